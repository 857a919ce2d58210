"""Mixed precision: candidate schemes per module, what each costs, how much each hurts, and the
allocation that hurts least under a budget.

- `candidate_schemes(base, weights=, inputs=, sparsity=)`: the product of the options, each merged
  onto the module's base scheme (a mapping of `QuantArgs` fields overrides the base's args; `None`
  keeps that part in high precision: W16 / A16). A candidate that quantizes nothing is `None`.
- Costs, exact integers: `weight_bits` (nominal code bits of the weight; 16 a weight unquantized;
  an N:M sparse weight stores N/M of the codes plus ceil(log2 M) index bits per kept value),
  `storage_bytes` (what the packed checkpoint stores for the weight: int32 words of
  `kernels.formats`, float32 scale and zero point per group, the int64 shape; 2 bytes a weight
  unquantized), `act_bits` (the input's bits, 16 unquantized; averaged over modules, so a budget
  of 4.4 over A4/A8 candidates is "10% of the linears at A8").
- Sensitivities: `hessian_proxy` (the GPTQ layer objective tr(ΔW H ΔWᵀ) of the RTN weight, or
  HAWQ-V2's trace form mean(diag H)·‖ΔW‖², Dong et al. 2020), `input_proxy` (tr(W E Wᵀ) with E
  the second moment of the activation quantization error), and the measured metrics
  `kl_to_reference` / `token_nll` which the `mixed_precision` stage evaluates with one module
  at a time on its candidate.
- `allocate(...)`: the multiple-choice knapsack, exact: one binary variable per (module,
  candidate), one-hot per module, a linear budget per resource, pins (forbidden candidates) and
  ties (modules whose candidates must agree on a key, e.g. activation bits of q/k/v), solved by
  `scipy.optimize.milp` (HiGHS branch and bound) with a zero relative gap. Resource rows are
  divided by the gcd of their coefficients and the chosen plan's totals are recomputed in
  integers, so "within budget" is checked exactly, never up to a solver tolerance.
- `tolerance_search(evaluate, lo, hi, tolerance)`: bisection over a budget until the measured
  ratio (e.g. calibration perplexity, quantized / full precision) is within 1 + tolerance: the
  search of "Augmenting Hessians with Inter-Layer Dependencies for Mixed-Precision PTQ"
  (Schaefer et al., 2023), which finds the smallest model within a user's accuracy tolerance.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from lmpress.kernels.formats import packed_cols

from .gptq import layer_objective
from .primitives import dequantize, fake_quantize, n_groups, qparam_rows
from .rtn import rtn_quantize
from .scheme import QuantArgs, QuantScheme
from .sim import SimQuantLinear

log = logging.getLogger(__name__)

FP_BITS = 16  # an unquantized weight or activation, as the costs count it
FP_BYTES = 2  # an unquantized weight, as the storage cost counts it (fp16/bf16)
RESOURCES = ("weight_bits", "bytes", "act_bits")


# ---------------------------------------------------------------------------- candidates


def _merge(option: Any, base: QuantArgs | None, what: str) -> QuantArgs | None:
    if option is None or isinstance(option, QuantArgs):
        return option
    if isinstance(option, Mapping):
        if base is None and "bits" not in option:
            raise ValueError(f"{what} candidate {dict(option)!r}: the base scheme has no {what} args to merge onto; give 'bits'")
        if what == "inputs" and base is None:  # activation args default to dynamic per-token
            option = {"granularity": "token", "dynamic": True, **option}
        return QuantArgs.from_dict(option, base)
    raise ValueError(f"{what} candidate {option!r}: use a mapping of QuantArgs fields (e.g. {{bits: 8}}) or null")


def candidate_schemes(
    base: QuantScheme | None,
    weights: Sequence[Any] | None = None,
    inputs: Sequence[Any] | None = None,
    sparsity: Sequence[str | None] | None = None,
) -> list[QuantScheme | None]:
    """Every combination of the options (weights outermost), duplicates removed, order kept.

    An option list left `None` keeps the base's value; an entry `None` is high precision."""
    w_opts = [base.weights if base else None] if weights is None else [_merge(o, base.weights if base else None, "weights") for o in weights]
    a_opts = [base.inputs if base else None] if inputs is None else [_merge(o, base.inputs if base else None, "inputs") for o in inputs]
    s_opts = [base.sparsity if base else None] if sparsity is None else list(sparsity)
    out: list[QuantScheme | None] = []
    for w in w_opts:
        for a in a_opts:
            for s in s_opts:
                c = None if (w is None and a is None and s is None) else QuantScheme(weights=w, inputs=a, sparsity=s)
                if c not in out:
                    out.append(c)
    if not out:
        raise ValueError("candidate_schemes: empty option list; give at least one option per list")
    return out


