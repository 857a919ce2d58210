"""Stage `fuse_norms`: untie the head from the embeddings and fold every RMSNorm gain into the
linears that read it (float64), leaving unit gains, so the residual stream can be rotated.
The logits are unchanged. No options."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from lmpress.quant.rotate import fuse_norms

from ..stage import register_stage
from ..surgery import untie_embeddings

log = logging.getLogger(__name__)


def fuse_model_norms(model, ctx) -> list[str]:
    """Untie lm_head, then fold the norms; records what was done in the report."""
    untied = untie_embeddings(model, ctx.arch)
    folded = fuse_norms(model, ctx.arch)
    log.info("fuse_norms: %d norms folded%s", len(folded), " (lm_head untied)" if untied else "")
    if ctx.report is not None:
        ctx.report.extra.setdefault("fuse_norms", {}).update({"untied_lm_head": untied, "folded": len(folded)})
    return folded


@register_stage("fuse_norms")
@dataclass(frozen=True)
class FuseNorms:
    def apply(self, model, ctx) -> None:
        fuse_model_norms(model, ctx)
