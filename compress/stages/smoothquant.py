"""Stage `smoothquant`: per-channel smoothing of the inputs of q/k/v (from the input norm),
gate/up (from the post-attention norm) and down_proj (from up_proj), using activation ranges
measured layer by layer on the calibration data. Exact in float; it makes per-token int8
activations lose less (W8A8). `smooth_layer` is the body for one decoder layer; under `--lazy`
it measures the ranges on the inputs the layer receives there (the earlier layers already
compressed), in memory on the inputs through the smoothed, not yet quantized, earlier layers."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.quant.smooth import fold_smoothing, smoothing_factors

from ..stage import register_stage

log = logging.getLogger(__name__)


@register_stage("smoothquant", needs_calibration=True)
@dataclass(frozen=True)
class SmoothQuant:
    alpha: float = 0.5
    down_proj: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant.alpha={self.alpha!r} must be a number in [0, 1] (0.5 is the paper's default)")

    def apply(self, model, ctx) -> None:
        for step in LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=ctx.batch_size, device=ctx.device):
            self.smooth_layer(step, ctx.arch)

    def smooth_layer(self, step, arch) -> None:
        """Measure the input ranges of one decoder layer on its calibration inputs (`step.forward()`)
        and fold the smoothing into it: the per-layer body, which `--lazy` calls too."""
        # (producer, readers): the producer's output is the readers' input
        groups = [(arch.input_norm, (arch.q_proj, arch.k_proj, arch.v_proj)), (arch.post_attn_norm, (arch.gate_proj, arch.up_proj))]
        if self.down_proj:
            groups.append((arch.up_proj, (arch.down_proj,)))
        amax: dict[str, torch.Tensor] = {}
        hooks = []
        for _, readers in groups:
            def hook(_m, args, key=readers[0]):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)  # (in,)
                amax[key] = torch.maximum(amax[key], x) if key in amax else x
            hooks.append(step.layer.get_submodule(readers[0]).register_forward_pre_hook(hook))
        try:
            step.forward(until=[step.layer.get_submodule(readers[0]) for _, readers in groups])  # nothing after them is needed
        finally:
            for h in hooks:
                h.remove()
        for producer, readers in groups:
            mods = [step.layer.get_submodule(r) for r in readers]
            if not all(isinstance(m, torch.nn.Linear) for m in mods):
                raise ValueError(f"smoothquant must run before quantization stages: {step.name}.{readers[0]} is already {type(mods[0]).__name__}")
            s = smoothing_factors(amax[readers[0]], [m.weight for m in mods], self.alpha)
            prod = step.layer.get_submodule(producer)
            offset = arch.norm_offset if producer in arch.norm_readers else 0.0  # a norm's gain, not a linear's weight
            fold_smoothing(s, prod.weight, mods, getattr(prod, "bias", None), offset)
        log.info("smoothquant: %s smoothed", step.name)