def label(scheme: QuantScheme | None) -> str:
    """A short unique-enough name: W3g64A16, W4A8, W16A16, W4A16-2:4 ..."""
    if scheme is None:
        return "W16A16"
    w = scheme.weights
    ws = "W16" if w is None else f"W{w.bits}" + (f"g{w.group_size}" if w.granularity == "group" else "")
    a = scheme.inputs
    return ws + ("A16" if a is None else f"A{a.bits}") + (f"-{scheme.sparsity}" if scheme.sparsity else "")


# ---------------------------------------------------------------------------- costs


def _nm(sparsity: str | None) -> tuple[int, int] | None:
    if sparsity is None:
        return None
    n, _, m = sparsity.partition(":")
    return int(n), int(m)


def weight_bits(scheme: QuantScheme | None, shape: tuple[int, int]) -> int:
    """Nominal bits of the weight (out, in): codes only (qparams are in `storage_bytes`)."""
    rows, cols = shape
    n = rows * cols
    b = FP_BITS if scheme is None or scheme.weights is None else scheme.weights.bits
    nm = _nm(scheme.sparsity if scheme is not None else None)
    if nm is None:
        return n * b
    k, m = nm
    if cols % m:
        raise ValueError(f"{k}:{m} sparsity needs in_features divisible by {m}, got {cols}")
    return n * k * (b + math.ceil(math.log2(m))) // m


def storage_bytes(scheme: QuantScheme | None, shape: tuple[int, int]) -> int:
    """Bytes of the weight in the packed checkpoint (`PackedLinear`'s buffers, bias excluded)."""
    rows, cols = shape
    if scheme is None or scheme.weights is None:
        return FP_BYTES * rows * cols if scheme is None or scheme.sparsity is None else weight_bits(scheme, shape) // 8
    if scheme.sparsity is not None:  # kept codes packed + index bits, qparams as dense
        body = -(-weight_bits(scheme, shape) // 8)
    else:
        body = 4 * rows * packed_cols(cols, scheme.weights.bits)
    args = scheme.weights
    qparams = qparam_rows(rows, args) * n_groups(cols, args) * 4 * (1 if args.symmetric else 2)
    return body + qparams + 16  # weight_shape: two int64


def act_bits(scheme: QuantScheme | None) -> int:
    return FP_BITS if scheme is None or scheme.inputs is None else scheme.inputs.bits


def cost(resource: str, scheme: QuantScheme | None, shape: tuple[int, int]) -> int:
    if resource == "weight_bits":
        return weight_bits(scheme, shape)
    if resource == "bytes":
        return storage_bytes(scheme, shape)
    if resource == "act_bits":
        return act_bits(scheme)
    raise ValueError(f"unknown resource {resource!r}; use one of {list(RESOURCES)}")


def budget_limits(budget: Mapping[str, Any], shapes: Sequence[tuple[int, int]]) -> dict[str, int]:
    """A user budget -> integer limits on the summed costs.

    `weight_bits`: average bits per weight over the modules (numel-weighted); `act_bits`: average
    input bits per module; `bytes`: total bytes. Averages are turned into totals with exact
    fractions (3.5 bits over N weights is 7N/2, rounded down)."""
    unknown = sorted(set(budget) - set(RESOURCES))
    if unknown:
        raise ValueError(f"budget: unknown key(s) {unknown}; allowed: {list(RESOURCES)}")
    out = {}
    numel = sum(r * c for r, c in shapes)
    for key, value in budget.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"budget.{key}={value!r} must be a positive number")
        v = Fraction(str(value))
        out[key] = math.floor(v * numel) if key == "weight_bits" else math.floor(v * len(shapes)) if key == "act_bits" else math.floor(v)
    if not out:
        raise ValueError(f"budget: give at least one of {list(RESOURCES)}")
    return out


