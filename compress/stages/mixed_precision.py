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

import logging
import math
import time
from dataclasses import dataclass

from torch import nn

from lmpress.calibration.layerwise import LayerReplay
from lmpress.calibration.sensitivity import measured_scores, plan_ppl_ratio, proxy_scores_by_layer
from lmpress.quant import mixed as mx
from lmpress.quant.sim import SimQuantLinear

from ..recipe import matches
from ..stage import register_stage
from ..surgery import get_module, set_module

log = logging.getLogger(__name__)

SENSITIVITIES = ("measured", "fisher", "hessian", "hessian_trace")
METRICS = ("kl", "loss")
REFERENCES = ("fp", "base")


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
                allowed[fqn] = [a and mx.pin_allows(pin, c) for a, c in zip(allowed[fqn], cands[fqn])]
                if not any(allowed[fqn]):
                    raise ValueError(f"mixed_precision: pin {pat!r} = {pin} leaves {fqn} no candidate among {[mx.label(c) for c in cands[fqn]]}")

        tokens = ctx.calib.tokens[: self.samples]
        runner = LayerReplay(model, arch, tokens, self.batch_size, ctx.device)
        need = self.tolerance is not None or (not self.scores_file and self.sensitivity != "fisher")
        fp = runner.capture(keep_logp=self.metric == "kl" and self.sensitivity == "measured") if need else {}
        if self.scores_file:
            scores = mx.load_scores(self.scores_file, names, cands)
        elif self.sensitivity == "measured":
            scores = measured_scores(model, ctx.plan, runner, fp, names, where, cands, self.metric, self.reference)
        elif self.sensitivity == "fisher":
            scores = mx.fisher_scores(model, {f: get_module(model, f) for f in names},
                                      model.get_submodule(arch.embed).weight, tokens, ctx.device, cands)
        else:
            scores = proxy_scores_by_layer(model, runner, names, where, cands,
                                           "trace" if self.sensitivity == "hessian_trace" else "full")
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
                 ", ".join(f"{k}: {v}" for k, v in mx.label_counts(plan).items()))
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
                chosen = {f: cands[f][j] for f, j in zip(names, alloc.choice)}
                memo[alloc.choice] = plan_ppl_ratio(model, runner, fp, chosen, originals, wcache)
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
