"""The "lmpress" attention function: per-module Q/K rotation (R3) and simulated KV quantization.

Hugging Face attention modules (LlamaAttention and friends) project Q, K, V, apply RoPE, update
the cache, then call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v,
mask, ...)``. Importing this module registers ``"lmpress"`` in that interface (and the sdpa mask
builder under the same name), so no model file is forked. The function reads the
`LmpressAttention` settings attached to the module as ``module.lmpress_attn``:

- ``qk``: an online transform of head_dim (R3, a Hadamard) applied to Q and K after RoPE.
  Q·Kᵀ is unchanged (the transform is orthogonal), and the keys are quantized in the rotated
  basis, where their outliers are spread across channels;
- ``kv``: `KVCacheArgs`. The per-token form (QuaRot: key_granularity token, residual 0) fake-
  quantizes K and V (B, kv_heads, T, head_dim) per head, per token, in groups along head_dim
  (`lmpress.quant.kv_cache.fake_quantize_kv`), or to FP8 E4M3 with static per-layer or per-head
  scales (the buffers `k_scale` / `v_scale`, calibrated under `observe_kv`), then calls the stock
  sdpa implementation. Any
  other setting is KIVI: per-channel keys, per-token values, a full-precision window of recent
  tokens and sinks, simulated decode-exactly (every query sees the cache as it is when that
  query is decoded; `lmpress.quant.kv_cache.kv_mixed_attention`);
- ``key_rotation``: RotateKV's pre-RoPE key transform (`KeyRotation`): with KIVI, keys are
  quantized after undoing RoPE (positions from ``position_ids``) and rotating; the dequantized
  keys are rotated back and RoPE re-applied (online).

The runtime cache `lmpress.kernels.kv_cache.QuantizedKVCache` returns keys/values whose first
tokens are already quantized (it tags the key tensor with how many, `RUNTIME_PREFIX_ATTR`); the
function quantizes only the rest, so simulation and runtime give the same attention. At a decode step it
hands over the layer instead (`DECODE_STATE_ATTR`), whose `decode_attention` attends over its codes.
Modules without settings pass straight through.

    attach_attention(model, arch, qk={0: OnlineHadamard(64, seed)}, kv=KVCacheArgs(...))
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Mapping

import torch
from torch import nn

from lmpress.quant.fp import E4M3
from lmpress.quant.kv_cache import (
    KeyRotation, apply_rope, check_kv_args, fake_quantize_keys_values, invert_rope, key_positions, kv_mixed_attention,
    quantized_copy,
)
from lmpress.quant.primitives import fake_quantize
from lmpress.quant.rope_scale import scale_qk
from lmpress.quant.scheme import KVCacheArgs, QuantArgs
from lmpress.quant.zipcache import zip_attention

from .online import transform_from_spec

FP8_TOKEN = QuantArgs(bits=8, type="float", granularity="token", dynamic=True)  # FP8 E4M3, one scale a row
log = logging.getLogger(__name__)
ATTN_IMPLEMENTATION = "lmpress"
SETTINGS_ATTR = "lmpress_attn"
RUNTIME_PREFIX_ATTR = "_lmpress_quantized_prefix"  # (keys, values) already quantized, set by QuantizedKVCache
ZIP_STATE_ATTR = "_lmpress_zip_state"  # the ZipCache layer of QuantizedKVCache: zip_tail, zip_commit
DECODE_STATE_ATTR = "_lmpress_decode_state"  # a QuantizedKVCache layer that attends one query itself: decode_attention
TOKEN_KV_ATTR = "_lmpress_token_kv"  # keys/values of the per-token form, transformed and quantized as they entered the cache


class LmpressAttention(nn.Module):
    """Settings of one attention module: optional online Q/K transform and KV fake-quant args."""

    def __init__(self, qk: nn.Module | None = None, kv: KVCacheArgs | None = None,
                 key_rotation: KeyRotation | None = None):
        super().__init__()
        self.qk = qk
        self.kv = kv
        self.key_rotation = key_rotation
        self._rope: list = []  # [the model's rotary embedding]: a reference, not a submodule
        self._qk_inv = None
        self._amax: dict | None = None  # {"k": (heads|1,), "v": ...} while `observe_kv` records
        self.register_buffer("k_scale", None)  # FP8 cache: static scales (1,) or (kv heads, 1, 1), once calibrated
        self.register_buffer("v_scale", None)
        self.register_buffer("qk_post_scale", None)  # (kv heads, head_dim): keys divided, queries multiplied after RoPE
        self.q_fp8 = False  # queries rounded to FP8 E4M3 per token and head (FireQ)
        self._qk_amax: dict | None = None  # {"q": (heads, D), "k": (kv heads, D)} while `observe_qk` records
        if kv is not None:
            check_kv_args(kv)

    def set_kv(self, kv: KVCacheArgs | None) -> None:
        if kv is not None:
            check_kv_args(kv)
        self.kv = kv

    def placeholder_kv_scales(self, kv_heads: int) -> None:
        """Buffers of the FP8 cache's scales in their shape, for `load_state_dict` to fill (load)."""
        shape = (kv_heads, 1, 1) if self.kv.scale == "head" else (1,)  # compressed-tensors' k_scale / v_scale shapes
        self.k_scale, self.v_scale = torch.ones(shape), torch.ones(shape)

    def _prepare_qk(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE-rotated query/key -> the post-RoPE scaling, then FP8 queries (`quant.rope_scale`)."""
        if self._qk_amax is not None:
            for name, x in (("q", query), ("k", key)):
                a = x.detach().abs().amax(dim=(0, 2)).float()  # (heads, D)
                self._qk_amax[name] = torch.maximum(self._qk_amax[name], a) if name in self._qk_amax else a
        if self.qk_post_scale is not None:
            query, key = scale_qk(query, key, self.qk_post_scale)
        if self.q_fp8:
            query = fake_quantize(query, FP8_TOKEN)  # rows (B, heads, T) of D: one scale per token and head
        return query, key

    def _observe(self, key: torch.Tensor, value: torch.Tensor) -> None:
        dims = (0, 2, 3) if self.kv.scale == "head" else (0, 1, 2, 3)
        for name, x in (("k", key), ("v", value)):
            a = x.detach().abs().amax(dim=dims).float().reshape(-1)  # (heads,) or (1,)
            self._amax[name] = torch.maximum(self._amax[name], a) if name in self._amax else a

    def set_rope(self, rotary: nn.Module | None) -> None:
        self._rope = [rotary] if rotary is not None else []

    @property
    def kivi(self) -> bool:
        return self.kv is not None and not self.kv.per_token_only

    @property
    def rotary(self) -> nn.Module | None:
        """The model's rotary embedding (attached with `set_rope`), or None."""
        return self._rope[0] if self._rope else None

    def rope_tables(self, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B|1, 1, T, D) float32, of the model's RoPE at `positions` (B|1, T)."""
        if not self._rope:
            raise RuntimeError("key_rotation needs the model's rotary embedding; attach it with attach_attention/restore_attention")
        cos, sin = self._rope[0](torch.empty(0, device=device, dtype=torch.float32), positions.to(device))  # (B|1, T, D)
        return cos[:, None], sin[:, None]

    def key_basis(self, positions: torch.Tensor | None, like: torch.Tensor, tables=None):
        """(to_basis, from_basis) mapping post-RoPE keys of positions `sl` (slices of `positions`,
        (B|1, T)) into the basis keys are quantized in and back, or (None, None). `tables`: the
        (cos, sin) of `rope_tables(positions)` when the caller already has them."""
        if self.key_rotation is not None:
            cos, sin = tables if tables is not None else self.rope_tables(positions, like.device)
            kr = self.key_rotation

            def to_basis(k, sl):  # in float32, or float64 for a float64 model
                return kr(invert_rope(k.to(torch.promote_types(k.dtype, torch.float32)), cos[:, :, sl], sin[:, :, sl]))

            def from_basis(kb, sl):
                return apply_rope(kr.inverse(kb.to(torch.promote_types(kb.dtype, torch.float32))),
                                  cos[:, :, sl], sin[:, :, sl]).to(like.dtype)

            return to_basis, from_basis
        if self.qk is not None:
            if self._qk_inv is None or self._qk_inv.device != like.device:
                self._qk_inv = self.qk.matrix(torch.float32).T.contiguous().to(like.device)
            qk, inv = self.qk, self._qk_inv
            return (lambda k, sl: qk(k)), (lambda kb, sl: torch.matmul(kb, inv.to(kb.dtype)))
        return None, None

    def kivi_attention(self, query, key, value, attention_mask, position_ids=None, scaling=None):
        """Decode-exact KIVI attention (see the module doc); returns (B, q_len, heads, D)."""
        if self.qk_post_scale is not None or self.q_fp8:
            raise ValueError("post-RoPE Q/K scaling and FP8 queries go with the per-token KV cache, not KIVI's "
                             "(its runtime cache holds keys before the attention function)")
        layer = getattr(key, DECODE_STATE_ATTR, None)
        if layer is not None:  # the runtime cache's decode step: attention over its codes, no dequantized prefix
            return layer.decode_attention(query, attention_mask, scaling, self.qk)
        prefix = getattr(key, RUNTIME_PREFIX_ATTR, (0, 0))
        positions = key_positions(key.shape[2], position_ids, device=key.device) if self.key_rotation is not None else None
        to_b, from_b = self.key_basis(positions, key)
        if self.kv.zipcache:  # the Q/K transform leaves q·k unchanged: only the basis keys are quantized in matters
            state = getattr(key, ZIP_STATE_ATTR, None)
            if state is None and query.shape[2] < key.shape[2] and not getattr(self, "_zip_warned", False):
                self._zip_warned = True
                log.warning("ZipCache decoding without lmpress's QuantizedKVCache: salient tokens are chosen from this "
                            "call's queries only; pass QuantizedKVCache(model) as the cache for the decode-exact cache")
            out, his, tail = zip_attention(query, key, value, self.kv, attention_mask, scaling, prefix[0],
                                           state.zip_tail if state is not None else None, to_b, from_b)
            if state is not None:
                state.zip_commit(his, tail)
            return out
        kq, vq = quantized_copy(key, value, self.kv, prefix, to_b, from_b)
        if self.qk is not None:
            query, key, kq = self.qk(query), self.qk(key), self.qk(kq)
        return kv_mixed_attention(query, key, value, kq, vq, self.kv, attention_mask, scaling)

    @property
    def active(self) -> bool:
        return (self.qk is not None or self.kv is not None or self.key_rotation is not None
                or self.qk_post_scale is not None or self.q_fp8)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if getattr(key, TOKEN_KV_ATTR, False):  # QuantizedKVCache's per-token layer did the keys' and values' part
            return (self.qk(query) if self.qk is not None else query), key, value
        query, key = self._prepare_qk(query, key)
        if self.qk is not None:
            query, key = self.qk(query), self.qk(key)
        if self.kv is not None and self.kv.per_token_only:
            if self._amax is not None:
                self._observe(key, value)
            key, value = fake_quantize_keys_values(key, value, self.kv, (self.k_scale, self.v_scale))
        return query, key, value

    def token_cache_misfit(self) -> str:
        """Why the runtime per-token layer (`kernels.kv_cache.PerTokenKVLayer`) cannot hold this attention's cache
        ('' when it can): it takes the per-token integer form with no post-RoPE scaling or FP8 queries."""
        if self.kv is None or not self.kv.per_token_only:
            return "no per-token KV settings"
        if self.kv.is_float:
            return "an FP8 cache (static scales): fake-quantized by the attention function"
        if self.qk_post_scale is not None or self.q_fp8:
            return "post-RoPE Q/K scaling or FP8 queries"
        return ""

    def spec(self) -> dict[str, Any]:
        if self.kv is not None and self.kv.is_float and self.k_scale is None:
            raise ValueError("the FP8 KV cache's scales were never calibrated: add stage `act_scales` after `kv_cache`")
        kv = self.kv.to_dict() if self.kv is not None else None
        if kv is not None and self.key_rotation is not None:
            kv["key_rotation"] = self.key_rotation.spec()
        rope = {"post": self.qk_post_scale is not None, "q_fp8": self.q_fp8}
        return {"qk": self.qk.spec() if self.qk is not None else None, "kv_cache": kv,
                "rope_scale": rope if any(rope.values()) else None}

    def extra_repr(self) -> str:
        kv = "none" if self.kv is None else f"KV{self.kv.bits} g{self.kv.group_size} {'sym' if self.kv.symmetric else 'asym'}"
        if self.kivi:
            kv += f" KIVI residual {self.kv.residual} sinks {self.kv.sink_tokens}"
        return f"kv={kv}"


def lmpress_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: settings of `module` (if any), then sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    settings = getattr(module, SETTINGS_ATTR, None)
    if settings is not None and settings.kivi:
        out = settings.kivi_attention(query, key, value, attention_mask, kwargs.get("position_ids"), kwargs.get("scaling"))
        return out, None
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
    attn_rel = arch.attention  # "self_attn"
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


@contextmanager
def cache_quant_off(module: nn.Module):
    """While active, the attention modules under `module` run without their KV fake-quant and
    RotateKV key rotation (the online Q/K transform stays): the attention as it is before the
    `kv_cache` and `rotate_kv` stages. Restored on exit."""
    saved = [(s, s.kv, s.key_rotation) for s in module.modules() if isinstance(s, LmpressAttention)]
    for s, _, _ in saved:
        s.kv, s.key_rotation = None, None
    try:
        yield
    finally:
        for s, kv, kr in saved:
            s.kv, s.key_rotation = kv, kr


@contextmanager
def observe_qk(module: nn.Module):
    """While active, the attention settings under `module` record the per-channel absmax of the
    RoPE-rotated queries (heads, D) and keys (kv heads, D) they see, before their post-RoPE
    scaling; yields {settings: that dict}, filled on exit."""
    mods = [s for s in module.modules() if isinstance(s, LmpressAttention)]
    out = {}
    for s in mods:
        s._qk_amax = out.setdefault(s, {})
    try:
        yield out
    finally:
        for s in mods:
            s._qk_amax = None


@contextmanager
def observe_kv(module: nn.Module):
    """While active, the FP8-cache attention modules under `module` record the absmax of the keys
    and values they cache (per tensor or per KV head, as their `scale` says); on exit each takes
    static scales absmax / 448 (`k_scale`, `v_scale`; 1 where a head was all zero)."""
    mods = [s for s in module.modules() if isinstance(s, LmpressAttention) and s.kv is not None and s.kv.is_float]
    for s in mods:
        s._amax = {}
    try:
        yield mods
    finally:
        for s in mods:
            amax, s._amax = s._amax, None
            if amax:
                shape = (-1, 1, 1) if s.kv.scale == "head" else (1,)  # (kv heads, 1, 1) or (1,), as placeholder_kv_scales
                s.k_scale, s.v_scale = (torch.where(amax[n] > 0, amax[n] / E4M3.max, torch.ones_like(amax[n])).reshape(shape)
                                        for n in ("k", "v"))


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


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The model's shared rotary embedding module (transformers' *RotaryEmbedding), if any."""
    for _, m in model.named_modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            return m
    return None


def attach_attention(
    model: nn.Module,
    arch,
    qk: Mapping[int, nn.Module] | None = None,
    kv: KVCacheArgs | None = None,
    key_rotation: Mapping[int, KeyRotation] | None = None,
) -> None:
    """Attach settings to every layer's attention: `qk` maps layer index -> online Q/K transform
    (layers not in it keep theirs), `kv` (if given) sets the KV fake-quant args of every layer,
    `key_rotation` maps layer index -> RotateKV pre-RoPE key transform."""
    rotary = find_rotary(model) if key_rotation else None
    if key_rotation and rotary is None:
        raise ValueError("key_rotation (pre-RoPE) needs a model with a rotary embedding module")
    for i, (_, attn) in enumerate(attention_modules(model, arch)):
        s = settings_of(attn, create=True)
        head_dim = getattr(attn, "head_dim", None)
        if qk is not None and i in qk:
            if head_dim is not None and qk[i].size != head_dim:
                raise ValueError(f"layer {i}: Q/K transform of size {qk[i].size} does not match head_dim {head_dim}")
            s.qk = qk[i]
        if kv is not None:
            check_kv_args(kv, head_dim)
            s.set_kv(kv)
        if key_rotation is not None and i in key_rotation:
            s.key_rotation = key_rotation[i]
            s.set_rope(rotary)
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
    rotary = find_rotary(model)
    for fqn, spec in specs.items():
        attn = model.get_submodule(fqn)
        s = settings_of(attn, create=True)
        s.qk = transform_from_spec(spec["qk"]) if spec.get("qk") else None
        kv = dict(spec["kv_cache"]) if spec.get("kv_cache") else None
        rot = kv.pop("key_rotation", None) if kv is not None else None
        s.set_kv(KVCacheArgs.from_dict(kv) if kv is not None else None)
        if s.kv is not None and s.kv.is_float:
            s.placeholder_kv_scales(model.config.num_key_value_heads)
        rope = spec.get("rope_scale") or {}
        s.q_fp8 = bool(rope.get("q_fp8"))
        if rope.get("post"):  # filled by load_state_dict
            s.qk_post_scale = torch.ones(model.config.num_key_value_heads, getattr(attn, "head_dim"))
        s.key_rotation = KeyRotation.from_spec(rot) if rot else None
        if rot:
            s.set_rope(rotary)
    use_lmpress_attention(model)


__all__ = [
    "ATTN_IMPLEMENTATION", "RUNTIME_PREFIX_ATTR", "ZIP_STATE_ATTR", "LmpressAttention", "find_rotary", "lmpress_attention_forward", "register", "attention_modules",
    "attach_attention", "attention_specs", "restore_attention", "use_lmpress_attention", "settings_of", "observe_kv", "observe_qk",
]
