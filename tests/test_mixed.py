"""Mixed precision: candidates, costs, sensitivities, the exact knapsack (vs brute force), the
tolerance search (quant/mixed.py) and the `mixed_precision` stage on the tiny model (plans the
quantization stages follow, manifest, inspect, recipe round trip, bit map)."""
import math
import random

import pytest
import torch

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress import Recipe, compress, inspect, load, save
from lmpress.compress.pipeline import build_plan
from lmpress.compress.recipe import freeze_plan
from lmpress.kernels.linear import PackedLinear
from lmpress.quant import mixed as mx
from lmpress.quant.primitives import fake_quantize
from lmpress.quant.scheme import QuantArgs, QuantScheme, W4A4


def _calib(n=6, seqlen=32, seed=0) -> CalibrationSet:
    toks = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=n, seqlen=seqlen, seed=seed, fingerprint=fingerprint(toks))


G32 = {"preset": "W3A16", "weights": {"group_size": 32, "symmetric": False}}


def _recipe(mp: dict, schemes=None, quant="rtn") -> Recipe:
    return Recipe.from_dict({"version": 1, "name": "mixed-test", "schemes": schemes or {"lm_head": None, "re:.*": G32},
                             "stages": [{"mixed_precision": {"samples": 3, **mp}}, {quant: {}}]})


# ---------------------------------------------------------------------------- allocation


def _instance(rng: random.Random, n: int, k: int):
    shapes = [(rng.choice([8, 16, 24]), rng.choice([16, 32])) for _ in range(n)]
    bits = [2, 3, 4, 8][:k]
    scores = [[rng.random() * 10 ** rng.uniform(-3, 1) for _ in bits] for _ in range(n)]
    costs = {"weight_bits": [[r * c * b for b in bits] for r, c in shapes],
             "bytes": [[rng.randint(1, 50) for _ in bits] for _ in range(n)]}
    return shapes, scores, costs


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_optimal_against_brute_force_and_within_budget(seed):
    rng = random.Random(seed)
    shapes, scores, costs = _instance(rng, n=rng.randint(3, 6), k=rng.choice([3, 4]))
    numel = sum(r * c for r, c in shapes)
    limits = mx.budget_limits({"weight_bits": rng.uniform(2.5, 4.5)}, shapes)
    if seed % 2:
        limits["bytes"] = int(sum(sum(t) / len(t) for t in costs["bytes"]))
    best, best_obj = mx.brute_force(scores, costs, limits)
    if best is None:
        with pytest.raises(mx.AllocationError):
            mx.allocate(scores, costs, limits)
        return
    a = mx.allocate(scores, costs, limits)
    assert a.status == "optimal"
    assert a.objective == pytest.approx(best_obj, rel=1e-9, abs=1e-12)
    for r, lim in limits.items():  # exact integer totals, recomputed here
        total = sum(costs[r][i][j] for i, j in enumerate(a.choice))
        assert total == a.totals[r] and total <= lim
    assert a.totals["weight_bits"] / numel <= limits["weight_bits"] / numel


def test_budget_is_met_exactly_when_it_binds():
    # four equal modules, W4 always better: at 3.5 average bits exactly two take W4, not fewer
    shapes = [(64, 64)] * 4
    scores = [[1.0 + i, 0.1] for i in range(4)]  # [W3, W4]
    costs = {"weight_bits": [[r * c * 3, r * c * 4] for r, c in shapes]}
    limits = mx.budget_limits({"weight_bits": 3.5}, shapes)
    assert limits["weight_bits"] == 7 * 64 * 64 * 4 // 2
    a = mx.allocate(scores, costs, limits)
    assert a.totals["weight_bits"] == limits["weight_bits"]
    assert a.choice == (0, 0, 1, 1)  # the two modules that lose most at W3 get W4


