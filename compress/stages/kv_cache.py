"""Stages `kv_cache` and `rotate_kv`. `kv_cache`: simulated KV-cache quantization with the recipe's top-level `kv_cache`
settings. It attaches them to every attention module and switches the model to the "lmpress"
attention function (`lmpress.kernels.attention`), which fake-quantizes K and V per head, per
token, in groups along head_dim (after the online Q/K rotation when `rotate` asked for one), or,
for KIVI settings (per-channel keys, residual window, sinks), simulates the quantized cache
decode-exactly; `lmpress.kernels.kv_cache.QuantizedKVCache` is the runtime cache for them.
Place it before the weight quantization stages so calibration sees the quantized cache. No
options; the settings come from the recipe:

```yaml
kv_cache: {bits: 4, group_size: 64, key_granularity: token}
stages: [fuse_norms, rotate, kv_cache, rtn]
```
"""
from __future__ import annotations

from dataclasses import dataclass

from lmpress.kernels.attention import attach_attention

from ..stage import register_stage


@register_stage("kv_cache")
@dataclass(frozen=True)
class KVCache:
    def apply(self, model, ctx) -> None:
        if ctx.kv_cache is None:
            raise ValueError(
                "stage kv_cache needs the recipe's top-level `kv_cache:` settings, e.g. "
                "`kv_cache: {bits: 4, group_size: 64, key_granularity: token}`"
            )
        attach_attention(model, ctx.arch, kv=ctx.kv_cache)
        if ctx.report is not None:
            ctx.report.extra["kv_cache"] = ctx.kv_cache.to_dict()


