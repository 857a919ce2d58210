"""Per-module sensitivity for mixed precision, measured on calibration data with the layer engine.

- `measured_scores`: swap one module at a time for a candidate (RTN weights, fake-quant inputs)
  and replay the model from that module's decoder layer (`LayerReplay`), recording the change of
  the metric (KL to the FP model, or calibration NLL) against the reference;
- `proxy_scores_by_layer`: tr(ΔW H ΔWᵀ) (+ the activation error's second moment), from one pass
  over each layer (`quant.mixed.proxy_scores`);
- `plan_ppl_ratio`: the calibration perplexity of a whole plan over the FP model's (tolerance mode).

The maths is in `lmpress.quant.mixed`; `compress/stages/mixed_precision.py` is the wiring.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

from torch import nn

from lmpress.quant import mixed as mx
from lmpress.quant.primitives import fake_quantize

from .layerwise import LayerReplay
from .stats import capture_input_stats

log = logging.getLogger(__name__)


@contextmanager
def swapped(model: nn.Module, originals: dict[str, nn.Module]):
    """Modules may be swapped inside; every module of `originals` is put back on exit."""
    try:
        yield
    finally:
        for f, m in originals.items():
            model.set_submodule(f, m)


def measured_scores(model: nn.Module, plan: dict, runner: LayerReplay, fp: dict, names: list[str], where: dict[str, int],
                    cands: dict[str, list], metric: str, reference: str) -> dict[str, dict[str, float]]:
    """{fqn: {candidate label: metric change}}; `reference` "fp" (every other module in full
    precision) or "base" (every other module on its `plan` scheme: the base candidate scores 0)."""
    originals = {f: model.get_submodule(f) for f in names}
    wcache: dict = {}
    try:
        with swapped(model, originals):
            base_ref = None
            if reference == "base":  # every module on its base scheme; layer inputs recaptured in that model
                for f in names:
                    model.set_submodule(f, mx.simulated(originals[f], plan[f], f, wcache))
                runner.capture(keep_logp=False, ref_logp=fp.get("logp"))
                base_ref = runner.metric(0, metric, fp)
            ref = base_ref if base_ref is not None else (0.0 if metric == "kl" else fp["nll"])
            todo = [(f, c) for f in names for c in cands[f] if not (reference == "base" and c == plan[f])]
            log.info("mixed_precision: measuring %d (module, candidate) pairs on %d x %d tokens (%s, reference %s)",
                     len(todo), runner.tokens.shape[0], runner.tokens.shape[1], metric, reference)
            scores: dict[str, dict[str, float]] = {f: {} for f in names}
            t0 = time.perf_counter()
            for k, (f, c) in enumerate(todo):
                home = model.get_submodule(f)
                model.set_submodule(f, originals[f] if c is None else mx.simulated(originals[f], c, f, wcache))
                scores[f][mx.label(c)] = runner.metric(where[f], metric, fp) - ref
                model.set_submodule(f, home)
                if (k + 1) % 20 == 0 or k + 1 == len(todo):
                    el = time.perf_counter() - t0
                    log.info("mixed_precision: %d/%d scores, %.0fs (eta %.0fs)", k + 1, len(todo), el, el / (k + 1) * (len(todo) - k - 1))
    finally:
        runner.restore_fp()
    for f in names:
        for c in cands[f]:
            scores[f].setdefault(mx.label(c), 0.0)  # the base candidate under reference "base"
    return scores


def proxy_scores_by_layer(model: nn.Module, runner: LayerReplay, names: list[str], where: dict[str, int],
                          cands: dict[str, list], kind: str) -> dict[str, dict[str, float]]:
    """{fqn: {candidate label: Hessian proxy}} from one pass over each layer (`kind` "full" | "trace")."""
    scores: dict[str, dict[str, float]] = {f: {} for f in names}
    by_layer: dict[int, list[str]] = {}
    for f in names:
        by_layer.setdefault(where[f], []).append(f)
    for idx, fs in sorted(by_layer.items()):
        mods, transforms, keys = {}, {}, {}
        for f in fs:
            mod = model.get_submodule(f)
            mods[f] = mod
            for a in {c.inputs for c in cands[f] if c is not None and c.inputs is not None}:
                key = f"{f}@{a}"
                mods[key] = mod
                transforms[key] = (lambda x, a=a: x - fake_quantize(x, a))
                keys[(f, a)] = key
        with capture_input_stats(mods, transforms=transforms, norms=False) as stats:
            runner.run_layer(idx)
        for f in fs:
            E = {a: stats[key].hessian for (g, a), key in keys.items() if g == f}
            scores[f] = mx.proxy_scores(model.get_submodule(f).weight.detach(), stats[f].hessian, E, cands[f], kind)
        for acc in stats.values():
            acc.release()
    return scores


def plan_ppl_ratio(model: nn.Module, runner: LayerReplay, fp: dict, plan: dict, originals: dict[str, nn.Module],
                   wcache: dict) -> float:
    """Calibration perplexity with every module of `plan` ({fqn: candidate | None}) simulated, over the FP model's."""
    with swapped(model, originals):
        for f, c in plan.items():
            model.set_submodule(f, originals[f] if c is None else mx.simulated(originals[f], c, f, wcache))
        return math.exp(runner.metric(0, "loss", fp) - fp["nll"])