def test_pins_and_ties_are_respected():
    rng = random.Random(3)
    n, k = 6, 4
    scores = [[rng.random() for _ in range(k)] for _ in range(n)]
    costs = {"act_bits": [[4, 8, 4, 8]] * n, "weight_bits": [[3, 3, 4, 4]] * n}
    keys = [["A4", "A8", "A4", "A8"]] * n
    allowed = [[True] * k for _ in range(n)]
    allowed[0] = [False, False, True, True]  # module 0 pinned to W4
    ties = [[1, 2, 3], [4, 5]]
    limits = {"act_bits": 4 * n + 8, "weight_bits": 3 * n + 2}
    best, best_obj = mx.brute_force(scores, costs, limits, allowed, ties, keys)
    a = mx.allocate(scores, costs, limits, allowed=allowed, ties=ties, tie_keys=keys)
    assert a.objective == pytest.approx(best_obj, rel=1e-12)
    assert a.choice[0] in (2, 3)
    for g in ties:
        assert len({keys[i][a.choice[i]] for i in g}) == 1
    # without the tie the optimum differs on this instance (so the constraint does something)
    free, free_obj = mx.brute_force(scores, costs, limits, allowed)
    assert free_obj < best_obj


def test_infeasible_budget_says_what_is_achievable():
    with pytest.raises(mx.AllocationError, match="least achievable"):
        mx.allocate([[0.0, 1.0]], {"weight_bits": [[30, 40]]}, {"weight_bits": 29})


def test_tolerance_search_finds_the_smallest_budget_within_tolerance():
    f = lambda b: 1 + 0.5 * math.exp(-(b - 3))  # falls with the budget; 1.05 at b = 3 + ln 10
    r = mx.tolerance_search(f, 3.0, 8.0, 0.05, resolution=0.01, max_steps=20)
    assert r.within and r.ratio <= 1.05
    assert 3 + math.log(10) <= r.budget <= 3 + math.log(10) + 0.01
    none = mx.tolerance_search(lambda b: 2.0, 3.0, 8.0, 0.05)
    assert none.budget is None and not none.within and len(none.history) == 1


# ---------------------------------------------------------------------------- candidates and costs


def test_candidates_merge_onto_the_base_and_dedupe():
    base = QuantScheme.from_dict(G32)
    c = mx.candidate_schemes(base, weights=[{"bits": 3}, {"bits": 4}, {"bits": 3}, None])
    assert [mx.label(s) for s in c] == ["W3g32A16", "W4g32A16", "W16A16"]
    assert c[1].weights.group_size == 32 and not c[1].weights.symmetric and c[2] is None
    a = mx.candidate_schemes(W4A4, inputs=[{"bits": 4}, {"bits": 8}, None])
    assert [mx.label(s) for s in a] == ["W4A4", "W4A8", "W4A16"]
    assert a[1].inputs.dynamic and a[1].inputs.granularity == "token"


@pytest.mark.parametrize("spec", [
    {"weights": {"bits": 3, "granularity": "group", "group_size": 64, "symmetric": False}},
    {"weights": {"bits": 2, "granularity": "group", "group_size": 32, "symmetric": True}},
    {"weights": {"bits": 8, "granularity": "channel"}},
    {"weights": {"bits": 4, "granularity": "tensor"}},
])
def test_storage_bytes_match_packed_linear(spec):
    s = QuantScheme.from_dict(spec)
    m = PackedLinear(200, 24, s, bias=False)  # in 200: partial last group, 3-bit words straddle
    assert mx.storage_bytes(s, (24, 200)) == sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert mx.weight_bits(s, (24, 200)) == 24 * 200 * s.weights.bits
    assert mx.weight_bits(QuantScheme(weights=s.weights, sparsity="2:4"), (24, 200)) == 24 * 200 * (s.weights.bits + 2) // 2


def test_proxies_are_the_output_errors_they_claim():
    torch.manual_seed(0)
    W, X = torch.randn(12, 32), torch.randn(500, 32) * torch.linspace(0.1, 3, 32)
    H = 2 * X.T @ X / X.shape[0]
    args = QuantArgs(bits=3, granularity="group", group_size=16, symmetric=False)
    dW = W - mx.rtn_weight(W, args)
    assert mx.hessian_proxy(W, H, args) == pytest.approx(2 * float((X @ dW.T).pow(2).sum()) / 500, rel=1e-5)
    assert mx.hessian_proxy(W, H, None) == 0.0
    a = QuantArgs(bits=4, granularity="token", dynamic=True)
    dX = X - fake_quantize(X, a)
    E = 2 * dX.T @ dX / X.shape[0]
    assert mx.input_proxy(W, E) == pytest.approx(2 * float((dX @ W.T).pow(2).sum()) / 500, rel=1e-5)


