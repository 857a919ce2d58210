"""Stage `rtn`: round-to-nearest weights for every module in the plan (min-max qparams, or
the MSE clipping search when the scheme's weight args say `mse_clip: true`)."""
from __future__ import annotations

from dataclasses import dataclass

from lmpress.quant.primitives import quant_error
from lmpress.quant.rtn import rtn_quantize

from ..stage import register_stage
from ..surgery import to_sim


@register_stage("rtn")
@dataclass(frozen=True)
class RTN:
    def apply(self, model, ctx) -> None:
        for fqn, scheme in ctx.plan.items():
            sim = to_sim(model, fqn, scheme)
            if scheme.weights is None or sim.quantized:
                continue  # activation-only scheme, or an earlier stage (e.g. GPTQ) quantized it
            W = sim.weight.detach().clone()
            q, scale, zero = rtn_quantize(W.float(), scheme.weights)
            sim.set_quantized(q, scale, zero)
            ctx.report.record_module(fqn, scheme=scheme.name, method="rtn", **quant_error(W, sim.weight))
