"""`compress(model, recipe, calib)`: resolve the per-module plan, run the stages in order."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lmpress.kernels.experts import expert_modules, split_experts
from lmpress.kernels.fused import split_fused

from .arch import ArchMap, arch_for, record_for, wants_record
from .recipe import Recipe, RecipeError
from .report import Report
from .stage import Context
from .surgery import linear_names, untie_embeddings

log = logging.getLogger(__name__)


def build_plan(model: nn.Module, recipe: Recipe) -> dict[str, Any]:
    """fqn -> QuantScheme for every linear the recipe's scheme map assigns a scheme."""
    names = linear_names(model)
    plan = {fqn: s for fqn in names if (s := recipe.scheme_for(fqn)) is not None}
    if not plan and recipe.schemes:  # `schemes: {}`: no weight quantization (e.g. a KV-cache-only recipe)
        raise RecipeError(
            f"the recipe's schemes {[k for k, _ in recipe.schemes]} match no linear layer of this model; "
            f"its linears are named like {names[:3]}"
        )
    return plan


def prepare(model: nn.Module, recipe: Recipe) -> ArchMap:
    """The model's ArchMap for `recipe`, the recipe checked against it before anything changes, and
    the structure its stages need put in place: fused linears split into their parts when a stage
    needs them (`kernels.fused`), mixture-of-experts experts split one linear pair per expert
    (`kernels.experts`)."""
    record = record_for(model)
    (record or arch_for(model)).check_recipe(recipe)  # before anything changes
    if record is not None and record.fused and wants_record(recipe):  # the stages need q/k/v, gate/up one by one
        split_fused(record.decoder_layers(model), record.fused_parts(model.config))
        model.__dict__.pop("_lmpress_arch", None)
        log.info("split the fused linears %s into their parts", list(record.fused))
    if recipe.schemes and split_experts(model):  # (a KV-cache-only recipe leaves the experts as they are)
        log.info("mixture of experts: %d experts modules split into one linear pair per expert", len(expert_modules(model)))
    arch = arch_for(model)  # the record, or discovered (with the split experts' linears)
    arch.check_recipe(recipe)
    return arch


def compress(
    model: nn.Module,
    recipe: Recipe | str,
    calib: Any = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
) -> Report:
    """Compress `model` in place with `recipe` (a Recipe, a built-in name or a YAML path).

    `calib` is a `CalibrationSet` (required when a stage needs calibration data). The model is
    left in its simulated form (SimQuantLinear modules), ready to evaluate or `save()`.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    arch = prepare(model, recipe)
    if recipe.needs_calibration and calib is None:
        names = [s.name for s in recipe.stages if s.needs_calibration]
        raise ValueError(f"stage(s) {names} need calibration data: pass calib=sample_calibration(tokenizer, ...)")
    plan = build_plan(model, recipe)
    if arch.lm_head in plan and untie_embeddings(model, arch):
        log.info("untied lm_head from the embeddings so it can be quantized")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    report = Report()
    ctx = Context(arch=arch, plan=plan, calib=calib, kv_cache=recipe.kv_args, device=device, report=report, batch_size=batch_size)
    model.eval()
    experts = expert_modules(model)
    for m in experts.values():  # calibration reaches every expert (kernels.experts)
        m.all_tokens = True
        m.routed.zero_()
    try:
        with torch.no_grad():
            for stage in recipe.stages:
                log.info("stage %s", stage.name)
                with report.timed(stage.name):
                    stage.apply(model, ctx)
    finally:
        for m in experts.values():
            m.all_tokens = False
    if experts:
        report.extra["experts"] = {name: [round(v, 4) for v in (m.routed / m.routed.sum().clamp_min(1)).tolist()]
                                   for name, m in experts.items()}  # each expert's share of the routing slots
    model.lmpress_meta = {
        "recipe": recipe,
        "plan": ctx.plan,
        "kv_cache": ctx.kv_cache,
        "calibration": calib.provenance() if calib is not None else None,
        "report": report,
    }
    return report
