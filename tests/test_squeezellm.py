"""SqueezeLLM dense-and-sparse quantization: the maths (`quant.squeezellm`), the runtime module
(`LUTLinear`), the Triton LUT dequant-GEMM against its torch oracle under the interpreter
(`kernels.lut_gemm`; its ahead-of-time compile is tests/test_aot.py's), the stage, and the packed
checkpoint round trip."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.calibration.stats import token_weights
from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.ct_format import why_not
from lmpress.compress.models import tiny_llama
from lmpress.kernels.dispatch import interpreter_ready
from lmpress.kernels.formats import pack_unsigned, packed_cols
from lmpress.kernels.linear import LUTLinear, sparse_col_dtype
from lmpress.kernels.lut_gemm import lut_gemm, lut_gemm_ref, lut_weight
from lmpress.quant import squeezellm as sq
from lmpress.quant.gptq import layer_objective
from _interpreter import run_triton_tests_in_interpreter

INTERP = interpreter_ready()
in_interpreter = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 at start-up; run by test_triton_suite_in_interpreter")


def _w(N, K, seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def _weighted_err(W, F, C, codes):
    return float((F * (W - C.gather(1, codes)).pow(2)).sum())


# ============================================================ maths


def test_kmeans_is_exact_when_a_row_has_no_more_values_than_centroids():
    W = torch.tensor([[0.5, -1.0, 2.0, 0.5, 2.0, -1.0, 3.0, 3.0]]).repeat(3, 1)  # 4 distinct values a row
    C, codes = sq.weighted_kmeans(W, torch.ones_like(W), 4)
    assert torch.equal(C.gather(1, codes), W)
    assert torch.all(C[:, 1:] >= C[:, :-1])  # sorted tables


def test_lloyd_iterations_lower_the_weighted_error_of_the_quantile_start():
    W, F = _w(16, 200), torch.rand(16, 200, generator=torch.Generator().manual_seed(1)) ** 4
    C0 = sq.weighted_quantiles(W, F, 8)
    start = _weighted_err(W, F, C0, sq.assign(W, C0))
    C, codes = sq.weighted_kmeans(W, F, 8)
    assert torch.equal(codes, sq.assign(W, C))  # converged: every entry at its nearest centroid
    assert _weighted_err(W, F, C, codes) < 0.8 * start


def test_fisher_weights_pull_the_centroids_to_the_sensitive_entries():
    W = _w(8, 256)
    W[:, :32] = 2 + torch.rand(8, 32, generator=torch.Generator().manual_seed(1))  # a tail region of [2, 3)
    F = torch.ones_like(W)
    F[:, :32] = 1000.0  # ... whose entries matter most
    Cf, cf = sq.weighted_kmeans(W, F, 4)
    Cu, cu = sq.weighted_kmeans(W, torch.ones_like(W), 4)
    err = lambda C, c: float((W - C.gather(1, c))[:, :32].pow(2).sum())  # noqa: E731
    assert err(Cf, cf) < 0.5 * err(Cu, cu)


def test_sparse_mask_keeps_the_largest_deviations_then_the_most_sensitive():
    W, F = _w(20, 50), torch.rand(20, 50, generator=torch.Generator().manual_seed(2))
    mask = sq.sparse_mask(W, F, outliers=0.01, sensitive=0.02)
    assert int(mask.sum()) == 10 + 20
    dev = (W - W.mean(1, keepdim=True)).abs()
    top = dev.flatten().topk(10).indices
    assert mask.flatten()[top].all()
    rest = F.flatten().masked_fill(torch.zeros(1000, dtype=torch.bool).index_fill_(0, top, True), -1)
    assert mask.flatten()[rest.topk(20).indices].all()
    assert not sq.sparse_mask(W, None, 0.0, 0.5).any()  # no Fisher: no sensitive entries


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_squeeze_reconstructs_sparse_entries_to_fp16_and_the_rest_from_the_table(bits):
    W = _w(33, 77) * torch.logspace(-1, 1, 33)[:, None]
    W[3, 5] = 40.0  # an outlier
    r = sq.squeeze(W, torch.rand_like(W), bits, outliers=0.01, sensitive=0.005)
    assert r["codes"].dtype == torch.uint8 and int(r["codes"].max()) < (1 << bits)
    assert r["codebook"].shape == (33, 1 << bits) and r["codebook"].dtype == torch.float16
    Wh = sq.dequantize(r["codes"], r["codebook"], r["sparse"])
    nz = r["sparse"] != 0
    assert nz[3, 5] and abs(float(Wh[3, 5]) - 40.0) < 40.0 * 2 ** -10
    dense = r["codebook"].float().gather(1, r["codes"].long())
    assert torch.equal(Wh[~nz], dense[~nz])
    # every dense entry sits at its row's nearest table value
    assert torch.equal(r["codes"].long(), sq.assign(W, r["codebook"].float()))
    err4 = ((Wh - W).norm() / W.norm()).item()
    assert err4 < {2: 0.45, 3: 0.22, 4: 0.12}[bits]


def test_more_bits_and_more_sparse_entries_lower_the_error():
    W = _w(64, 128)
    W[::7, ::11] *= 15  # heavy tails
    err = lambda bits, o: ((sq.dequantize(**{k: v for k, v in sq.squeeze(W, None, bits, o, 0).items()}) - W).norm()).item()  # noqa: E731
    assert err(4, 0.0) < err(3, 0.0) < err(2, 0.0)
    assert err(3, 0.01) < err(3, 0.0)


def test_squeeze_refuses_unsupported_widths():
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        sq.squeeze(_w(4, 8), None, 8)


def _correlated_hessian(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) @ (torch.eye(K) + 0.6 * torch.randn(K, K, generator=g) / K ** 0.5)  # (n, K)
    X = X * torch.rand(K, generator=g) * 3
    return 2 * X.T @ X / X.shape[0]  # (K, K)


def test_gptq_assign_on_a_diagonal_hessian_is_the_nearest_centroid():
    """No correlation between inputs: an error has nowhere to go, so the codes are squeeze's."""
    W = _w(24, 40)
    mask, C = sq.fit_codebook(W, None, 3, outliers=0.02, sensitive=0.0)
    H = torch.diag(torch.rand(40, generator=torch.Generator().manual_seed(4)) + 0.1)
    parts, stats = sq.gptq_assign(W, H, mask, C)
    ref = sq.squeeze(W, None, 3, outliers=0.02, sensitive=0.0)
    assert torch.equal(parts["codes"], ref["codes"]) and torch.equal(parts["codebook"], ref["codebook"])
    assert torch.equal(parts["sparse"], ref["sparse"])
    assert stats["loss"] == pytest.approx(stats["nearest_loss"], rel=1e-9)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_assign_lowers_the_layer_objective_and_keeps_the_table(act_order):
    W, H = _w(48, 96, seed=5), _correlated_hessian(96)
    mask, C = sq.fit_codebook(W, torch.rand_like(W), 3, outliers=0.01, sensitive=0.005)
    parts, stats = sq.gptq_assign(W, H, mask, C, act_order=act_order)
    assert stats["loss"] < 0.9 * stats["nearest_loss"]
    Wh = sq.dequantize(parts["codes"], parts["codebook"], parts["sparse"])
    assert stats["loss"] == pytest.approx(layer_objective(W, Wh, H), rel=1e-6)
    assert torch.equal(parts["codebook"], C) and parts["codes"].dtype == torch.uint8
    assert not parts["sparse"][~mask].any()  # corrections only at the kept positions
    off = ~mask
    assert torch.equal(Wh[off], C.float().gather(1, parts["codes"].long())[off])


