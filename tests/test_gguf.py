"""GGUF: llama.cpp's block grids (quant/gguf.py), the exporter (compress/gguf.py), and llama.cpp
itself reading what we write (eval/llamacpp.py, with the llamacpp extra)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from lmpress.quant import gguf as G  # noqa: E402
from lmpress.quant.gptq import layer_objective  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[0, 1] = 1.3  # an outlier
    W[1, : min(cols, 32)] = 0.0  # an all-zero block (K-types: an all-zero sub-block)
    W[2 % rows, -32:] = -0.02  # a constant block
    return W


@pytest.mark.parametrize("name", list(G.TYPES))
@pytest.mark.parametrize("rows,blocks", [(3, 1), (5, 3)])
def test_every_type_packs_to_what_gguf_reads_and_back(name, rows, blocks):
    """pack -> gguf.quants.dequantize equals our dequantize bit for bit; unpack is pack's exact inverse."""
    t = G.TYPES[name]
    W = _weights(rows, blocks * t.block)
    imp = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(1))
    u, f = G.rtn(t, W, imp)
    ours = G.dequantize(t, u, f)
    data = G.pack(t, u, f)
    assert data.dtype == np.uint8 and data.shape == (rows, blocks * t.type_size)
    theirs = gguf_dequantize(data, gguf.GGMLQuantizationType[name]).reshape(W.shape)
    assert np.array_equal(ours.numpy(), theirs)
    u2, f2 = G.unpack(t, data, W.shape[1])
    assert torch.equal(u2, u)
    assert np.array_equal(G.pack(t, u2, f2), data)
    assert torch.all(ours[1, :32] == 0) or name in ("Q4_1", "Q5_1")  # zero stays zero (affine types: up to the min)
    assert float((ours[2:] - W[2:]).pow(2).sum() / W[2:].pow(2).sum()) < {"Q2_K": 0.15, "Q3_K": 0.05}.get(name, 0.03)


def test_unpacking_a_file_llama_cpp_made_gives_back_its_bytes():
    """The bundled SmolLM2 GGUF (Q4_1 and Q8_0 tensors, written by llama.cpp's tools): unpack + pack
    reproduces every byte: our layout is llama.cpp's."""
    from lmpress.compress.models import gguf_source

    try:
        src = gguf_source("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - no network or package: nothing to compare with
        pytest.skip(f"bundled SmolLM2 unavailable: {e}")
    reader = gguf.GGUFReader(src)
    seen = set()
    for tensor in reader.tensors:
        ty = tensor.tensor_type.name
        if ty not in G.TYPES or ty in seen:
            continue
        seen.add(ty)
        cols = int(tensor.shape[0])
        data = np.asarray(tensor.data).reshape(int(tensor.shape[1]), -1)[:64]  # (rows, row bytes), 64 rows
        u, f = G.unpack(ty, data, cols)
        assert np.array_equal(G.pack(ty, u, f), data), tensor.name
    assert seen == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_rtn_fit_is_at_least_as_good_as_ggufs_reference_quantizer(name):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    ref = gguf_dequantize(gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType[name]),
                          gguf.GGMLQuantizationType[name])
    u, f = G.rtn(name, W)
    ours = G.dequantize(G.TYPES[name], u, f).numpy()
    err = lambda x: float(((x - W.numpy()) ** 2).sum())  # noqa: E731
    assert err(ours) <= err(ref) * 1.0001


def _problem(rows=40, cols=256, n=800, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.1  # correlated inputs
    X[:, 5] *= 20  # an outlier channel
    H = 2 * X.T @ X / n
    return torch.randn(rows, cols, generator=g) * 0.05, H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["Q4_0", "IQ4_NL", "Q3_K", "Q4_K", "Q6_K"])
def test_gptq_on_the_grid_beats_rtn_and_stays_on_it(name, act_order):
    t = G.TYPES[name]
    W, H = _problem()
    u, f, st = G.gptq(t, W, H, act_order=act_order)
    Wq = G.dequantize(t, u, f)
    assert st["loss"] == pytest.approx(layer_objective(W, Wq, H), rel=1e-9)
    assert st["loss"] < 0.8 * st["rtn_loss"]
    data = G.pack(t, u, f)  # on the grid: the bytes say exactly Wq
    assert np.array_equal(gguf_dequantize(data, gguf.GGMLQuantizationType[name]).reshape(W.shape), Wq.numpy())


