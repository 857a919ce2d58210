"""Stage `squeezellm`: dense-and-sparse codebook quantization of the weights (SqueezeLLM,
`lmpress.quant.squeezellm`), replacing each weight-quantized linear of the plan with a `LUTLinear`.

The codebook width is the scheme's weight `bits` (2, 3 or 4); the scheme's grid settings (group
size, symmetry) do not apply, since each output channel gets its own non-uniform table. Schemes
that quantize activations are refused: this is a weight-only method. The sensitivity is the
empirical Fisher diagonal of the calibration loss (`quant.mixed.empirical_fisher`: one forward and
backward pass of the float model per calibration sequence, every linear at once, as SqueezeLLM
computes it once on the original model); `fisher: false` gives plain k-means.

    schemes: {lm_head: null, "re:.*": {preset: W3A16}}
    stages: [{squeezellm: {outliers: 0.004, sensitive: 0.0005}}]     # recipe w3a16-squeezellm

The report records per module the bits per weight stored (codes, codebooks, CSR) and the sparse
entries, and in `report.extra["squeezellm"]` the weighted average bits and the seconds spent.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lmpress.kernels.linear import LUTLinear
from lmpress.quant.mixed import empirical_fisher
from lmpress.quant.primitives import quant_error
from lmpress.quant.squeezellm import KMEANS_ITERS, squeeze

from ..stage import register_stage
from ..surgery import set_module

log = logging.getLogger(__name__)


@register_stage("squeezellm", needs_calibration=True)
@dataclass(frozen=True)
class SqueezeLLM:
    outliers: float = 0.004  # share of entries kept exactly for their magnitude (the paper's 0.40%)
    sensitive: float = 0.0005  # share kept exactly for their Fisher weight (the paper's 0.05%)
    fisher: bool = True  # weight the k-means by the Fisher diagonal; false: plain k-means
    iters: int = KMEANS_ITERS  # Lloyd iterations at most
    max_sequences: int | None = None  # calibration sequences for the Fisher pass (None: all)

    def __post_init__(self) -> None:
        for key in ("outliers", "sensitive"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 0.5:
                raise ValueError(f"squeezellm.{key}={v!r} must be a share in [0, 0.5), e.g. 0.004 for 0.4%")
        if not isinstance(self.fisher, bool):
            raise ValueError(f"squeezellm.fisher={self.fisher!r} must be true or false")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ValueError(f"squeezellm.iters={self.iters!r} must be a positive integer")
        if self.max_sequences is not None and (not isinstance(self.max_sequences, int) or self.max_sequences < 1):
            raise ValueError(f"squeezellm.max_sequences={self.max_sequences!r} must be a positive integer or null (all)")

    def apply(self, model, ctx) -> None:
        quantized = [f for f, s in ctx.plan.items() if s is not None and s.weights is not None]
        for f in quantized:
            s = ctx.plan[f]
            if s.inputs is not None or s.weights.type != "int" or s.weights.bits not in (2, 3, 4) or s.sparsity is not None:
                raise ValueError(f"squeezellm is weight-only with 2-, 3- or 4-bit codebooks; {f} has scheme {s.name}: "
                                 "use a W2A16/W3A16/W4A16 preset")
            if type(model.get_submodule(f)) is not torch.nn.Linear:
                raise ValueError(f"squeezellm quantizes float linears: {f} is already {type(model.get_submodule(f)).__name__}; "
                                 "run it instead of rtn/gptq, not after")
        if not quantized:
            log.info("squeezellm: no module quantizes weights")
            return
        if self.fisher and ctx.calib is None:
            raise ValueError("stage 'squeezellm' needs calibration data for its Fisher weights: pass "
                             "calib=sample_calibration(tokenizer, ...)")
        t0 = time.perf_counter()
        fisher = {}
        if self.fisher:
            tokens = ctx.calib.tokens[: self.max_sequences]  # (n, seqlen)
            mods = [model.get_submodule(f) for f in quantized]
            embed = model.get_submodule(ctx.arch.embed).weight
            fisher = dict(zip(quantized, empirical_fisher(model, [m.weight for m in mods], embed, tokens, ctx.device)))
            log.info("squeezellm: Fisher diagonal of %d linears over %d sequences in %.1f s", len(mods), tokens.shape[0],
                     time.perf_counter() - t0)
        t_fisher = time.perf_counter() - t0
        bits_sum = weights = 0
        for f in quantized:
            lin = model.get_submodule(f)
            bits = ctx.plan[f].weights.bits
            W = lin.weight.detach()
            t1 = time.perf_counter()
            parts = squeeze(W, fisher.pop(f, None), bits, self.outliers, self.sensitive, self.iters)
            new = LUTLinear.from_parts(lin, parts["codes"], parts["codebook"], parts["sparse"], bits)
            set_module(model, f, new)
            bpw = new.bits_per_weight()
            bits_sum += bpw * W.numel()
            weights += W.numel()
            if ctx.report is not None:
                ctx.report.record_module(f, scheme=f"SqueezeLLM-{bits}bit", method="squeezellm",
                                         **quant_error(W, new.dense_weight(W.dtype)), bits_per_weight=round(bpw, 4),
                                         sparse_entries=new.nnz, seconds=round(time.perf_counter() - t1, 4))
        if ctx.report is not None:
            ctx.report.extra["squeezellm"] = {"bits_per_weight": round(bits_sum / weights, 4), "modules": len(quantized),
                                              "fisher_seconds": round(t_fisher, 2),
                                              "kmeans_seconds": round(time.perf_counter() - t0 - t_fisher, 2)}