def test_gptq_assign_rows_are_independent_so_stacked_weights_solve_as_one():
    W1, W2, H = _w(16, 64, seed=6), _w(8, 64, seed=7), _correlated_hessian(64, seed=1)
    (m1, c1), (m2, c2) = sq.fit_codebook(W1, None, 4, 0.01, 0), sq.fit_codebook(W2, None, 4, 0.01, 0)
    both, _ = sq.gptq_assign(torch.cat([W1, W2]), H, torch.cat([m1, m2]), torch.cat([c1, c2]))
    one, _ = sq.gptq_assign(W2, H, m2, c2)
    assert torch.equal(both["codes"][16:], one["codes"]) and torch.equal(both["sparse"][16:], one["sparse"])


# ============================================================ the runtime module


def _lut_linear(N=21, K=37, bits=3, outliers=0.02, bias=True, seed=0):
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_w(N, K, seed))
    r = sq.squeeze(lin.weight, torch.rand(N, K), bits, outliers=outliers, sensitive=0.0)
    return lin, r, LUTLinear.from_parts(lin, r["codes"], r["codebook"], r["sparse"], bits)


@pytest.mark.parametrize("bits,K", [(3, 37), (4, 64), (2, 45), (3, 1)])
def test_lut_linear_holds_exactly_the_squeezed_weight(bits, K):
    lin, r, m = _lut_linear(K=K, bits=bits)
    assert m.weight_codes.shape == (21, packed_cols(K, bits))
    assert torch.equal(m.dense_weight(), sq.dequantize(r["codes"], r["codebook"], r["sparse"]))
    x = torch.randn(4, K)
    assert torch.equal(m(x), torch.nn.functional.linear(x, m.dense_weight(), lin.bias))
    assert m.kernel_path.kind == "ref"


def test_lut_linear_bits_per_weight_counts_every_stored_bit():
    _, _, m = _lut_linear(N=10, K=64, bits=4)
    nnz = m.nnz
    assert nnz > 0
    stored = 10 * 8 * 32 + 10 * 16 * 16 + 11 * 32 + nnz * 16 + nnz * 16  # codes, tables, rowptr, cols (int16), values
    assert m.bits_per_weight() == pytest.approx(stored / 640)
    assert sparse_col_dtype(32767) == torch.int16 and sparse_col_dtype(32768) == torch.int32  # wider layers: int32 columns


# ============================================================ the Triton kernel (interpreter)
CASES = [  # M, N, K, bits, dtype, bias, split_k, config
    (1, 24, 64, 4, torch.float32, True, None, None),
    (5, 40, 96, 3, torch.float32, False, None, None),
    (3, 17, 45, 2, torch.float32, True, None, None),
    (5, 24, 70, 3, torch.float16, True, None, None),  # 3-bit fields straddle words; a partial slab
    (1, 24, 96, 3, torch.float32, True, 3, {"BLOCK_K": 32}),  # split-K: partial sums, bias after
    (5, 40, 64, 4, torch.float32, False, 2, {"BLOCK_N": 16}),
]


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{c[3]}bit-{str(c[4])[6:]}"
                         f"{'-bias' if c[5] else ''}{f'-split{c[6]}' if c[6] else ''}")
def test_lut_gemm_matches_reference(case):
    M, N, K, bits, dtype, with_bias, split, config = case
    r = sq.squeeze(_w(N, K), None, bits, 0.0, 0.0)
    codes = pack_unsigned(r["codes"], bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    b = torch.randn(N).to(dtype) if with_bias else None
    y = lut_gemm(x, codes, r["codebook"], bits=bits, in_features=K, bias=b, split_k=split, config=config)
    ref = lut_gemm_ref(x, codes, r["codebook"], K, bits, b)
    assert y.dtype == dtype and y.shape == (M, N)
    rel = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= {torch.float32: 1e-6, torch.float16: 1e-3}[dtype]


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_code_reads_its_table_entry(bits):
    K, N = 48, 16
    codes = (torch.arange(N * K) % (1 << bits)).reshape(N, K).to(torch.uint8)
    table = torch.randn(N, 1 << bits).half()
    packed = pack_unsigned(codes, bits)
    eye = torch.eye(K)  # identity activations: the output is the weight, transposed
    y = lut_gemm(eye, packed, table, bits=bits, in_features=K)
    assert torch.equal(y.T, lut_weight(packed, table, K, bits))


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("bits,K", [(3, 70), (4, 64)])
def test_lut_linear_triton_path_adds_the_sparse_part(bits, K, monkeypatch):
    _, _, m = _lut_linear(N=24, K=K, bits=bits, outliers=0.03)
    assert m.nnz > 0
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(4))
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    with torch.no_grad():
        y = m(x)
    assert m.kernel_path.kind == "triton-lut"
    ref = torch.nn.functional.linear(x, m.dense_weight(), m.bias)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6


def test_lut_gemm_refuses_bad_input():
    r = sq.squeeze(_w(8, 32), None, 3, 0.0, 0.0)
    codes = pack_unsigned(r["codes"], 3)
    with pytest.raises(ValueError, match="int32 words per output channel"):
        lut_gemm(torch.randn(2, 32), codes[:, :-1].contiguous(), r["codebook"], bits=3, in_features=32)
    with pytest.raises(ValueError, match="codebook must be"):
        lut_gemm(torch.randn(2, 32), codes, r["codebook"][:, :4], bits=3, in_features=32)
    with pytest.raises(ValueError, match="bits"):
        lut_gemm(torch.randn(2, 32), codes, r["codebook"], bits=8, in_features=32)


def test_triton_suite_in_interpreter():
    run_triton_tests_in_interpreter(__file__)


# ============================================================ the stage and the checkpoint


def _calib(model, n=4, seqlen=32):
    toks = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=n, seqlen=seqlen, seed=0, fingerprint=fingerprint(toks))


@pytest.mark.parametrize("recipe", ["w3a16-squeezellm", "w4a16-squeezellm", "w3a16-squeezellm-gptq"])
def test_recipe_compresses_saves_and_reloads_bit_identically(tmp_path, recipe):
    model, _ = tiny_llama()
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).logits
    report = compress(model, Recipe.load(recipe), _calib(model))
    luts = {n: m for n, m in model.named_modules() if isinstance(m, LUTLinear)}
    assert len(luts) == 7 * model.config.num_hidden_layers and not isinstance(model.lm_head, LUTLinear)
    assert all(m.nnz > 0 for m in luts.values())
    extra = report.extra["squeezellm"]
    assert extra["modules"] == len(luts) and extra["bits_per_weight"] > int(recipe[1])
    with torch.no_grad():
        y = model(x).logits
    assert ((y - ref).norm() / ref.norm()).item() < 0.5
    out = save(model, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lmpress"
    assert qc["lmpress"]["codebooks"]["modules"]["model.layers.0.mlp.down_proj"]["bits"] == int(recipe[1])
    loaded = load(out)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, LUTLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, y)