# ---------------------------------------------------------------------------- the stage


def test_stage_plan_is_followed_by_the_quantization_stages(tiny):
    model, _ = tiny
    pins = {"layers.0.self_attn.v_proj": {"weights": {"bits": 8}}, "layers.1.mlp.down_proj": {"weights": {"bits": 2}}}
    r = _recipe({"weights": [{"bits": 2}, {"bits": 3}, {"bits": 4}, {"bits": 8}], "budget": {"weight_bits": 3.5},
                 "sensitivity": "hessian", "pins": pins}, quant="gptq")
    rep = compress(model, r, _calib())
    mp = rep.extra["mixed_precision"]
    plan = model.lmpress_meta["plan"]
    assert mp["avg_weight_bits"] <= 3.5 and mp["status"] == "optimal"
    v = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert v.scheme.weights.bits == 8 and plan["model.layers.0.self_attn.v_proj"].weights.bits == 8
    assert int(v.weight_codes.max()) > 7 or int(v.weight_codes.min()) < -8  # really 8-bit codes
    d = model.get_submodule("model.layers.1.mlp.down_proj")
    assert d.scheme.weights.bits == 2 and -2 <= int(d.weight_codes.min()) and int(d.weight_codes.max()) <= 1
    for fqn, p in mp["plan"].items():  # every module quantized as the plan says
        assert model.get_submodule(fqn).scheme.weights.bits == p["weights"] == plan[fqn].weights.bits
    assert len({p["scheme"] for p in mp["plan"].values()}) >= 2


def test_activation_plan_with_ties_and_a8(tiny):
    model, _ = tiny
    r = _recipe({"inputs": [{"bits": 4}, {"bits": 8}], "budget": {"act_bits": 5.2}, "sensitivity": "fisher"},
                schemes={"lm_head": None, "re:.*": "W4A4"})
    rep = compress(model, r, _calib())
    plan = model.lmpress_meta["plan"]
    a8 = [f for f, s in plan.items() if s.inputs.bits == 8]
    assert 0 < len(a8) and sum(s.inputs.bits for s in plan.values()) <= math.floor(5.2 * len(plan))
    for i in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            bits = {plan[f].inputs.bits for f in plan if f.startswith(f"model.layers.{i}.") and f.rsplit(".", 1)[1] in group}
            assert len(bits) == 1  # tied to the shared input
    assert model.get_submodule(a8[0]).scheme.inputs.bits == 8
    s = rep.extra["mixed_precision"]["scores"]["model.layers.0.self_attn.q_proj"]
    assert s["W4A4"] > s["W4A8"] > 0  # the activation part reaches layer 0's inputs


def test_measured_score_is_the_kl_of_that_single_change(tiny):
    model, _ = tiny
    import copy

    fp = copy.deepcopy(model)
    calib = _calib()
    rep = compress(model, _recipe({"weights": [{"bits": 2}, {"bits": 4}], "budget": {"weight_bits": 3}, "metric": "kl"}), calib)
    got = rep.extra["mixed_precision"]["scores"]["model.layers.1.self_attn.o_proj"]["W2g32A16"]
    # the same change made by hand, the model run whole
    from lmpress.quant.sim import SimQuantLinear
    from lmpress.quant.rtn import rtn_quantize

    toks = calib.tokens[:3]
    with torch.no_grad():
        ref = torch.log_softmax(fp(toks).logits.float(), -1)
        lin = fp.get_submodule("model.layers.1.self_attn.o_proj")
        s = QuantScheme.from_dict({**G32, "weights": {**G32["weights"], "bits": 2}})
        sim = SimQuantLinear(lin, s)
        sim.set_quantized(*rtn_quantize(lin.weight.float(), s.weights))
        fp.model.layers[1].self_attn.o_proj = sim
        kl, n = mx.kl_to_reference(fp(toks).logits, ref)
    assert got == pytest.approx(kl / n, rel=1e-4, abs=1e-9) and got > 0


