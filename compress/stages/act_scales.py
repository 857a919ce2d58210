"""Stage `act_scales`: calibrate static activation scales, layer by layer on the calibration set.

Schemes whose inputs say `dynamic: false` quantize activations with one calibrated scale: FP8 or
INT8 per tensor (`input_scale` = absmax / the format's largest value), or NVFP4, whose per-tensor
scale is calibrated while its group scales are still computed at run time (compressed-tensors'
`input_global_scale`). The scale is the absmax of the module's input over every calibration
token (the min-max observer). Each decoder layer sees the outputs of the layers before it, with
their weights and static scales already in place; inside a layer the linears go in
`arch.sequential_groups` order, so o_proj's scale is measured on an attention output computed
with q/k/v's static quantization. Put it after the weight stage (`rtn`); stage `gptq` calibrates
the scales of the modules it quantizes itself (`gptq.observe_inputs`), before their Hessians. The
same pass calibrates COMET's channel order (`inputs.outliers`, `quant.fmpq`): the channels by their
absmax over the calibration tokens, largest first.

It also calibrates the FP8 KV cache (`kv_cache: {type: float, scale: tensor|head}`, placed by
stage `kv_cache` before it): per layer, after the layer's input scales, the absmax of the keys
(after RoPE and any online Q/K transform) and values it caches, per tensor or per KV head, over
the calibration set; `k_scale` / `v_scale` = absmax / 448.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from lmpress.calibration.layerwise import LayerwiseRunner, group_passes
from lmpress.kernels.attention import LmpressAttention, observe_kv

from ..stage import register_stage
from ..surgery import get_module, to_sim
from .gptq import observe_inputs, static_outside_layers

log = logging.getLogger(__name__)


@register_stage("act_scales", needs_calibration=True)
@dataclass(frozen=True)
class ActScales:
    def apply(self, model, ctx) -> None:
        static_outside_layers(model, ctx, ctx.plan)
        for fqn, scheme in ctx.plan.items():
            to_sim(model, fqn, scheme)
        n_layers = len(ctx.arch.decoder_layers(model))
        by_layer: dict[int, list[str]] = {}
        for fqn in ctx.plan:
            if get_module(model, fqn).calibrated_inputs:
                idx, rel = ctx.arch.layer_of(fqn, n_layers)
                by_layer.setdefault(idx, []).append(rel)
        fp8_kv = ctx.kv_cache is not None and ctx.kv_cache.is_float
        if fp8_kv and not any(isinstance(m, LmpressAttention) and m.kv is not None for m in model.modules()):
            raise ValueError("act_scales calibrates the FP8 KV cache's scales: put stage kv_cache before it")
        if not by_layer and not fp8_kv:
            log.info("act_scales: no static activation scale and no FP8 KV cache; nothing to calibrate")
            return
        for step in LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=ctx.batch_size, device=ctx.device):
            rels = by_layer.get(step.index, [])
            for targets, later in group_passes(ctx.arch.sequential_groups, set(rels)):
                observe_inputs(step, targets, later)
            if fp8_kv:
                with observe_kv(step.layer):  # the attention runs before o_proj
                    step.forward(until=[step.layer.get_submodule(ctx.arch.o_proj)])
            log.info("act_scales: %s: %d static scales%s", step.name, len(rels), " + FP8 KV scales" if fp8_kv else "")