@pytest.mark.parametrize("cap", [None, 1.0])
def test_gptq_option_solves_layer_zero_on_its_own_inputs_and_round_trips(tmp_path, cap):
    """gptq: true. Layer 0's q/k/v read the float model's normed embeddings: their codes are
    `gptq_assign` on those inputs' Hessian (computed here independently; with `token_cap`, each
    token weighted by `token_weights` over its batch), and the whole model is closer to the float
    one on the calibration text than with nearest-centroid codes."""
    model, _ = tiny_llama()
    calib = _calib(model, n=8, seqlen=32)
    attn = model.model.layers[0].self_attn
    xs = []
    hook = attn.q_proj.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        ref = model(calib.tokens).logits
    hook.remove()
    X = torch.cat(xs).double()  # (n * seqlen, hidden): one batch
    w = torch.ones(X.shape[0], dtype=X.dtype) if cap is None else token_weights(X, cap)  # (n * seqlen,)
    H = (2 * (X * w[:, None]).T @ X / X.shape[0]).float()
    Ws = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    fitted = [sq.fit_codebook(W, None, 3, 0.004, 0.0) for W in Ws]
    want, _ = sq.gptq_assign(torch.cat([W.detach() for W in Ws]), H, torch.cat([m for m, _ in fitted]),
                             torch.cat([c for _, c in fitted]))
    data = Recipe.load("w3a16-squeezellm").to_dict()
    plain = tiny_llama()[0]
    data["stages"] = [{"squeezellm": {"fisher": False, "sensitive": 0.0}}]
    compress(plain, Recipe.from_dict(data), calib)
    data["stages"] = [{"squeezellm": {"fisher": False, "sensitive": 0.0, "gptq": True, "token_cap": cap}}]
    report = compress(model, Recipe.from_dict(data), calib)
    assert report.extra["squeezellm"]["gptq"] is True
    got = torch.cat([m.dense_weight() for m in (attn.q_proj, attn.k_proj, attn.v_proj)])  # (q+k+v out, hidden)
    expect = sq.dequantize(want["codes"], want["codebook"], want["sparse"])
    assert (got == expect).float().mean().item() > 0.99  # the batched Hessian sums in another order
    assert report.modules["model.layers.0.self_attn.q_proj"]["method"] == "squeezellm-gptq"
    with torch.no_grad():
        err = lambda m: ((m(calib.tokens).logits - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(model) < err(plain)
    x = calib.tokens[:1, :12]
    loaded = load(save(model, tmp_path / "c"))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_plain_kmeans_without_sparse_part_round_trips(tmp_path):
    """No Fisher, no sparse entries: empty CSR tensors save and load (they share no storage)."""
    model, _ = tiny_llama()
    data = Recipe.load("w4a16-squeezellm").to_dict()
    data["stages"] = [{"squeezellm": {"outliers": 0.0, "sensitive": 0.0, "fisher": False}}]
    compress(model, Recipe.from_dict(data), _calib(model))
    assert all(m.nnz == 0 for m in model.modules() if isinstance(m, LUTLinear))
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    loaded = load(save(model, tmp_path / "c"))
    assert loaded.model.layers[0].mlp.up_proj.weight_sparse_cols.dtype == torch.int16
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_codebooks_have_no_compressed_tensors_form():
    assert "codebook" in why_not({}, {}, {"codebooks": {"format": "squeezellm", "modules": {}}}, None)


def test_stage_refuses_activation_schemes_and_quantized_modules():
    model, _ = tiny_llama()
    data = Recipe.load("w4a16-squeezellm").to_dict()
    data["schemes"]["re:.*"] = {"preset": "W4A8"}
    with pytest.raises(ValueError, match="weight-only"):
        compress(model, Recipe.from_dict(data), _calib(model))
    data = Recipe.load("w4a16-squeezellm").to_dict()
    data["stages"] = [{"rtn": {}}, {"squeezellm": {}}]
    with pytest.raises(ValueError, match="run it instead of rtn/gptq"):
        compress(tiny_llama()[0], Recipe.from_dict(data), _calib(model))
    with pytest.raises(ValueError, match="outliers"):
        Recipe.from_dict({**Recipe.load("w4a16-squeezellm").to_dict(), "stages": [{"squeezellm": {"outliers": 0.7}}]})
    with pytest.raises(ValueError, match="token_cap"):
        Recipe.from_dict({**Recipe.load("w4a16-squeezellm").to_dict(), "stages": [{"squeezellm": {"token_cap": 0}}]})


def test_inspect_counts_the_codebook_modules(tmp_path):
    from lmpress.compress import inspect

    model, _ = tiny_llama()
    compress(model, Recipe.load("w3a16-squeezellm"), _calib(model))
    info = inspect(save(model, tmp_path / "c"))
    row = info["modules"]["model.layers.0.mlp.down_proj"]
    m = model.model.layers[0].mlp.down_proj
    assert row["scheme"] == "SqueezeLLM-3bit" and row["shape"] == [m.out_features, m.in_features]
    assert row["bits_per_weight"] == pytest.approx(m.bits_per_weight() + 8 * 16 / (m.in_features * m.out_features), abs=1e-3)
    assert "codebook" in info["runtimes"]["vLLM"]


def test_codebook_artifact_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama()
    compress(model, Recipe.load("w4a16-squeezellm"), _calib(model))
    path = save(model, tmp_path / "q", tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(path)  # lmpress.compress is imported: quant_method lmpress is known
    assert isinstance(hf.model.layers[0].mlp.down_proj, LUTLinear)
    x = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, load(path)(x).logits)