@register_stage("rotate_kv", needs_calibration=True)
@dataclass(frozen=True)
class RotateKV:
    """RotateKV's rotations (Su et al. 2025, arXiv:2501.16383) for the KIVI cache:

    - keys: pre-RoPE, the channels of each group of `group_heads` KV heads (0 = all) are
      reordered by their calibration abs-max (`zigzag_order`: large channels dealt evenly over
      the Hadamard blocks; `reorder: false` keeps the identity) and multiplied by a Hadamard of
      blocks of `block` channels (0 = the whole group); applied online around the cache
      (`KeyRotation`, in the "lmpress" attention function and `QuantizedKVCache`);
    - values (`values: true`): a per-layer Hadamard of head_dim folded into v_proj and o_proj
      (the cache holds v·Q; QuaRot's R2 does the same, so leave it off after `rotate`).

    `samples` calibration sequences feed the channel statistics. Must run before weight
    quantization when `values` is true.

    ```yaml
    - rotate_kv: {group_heads: 0, block: 64, reorder: true, values: true, seed: 0, samples: 16}
    ```
    """

    group_heads: int = 0
    block: int = 0
    reorder: bool = True
    values: bool = True
    seed: int = 0
    samples: int = 16

    def __post_init__(self) -> None:
        for key in ("group_heads", "block", "seed"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"rotate_kv.{key}={v!r} must be a non-negative integer")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise ValueError(f"rotate_kv.samples={self.samples!r} must be a positive integer")
        for key in ("reorder", "values"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"rotate_kv.{key}={getattr(self, key)!r} must be true or false")

    def geometry(self, cfg, arch, layer0) -> dict:
        """The KV heads, head_dim, heads a group and Hadamard block (checked against the model)."""
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = arch.head_dim(layer0, cfg)
        gh = self.group_heads or n_kv
        if n_kv % gh:
            raise ValueError(f"rotate_kv.group_heads={self.group_heads} must divide the {n_kv} KV heads")
        block = self.block or gh * head_dim
        if (gh * head_dim) % block:
            raise ValueError(f"rotate_kv.block={self.block} must divide group_heads*head_dim={gh * head_dim}")
        return {"n_heads": n_heads, "n_kv": n_kv, "head_dim": head_dim, "group_heads": gh, "block": block}

    def key_rotation(self, i: int, geo: dict, key_absmax=None):
        """Layer i's KeyRotation; `key_absmax` (n_kv*head_dim,) orders its channels (None: identity)."""
        from lmpress.quant.kv_cache import KeyRotation, zigzag_order
        from lmpress.quant.rotate import sub_seed

        gh, block = geo["group_heads"], geo["block"]
        perm = None
        if key_absmax is not None:
            mag = key_absmax.reshape(geo["n_kv"] // gh, gh * geo["head_dim"])  # (groups, size): pre-RoPE key channel abs-max
            perm = [zigzag_order(m, block).tolist() for m in mag]
        return KeyRotation(geo["n_kv"], geo["head_dim"], gh, block, sub_seed(self.seed, "rotatekv-k", i), perm)

    def fold_values(self, layer, i: int, arch, geo: dict) -> None:
        """Layer i's per-head value Hadamard, folded into v_proj and o_proj (`values: true`)."""
        import torch

        from lmpress.quant.kv_cache import fold_value_rotation
        from lmpress.quant.rotate import rotation_matrix, sub_seed

        v = layer.get_submodule(arch.v_proj)
        o = layer.get_submodule(arch.o_proj)
        o = getattr(o, "linear", o)  # a RotatedInput wrapper keeps the linear inside
        if not (isinstance(v, torch.nn.Linear) and isinstance(o, torch.nn.Linear)):
            raise ValueError("rotate_kv with values: true must run before weight quantization (rtn/gptq)")
        Q = rotation_matrix(geo["head_dim"], "hadamard", sub_seed(self.seed, "rotatekv-v", i))
        fold_value_rotation(v, o, geo["n_heads"], geo["n_kv"], Q)

    def layer_key_absmax(self, step, arch):
        """The abs-max of every pre-RoPE key channel of one layer over the first `samples`
        sequences of its inputs (`step.forward()`): the per-layer form of the statistics pass."""
        return _absmax_hooked(step.layer.get_submodule(arch.k_proj), self.samples,
                              lambda: step.forward(until=[step.layer.get_submodule(arch.o_proj)]))

    def apply(self, model, ctx) -> None:
        layers = ctx.arch.decoder_layers(model)
        geo = self.geometry(model.config, ctx.arch, layers[0])
        stats = _key_absmax(model, ctx, self.samples) if self.reorder else None
        rotations = {}
        for i, layer in enumerate(layers):
            rotations[i] = self.key_rotation(i, geo, stats[i] if stats is not None else None)
            if self.values:
                self.fold_values(layer, i, ctx.arch, geo)
        attach_attention(model, ctx.arch, key_rotation=rotations)
        self.record(ctx, geo)

    def record(self, ctx, geo: dict) -> None:
        if ctx.report is not None:
            ctx.report.extra["rotate_kv"] = {"group_heads": geo["group_heads"], "block": geo["block"],
                                             "reorder": self.reorder, "values": self.values, "seed": self.seed}


def _absmax_hooked(k_proj, samples: int, run) -> "torch.Tensor":
    """Abs-max over the first `samples` sequences of k_proj's output channels while `run()` runs."""
    import torch

    seen = {"rows": 0, "amax": None}

    def hook(_m, _inp, out):
        take = out[: max(0, samples - seen["rows"])]  # (b, T, n_kv*head_dim): only the first `samples` sequences
        seen["rows"] += out.shape[0]
        if take.shape[0]:
            a = take.detach().abs().reshape(-1, out.shape[-1]).amax(0).float().cpu()
            seen["amax"] = a if seen["amax"] is None else torch.maximum(seen["amax"], a)

    h = k_proj.register_forward_hook(hook)
    try:
        run()
    finally:
        h.remove()
    return seen["amax"]


def _key_absmax(model, ctx, samples: int):
    """Per layer, the abs-max over calibration tokens of every pre-RoPE key channel (k_proj's output), (n_kv*head_dim,)."""
    import torch

    tokens = ctx.calib.tokens[:samples]
    stats: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(ctx.arch.decoder_layers(model)):
        def hook(_m, _inp, out, i=i):
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float().cpu()
            stats[i] = a if i not in stats else torch.maximum(stats[i], a)
        hooks.append(layer.get_submodule(ctx.arch.k_proj).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in range(0, tokens.shape[0], max(1, ctx.batch_size)):
                model(tokens[b:b + ctx.batch_size].to(ctx.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats
