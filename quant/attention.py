"""The "lmpress" attention function: per-module Q/K rotation (R3) and simulated KV quantization.

Hugging Face attention modules (LlamaAttention and friends) project Q, K, V, apply RoPE, update
the cache, then call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v,
mask, ...)``. Importing this module registers ``"lmpress"`` in that interface (and the sdpa mask
builder under the same name), so no model file is forked. The function reads the
`LmpressAttention` settings attached to the module as ``module.lmpress_attn``:

- ``qk``: an online transform of head_dim (R3, a Hadamard) applied to Q and K after RoPE.
  Q·Kᵀ is unchanged (the transform is orthogonal), and the keys are quantized in the rotated
  basis, where their outliers are spread across channels;
- ``kv``: `KVCacheArgs`; K and V (B, kv_heads, T, head_dim) are fake-quantized per head, per
  token, in groups along head_dim (`lmpress.quant.kv_cache.fake_quantize_kv`),

then calls the stock sdpa implementation. Modules without settings pass straight through.

    attach_attention(model, arch, qk={0: OnlineHadamard(64, seed)}, kv=KVCacheArgs(...))
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lmpress.kernels.online import transform_from_spec

from .kv_cache import check_kv_args, fake_quantize_kv
from .scheme import KVCacheArgs

ATTN_IMPLEMENTATION = "lmpress"
SETTINGS_ATTR = "lmpress_attn"


class LmpressAttention(nn.Module):
    """Settings of one attention module: optional online Q/K transform and KV fake-quant args."""

    def __init__(self, qk: nn.Module | None = None, kv: KVCacheArgs | None = None):
        super().__init__()
        self.qk = qk
        self.kv = kv
        if kv is not None:
            check_kv_args(kv)

    def set_kv(self, kv: KVCacheArgs | None) -> None:
        if kv is not None:
            check_kv_args(kv)
        self.kv = kv

    @property
    def active(self) -> bool:
        return self.qk is not None or self.kv is not None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self.qk is not None:
            query, key = self.qk(query), self.qk(key)
        if self.kv is not None:
            kv = self.kv
            key = fake_quantize_kv(key, kv.bits, kv.group_size, symmetric=kv.symmetric)
            value = fake_quantize_kv(value, kv.bits, kv.group_size, symmetric=kv.symmetric)
        return query, key, value

    def spec(self) -> dict[str, Any]:
        return {
            "qk": self.qk.spec() if self.qk is not None else None,
            "kv_cache": self.kv.to_dict() if self.kv is not None else None,
        }

    def extra_repr(self) -> str:
        kv = "none" if self.kv is None else f"KV{self.kv.bits} g{self.kv.group_size} {'sym' if self.kv.symmetric else 'asym'}"
        return f"kv={kv}"


def lmpress_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: settings of `module` (if any), then sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    settings = getattr(module, SETTINGS_ATTR, None)
    if settings is not None:
        query, key, value = settings(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_REGISTERED = False


def register() -> None:
    """Register "lmpress" with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, lmpress_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _REGISTERED = True


register()


# --------------------------------------------------------------------------- model level


def attention_modules(model: nn.Module, arch) -> list[tuple[str, nn.Module]]:
    """(fqn, attention module) of every decoder layer, in order."""
    layers_path = arch.layers
    attn_rel = arch.q_proj.rpartition(".")[0]  # "self_attn"
    out = []
    for i, layer in enumerate(arch.decoder_layers(model)):
        out.append((f"{layers_path}.{i}.{attn_rel}", layer.get_submodule(attn_rel)))
    return out


def settings_of(attn: nn.Module, create: bool = False) -> LmpressAttention | None:
    s = getattr(attn, SETTINGS_ATTR, None)
    if s is None and create:
        s = LmpressAttention()
        attn.add_module(SETTINGS_ATTR, s)
    return s


def use_lmpress_attention(model: nn.Module) -> None:
    """Point the model (and its config) at the "lmpress" attention function."""
    register()
    if getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        return
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (AttributeError, ValueError, KeyError):
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.config._attn_implementation = ATTN_IMPLEMENTATION


def attach_attention(
    model: nn.Module,
    arch,
    qk: Mapping[int, nn.Module] | None = None,
    kv: KVCacheArgs | None = None,
) -> None:
    """Attach settings to every layer's attention: `qk` maps layer index -> online Q/K transform
    (layers not in it keep theirs), `kv` (if given) sets the KV fake-quant args of every layer."""
    if kv is not None:
        check_kv_args(kv)
    for i, (_, attn) in enumerate(attention_modules(model, arch)):
        s = settings_of(attn, create=True)
        if qk is not None and i in qk:
            head_dim = getattr(attn, "head_dim", None)
            if head_dim is not None and qk[i].size != head_dim:
                raise ValueError(f"layer {i}: Q/K transform of size {qk[i].size} does not match head_dim {head_dim}")
            s.qk = qk[i]
        if kv is not None:
            s.set_kv(kv)
    use_lmpress_attention(model)


def attention_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{attention fqn: {"qk": transform spec | None, "kv_cache": KVCacheArgs dict | None}} of
    every module that carries active settings."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LmpressAttention) and mod.active:
            out[name.rpartition(".")[0]] = mod.spec()
    return out


def restore_attention(model: nn.Module, specs: Mapping[str, Mapping[str, Any]]) -> None:
    """Rebuild the settings recorded by `attention_specs` (at load time)."""
    if not specs:
        return
    for fqn, spec in specs.items():
        attn = model.get_submodule(fqn)
        s = settings_of(attn, create=True)
        s.qk = transform_from_spec(spec["qk"]) if spec.get("qk") else None
        s.set_kv(KVCacheArgs.from_dict(spec["kv_cache"]) if spec.get("kv_cache") else None)
    use_lmpress_attention(model)


__all__ = [
    "ATTN_IMPLEMENTATION", "LmpressAttention", "lmpress_attention_forward", "register", "attention_modules",
    "attach_attention", "attention_specs", "restore_attention", "use_lmpress_attention", "settings_of",
]