# ---------------------------------------------------------------------------- sensitivities


@torch.no_grad()
def rtn_weight(W: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The RTN-quantized weight, dequantized (out, in) float32."""
    q, s, z = rtn_quantize(W.float(), args)
    return dequantize(q, s, z, args, dtype=torch.float32)


@torch.no_grad()
def hessian_proxy(W: torch.Tensor, H: torch.Tensor, args: QuantArgs | None, kind: str = "full") -> float:
    """Weight sensitivity of a candidate from the input Hessian H = (2/N) Σ xᵀx (in, in).

    `full`: tr(ΔW H ΔWᵀ), the GPTQ objective of the RTN weight (output error on the calibration
    inputs); `trace`: mean(diag H)·‖ΔW‖²_F (HAWQ-V2). 0 for unquantized weights."""
    if args is None:
        return 0.0
    dW = W.float() - rtn_weight(W, args)  # (out, in)
    if kind == "full":
        return layer_objective(W.float(), W.float() - dW, H)
    if kind == "trace":
        return float(H.diagonal().double().mean()) * float(dW.double().pow(2).sum())
    raise ValueError(f"hessian_proxy kind={kind!r}: use 'full' or 'trace'")


@torch.no_grad()
def input_proxy(W: torch.Tensor, E: torch.Tensor) -> float:
    """tr(W E Wᵀ): the output error caused by the input quantization error δx, with
    E = (2/N) Σ δxᵀδx (in, in) collected on the calibration inputs."""
    W64 = W.to(E.device, torch.float64)  # (out, in)
    return float(((W64 @ E.double()) * W64).sum())


def empirical_fisher(model: torch.nn.Module, weights: Sequence[torch.Tensor], embed_weight: torch.Tensor,
                     tokens: torch.Tensor, device) -> list[torch.Tensor]:
    """The empirical Fisher diagonal of each of `weights` (float32, same shapes): the sum over the
    calibration sequences `tokens` (n, T) of the squared gradient of the sequence's mean next-token
    NLL, one forward and backward pass per sequence (SqueezeLLM's sensitivity). `embed_weight`, the
    embedding table, takes part so that autograd reaches layer 0's inputs (hooks there fire)."""
    params = list(weights) + [embed_weight]
    was = [p.requires_grad for p in params]
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for seq in tokens.split(1):  # (1, T): one gradient per sequence
                logits = model(input_ids=seq.to(device), use_cache=False).logits
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                loss = -lp.gather(-1, seq[:, 1:, None].to(lp.device)).mean()
                grads = torch.autograd.grad(loss, params)
                for acc, g in zip(fisher, grads):
                    acc += g.float().pow(2)
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return fisher


def fisher_scores(model: torch.nn.Module, mods: Mapping[str, torch.nn.Module], embed_weight: torch.Tensor,
                  tokens: torch.Tensor, device, cands: Mapping[str, Sequence[QuantScheme | None]]) -> dict:
    """½ Σ F ⊙ ΔW² with F the empirical Fisher diagonal (`empirical_fisher`) for the weight part,
    ½ Σ_t (g_t ⊙ δx_t)² with g_t the loss gradient at the module's input for the activation part.
    `mods`: {name: linear} to score; `embed_weight`: the embedding table. Returns {name:
    {candidate label: score}}."""
    names = list(mods)
    act = {(f, c.inputs): 0.0 for f in names for c in cands[f] if c is not None and c.inputs is not None}
    hooks = []
    for f, m in mods.items():
        alist = [a for (g, a) in act if g == f]
        if not alist:
            continue

        def pre(_m, args, f=f, alist=alist):
            x = args[0]
            if not x.requires_grad:
                return
            dxs = [(a, (x - fake_quantize(x, a)).detach().float()) for a in alist]

            def grad_hook(g, dxs=dxs, f=f):
                for a, dx in dxs:
                    act[(f, a)] += 0.5 * float((g.float() * dx).pow(2).double().sum())

            x.register_hook(grad_hook)
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        fisher = dict(zip(names, empirical_fisher(model, [m.weight for m in mods.values()], embed_weight, tokens, device)))
    finally:
        for h in hooks:
            h.remove()
    scores = {}
    for f in names:
        W = mods[f].weight.detach().float()
        wpart = {}
        scores[f] = {}
        for c in cands[f]:
            w = None if c is None else c.weights
            if w not in wpart:
                wpart[w] = 0.0 if w is None else 0.5 * float((fisher[f] * (W - rtn_weight(W, w)).pow(2)).double().sum())
            scores[f][label(c)] = wpart[w] + (0.0 if c is None or c.inputs is None else act[(f, c.inputs)])
    return scores


def proxy_scores(W: torch.Tensor, H: torch.Tensor, E: Mapping[QuantArgs, torch.Tensor],
                 cands: Sequence[QuantScheme | None], kind: str = "full") -> dict[str, float]:
    """{candidate label: `hessian_proxy` of its weights + `input_proxy` of its inputs} for one
    module: `H` the second moment of its input, `E[args]` that of the input's quantization error
    under input args `args`."""
    wp: dict = {}
    out = {}
    for c in cands:
        w = None if c is None else c.weights
        if w not in wp:
            wp[w] = hessian_proxy(W, H, w, kind)
        out[label(c)] = wp[w] + (0.0 if c is None or c.inputs is None else input_proxy(W, E[c.inputs]))
    return out


def kl_to_reference(logits: torch.Tensor, ref_logp: torch.Tensor) -> tuple[float, int]:
    """(Σ over tokens of KL(p_ref ‖ p), number of tokens); logits and ref_logp (..., vocab)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (...,)
    return float(kl.double().sum()), kl.numel()


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """(Σ next-token NLL, count) for logits (B, T, V) of tokens (B, T)."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nll = -lp.gather(-1, tokens[:, 1:, None].to(lp.device)).squeeze(-1)  # (B, T-1)
    return float(nll.double().sum()), nll.numel()


# ---------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]  # candidate index per module
    objective: float  # Σ of the chosen scores (as given)
    totals: dict[str, int]  # exact summed cost per constrained resource
    limits: dict[str, int]
    status: str = "optimal"
    solves: int = 1
    extra: dict = field(default_factory=dict)


class AllocationError(ValueError):
    """No plan satisfies the budget and constraints; the message says the least achievable cost."""


def _row_gcd(values: np.ndarray) -> int:
    g = 0
    for v in np.unique(np.abs(values)):
        g = math.gcd(g, int(v))
    return g or 1


def allocate(
    scores: Sequence[Sequence[float]],
    costs: Mapping[str, Sequence[Sequence[int]]],
    limits: Mapping[str, int],
    allowed: Sequence[Sequence[bool]] | None = None,
    ties: Sequence[Sequence[int]] = (),
    tie_keys: Sequence[Sequence[Hashable]] | None = None,
    time_limit: float | None = None,
) -> Allocation:
    """Minimize Σ_i scores[i][choice_i] s.t. Σ_i costs[r][i][choice_i] ≤ limits[r] for every r.

    `allowed[i][j]` False forbids candidate j of module i (pins). Every group in `ties` (module
    indices) must pick candidates with equal `tie_keys[i][j]`. Exact: integer costs, zero gap."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(scores)
    if n == 0:
        raise ValueError("allocate: no modules")
    sizes = [len(s) for s in scores]
    if min(sizes) < 1:
        raise ValueError("allocate: every module needs at least one candidate")
    offs = np.concatenate([[0], np.cumsum(sizes)])  # variable index of (i, 0)
    nv = int(offs[-1])
    for r, table in costs.items():
        if [len(t) for t in table] != sizes:
            raise ValueError(f"allocate: costs[{r!r}] must have one entry per candidate of every module")
    missing = sorted(set(limits) - set(costs))
    if missing:
        raise ValueError(f"allocate: limits on {missing} but no costs for them")
    S = np.array([float(v) for s in scores for v in s])  # (nv,)
    if not np.all(np.isfinite(S)):
        raise ValueError("allocate: scores must be finite")
    # per-module shift and one global scale leave the argmin unchanged; keep HiGHS's absolute gaps negligible
    Sn = np.concatenate([np.asarray(s, float) - min(s) for s in scores])
    span = float(Sn.max())
    c = Sn * (1e4 / span) if span > 0 else Sn
    ub = np.ones(nv)
    if allowed is not None:
        ub = np.array([1.0 if a else 0.0 for al in allowed for a in al])
        if len(ub) != nv:
            raise ValueError("allocate: allowed must have one flag per candidate of every module")
        for i in range(n):
            if not ub[offs[i]:offs[i + 1]].any():
                raise AllocationError(f"allocate: module {i} has every candidate forbidden")
    A_rows, lo, hi = [], [], []
    for i in range(n):  # one-hot
        row = np.zeros(nv)
        row[offs[i]:offs[i + 1]] = 1
        A_rows.append(row), lo.append(1), hi.append(1)
    C = {r: np.array([int(v) for t in costs[r] for v in t], dtype=np.int64) for r in limits}
    if ties:
        if tie_keys is None:
            raise ValueError("allocate: ties need tie_keys")
        for group in ties:
            group = list(group)
            for a, b in zip(group, group[1:]):
                for key in {k for k in tie_keys[a]} | {k for k in tie_keys[b]}:
                    row = np.zeros(nv)
                    for j, k in enumerate(tie_keys[a]):
                        row[offs[a] + j] += k == key
                    for j, k in enumerate(tie_keys[b]):
                        row[offs[b] + j] -= k == key
                    A_rows.append(row), lo.append(0), hi.append(0)
    slack = {r: 0 for r in limits}
    for attempt in range(6):
        rows, rlo, rhi = list(A_rows), list(lo), list(hi)
        for r, lim in limits.items():
            g = _row_gcd(C[r])
            rows.append(C[r] / g)
            rlo.append(-np.inf)
            rhi.append(float((int(lim) - slack[r]) // g))
        res = milp(c, integrality=np.ones(nv), bounds=Bounds(np.zeros(nv), ub),
                   constraints=LinearConstraint(np.array(rows), np.array(rlo), np.array(rhi)),
                   options={"mip_rel_gap": 0.0, **({"time_limit": time_limit} if time_limit else {})})
        if res.x is None:
            least = {r: int(sum(min(int(v) for v, ok in zip(t, al) if ok) for t, al in
                                zip(costs[r], allowed or [[True] * k for k in sizes]))) for r in limits}
            raise AllocationError(f"no plan meets the budget {dict(limits)} (least achievable totals {least}, "
                                  f"ignoring ties); raise the budget. Solver: {res.message}")
        x = res.x
        choice = tuple(int(np.argmax(x[offs[i]:offs[i + 1]])) for i in range(n))
        totals = {r: int(sum(int(costs[r][i][j]) for i, j in enumerate(choice))) for r in C}
        over = {r: totals[r] - int(limits[r]) for r in limits if totals[r] > int(limits[r])}
        if not over:
            obj = float(sum(scores[i][j] for i, j in enumerate(choice)))
            status = "optimal" if res.status == 0 else f"stopped: {res.message}"
            return Allocation(choice, obj, totals, {r: int(v) for r, v in limits.items()}, status, attempt + 1)
        for r, v in over.items():  # a solver tolerance let an integer total slip over: tighten and re-solve
            slack[r] += v
        log.warning("allocate: rounding put totals over the limits by %s; re-solving with tighter limits", over)
    raise AllocationError(f"allocate: could not find a plan within {dict(limits)} after tightening")


def brute_force(scores, costs, limits, allowed=None, ties=(), tie_keys=None) -> tuple[tuple[int, ...] | None, float]:
    """Exhaustive reference for small instances (tests): (best choice or None, its objective)."""
    import itertools

    sizes = [len(s) for s in scores]
    best, best_obj = None, math.inf
    for choice in itertools.product(*(range(k) for k in sizes)):
        if allowed is not None and not all(allowed[i][j] for i, j in enumerate(choice)):
            continue
        if any(sum(costs[r][i][j] for i, j in enumerate(choice)) > lim for r, lim in limits.items()):
            continue
        if any(len({tie_keys[i][choice[i]] for i in g}) > 1 for g in ties):
            continue
        obj = sum(scores[i][j] for i, j in enumerate(choice))
        if obj < best_obj:
            best, best_obj = choice, obj
    return best, best_obj


# ---------------------------------------------------------------------------- tolerance search


@dataclass(frozen=True)
class SearchResult:
    budget: float | None  # the smallest budget found within tolerance (None: not even `hi`)
    ratio: float | None  # its measured ratio
    history: tuple[tuple[float, float], ...]  # (budget, ratio) in the order measured
    tolerance: float

    @property
    def within(self) -> bool:
        return self.ratio is not None and self.ratio <= 1 + self.tolerance


def tolerance_search(
    evaluate: Callable[[float], float], lo: float, hi: float, tolerance: float,
    resolution: float = 0.05, max_steps: int = 10,
) -> SearchResult:
    """Bisection for the smallest budget in [lo, hi] whose measured ratio ≤ 1 + tolerance.

    `evaluate(budget)` allocates at that budget, quantizes and returns the measured ratio (e.g.
    calibration perplexity / full-precision perplexity). It assumes the ratio falls as the budget
    grows; every measurement is in `history`, and the answer is the smallest budget *measured*
    within tolerance, so a non-monotone step can cost optimality, never the tolerance."""
    if not (tolerance >= 0):
        raise ValueError(f"tolerance={tolerance!r} must be >= 0 (e.g. 0.02 for 2%)")
    if not lo < hi:
        raise ValueError(f"tolerance_search: need lo < hi, got {lo}, {hi}")
    history: list[tuple[float, float]] = []

    def ev(b: float) -> bool:
        r = float(evaluate(b))
        history.append((b, r))
        log.info("tolerance search: budget %.4g -> ratio %.4f (%s)", b, r, "within" if r <= 1 + tolerance else "over")
        return r <= 1 + tolerance

    if not ev(hi):
        return SearchResult(None, None, tuple(history), tolerance)
    steps = 1
    while hi - lo > resolution and steps < max_steps:
        mid = (lo + hi) / 2
        if ev(mid):
            hi = mid
        else:
            lo = mid
        steps += 1
    ok = [(b, r) for b, r in history if r <= 1 + tolerance]
    b, r = min(ok)
    return SearchResult(b, r, tuple(history), tolerance)


# --------------------------------------------------------------------------- plan helpers


def pin_allows(pin: Mapping[str, Any], cand: QuantScheme | None) -> bool:
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


def label_counts(plan: Mapping[str, QuantScheme | None]) -> dict[str, int]:
    """How many modules each candidate label has in `plan`."""
    out: dict[str, int] = {}
    for s in plan.values():
        out[label(s)] = out.get(label(s), 0) + 1
    return out


def simulated(linear: torch.nn.Module, scheme: QuantScheme, fqn: str, wcache: dict):
    """A throwaway simulated module: RTN weights (cached per module and weight args in `wcache`), fake-quant inputs."""
    sim = SimQuantLinear(linear, scheme)
    if scheme.weights is not None:
        key = (fqn, scheme.weights)
        if key not in wcache:
            wcache[key] = rtn_quantize(linear.weight.detach().float(), scheme.weights)
        sim.set_quantized(*wcache[key])
    return sim


def load_scores(path: str, names: Sequence[str], cands: Mapping[str, Sequence[QuantScheme | None]]) -> dict[str, dict[str, float]]:
    """The `scores` of an earlier run (a report.json, or a JSON {fqn: {candidate label: score}}),
    for every (module, candidate) of this one."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    for key in ("compression", "mixed_precision", "scores"):
        if isinstance(data, dict) and key in data and isinstance(data[key], dict):
            data = data[key]
    missing = [(f, label(c)) for f in names for c in cands[f] if label(c) not in data.get(f, {})]
    if missing:
        raise ValueError(f"mixed_precision: scores_file {path} has no score for {missing[:3]} ({len(missing)} missing)")
    return {f: {label(c): float(data[f][label(c)]) for c in cands[f]} for f in names}
