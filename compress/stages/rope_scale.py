"""Stage `rope_scale`: FireQ's Q/K scaling around RoPE (`lmpress.quant.rope_scale`), calibrated
layer by layer, and optionally FP8 queries.

Per decoder layer, on the calibration inputs the layer receives:
1. pre-RoPE (`pre: true`): the per-channel absmax of q_proj's and k_proj's outputs gives one
   factor per (KV head, RoPE pair), folded into q_proj / k_proj (exact in float);
2. post-RoPE (`post: true`): with that folded, the per-channel absmax of the rotated queries and
   keys gives one factor per (KV head, channel), applied online by the "lmpress" attention;
3. `q_fp8: true`: queries rounded to FP8 E4M3 per token and head at run time.

Run it before the weight stages (it changes q_proj / k_proj) and with the per-token KV cache
(`kv_cache: {key_granularity: token}`), whose keys are quantized inside the attention function
after the scaling; KIVI's runtime cache holds keys before it, so KIVI settings are refused.

```yaml
- rope_scale: {alpha: 0.5, pre: true, post: true, q_fp8: true}
```
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.kernels.attention import observe_qk, settings_of, use_lmpress_attention
from lmpress.quant.rope_scale import balance, fold_pre_rope, pair_shared, per_kv_group

from ..stage import register_stage

log = logging.getLogger(__name__)


@register_stage("rope_scale", needs_calibration=True)
@dataclass(frozen=True)
class RopeScale:
    alpha: float = 0.5
    pre: bool = True
    post: bool = True
    q_fp8: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"rope_scale.alpha={self.alpha!r} must be a number in [0, 1] (0.5 balances keys and queries)")
        for key in ("pre", "post", "q_fp8"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"rope_scale.{key}={getattr(self, key)!r} must be true or false")

    def apply(self, model: nn.Module, ctx) -> None:
        if ctx.kv_cache is not None and not ctx.kv_cache.per_token_only:
            raise ValueError("rope_scale goes with the per-token KV cache (key_granularity: token, residual 0, no sinks); "
                             "KIVI's runtime cache holds keys before the post-RoPE scaling")
        cfg = model.config
        n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        use_lmpress_attention(model)
        arch = ctx.arch
        for step in LayerwiseRunner(model, arch, ctx.calib.tokens, batch_size=ctx.batch_size, device=ctx.device):
            attn = step.layer.get_submodule(arch.attention)
            q_proj, k_proj = step.layer.get_submodule(arch.q_proj), step.layer.get_submodule(arch.k_proj)
            if type(q_proj) is not nn.Linear or type(k_proj) is not nn.Linear:
                raise ValueError(f"rope_scale must run before the weight stages: {step.name}.{arch.q_proj} is {type(q_proj).__name__}")
            d = q_proj.out_features // n_heads
            o_proj = step.layer.get_submodule(arch.o_proj)
            if self.pre:
                amax = self._output_ranges(step, {"q": q_proj, "k": k_proj}, o_proj)
                s = pair_shared(balance(amax["k"].reshape(n_kv, d), per_kv_group(amax["q"].reshape(n_heads, d), n_kv), self.alpha))
                fold_pre_rope(q_proj, k_proj, s, n_heads)
            settings = settings_of(attn, create=True)
            if self.post:
                with observe_qk(attn) as seen:
                    step.forward(until=[o_proj])  # the attention function runs before o_proj
                r = seen[settings]
                settings.qk_post_scale = balance(r["k"], per_kv_group(r["q"], n_kv), self.alpha)
            settings.q_fp8 = self.q_fp8
            log.info("rope_scale: %s: pre %s, post %s, FP8 queries %s", step.name, self.pre, self.post, self.q_fp8)

    @staticmethod
    def _output_ranges(step, mods: dict[str, nn.Module], until: nn.Module) -> dict[str, torch.Tensor]:
        """Per-output-channel absmax of `mods` over the calibration batches of this layer."""
        amax: dict[str, torch.Tensor] = {}

        def hook(name, _m, _args, out):
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(dim=0).float()  # (out_features,)
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        hooks = [m.register_forward_hook(partial(hook, name)) for name, m in mods.items()]
        try:
            step.forward(until=[until])
        finally:
            for h in hooks:
                h.remove()
        return amax
