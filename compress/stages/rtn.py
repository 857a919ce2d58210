"""Stage `rtn`: round-to-nearest weights for every module in the plan (min-max qparams, or
the MSE clipping search when the scheme's weight args say `mse_clip: true`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from lmpress.quant.primitives import quant_error
from lmpress.quant.rtn import rtn_quantize

from ..stage import register_stage
from ..surgery import to_sim


def rtn_modules(model, ctx, fqns, note: str | None = None) -> None:
    """RTN on the SimQuantLinear modules `fqns` that quantize weights and are not quantized yet
    (activation-only schemes, and modules an earlier stage quantized, are left alone). The body of
    stage `rtn`, run per layer by the larger-than-memory path, and stage `gptq`'s fallback for
    modules with no layer inputs (`note` says why; the seconds are recorded with it)."""
    for fqn in fqns:
        sim = model.get_submodule(fqn)
        if sim.scheme.weights is None or sim.quantized:
            continue
        W = sim.weight.detach().clone()
        t0 = time.perf_counter()
        q, scale, zero = rtn_quantize(W.float(), sim.scheme.weights)
        sim.set_quantized(q, scale, zero)
        why = {} if note is None else {"seconds": round(time.perf_counter() - t0, 4), "note": note}
        if ctx.report is not None:
            ctx.report.record_module(fqn, scheme=sim.scheme.name, method="rtn", **quant_error(W, sim.weight), **why)


@register_stage("rtn")
@dataclass(frozen=True)
class RTN:
    def apply(self, model, ctx) -> None:
        for fqn, scheme in ctx.plan.items():
            to_sim(model, fqn, scheme)
        rtn_modules(model, ctx, list(ctx.plan))