def test_a_row_length_the_block_does_not_divide_is_refused_with_the_fallback():
    with pytest.raises(ValueError, match=r"576 .*Q5_0"):
        G.rtn("Q4_K", torch.zeros(2, 576))
    with pytest.raises(ValueError, match="not one lmpress writes"):
        G.block_type("Q4_Z")


def test_rotary_row_permutation_is_llama_cpps():
    """convert_hf_to_gguf.py's LlamaModel.permute, written out: heads of [first half | second half]
    become interleaved pairs."""
    from lmpress.compress.gguf import permute_rows

    w = torch.arange(8 * 3).reshape(8, 3)  # 2 heads of dim 4
    ref = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)
    assert torch.equal(w[permute_rows(8, 2)], ref)


# ------------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2():
    from lmpress.compress.models import gguf_source, load_model

    model, tok = load_model("smollm2-135m")
    return model, tok, gguf_source("smollm2-135m")


@pytest.mark.slow
def test_f32_export_holds_the_source_files_values(smollm2, tmp_path):
    """The float model written back as F32 GGUF: every tensor equals the source GGUF's (q/k rows
    permuted back to llama.cpp's layout), and the metadata (tokenizer, chat template) is carried."""
    from lmpress.compress import gguf as CG

    model, _, src = smollm2
    out = CG.write_gguf(model, tmp_path / "f32.gguf", src, CG.plan_types(model, "F32"))
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        x = gguf_dequantize(t.data, t.tensor_type).reshape(-1)
        y = gguf_dequantize(tb[name].data, tb[name].tensor_type).reshape(-1)
        assert np.array_equal(x, y), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.rope.freq_base"):
        assert a.fields[key].contents() == b.fields[key].contents()


