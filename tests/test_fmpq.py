"""COMET's fine-grained mixed-precision activations (FMPQ, `lmpress.quant.fmpq`): the 4/8-bit channel
groups after the calibrated reordering, the simulated and packed forms, the recipe, and the W4Ax
Triton kernel against its reference (interpreter, in a subprocess as tests/test_kernels.py)."""
from __future__ import annotations

import pytest
import torch

from _interpreter import run_triton_tests_in_interpreter
from lmpress.kernels.dispatch import interpreter_ready
from lmpress.kernels.formats import pack
from lmpress.kernels.w4ax_gemm import w4ax_gemm_ref
from lmpress.quant.fmpq import (average_bits, channel_order, fmpq_dequantize, fmpq_fake_quantize, fmpq_quantize,
                                group_bits, high_groups)
from lmpress.quant.primitives import fake_quantize
from lmpress.quant.scheme import QuantArgs, QuantScheme

INTERP = interpreter_ready()
in_interpreter = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 at start-up; run by test_w4ax_triton_in_interpreter")


def fmpq_args(share=0.25, G=64, **kw) -> QuantArgs:
    return QuantArgs(bits=4, granularity="group", group_size=G, dynamic=True, outliers=share, **kw)


def test_group_widths_and_average_bits():
    a = fmpq_args(0.1)
    assert high_groups(576, a) == 1 and high_groups(1536, a) == 2  # 9 groups: 0.9 -> 1; 24 groups: 2.4 -> 2
    assert group_bits(576, a).tolist() == [8] + [4] * 8
    assert average_bits(576, a) == pytest.approx(4 + 4 * 64 / 576)
    assert high_groups(100, fmpq_args(1.0)) == 2 and average_bits(100, fmpq_args(1.0)) == 8  # partial last group
    assert average_bits(100, fmpq_args(0.5)) == pytest.approx((64 * 8 + 36 * 4) / 100)


def test_without_outlier_groups_it_is_per_token_group_quantization():
    """Share 0 ... or every group 4-bit: the plain `granularity: group` fake-quant, exactly."""
    x = torch.randn(3, 7, 200, generator=torch.Generator().manual_seed(0))
    plain = QuantArgs(bits=4, granularity="group", group_size=64, dynamic=True)
    assert torch.equal(fmpq_fake_quantize(x, fmpq_args(0.0)), fake_quantize(x, plain))
    eight = QuantArgs(bits=8, granularity="group", group_size=64, dynamic=True)
    assert torch.equal(fmpq_fake_quantize(x, fmpq_args(1.0)), fake_quantize(x, eight))