def test_tolerance_mode_returns_a_plan_within_tolerance(tiny):
    model, _ = tiny
    calib = _calib()
    r = _recipe({"weights": [{"bits": 2}, {"bits": 3}, {"bits": 4}, {"bits": 8}], "tolerance": 0.002,
                 "sensitivity": "hessian"})
    import copy

    fp = copy.deepcopy(model)
    rep = compress(model, r, calib)  # rtn after the stage: the same quantizer the search measured
    t = rep.extra["mixed_precision"]["tolerance"]
    assert t["calib_ppl_ratio"] <= 1.002 and t["budget"] < 8
    toks = calib.tokens[:3]
    with torch.no_grad():
        nq, c = mx.token_nll(model(toks).logits, toks)
        nf, _ = mx.token_nll(fp(toks).logits, toks)
    assert math.exp((nq - nf) / c) == pytest.approx(t["calib_ppl_ratio"], rel=1e-5)
    assert rep.extra["mixed_precision"]["avg_weight_bits"] <= t["budget"] + 1e-12
    assert any(r > 1.002 for _, r in t["history"])  # the search did reject smaller budgets


def test_mixed_checkpoint_round_trip_inspect_and_recipe(tiny, tmp_path):
    from typer.testing import CliRunner

    from lmpress.cli.main import app
    from lmpress.compress.models import tiny_llama

    model, tok = tiny
    r = _recipe({"weights": [{"bits": 2}, {"bits": 3}, {"bits": 4}, {"bits": 8}], "budget": {"weight_bits": 3.5},
                 "sensitivity": "hessian_trace", "pins": {"layers.0.self_attn.k_proj": {"weights": {"bits": 3}}}})
    compress(model, r, _calib())
    plan = model.lmpress_meta["plan"]
    bits = {s.weights.bits for s in plan.values()}
    assert 3 in bits and len(bits) >= 3  # several packed widths, one of them straddling int32 words
    out = save(model, tmp_path / "ck", tokenizer=tok)
    back = load(out)
    x = _calib(2, 24, seed=5).tokens
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=1e-5)
    manifest = back.lmpress_meta["manifest"]
    for fqn, s in plan.items():
        assert QuantScheme.from_dict(manifest["modules"][fqn]) == s
        assert manifest["lmpress"]["mixed_precision"]["plan"][fqn]["weights"] == s.weights.bits
    info = inspect(out)
    assert info["mixed_precision"]["avg_weight_bits"] <= 3.5 and "scores" not in info["mixed_precision"]
    res = CliRunner().invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "mixed precision" in res.output and "layer" in res.output
    # the frozen recipe reproduces the plan on a fresh model, through YAML
    frozen = Recipe.from_yaml(freeze_plan(r, plan).to_yaml())
    assert [s.name for s in frozen.stages] == ["rtn"]
    fresh, _ = tiny_llama(seed=0)
    assert build_plan(fresh, frozen) == plan


def test_report_draws_the_bit_map(tmp_path):
    from lmpress.eval.report import write_report

    plan = {f"model.layers.{i}.{p}": {"scheme": "x", "weights": b, "inputs": 16}
            for i in range(3) for p, b in (("self_attn.q_proj", 3), ("mlp.down_proj.linear", 4))}
    write_report(tmp_path, {"model": "m", "recipe": "r", "compression": {"mixed_precision": {"plan": plan}}})
    assert (tmp_path / "plots" / "bit_map.png").stat().st_size > 1000
    assert "bit_map.png" in (tmp_path / "report.md").read_text()


