"""Stage `mixed_precision`: score every (module, candidate scheme), allocate the candidates that
hurt least under a budget (exact multiple-choice knapsack, `lmpress.quant.mixed.allocate`), and
write the per-module plan into `ctx.plan`, which the later stages (sparsity, gptq, rtn, the
activation fake-quant of `SimQuantLinear`) follow. Put it after rotations / kv_cache and before
the quantization stages.

```yaml
- mixed_precision:
    weights: [{bits: 3}, {bits: 4}, {bits: 8}]   # merged onto each module's scheme weights; null = W16
    inputs: null                                  # e.g. [{bits: 4}, {bits: 8}]; null list = keep the scheme's
    budget: {weight_bits: 3.5}                    # weight_bits (avg / weight), act_bits (avg / linear), bytes
    sensitivity: measured                         # measured | fisher | hessian | hessian_trace
    metric: kl                                    # measured: kl (to the FP model) | loss (calibration NLL)
    reference: fp                                 # measured: fp (one module quantized, the rest FP) | base
    samples: 8                                    # calibration sequences used for scores and the search
    pins: {"re:.*layers\\.0\\..*": {weights: {bits: 8}}}
    tie_inputs: true                              # modules reading one input (q/k/v, gate/up) share its A-bits
    tolerance: null                               # e.g. 0.02: smallest `search` budget within 2% calib ppl
```
Scores: `measured` swaps one module at a time for its candidate (RTN weights, fake-quant inputs)
and runs the model from that module's decoder layer on cached layer inputs, recording the change
of the metric against `reference` (`fp`: every other module in full precision, as the seed paper;
`base`: every other module on the recipe's scheme, so the base candidate scores 0 and only the
other candidates need a run). `hessian`: tr(ΔW H ΔWᵀ) of the RTN weight plus tr(W E Wᵀ) for the
activation error (E: second moment of x - fq(x)), from one pass over each layer; `hessian_trace`
uses mean(diag H)·‖ΔW‖² for the weight part. `fisher`: SqueezeLLM's second-order sensitivity with
the empirical Fisher diagonal of the calibration loss, ½ Σ F ⊙ ΔW² (F: squared per-sequence weight
gradients), plus ½ Σ_t (g_t ⊙ δx_t)² for the activation error (g_t: the loss gradient at the
module's input); one forward + backward pass per sequence, so it is the cheap end-to-end score
(put the stage before `kv_cache`: the KV fake-quant's rounding has no gradient). `scores_file` reuses the `scores` of an earlier run
(a report.json or a JSON {fqn: {candidate label: score}}).

Tolerance mode bisects the `search` budget key between the least and the most any plan costs
until the calibration perplexity of the plan (RTN weights, measured on the `samples` sequences)
over the full-precision one is within 1 + tolerance; the plan of the smallest budget measured
within it is kept. The later GPTQ stage usually lowers the error further; the report records
the search, and the bench measures the final model.

The report (`report.extra["mixed_precision"]`) and the checkpoint manifest (`lmpress` block,
`mixed_precision`) record the budget, the totals, the per-module plan and how it was found.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmpress.quant import mixed as mx
from lmpress.quant.primitives import fake_quantize
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import QuantScheme
from lmpress.quant.sim import SimQuantLinear

from lmpress.calibration.layerwise import LayerReplay

from ..recipe import matches
from ..stage import register_stage
from ..surgery import get_module, set_module

log = logging.getLogger(__name__)

SENSITIVITIES = ("measured", "fisher", "hessian", "hessian_trace")
METRICS = ("kl", "loss")
REFERENCES = ("fp", "base")


def _pin_ok(pin: dict, cand: QuantScheme | None) -> bool:
    """Does `cand` agree with every part the pin names? ({weights: {bits: 8}}, {inputs: null}, {sparsity: ...})"""
    for part, want in pin.items():
        got = getattr(cand, part, None) if cand is not None else None
        if part == "sparsity":
            if got != want:
                return False
        elif want is None:
            if got is not None:
                return False
        else:
            if got is None or any(getattr(got, k) != v for k, v in want.items()):
                return False
    return True


@register_stage("mixed_precision", needs_calibration=True)
@dataclass(frozen=True)
class MixedPrecision:
    weights: list | None = None
    inputs: list | None = None
    budget: dict | None = None
    sensitivity: str = "measured"
    metric: str = "kl"
    reference: str = "fp"
    samples: int = 8
    pins: dict | None = None
    tie_inputs: bool = True
    tolerance: float | None = None
    search: str = "weight_bits"
    scores_file: str | None = None
    batch_size: int = 2

    def __post_init__(self) -> None:
        def bad(key, allowed):
            raise ValueError(f"mixed_precision: option {key}={getattr(self, key)!r}; allowed: {allowed}")

        for key in ("weights", "inputs"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, list) or not v):
                bad(key, "null or a non-empty list of QuantArgs mappings / null entries")
            for o in v or ():
                if o is not None and not isinstance(o, dict):
                    bad(key, "entries that are mappings of QuantArgs fields (e.g. {bits: 4}) or null")
        if self.weights is None and self.inputs is None:
            raise ValueError("mixed_precision: give candidate `weights` and/or `inputs` lists (otherwise there is nothing to choose)")
        if self.sensitivity not in SENSITIVITIES:
            bad("sensitivity", list(SENSITIVITIES))
        if self.metric not in METRICS:
            bad("metric", list(METRICS))
        if self.reference not in REFERENCES:
            bad("reference", list(REFERENCES))
        for key in ("samples", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, "a positive integer")
        if self.budget is not None and not isinstance(self.budget, dict):
            bad("budget", f"a mapping with keys from {list(mx.RESOURCES)}")
        if self.budget:
            mx.budget_limits(self.budget, [(1, 1)])  # key and value checks
        if self.tolerance is not None:
            t = self.tolerance
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < 10):
                bad("tolerance", "null or a ratio margin in [0, 10), e.g. 0.02 for 2%")
        if self.search not in mx.RESOURCES:
            bad("search", list(mx.RESOURCES))
        if self.budget is None and self.tolerance is None:
            raise ValueError("mixed_precision: give a `budget` (e.g. {weight_bits: 3.5}) or a `tolerance` (e.g. 0.02)")
        if self.pins is not None:
            if not isinstance(self.pins, dict):
                bad("pins", "a mapping {module name | 're:<regex>': {weights: {...} | null, inputs: {...} | null}}")
            for pat, pin in self.pins.items():
                if not isinstance(pin, dict) or set(pin) - {"weights", "inputs", "sparsity"}:
                    raise ValueError(f"mixed_precision: pins[{pat!r}] must be a mapping with keys weights / inputs / sparsity")
        if not isinstance(self.tie_inputs, bool):
            bad("tie_inputs", "true or false")

    # ------------------------------------------------------------------ apply

    def apply(self, model: nn.Module, ctx) -> None:
        if ctx.calib is None:
            raise ValueError("stage 'mixed_precision' needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
        t0 = time.perf_counter()
        arch = ctx.arch
        n_layers = len(arch.decoder_layers(model))
        names = list(ctx.plan)
        where = {fqn: self._layer_of(fqn, arch, n_layers) for fqn in names}
        shapes = {fqn: (get_module(model, fqn).out_features, get_module(model, fqn).in_features) for fqn in names}
        cands = {fqn: mx.candidate_schemes(ctx.plan[fqn], self.weights, self.inputs) for fqn in names}
        allowed = {fqn: [True] * len(cands[fqn]) for fqn in names}
        for pat, pin in (self.pins or {}).items():
            hit = [fqn for fqn in names if matches(pat, fqn)]
            if not hit:
                raise ValueError(f"mixed_precision: pin {pat!r} matches no module of the plan (e.g. {names[:2]})")
            for fqn in hit:
                allowed[fqn] = [a and _pin_ok(pin, c) for a, c in zip(allowed[fqn], cands[fqn])]
                if not any(allowed[fqn]):
                    raise ValueError(f"mixed_precision: pin {pat!r} = {pin} leaves {fqn} no candidate among {[mx.label(c) for c in cands[fqn]]}")

        tokens = ctx.calib.tokens[: self.samples]
        runner = LayerReplay(model, arch, tokens, self.batch_size, ctx.device)
        need = self.tolerance is not None or (not self.scores_file and self.sensitivity != "fisher")
        fp = runner.capture(keep_logp=self.metric == "kl" and self.sensitivity == "measured") if need else {}
        if self.scores_file:
            scores = self._load_scores(names, cands)
        elif self.sensitivity == "measured":
            scores = self._measured(model, ctx, runner, fp, names, where, cands)
        elif self.sensitivity == "fisher":
            scores = mx.fisher_scores(model, {f: get_module(model, f) for f in names},
                                      model.get_submodule(arch.embed).weight, tokens, ctx.device, cands)
        else:
            scores = self._proxies(model, ctx, runner, names, where, cands)
        t_scores = time.perf_counter() - t0

        ties = []
        if self.tie_inputs:
            for i in range(n_layers):
                for group in arch.sequential_groups:
                    members = [f"{arch.layers}.{i}.{rel}" for rel in group if f"{arch.layers}.{i}.{rel}" in ctx.plan]
                    if len(members) > 1:
                        ties.append([names.index(m) for m in members])
        problem = dict(
            scores=[[scores[f][mx.label(c)] for c in cands[f]] for f in names],
            costs={r: [[mx.cost(r, c, shapes[f]) for c in cands[f]] for f in names] for r in mx.RESOURCES},
            allowed=[allowed[f] for f in names], ties=ties,
            tie_keys=[[c.inputs if c is not None else None for c in cands[f]] for f in names],
        )
        shape_list = [shapes[f] for f in names]
        search = None
        if self.tolerance is not None:
            alloc, search = self._tolerance(model, runner, fp, names, cands, problem, shape_list)
        else:
            limits = mx.budget_limits(self.budget, shape_list)
            alloc = mx.allocate(limits=limits, **problem)

        plan = {f: cands[f][j] for f, j in zip(names, alloc.choice)}
        self._install_plan(model, ctx, plan)
        numel = sum(r * c for r, c in shape_list)
        totals = {r: sum(problem["costs"][r][i][j] for i, j in enumerate(alloc.choice)) for r in mx.RESOURCES}
        summary = {
            "sensitivity": "file" if self.scores_file else self.sensitivity,
            "metric": self.metric if self.sensitivity == "measured" else None,
            "reference": self.reference if self.sensitivity == "measured" else None,
            "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
            "budget": dict(self.budget or {}), "limits": alloc.limits,
            "avg_weight_bits": totals["weight_bits"] / numel, "avg_act_bits": totals["act_bits"] / len(names),
            "weight_bytes": totals["bytes"], "objective": alloc.objective, "status": alloc.status,
            "seconds": {"scores": round(t_scores, 2), "total": round(time.perf_counter() - t0, 2)},
            "plan": {f: {"scheme": mx.label(s), "weights": mx.FP_BITS if s is None or s.weights is None else s.weights.bits,
                         "inputs": mx.act_bits(s)} for f, s in plan.items()},
        }
        if search is not None:
            summary["tolerance"] = {"tolerance": search.tolerance, "search": self.search, "budget": search.budget,
                                    "calib_ppl_ratio": search.ratio, "history": [list(h) for h in search.history],
                                    "fp_calib_ppl": math.exp(fp["nll"])}
        log.info("mixed_precision: %d modules, avg %.4f weight bits, avg %.3f act bits, %d weight bytes; %s",
                 len(names), summary["avg_weight_bits"], summary["avg_act_bits"], totals["bytes"],
                 ", ".join(f"{k}: {v}" for k, v in _counts(plan).items()))
        if ctx.report is not None:
            ctx.report.extra["mixed_precision"] = {**summary, "scores": scores}

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _layer_of(fqn: str, arch, n_layers: int) -> int:
        idx, _ = arch.layer_of(fqn, n_layers)
        if idx is not None:
            return idx
        if fqn == arch.lm_head:
            return n_layers  # after every decoder layer
        raise ValueError(f"mixed_precision allocates the decoder layers' linears and {arch.lm_head}; {fqn} is neither")

    def _load_scores(self, names, cands) -> dict:
        data = json.loads(Path(self.scores_file).read_text())
        for key in ("compression", "mixed_precision", "scores"):
            if isinstance(data, dict) and key in data and isinstance(data[key], dict):
                data = data[key]
        missing = [(f, mx.label(c)) for f in names for c in cands[f] if mx.label(c) not in data.get(f, {})]
        if missing:
            raise ValueError(f"mixed_precision: scores_file {self.scores_file} has no score for {missing[:3]} ({len(missing)} missing)")
        return {f: {mx.label(c): float(data[f][mx.label(c)]) for c in cands[f]} for f in names}

    def _measured(self, model, ctx, runner: LayerReplay, fp: dict, names, where, cands) -> dict:
        originals = {f: get_module(model, f) for f in names}
        wcache: dict = {}
        base_ref = None
        try:
            if self.reference == "base":  # every module on its base scheme; layer inputs recaptured in that model
                for f in names:
                    set_module(model, f, _sim(originals[f], ctx.plan[f], f, wcache))
                runner.capture(keep_logp=False, ref_logp=fp.get("logp"))
                base_ref = runner.metric(0, self.metric, fp)
            ref = base_ref if base_ref is not None else (0.0 if self.metric == "kl" else fp["nll"])
            todo = [(f, c) for f in names for c in cands[f]
                    if not (self.reference == "base" and c == ctx.plan[f])]
            log.info("mixed_precision: measuring %d (module, candidate) pairs on %d x %d tokens (%s, reference %s)",
                     len(todo), runner.tokens.shape[0], runner.tokens.shape[1], self.metric, self.reference)
            scores = {f: {} for f in names}
            t0 = time.perf_counter()
            for k, (f, c) in enumerate(todo):
                home = get_module(model, f)
                set_module(model, f, originals[f] if c is None else _sim(originals[f], c, f, wcache))
                scores[f][mx.label(c)] = runner.metric(where[f], self.metric, fp) - ref
                set_module(model, f, home)
                if (k + 1) % 20 == 0 or k + 1 == len(todo):
                    el = time.perf_counter() - t0
                    log.info("mixed_precision: %d/%d scores, %.0fs (eta %.0fs)", k + 1, len(todo), el, el / (k + 1) * (len(todo) - k - 1))
            for f in names:
                for c in cands[f]:
                    scores[f].setdefault(mx.label(c), 0.0)  # the base candidate under reference "base"
            return scores
        finally:
            for f in names:
                set_module(model, f, originals[f])
            runner.restore_fp()

    def _proxies(self, model, ctx, runner: LayerReplay, names, where, cands) -> dict:
        arch = ctx.arch
        kind = "trace" if self.sensitivity == "hessian_trace" else "full"
        scores = {f: {} for f in names}
        by_layer: dict[int, list[str]] = {}
        for f in names:
            by_layer.setdefault(where[f], []).append(f)
        from lmpress.calibration.stats import capture_input_stats

        for idx, fs in sorted(by_layer.items()):
            mods, transforms, keys = {}, {}, {}
            for f in fs:
                mod = get_module(model, f)
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
                scores[f] = mx.proxy_scores(get_module(model, f).weight.detach(), stats[f].hessian, E, cands[f], kind)
            for acc in stats.values():
                acc.release()
        return scores

    def _tolerance(self, model, runner, fp, names, cands, problem, shape_list):
        key = self.search
        costs = problem["costs"][key]
        allowed = problem["allowed"]
        lo_tot = sum(min(v for v, ok in zip(t, al) if ok) for t, al in zip(costs, allowed))
        hi_tot = sum(max(v for v, ok in zip(t, al) if ok) for t, al in zip(costs, allowed))
        denom = sum(r * c for r, c in shape_list) if key == "weight_bits" else len(names) if key == "act_bits" else 1
        lo, hi = lo_tot / denom, hi_tot / denom
        resolution = 0.05 if key != "bytes" else (hi - lo) / 64
        memo: dict = {}
        allocs: dict = {}
        originals = {f: get_module(model, f) for f in names}
        wcache: dict = {}

        def evaluate(b: float) -> float:
            budget = {**(self.budget or {}), key: b}
            alloc = mx.allocate(limits=mx.budget_limits(budget, shape_list), **problem)
            allocs[b] = alloc
            if alloc.choice not in memo:
                try:
                    for f, j in zip(names, alloc.choice):
                        c = cands[f][j]
                        set_module(model, f, originals[f] if c is None else _sim(originals[f], c, f, wcache))
                    memo[alloc.choice] = math.exp(runner.metric(0, "loss", fp) - fp["nll"])
                finally:
                    for f in names:
                        set_module(model, f, originals[f])
            return memo[alloc.choice]

        search = mx.tolerance_search(evaluate, lo, hi, float(self.tolerance), resolution=resolution)
        if search.budget is None:
            raise mx.AllocationError(
                f"mixed_precision: even the largest plan ({key} {hi:.4g}) has calibration perplexity ratio "
                f"{search.history[-1][1]:.4f} > 1 + {self.tolerance}; widen the candidates (e.g. add {{bits: 8}}) or the tolerance")
        return allocs[search.budget], search

    @staticmethod
    def _install_plan(model, ctx, plan: dict) -> None:
        for f, s in plan.items():
            mod = get_module(model, f)
            if isinstance(mod, SimQuantLinear):
                if mod.quantized:
                    raise ValueError(f"mixed_precision: {f} is already quantized; put mixed_precision before rtn/gptq")
                if s is None:
                    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    device=mod.weight.device, dtype=mod.weight.dtype)
                    lin.weight.data, lin.bias = mod.weight.data, mod.bias
                    set_module(model, f, lin)
                else:
                    mod.scheme = s
            if s is None:
                ctx.plan.pop(f)
            else:
                ctx.plan[f] = s


def _counts(plan: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in plan.values():
        out[mx.label(s)] = out.get(mx.label(s), 0) + 1
    return out


def _sim(linear: nn.Module, scheme: QuantScheme, fqn: str, wcache: dict) -> SimQuantLinear:
    """A throwaway simulated module: RTN weights (cached per module and weight args), fake-quant inputs."""
    sim = SimQuantLinear(linear, scheme)
    if scheme.weights is not None:
        key = (fqn, scheme.weights)
        if key not in wcache:
            wcache[key] = rtn_quantize(linear.weight.detach().float(), scheme.weights)
        sim.set_quantized(*wcache[key])
    return sim