@pytest.mark.parametrize("K", [1, 63, 64, 130, 576])
def test_codes_round_trip_and_the_outlier_channels_take_8_bits(K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(5, K, generator=g)
    hot = torch.randperm(K, generator=g)[: max(1, K // 20)]
    x[:, hot] *= 40  # outlier channels
    a = fmpq_args(0.25)
    perm = channel_order(x.abs().amax(0))
    assert set(perm[: len(hot)].tolist()) == set(hot.tolist())
    codes, scale = fmpq_quantize(x, a, perm)  # (5, K) in perm order, (5, groups)
    bits = group_bits(K, a)
    lim = torch.repeat_interleave(2 ** (bits - 1) - 1, 64)[:K]
    assert codes.dtype == torch.int8 and bool((codes.abs() <= lim + 1).all())
    assert bool((codes[:, :min(K, 64)].abs().amax(1) == (127 if bits[0] == 8 else 7)).all())  # absmax hits qmax
    back = fmpq_dequantize(codes, scale, a, perm)
    assert torch.equal(back, fmpq_fake_quantize(x, a, perm))
    # the reordering is what makes it pay: outliers in one 8-bit group instead of spread over 4-bit ones
    if K >= 130:
        err = lambda p: (fmpq_fake_quantize(x, a, p) - x).pow(2).sum().item()  # noqa: E731
        assert err(perm) < 0.5 * err(None)


def test_args_validation_says_what_to_do():
    with pytest.raises(ValueError, match="share of channel groups"):
        fmpq_args(1.5)
    with pytest.raises(ValueError, match="type int, symmetric, dynamic"):
        QuantArgs(bits=4, granularity="token", dynamic=True, outliers=0.1)
    with pytest.raises(ValueError, match="above bits"):
        fmpq_args(0.1, outlier_bits=4)
    a = fmpq_args(0.1)
    assert QuantArgs.from_dict(a.to_dict()) == a and "outliers" not in fmpq_args(0.0).to_dict()
    s = QuantScheme.from_dict({"preset": "W4A4", "inputs": {"granularity": "group", "group_size": 64, "outliers": 0.1}})
    assert s.inputs == QuantArgs(bits=4, granularity="group", group_size=64, dynamic=True, outliers=0.1)


def _model_compressed(share: float, stages=({"gptq": {}},)):
    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.compress import Recipe, compress
    from lmpress.compress.models import tiny_llama

    model, tok = tiny_llama(seed=0)
    recipe = Recipe.from_dict({"version": 1, "name": "c", "schemes": {"lm_head": None, "re:.*": {
        "preset": "W4A4", "inputs": {"granularity": "group", "group_size": 32, "outliers": share}}}, "stages": list(stages)})
    toks = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(3))
    compress(model, recipe, CalibrationSet(tokens=toks, source="random", split="calib", n=4, seqlen=48, seed=3,
                                           fingerprint=fingerprint(toks)))
    return model, tok


def test_gptq_calibrates_the_channel_order_and_packed_reload_is_identical(tmp_path):
    from lmpress.compress import load, save

    model, tok = _model_compressed(0.25)
    layer = model.model.layers[0]
    q, k, up = layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.up_proj
    assert q.input_perm is not None and torch.equal(q.input_perm, k.input_perm)  # one input, one order
    assert sorted(up.input_perm.tolist()) == list(range(up.in_features))
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    path = save(model, tmp_path / "comet", tokenizer=tok)
    with torch.no_grad():
        y = model(x).logits
        packed = load(path)
        assert torch.equal(packed.model.layers[0].self_attn.q_proj.input_perm, q.input_perm)
        assert torch.equal(packed(x).logits, y)


def test_act_scales_calibrates_the_order_after_rtn():
    model, _ = _model_compressed(0.25, stages=({"rtn": {}}, {"act_scales": {}}))
    down = model.model.layers[1].mlp.down_proj
    assert down.input_perm is not None and not torch.equal(down.input_perm, torch.arange(down.in_features))


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("M,N,K,G,w_bits", [(1, 16, 64, 32, 4), (5, 19, 130, 64, 4), (17, 33, 200, 64, 8), (3, 40, 256, 128, 4)])
def test_w4ax_gemm_matches_reference(M, N, K, G, w_bits):
    from lmpress.kernels.w4ax_gemm import w4ax_gemm

    g = torch.Generator().manual_seed(M + N + K)
    x = torch.randn(M, K, generator=g)
    x[:, :3] *= 30
    a = fmpq_args(0.25, G)
    codes, sx = fmpq_quantize(x, a, channel_order(x.abs().amax(0)))
    lim = 1 << (w_bits - 1)
    words = pack(torch.randint(-lim, lim, (N, K), generator=g, dtype=torch.int8), w_bits)
    sw = torch.rand(N, 1, generator=g) + 0.1
    bias = torch.randn(N, generator=g)
    for b in (None, bias):
        y = w4ax_gemm(codes, sx, words, sw, in_features=K, group_size=G, w_bits=w_bits, bias=b)
        ref = w4ax_gemm_ref(codes, sx, words, sw, in_features=K, group_size=G, w_bits=w_bits, bias=b)
        assert y.shape == ref.shape == (M, N)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.triton
@in_interpreter
def test_packed_linear_runs_comet_through_the_w4ax_kernel(monkeypatch):
    """The Triton path of a COMET PackedLinear (codes over the reordered channels, the weight's
    columns reordered once) gives the simulation's output."""
    from lmpress.kernels.linear import PackedLinear
    from lmpress.quant.rtn import rtn_quantize
    from lmpress.quant.sim import SimQuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(130, 24)
    scheme = QuantScheme.from_dict({"preset": "W4A4", "inputs": {"granularity": "group", "group_size": 64, "outliers": 0.25}})
    sim = SimQuantLinear(lin, scheme)
    sim.set_quantized(*rtn_quantize(lin.weight.detach(), scheme.weights))
    x = torch.randn(3, 130)
    x[:, 7] *= 50
    sim.calibrate_inputs(x.abs().amax(0))
    packed = PackedLinear.from_sim(sim)
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    with torch.no_grad():
        y = packed(x)
    assert packed.kernel_path.kind == "triton-w4a4/8"
    torch.testing.assert_close(y, sim(x), rtol=1e-5, atol=1e-4)


@pytest.mark.triton
@in_interpreter
def test_w4ax_shape_errors_say_what_to_do():
    from lmpress.kernels.w4ax_gemm import w4ax_gemm

    codes, words = torch.zeros(2, 64, dtype=torch.int8), torch.zeros(4, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="one scale per token and group"):
        w4ax_gemm(codes, torch.ones(2, 1), words, torch.ones(4, 1), in_features=64, group_size=32)
    with pytest.raises(ValueError, match="power of two"):
        w4ax_gemm(codes, torch.ones(2, 2), words, torch.ones(4, 1), in_features=64, group_size=48)


@pytest.mark.triton
@pytest.mark.skipif(INTERP, reason="already running under TRITON_INTERPRET=1")
def test_w4ax_triton_in_interpreter():
    run_triton_tests_in_interpreter(__file__)
