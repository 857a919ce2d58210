"""Stage `mergequant`: MergeQuant's static per-channel activation quantization (quantization step
migration), so that no dynamic quantization op is left at run time.

For each group of linears reading one tensor (q/k/v the input norm's output, gate/up the
post-attention norm's, o_proj the attention output from v_proj, down_proj the MLP product from
up_proj), a static step per input channel is calibrated (`lmpress.quant.smooth.static_channel_steps`:
the channel's abs-max over the first `samples` calibration sequences, shrunk per channel by the
clip ratio with the least squared error when `clip_search`). The steps are migrated: the producer
(an RMSNorm gain, or v_proj's / up_proj's rows) is divided by them and the readers' columns
multiplied by them, exact in float. The readers' inputs are then quantized by rounding alone: their
static per-tensor `input_scale` is fixed to 1 (stages `gptq` and `act_scales` leave it). Under
grouped-query attention a KV channel serves several query heads: o_proj's channel steps are the
largest over the heads that read it.

The schemes of the readers must quantize inputs statically: symmetric int, per tensor,
`dynamic: false`. Place it before the weight stage, which then quantizes the migrated weights.

```yaml
schemes: {default: {weights: {bits: 4, granularity: channel, symmetric: true},
                    inputs: {bits: 4, granularity: tensor, symmetric: true, dynamic: false}}}
stages: [{mergequant: {clip_search: true, samples: 16}}, gptq]
```
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.quant.primitives import without_sinks
from lmpress.quant.smooth import fold_smoothing, static_channel_steps

from ..stage import register_stage
from ..surgery import to_sim

log = logging.getLogger(__name__)


@register_stage("mergequant", needs_calibration=True)
@dataclass(frozen=True)
class MergeQuant:
    clip_search: bool = True
    o_proj: bool = True
    down_proj: bool = True
    samples: int = 16

    def __post_init__(self) -> None:
        for key in ("clip_search", "o_proj", "down_proj"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"mergequant.{key}={getattr(self, key)!r} must be true or false")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise ValueError(f"mergequant.samples={self.samples!r} must be a positive integer")

    def groups(self, arch) -> list[tuple[str, tuple[str, ...]]]:
        """(producer, readers) of one decoder layer."""
        out = [(arch.input_norm, (arch.q_proj, arch.k_proj, arch.v_proj)), (arch.post_attn_norm, (arch.gate_proj, arch.up_proj))]
        if self.o_proj:
            out.append((arch.v_proj, (arch.o_proj,)))
        if self.down_proj:
            out.append((arch.up_proj, (arch.down_proj,)))
        return out

    def apply(self, model, ctx) -> None:
        n_layers = len(ctx.arch.decoder_layers(model))
        tokens = ctx.calib.tokens[: self.samples]
        for step in LayerwiseRunner(model, ctx.arch, tokens, batch_size=ctx.batch_size, device=ctx.device):
            prefix = f"{ctx.arch.layers}.{step.index}."
            schemes = {rel: ctx.plan.get(prefix + rel) for _, readers in self.groups(ctx.arch) for rel in readers}
            self.merge_layer(step, ctx.arch, schemes, model.config)
            for rel, scheme in schemes.items():
                sim = to_sim(model, prefix + rel, scheme)
                sim.input_scale = torch.ones(1, 1, dtype=torch.float32, device=sim.weight.device)
                sim.input_scale_fixed = True  # the steps live in the weights: calibration must not rescale
            log.info("mergequant: %s: steps migrated into %d groups (%d of %d layers)", step.name,
                     len(self.groups(ctx.arch)), step.index + 1, n_layers)
        if ctx.report is not None:
            ctx.report.extra["mergequant"] = {"clip_search": self.clip_search, "o_proj": self.o_proj,
                                              "down_proj": self.down_proj, "samples": int(tokens.shape[0])}

    @torch.no_grad()
    def merge_layer(self, step, arch, schemes: dict, config) -> None:
        """Calibrate and migrate the steps of one decoder layer (`schemes`: reader path -> its scheme)."""
        layer = step.layer
        groups = self.groups(arch)
        for _, readers in groups:
            for rel in readers:
                a = schemes[rel].inputs if schemes[rel] is not None else None
                if a is None or a.dynamic or a.type != "int" or not a.symmetric or a.granularity != "tensor":
                    raise ValueError(f"mergequant: {step.name}.{rel} must quantize inputs statically (inputs: {{bits: 4, "
                                     "granularity: tensor, symmetric: true, dynamic: false}): the migrated steps leave "
                                     "a static scale of 1")
                if not isinstance(layer.get_submodule(rel), torch.nn.Linear):
                    raise ValueError(f"mergequant must run before quantization stages and online transforms: "
                                     f"{step.name}.{rel} is a {type(layer.get_submodule(rel)).__name__}")
        xs: dict[str, list[torch.Tensor]] = {readers[0]: [] for _, readers in groups}

        def keep(key, _m, a):  # the reader's input (B, T, in) -> (B * (T - sinks), in): sink positions stay float
            x = without_sinks(a[0].detach(), schemes[key].inputs)
            xs[key].append(x.reshape(-1, x.shape[-1]).float().cpu())

        hooks = [layer.get_submodule(readers[0]).register_forward_pre_hook(partial(keep, readers[0])) for _, readers in groups]
        try:
            step.forward(until=[layer.get_submodule(readers[0]) for _, readers in groups])
        finally:
            for h in hooks:
                h.remove()
        for producer, readers in groups:
            mods = [layer.get_submodule(r) for r in readers]
            steps = static_channel_steps(torch.cat(xs[readers[0]]), schemes[readers[0]].inputs, self.clip_search)  # (in,)
            prod = layer.get_submodule(producer)
            if producer == arch.v_proj and prod.out_features != mods[0].in_features:  # grouped-query attention
                kv, q = prod.out_features, mods[0].in_features
                head_dim = q // config.num_attention_heads
                g = q // kv
                s_v = steps.reshape(kv // head_dim, g, head_dim).amax(dim=1).reshape(-1)  # (kv,): the largest over a KV head's readers
                s_o = s_v.reshape(kv // head_dim, head_dim).repeat_interleave(g, dim=0).reshape(-1)  # (q,): as repeat_kv
                fold_smoothing(s_v.to(prod.weight.device), prod.weight, [], getattr(prod, "bias", None))
                for m in mods:
                    m.weight.copy_((m.weight.double() * s_o.to(m.weight.device).double()[None, :]).to(m.weight.dtype))
                continue
            offset = arch.norm_offset if producer in arch.norm_readers else 0.0  # a norm's gain, not a linear's weight
            fold_smoothing(steps.to(prod.weight.device), prod.weight, mods, getattr(prod, "bias", None), offset)
