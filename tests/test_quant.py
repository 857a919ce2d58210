import math

import pytest
import torch

from lmpress.quant.primitives import (
    compute_qparams, dequantize, fake_quantize, mse_clip_qparams, quant_error, quantize,
)
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import QuantArgs
from lmpress.quant.sim import SimQuantLinear

ARGS = [
    QuantArgs(bits=b, granularity=g, group_size=gs, symmetric=sym)
    for b in (2, 3, 4, 8)
    for g, gs in (("tensor", None), ("channel", None), ("group", 16), ("group", 7))
    for sym in (True, False)
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: f"b{a.bits}-{a.granularity}{a.group_size or ''}-{'sym' if a.symmetric else 'asym'}")
def test_codes_in_range_and_error_bounded(args):
    torch.manual_seed(0)
    w = torch.randn(9, 37)
    s, z = compute_qparams(w, args)
    q = quantize(w, s, z, args)
    assert q.dtype == torch.int8 and int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
    assert s.shape == ((1, 1) if args.granularity == "tensor" else (9, math.ceil(37 / (args.group_size or 37))))
    wq = dequantize(q, s, z, args)
    # round to nearest: error at most half a step wherever nothing is clipped
    from lmpress.quant.primitives import expand_qparam
    step = expand_qparam(s, 9, 37, args)
    assert ((w - wq).abs() <= step / 2 + 1e-6).all()
    if args.bits == 8:
        assert quant_error(w, wq)["sqnr_db"] > 35


def test_partial_last_group_uses_only_its_columns():
    args = QuantArgs(bits=4, granularity="group", group_size=8, symmetric=True)
    w = torch.ones(2, 10)
    w[:, 8:] = 100.0  # the partial last group (2 columns) has its own, larger range
    s, _ = compute_qparams(w, args)
    assert s.shape == (2, 2)
    assert torch.allclose(s[:, 0], torch.full((2,), 1 / 7)) and torch.allclose(s[:, 1], torch.full((2,), 100 / 7))
    assert torch.equal(fake_quantize(w, args), w)


@pytest.mark.parametrize("sym", [True, False])
def test_constant_and_zero_rows_are_exact(sym):
    args = QuantArgs(bits=4, granularity="channel", symmetric=sym)
    w = torch.stack([torch.zeros(12), torch.full((12,), 3.5), torch.full((12,), -0.25)])
    s, z = compute_qparams(w, args)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.allclose(fake_quantize(w, args), w, atol=1e-7)
    # zero row: exactly zero codes-to-values, whatever the scale
    assert torch.equal(dequantize(quantize(w[:1], s[:1], z[:1], args), s[:1], z[:1], args), w[:1])


def test_asymmetric_uses_the_full_grid():
    args = QuantArgs(bits=2, granularity="channel", symmetric=False)
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    q = quantize(w, *compute_qparams(w, args), args)
    assert q.tolist() == [[-2, -1, 0, 1]]
    assert torch.equal(fake_quantize(w, args), w)


def test_per_token_activation_fake_quant_keeps_shape():
    args = QuantArgs(bits=4, granularity="token", dynamic=True)
    x = torch.randn(2, 5, 24)
    xq = fake_quantize(x, args)
    assert xq.shape == x.shape
    # each token scaled by its own absmax: the absmax element is reproduced exactly
    idx = x.abs().argmax(-1, keepdim=True)
    assert torch.allclose(xq.gather(-1, idx), x.gather(-1, idx))


def test_clip_ratio_shrinks_the_range():
    w = torch.randn(4, 64)
    full = compute_qparams(w, QuantArgs(bits=4))[0]
    clipped = compute_qparams(w, QuantArgs(bits=4, clip_ratio=0.8))[0]
    assert torch.allclose(clipped, full * 0.8)


def test_mse_clip_never_worse_than_minmax():
    torch.manual_seed(1)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    w[0, 0] = 12.0  # an outlier that min-max would waste the grid on
    for args in (QuantArgs(bits=3, mse_clip=True), QuantArgs(bits=4, granularity="group", group_size=32, symmetric=False, mse_clip=True)):
        plain = QuantArgs(**{**args.to_dict(), "mse_clip": False})
        e_mm = (w - fake_quantize(w, plain)).pow(2).sum()
        s, z = mse_clip_qparams(w, args)
        e_mse = (w - dequantize(quantize(w, s, z, args), s, z, args)).pow(2).sum()
        assert e_mse < e_mm


def test_sim_linear_matches_manual_fake_quant():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    from lmpress.quant.scheme import W4A4

    sim = SimQuantLinear(lin, W4A4)
    q, s, z = rtn_quantize(lin.weight.detach(), W4A4.weights)
    sim.set_quantized(q, s, z)
    x = torch.randn(3, 7, 40)
    ref = torch.nn.functional.linear(fake_quantize(x, W4A4.inputs), fake_quantize(lin.weight.detach(), W4A4.weights), lin.bias)
    assert torch.allclose(sim(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        sim.set_quantized(q[:, :3], s, z)


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, granularity="token", dynamic=True, clip_ratio=0.9),
    QuantArgs(bits=4, granularity="token", dynamic=True, symmetric=False),
    QuantArgs(bits=4, granularity="channel"),
    QuantArgs(bits=3, granularity="group", group_size=32, symmetric=False),  # 80 columns: a partial group
], ids=["a4-clip", "a4-asym", "w4-ch", "w3-g32-asym"])
def test_fake_quantize_ste_forward_and_gradient_through_the_scale(args):
    from lmpress.quant.primitives import fake_quantize_ste

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 6, 80, generator=g, dtype=torch.float64) * torch.linspace(0.2, 4, 80, dtype=torch.float64))
    xg = x.clone().requires_grad_(True)
    y = fake_quantize_ste(xg, args)
    assert y.dtype == x.dtype and torch.equal(y.detach(), fake_quantize(x, args))
    (y - xg).pow(2).sum().backward()  # the error's gradient: zero if the qparams were detached
    assert float(xg.grad.abs().max()) > 0
