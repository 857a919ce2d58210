"""Pruning: masks and scores (prune/masks.py), SparseGPT alone and joint with quantization
(prune/sparsegpt.py), the stages `magnitude` / `wanda` / `sparsegpt` on the tiny model, the
sparse recipes through save/load, and N:M checks on the reloaded checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.models import tiny_llama
from lmpress.kernels.formats import sparse24_mask
from lmpress.kernels.linear import Sparse24Linear
from lmpress.prune.masks import (check_nm, magnitude_scores, nm_mask, parse_structure, sparsity_of, unstructured_mask,
                                 wanda_scores)
from lmpress.prune.sparsegpt import sparsegpt_prune
from lmpress.quant.gptq import layer_objective
from lmpress.quant.primitives import dequantize, expand_qparam
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import QuantArgs
from lmpress.quant.sim import SimQuantLinear


# ============================================================ masks
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8), (8, 16), (5, 16)])
@pytest.mark.parametrize("cols", [16, 19, 35, 3])
def test_nm_mask_keeps_the_n_best_of_every_m(n, m, cols):
    s = torch.rand(7, cols, generator=torch.Generator().manual_seed(cols))
    mask = nm_mask(s, n, m)
    check_nm(mask, n, m, exact=True)
    for start in range(0, cols, m):  # the kept ones are the best of their group
        g, k = s[:, start:start + m], mask[:, start:start + m]
        kept_min = torch.where(k, g, torch.full_like(g, 2.0)).amin(1)
        dropped_max = torch.where(k, torch.full_like(g, -1.0), g).amax(1)
        assert bool((kept_min >= dropped_max).all())


def test_check_nm_catches_violations():
    mask = torch.tensor([[True, True, True, False, True, True, False, False]])
    with pytest.raises(AssertionError, match="more than 2"):
        check_nm(mask, 2, 4)
    with pytest.raises(AssertionError, match="exactly 2"):
        check_nm(torch.tensor([[True, False, False, False]]), 2, 4)
    check_nm(torch.tensor([[True, False, False, False]]), 2, 4, exact=False)


def test_unstructured_mask_fraction_and_comparison_group():
    s = torch.rand(10, 30, generator=torch.Generator().manual_seed(0))
    s[0] *= 100  # row 0 dominates: a matrix-wide threshold keeps it all, a per-row one does not
    whole = unstructured_mask(s, 0.5)
    assert int((~whole).sum()) == 150 and bool(whole[0].all())
    rows = unstructured_mask(s, 0.5, per_row=True)
    assert (~rows).sum(1).tolist() == [15] * 10
    assert bool(unstructured_mask(s, 0.0).all())


def test_scores():
    W = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    norms = torch.tensor([2.0, 0.1])
    assert torch.equal(magnitude_scores(W), W.abs())
    assert torch.allclose(wanda_scores(W, norms), torch.tensor([[2.0, 0.2], [6.0, 0.05]]))
    with pytest.raises(ValueError, match="col_norms"):
        wanda_scores(W, torch.ones(3))


@pytest.mark.parametrize("bad", ["2:3", "4:4", "0:4", "2-4", "dense"])
def test_parse_structure_rejects(bad):
    with pytest.raises(ValueError, match="structure="):
        parse_structure(bad)


# ============================================================ SparseGPT
def _problem(rows=32, cols=64, n_tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(n_tokens, cols, generator=g) @ mix  # correlated inputs
    X[:, 5] *= 10  # an outlier channel
    H = 2 * X.T.double() @ X.double() / n_tokens
    W = torch.randn(rows, cols, generator=g)
    return W, H, X


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_sparsegpt_beats_wanda_and_magnitude_on_the_layer_objective(nm):
    W, H, X = _problem()
    res = sparsegpt_prune(W, H, nm=nm, block_size=32)
    check_nm(res["mask"], *nm)
    assert bool((res["weight"][~res["mask"]] == 0).all())
    wanda = W * nm_mask(wanda_scores(W, X.norm(dim=0)), *nm)
    mag = W * nm_mask(magnitude_scores(W), *nm)
    lw, lm = layer_objective(W, wanda, H), layer_objective(W, mag, H)
    assert res["loss"] < lw <= lm * 1.0001, (res["loss"], lw, lm)
    assert res["loss"] == pytest.approx(layer_objective(W, res["weight"], H))


@pytest.mark.parametrize("nm,sparsity", [((2, 4), None), (None, 0.6)], ids=["2:4", "unstructured"])
def test_refit_is_the_least_squares_optimum_for_the_mask(nm, sparsity):
    W, H, _ = _problem(cols=72)
    H[7, :] = 0.0  # a dead input
    H[:, 7] = 0.0
    swept = sparsegpt_prune(W, H, nm=nm, sparsity=sparsity, block_size=24)
    res = sparsegpt_prune(W, H, nm=nm, sparsity=sparsity, block_size=24, refit=True)
    m = res["mask"]
    assert torch.equal(m, swept["mask"]) and bool((res["weight"][~m] == 0).all())
    assert res["sweep_loss"] == pytest.approx(swept["loss"])
    assert res["loss"] < swept["loss"]
    # optimality: the damped objective's gradient 2 (Ŵ - W) H_d vanishes on every kept weight
    Hd = H.clone()
    Hd[7, 7] = 1.0
    Hd += res["damp"] * H.diagonal()[H.diagonal() > 0].mean() * torch.eye(72, dtype=H.dtype)
    W0 = W.double().clone()
    W0[:, 7] = 0.0
    grad = (res["weight"].double() - W0) @ Hd
    assert float(grad[m].abs().max()) < 1e-4 * float((W0 @ Hd).abs().max())
    with pytest.raises(ValueError, match="refit needs float weights"):
        sparsegpt_prune(W, H, nm=nm, sparsity=sparsity, refit=True, quant=QuantArgs(bits=4, granularity="channel"))


def test_sparsegpt_unstructured_sparsity_and_zero_target():
    W, H, _ = _problem(cols=70)
    res = sparsegpt_prune(W, H, nm=None, sparsity=0.6, block_size=32)
    assert sparsity_of(res["weight"]) == pytest.approx(0.6, abs=0.01)
    same = sparsegpt_prune(W, H, nm=None, sparsity=0.0, block_size=32)
    assert torch.allclose(same["weight"], W, atol=1e-5) and same["loss"] < 1e-8


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, granularity="group", group_size=16, symmetric=False),
    QuantArgs(bits=4, granularity="channel", symmetric=True),
    QuantArgs(bits=3, granularity="group", group_size=64, symmetric=False),
], ids=["w4g16asym", "w4ch", "w3g64"])
def test_joint_sparsegpt_quantization(args):
    W, H, _ = _problem()
    res = sparsegpt_prune(W, H, nm=(2, 4), quant=args, block_size=32)
    q, s, z = res["codes"], res["scale"], res["zero"]
    assert torch.equal(dequantize(q, s, z, args), res["weight"])
    check_nm(res["mask"], 2, 4)
    zf = expand_qparam(z, *W.shape, args)
    assert bool((q[~res["mask"]].float() == zf[~res["mask"]]).all())  # pruned: the zero point, value exactly 0
    assert bool((res["weight"][~res["mask"]] == 0).all())
    # joint beats pruning first and rounding afterwards (RTN of the SparseGPT weights)
    pruned = sparsegpt_prune(W, H, nm=(2, 4), block_size=32)["weight"]
    rq, rs, rz = rtn_quantize(pruned, args)
    assert res["loss"] < layer_objective(W, dequantize(rq, rs, rz, args), H)


def test_sparsegpt_validation_messages():
    W, H, _ = _problem()
    with pytest.raises(ValueError, match="block_size=30 must be a multiple of M=4"):
        sparsegpt_prune(W, H, nm=(2, 4), block_size=30)
    with pytest.raises(ValueError, match="needs sparsity"):
        sparsegpt_prune(W, H, nm=None)
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        sparsegpt_prune(W, H[:10, :10])


# ============================================================ stages on the tiny model
def _calib(n=8, seqlen=32, seed=0) -> CalibrationSet:
    toks = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=n, seqlen=seqlen, seed=seed,
                          fingerprint=fingerprint(toks))


def _recipe(stage: str, scheme, **opts) -> Recipe:
    return Recipe.from_dict({"version": 1, "schemes": {"lm_head": None, "re:.*": scheme}, "stages": [{stage: opts}]})


def _sims(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SimQuantLinear)}


@pytest.mark.parametrize("stage", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_stage_prunes_every_linear_n_m(stage, structure):
    model, _ = tiny_llama(seed=0)
    report = compress(model, _recipe(stage, {"sparsity": structure}, structure=structure), _calib())
    n, m = parse_structure(structure)
    sims = _sims(model)
    assert len(sims) == 14  # 2 layers x 7 linears; lm_head kept
    for name, sim in sims.items():
        check_nm(sim.weight, n, m, exact=False)
        assert sim.scheme.sparsity == structure
        assert report.modules[name]["structure"] == structure and report.modules[name]["method"] == stage
        assert report.modules[name]["sparsity"] >= 1 - n / m - 1e-6


def test_stage_output_error_orders_sparsegpt_wanda_magnitude():
    calib = _calib(n=16, seqlen=48)
    dense, _ = tiny_llama(seed=0)
    with torch.no_grad():
        ref = dense(calib.tokens).logits
    err = {}
    for stage in ("magnitude", "wanda", "sparsegpt"):
        model, _ = tiny_llama(seed=0)
        compress(model, _recipe(stage, {"sparsity": "2:4"}), calib)
        with torch.no_grad():
            err[stage] = float((model(calib.tokens).logits - ref).pow(2).mean())
    assert err["sparsegpt"] < err["magnitude"], err
    assert err["sparsegpt"] < err["wanda"], err


def test_targets_map_and_dense_modules():
    model, _ = tiny_llama(seed=0)
    targets = {"down_proj": None, "re:.*q_proj": "4:8", "re:.*layers\\.1\\..*": 0.3}
    compress(model, _recipe("wanda", {"preset": "W4A16", "weights": {"group_size": 32}}, structure="2:4", targets=targets), _calib())
    for name, sim in _sims(model).items():
        if name.endswith("down_proj"):
            assert sim.scheme.sparsity is None and sparsity_of(sim.weight) < 0.2  # left dense (no quantization stage follows)
        elif name.endswith("q_proj"):
            check_nm(sim.weight, 4, 8, exact=False)
            assert sim.scheme.sparsity == "4:8"
        elif ".layers.1." in name:
            assert sim.scheme.sparsity is None and sparsity_of(sim.weight) == pytest.approx(0.3, abs=0.02)
        else:
            check_nm(sim.weight, 2, 4, exact=False)


def test_owl_allocates_per_layer_sparsity_around_the_target():
    model, _ = tiny_llama(seed=0)
    report = compress(model, _recipe("wanda", {"preset": "W8A16"}, structure="unstructured", sparsity=0.5, owl_lambda=0.1), _calib())
    per_layer = {}
    for name, row in report.modules.items():
        per_layer.setdefault(name.split(".")[2], []).append(row["sparsity"])
    means = sorted(sum(v) / len(v) for v in per_layer.values())
    assert means[0] < 0.5 - 0.05 and means[-1] > 0.5 + 0.05  # +-lambda: 0.4 and 0.6 for two layers
    assert sum(means) / len(means) == pytest.approx(0.5, abs=0.02)


def test_stage_validation():
    with pytest.raises(ValueError, match="structure"):
        _recipe("sparsegpt", {"sparsity": "2:4"}, structure="3:3")
    with pytest.raises(ValueError, match="owl_lambda"):
        _recipe("wanda", {"sparsity": "2:4"}, owl_lambda=0.9)
    with pytest.raises(ValueError, match="targets"):
        _recipe("wanda", {"sparsity": "2:4"}, targets={"q_proj": "2:5"})
    model, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="sparsity '4:8' but the stage prunes it as 2:4"):
        compress(model, _recipe("magnitude", {"sparsity": "4:8"}, structure="2:4"))
    model, _ = tiny_llama(seed=0)
    r = Recipe.from_dict({"version": 1, "schemes": {"lm_head": None, "re:.*": "W8A16"}, "stages": [{"rtn": {}}, {"magnitude": {}}]})
    with pytest.raises(ValueError, match="before rtn/gptq"):
        compress(model, r)
    model, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="calibration"):
        compress(model, _recipe("wanda", {"sparsity": "2:4"}))


# ============================================================ recipes through the checkpoint
@pytest.mark.parametrize("name", ["sparse24-sparsegpt", "sparse24-wanda", "sparse24-sparsegpt-w4a16"])
def test_sparse_recipes_save_load_and_check_groups(name, tmp_path):
    model, tok = tiny_llama(seed=0)
    calib = _calib()
    compress(model, name, calib)
    out = save(model, tmp_path / "ckpt", tokenizer=tok)
    manifest = json.loads((out / "config.json").read_text())["quantization_config"]
    assert manifest["format_version"] == 2 and manifest["lmpress"]["sparsity"]["format"] == "sparse24"
    assert len(manifest["lmpress"]["sparsity"]["modules"]) == 14
    loaded = load(out)
    mods = [m for m in loaded.modules() if isinstance(m, Sparse24Linear)]
    assert len(mods) == 14
    for m in mods:
        check_nm(sparse24_mask(m.weight_sparse24_meta, m.in_features), 2, 4, exact=True)
        check_nm(m.dense_weight(), 2, 4, exact=False)
    with torch.no_grad():
        assert torch.equal(loaded(calib.tokens[:2]).logits, model(calib.tokens[:2]).logits)


# ============================================================ structured pruning
def test_keep_heads_per_kv_group_and_columns():
    from lmpress.prune.structured import head_columns, keep_heads

    scores = torch.tensor([0.1, 0.9, 0.5, 3.0, 0.2, 0.4])  # 2 KV groups of 3 query heads
    heads = keep_heads(scores, n_kv=2, keep_per_group=2)
    assert heads.tolist() == [1, 2, 3, 5]
    assert head_columns(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_structured_stage_equals_zeroing_the_removed_channels(tmp_path):
    """The shrunk model computes what the original computes with the removed FFN channels and
    heads zeroed (their down_proj / o_proj columns set to 0), and save/load keeps the new sizes."""
    from lmpress.prune.structured import ffn_channel_scores, head_scores  # noqa: F401  (ranking is tested through the stage)

    calib = _calib()
    model, tok = tiny_llama(seed=0)
    ref, _ = tiny_llama(seed=0)
    report = compress(model, Recipe.from_dict({"version": 1, "schemes": {"lm_head": None, "re:.*": {"sparsity": "2:4"}},
                                               "stages": [{"structured": {"ffn_keep": 0.5, "heads_keep": 0.67, "multiple_of": 8}}]}), calib)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (80, 4, 2, 16)
    assert report.extra["structured"]["intermediate_size"] == [160, 80]
    for i, layer in enumerate(model.model.layers):
        rl = ref.model.layers[i]
        # which channels/heads survived: match the kept rows of gate_proj / q_proj against the original
        Wg, Wg0 = layer.mlp.gate_proj.weight, rl.mlp.gate_proj.weight
        kept_c = [int((Wg0 == Wg[r]).all(1).nonzero()[0]) for r in range(Wg.shape[0])]
        Wq, Wq0 = layer.self_attn.q_proj.weight, rl.self_attn.q_proj.weight
        kept_q = [int((Wq0 == Wq[r]).all(1).nonzero()[0]) for r in range(Wq.shape[0])]
        assert len(set(kept_c)) == 80 and len(set(kept_q)) == 64
        heads = sorted({c // 16 for c in kept_q})
        assert [sum(1 for h in heads if h // 3 == g) for g in range(2)] == [2, 2]  # 2 of 3 heads in each KV group
        with torch.no_grad():
            drop_c = torch.ones(160, dtype=torch.bool)
            drop_c[kept_c] = False
            rl.mlp.down_proj.weight[:, drop_c] = 0
            drop_q = torch.ones(96, dtype=torch.bool)
            drop_q[kept_q] = False
            rl.self_attn.o_proj.weight[:, drop_q] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(calib.tokens).logits, ref(calib.tokens).logits, rtol=1e-4, atol=1e-4)
    out = save(model, tmp_path / "ckpt", tokenizer=tok)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 80
    loaded = load(out)
    with torch.no_grad():
        assert torch.equal(loaded(calib.tokens[:2]).logits, model(calib.tokens[:2]).logits)


def test_structured_stage_validation():
    with pytest.raises(ValueError, match="ffn_keep"):
        _recipe("structured", {"sparsity": "2:4"}, ffn_keep=0)
    model, _ = tiny_llama(seed=0)
    r = Recipe.from_dict({"version": 1, "schemes": {"lm_head": None, "re:.*": "W8A16"},
                          "stages": [{"rtn": {}}, {"structured": {"ffn_keep": 0.5}}]})
    with pytest.raises(ValueError, match="run stage 'structured' first"):
        compress(model, r, _calib())