@pytest.mark.slow
def test_llama_cpp_runs_our_file_as_lmpress_simulates_it(smollm2, tmp_path):
    """`lmpress export --format gguf`: llama.cpp loads the file with no other input, and its
    perplexity is within 0.5% of lmpress's simulation of the same grid (the file's values exactly,
    and the activations quantized as llama.cpp's matmul does)."""
    from typer.testing import CliRunner

    from lmpress.cli.main import app
    from lmpress.eval import llamacpp
    from lmpress.eval.ppl import perplexity_from_ids

    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (the llamacpp extra)")
    from lmpress.calibration.data import load_text
    from lmpress.compress import gguf as CG
    from lmpress.compress.models import load_model

    out = tmp_path / "q4k.gguf"
    res = CliRunner().invoke(app, ["export", "smollm2-135m", "--format", "gguf", "--type", "Q4_K", "--method", "rtn",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.0.attn_q.weight"] == "Q5_0"  # llama.cpp's fallback
    assert types["token_embd.weight"] == "Q8_0"
    model, tok = load_model("smollm2-135m")
    types = CG.plan_types(model, "Q4_K")
    CG.quantize_model(model, types, method="rtn")  # the same grid, simulated
    ids = tok(load_text("wiki", split="eval"), add_special_tokens=False)["input_ids"][: 4 * 256]
    windows = [ids[i * 256:(i + 1) * 256] for i in range(4)]
    torch.set_num_threads(2)
    with CG.llamacpp_activations(model, types):
        sim = perplexity_from_ids(model, torch.tensor(ids), 256, 4).ppl
    ll = llamacpp.perplexity(out, windows, threads=2)
    assert abs(ll / sim - 1) < 0.005, (ll, sim)


def test_export_refusals(tmp_path):
    from typer.testing import CliRunner

    from lmpress.cli.main import app

    r = CliRunner().invoke(app, ["export", "tiny-llama", "--format", "gguf", "--type", "Q4_K", "--out", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "no GGUF" in r.output
    r = CliRunner().invoke(app, ["export", "smollm2-135m", "--format", "gguf", "--type", "Q4_Z", "--out", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "Q4_Z" in r.output
    r = CliRunner().invoke(app, ["export", "smollm2-135m", "--format", "gguf", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and ".gguf" in r.output


@pytest.mark.slow
def test_compress_and_eval_exports_gguf_and_reports_llama_cpps_figures(tmp_path):
    """`compress-and-eval --export gguf:Q8_0`: the file beside the checkpoint, and a GGUF section in
    report.json / report.md (llama.cpp's perplexity when the extra is installed)."""
    import json

    from typer.testing import CliRunner

    from lmpress.cli.main import app
    from lmpress.eval import llamacpp

    out = tmp_path / "run"
    # 16 x 256 windows. Fewer tokens leave llama.cpp and the simulation apart by chance: 2 x 128 0.7-0.9%,
    # 16 x 128 0.14%; 4 x 256 0.01% on an AVX-512 Xeon but 0.52% on an AVX2 EPYC, where 16 x 256 gave 0.02%
    res = CliRunner().invoke(app, ["compress-and-eval", "smollm2-135m", "--recipe", "w8a8-rtn", "--out", str(out),
                                   "--n", "4", "--seqlen", "256", "--windows", "16", "--tasks", "none", "--no-latency",
                                   "--export", "gguf:Q8_0"])
    assert res.exit_code == 0, res.output
    g = json.loads((out / "report.json").read_text())["gguf"]
    assert (out / g["file"]).is_file() and g["type"] == "Q8_0" and g["bits_per_weight"] == pytest.approx(8.5)
    if llamacpp.available():
        assert abs(g["llamacpp_vs_sim"] - 1) < 0.005 and g["decode_tps"] > 0
    assert "## GGUF (llama.cpp)" in (out / "report.md").read_text()
    bad = CliRunner().invoke(app, ["compress-and-eval", "tiny-llama", "--out", str(tmp_path / "t"), "--export", "gguf:Q4_K"])
    assert bad.exit_code == 2 and "GGUF" in bad.output


@pytest.mark.slow
def test_a_model_with_lmpress_modules_is_refused(smollm2, tmp_path):
    import copy

    from lmpress.compress import gguf as CG
    from lmpress.compress.surgery import to_sim
    from lmpress.quant.scheme import preset

    model, _, src = smollm2
    model = copy.deepcopy(model)
    types = CG.plan_types(model, "Q4_0")
    to_sim(model, "model.layers.3.self_attn.q_proj", preset("W4A4"))  # stands for any online op
    with pytest.raises(CG.GGUFExportError, match=r"model.layers.3.self_attn.q_proj is an lmpress SimQuantLinear"):
        CG.write_gguf(model, tmp_path / "x.gguf", src, types)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_mixed_plan_meets_its_bits_per_weight(tmp_path):
    """`--bpw`: a block type per linear under the budget (exact bytes), not one type for all."""
    from typer.testing import CliRunner

    from lmpress.cli.main import app
    from lmpress.compress import gguf as CG
    from lmpress.compress.models import load_model

    out = tmp_path / "mix.gguf"
    res = CliRunner().invoke(app, ["export", "smollm2-135m", "--format", "gguf", "--type", "Q4_0", "--bpw", "5.2",
                                   "--method", "rtn", "--n", "2", "--seqlen", "64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    model, _ = load_model("smollm2-135m")
    assert CG.bits_per_weight(model, types) <= 5.2
    assert len({ty for g, ty in types.items() if g.startswith("blk.") and ty != "F32"}) >= 2


def test_read_weighted_hessian_uses_the_models_own_attention(tiny):
    """The attention recomputed in the hook equals transformers' eager attention weights: H_v =
    Σ_t w_t x_t x_tᵀ / N with w_t = Σ_t' A[t', t]² (mean over heads, normalized to mean 1)."""
    from lmpress.compress.gguf import read_weighted_hessian

    model, _ = tiny
    model.set_attn_implementation("eager")
    attn = model.model.layers[1].self_attn
    xs = []
    h = attn.v_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), read_weighted_hessian(attn, attn.v_proj) as acc:
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    h.remove()
    A = out.attentions[1].double()  # (B, heads, T, T)
    w = A.square().sum(-2).mean(1)
    w = w / w.mean(1, keepdim=True)
    x = xs[0].double()
    ref = torch.einsum("bti,bt,btj->ij", x, w, x) / (2 * 24)
    assert torch.allclose(acc.value().double(), ref, rtol=1e-4, atol=1e-6)
    assert float(w[:, 0].mean()) > 2.0  # the first token is read most (causal attention)


def test_a_source_architecture_not_checked_against_llama_cpp_is_refused(tiny, tmp_path):
    """Gemma's GGUF stores its norms as 1 + w (llama.cpp's converter rewrites them): an export
    written with the LLaMA rules would load and be wrong, so only checked architectures export."""
    import gguf

    from lmpress.compress.gguf import GGUFExportError, export_gguf

    src = tmp_path / "gemma3.gguf"
    w = gguf.GGUFWriter(str(src), "gemma3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model, _ = tiny
    with pytest.raises(GGUFExportError, match=r"checked against llama.cpp for llama only, and the source is 'gemma3'"):
        export_gguf(model, tmp_path / "out.gguf", src, ftype="Q4_K")
    assert not (tmp_path / "out.gguf").exists()