def test_stage_options_are_validated():
    with pytest.raises(Exception, match="sensitivity"):
        _recipe({"weights": [{"bits": 3}], "budget": {"weight_bits": 3}, "sensitivity": "magic"})
    with pytest.raises(Exception, match="budget"):
        _recipe({"weights": [{"bits": 3}], "budget": {"bitz": 3}})
    with pytest.raises(Exception, match="budget.*or a `tolerance`"):
        _recipe({"weights": [{"bits": 3}]})
    with pytest.raises(Exception, match="pin"):
        compress(__import__("lmpress.compress.models", fromlist=["x"]).tiny_llama()[0],
                 _recipe({"weights": [{"bits": 3}], "budget": {"weight_bits": 3}, "pins": {"nothing_here": {"weights": None}}}), _calib())


@pytest.mark.parametrize("name", ["mixed-w3.5-gptq", "mixed-w4a4-a8outliers"])
def test_builtin_mixed_recipes_run_on_the_tiny_model(name):
    from lmpress.compress.models import tiny_llama

    model, _ = tiny_llama(seed=1)
    rep = compress(model, name, _calib(8, 32))
    mp = rep.extra["mixed_precision"]
    plan = model.lmpress_meta["plan"]
    if name == "mixed-w3.5-gptq":
        assert mp["avg_weight_bits"] <= 3.5 and {s.weights.bits for s in plan.values()} <= {3, 4, 8}
        assert all(s.weights.group_size == 64 for s in plan.values())
    else:
        assert {s.inputs.bits for s in plan.values()} == {4, 8} and mp["avg_act_bits"] <= 4.4 + 1e-12
        assert all(s.weights.bits == 4 for s in plan.values())
    assert all(m.quantized for f in plan if (m := model.get_submodule(f)) is not None)


def test_measured_scores_against_the_base_model(tiny):
    """reference: base — every other module on the recipe's scheme; the score of (m, c) is the KL
    of the base model with m switched to c minus the base model's own KL."""
    import copy

    from lmpress.quant.rtn import rtn_quantize
    from lmpress.quant.sim import SimQuantLinear
    from lmpress.compress.surgery import linear_names, set_module

    model, _ = tiny
    fp = copy.deepcopy(model)
    calib = _calib()
    r = _recipe({"inputs": [{"bits": 4}, {"bits": 8}], "budget": {"act_bits": 4.6}, "reference": "base", "tie_inputs": False},
                schemes={"lm_head": None, "re:.*": "W4A4"})
    scores = compress(model, r, calib).extra["mixed_precision"]["scores"]
    assert all(s["W4A4"] == 0.0 for s in scores.values())
    toks = calib.tokens[:3]

    def kl_with(a8: str | None) -> float:
        m = copy.deepcopy(fp)
        for f in linear_names(m):
            if f == "lm_head":
                continue
            lin = m.get_submodule(f)
            s = QuantScheme(weights=W4A4.weights, inputs=(W4A4.inputs if f != a8 else QuantArgs(bits=8, granularity="token", dynamic=True)))
            sim = SimQuantLinear(lin, s)
            sim.set_quantized(*rtn_quantize(lin.weight.float(), s.weights))
            set_module(m, f, sim)
        with torch.no_grad():
            kl, n = mx.kl_to_reference(m(toks).logits, torch.log_softmax(fp(toks).logits.float(), -1))
        return kl / n

    f = "model.layers.0.mlp.down_proj"
    want = kl_with(f) - kl_with(None)
    assert abs(want) > 1e-7  # a real difference (on this random tiny model its sign is noise)
    assert scores[f]["W4A8"] == pytest.approx(want, rel=1e-3)


def test_scores_file_reads_a_report_and_names_what_is_missing(tmp_path):
    import json

    from lmpress.quant.scheme import QuantArgs, QuantScheme

    w3, w4 = QuantScheme(weights=QuantArgs(bits=3)), QuantScheme(weights=QuantArgs(bits=4))
    cands = {"a": [w3, w4], "b": [w3, None]}
    scores = {"a": {mx.label(w3): 2.0, mx.label(w4): 1.0}, "b": {mx.label(w3): 0.5, mx.label(None): 0.0}}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"compression": {"mixed_precision": {"scores": scores}}}))
    assert mx.load_scores(str(report), ["a", "b"], cands) == scores
    with pytest.raises(ValueError, match=r"has no score for \[\('c'"):
        mx.load_scores(str(report), ["a", "c"], {**cands, "c": [w3]})
