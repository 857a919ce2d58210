"""Kernels: Triton kernels vs their torch oracles (interpreter), the CPU fast path vs the
reference, dispatch, and a tiny model end to end through the Triton kernels.

Triton on CPU needs TRITON_INTERPRET=1 before triton is first imported, and transformers
imports triton (through torch._dynamo) as soon as the shared conftest builds a model class; so
unless the whole session was started with the variable set, the `triton` tests here are skipped
in-process and `test_triton_suite_in_interpreter` re-runs them (`-m triton`) in a subprocess
started with it. Shapes are small and blocks big: the interpreter costs ~ms per block step.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpress.compress import Recipe
from lmpress.kernels import cpu
from lmpress.kernels.dispatch import interpreter_ready, requested_backend
from lmpress.kernels.formats import from_kn_layout, pack, to_kn_layout, unpack, unsigned_codes
from lmpress.kernels.linear import PackedLinear
from lmpress.quant.primitives import dequantize, fake_quantize
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import PRESETS, W4A4, W4A8, W4A16, W8A8, QuantArgs, QuantScheme
from lmpress.quant.sim import SimQuantLinear
from _interpreter import run_triton_tests_in_interpreter

INTERP = interpreter_ready()
in_interpreter = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 at start-up; run by test_triton_suite_in_interpreter")


def _w(bits, group=None, sym=True, gran=None):
    return QuantArgs(bits=bits, granularity=gran or ("group" if group else "channel"), group_size=group, symmetric=sym)


A8 = QuantArgs(bits=8, granularity="token", dynamic=True)
A4 = QuantArgs(bits=4, granularity="token", dynamic=True)
A4_CLIP = QuantArgs(bits=4, granularity="token", dynamic=True, clip_ratio=0.9)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _quantized(N, K, args, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    q, s, z = rtn_quantize(W, args)
    return pack(q, args.bits), s, (None if args.symmetric else z)


def _sim(scheme, in_f, out_f, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    sim = SimQuantLinear(lin, scheme)
    sim.set_quantized(*rtn_quantize(lin.weight.detach().float(), scheme.weights))
    return sim


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ============================================================ formats: kernel layouts
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kn_layout_round_trip_and_unsigned_codes(bits):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 45), dtype=torch.int8)
    p = pack(q, bits)
    kn = to_kn_layout(p, bits)
    assert kn.shape == (p.shape[1], 7) and kn.is_contiguous()
    assert torch.equal(from_kn_layout(kn, bits), p)
    assert torch.equal(unsigned_codes(p, bits, 45), q.int() + (1 << (bits - 1)))
    assert torch.equal(unsigned_codes(p, bits, 45, torch.uint8).int(), q.int() + (1 << (bits - 1)))


def test_kn_layout_refuses_3_bits():
    with pytest.raises(ValueError, match="divides 32"):
        to_kn_layout(pack(torch.zeros(2, 11, dtype=torch.int8), 3), 3)


# ============================================================ CPU fast path
@pytest.mark.parametrize("args,K", [
    (_w(4, 64, sym=False), 256), (_w(4, 128), 200), (_w(4, 32, sym=False), 96), (_w(4, 512, sym=False), 600),
    (_w(4), 200), (_w(4, sym=False), 77), (_w(4, gran="tensor", sym=False), 64),
    (_w(8), 90), (_w(2, 16, sym=False), 50), (_w(3, 64, sym=False), 130), (_w(8, gran="tensor"), 40),
])
def test_dequantize_fast_is_bit_identical(args, K):
    p, s, z = _quantized(24, K, args)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(cpu.dequantize_fast(p, s, z, args, K, dtype), cpu.reference_weight(p, s, z, args, K, dtype))


@pytest.mark.parametrize("args,bias", [(_w(4, 64, sym=False), True), (_w(8), False), (_w(4, gran="tensor", sym=False), True)])
def test_linear_dequant_in_blocks_matches(args, bias, monkeypatch):
    p, s, z = _quantized(200, 96, args)
    b = _x(200, seed=3) if bias else None
    x = _x(2, 20, 96)
    whole = F.linear(x, cpu.reference_weight(p, s, z, args, 96, torch.float32), b)
    assert torch.equal(cpu.linear_dequant(x, p, s, z, args, 96, b), whole)  # one block: the same F.linear
    monkeypatch.setattr(cpu, "WHOLE_BYTES", 199 * 96 * 4)  # 200 channels: too large to go whole
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 64 * 96 * 4)  # blocks of 64 output channels
    assert _rel(cpu.linear_dequant(x, p, s, z, args, 96, b), whole) < 1e-6


@pytest.mark.parametrize("args,N,K", [
    (_w(4, 64, sym=False), 48, 256),  # exact fit
    (_w(4, 128), 40, 200),  # N and K padded, partial last group
    (_w(4, 256, sym=False), 16, 512),
    (_w(4, 96, sym=False), 32, 200),  # our groups of 96 = three op groups of 32
    (_w(4), 24, 130),  # per channel: unit scale in the op
    (_w(4, sym=False), 24, 130),
    (_w(4, gran="tensor", sym=False), 16, 64),
])
def test_int4pack_conversion_matches_our_dequantize(args, N, K):
    """Run torch's int4 op in fp32 on the identity: it returns its own idea of W^T, which must be ours."""
    p, s, z = _quantized(N, K, args)
    prep = cpu.prepare_int4(p, s, z, args, K, dtype=torch.float32)
    eye = torch.eye(prep.k_padded)
    w_op = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, prep.weight, prep.group, prep.scale_zero).t()[:N, :K]
    if prep.col_scale is not None:
        w_op = w_op * prep.col_scale[:, None]
    ours = dequantize(unpack(p, 4, K), s, z if z is not None else torch.zeros_like(s), args)
    if args.symmetric or prep.col_scale is not None:
        assert torch.equal(w_op, ours)  # (q - 8) * s + 0, or integer q - z then * s: exact
    else:
        assert (w_op - ours).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * ours.abs().max().item()


CPU_SCHEMES = {  # name: (scheme, path for a few rows)
    "W4A16-g64-asym": (QuantScheme(weights=_w(4, 64, sym=False)), "cpu-int4pack"),
    "W4A16-g128-partial": (W4A16, "cpu-int4pack"),  # N and K padded for the op
    "W4-channel-asym": (QuantScheme(weights=_w(4, sym=False)), "cpu-int4pack"),
    "W8A16": (QuantScheme(weights=_w(8)), "cpu-int8pack"),
}
INT8MM_SCHEMES = {  # name -> (scheme, CPU path at every size unless LMPRESS_INT8_GEMM=0)
    "W4A8": (W4A8, "cpu-int8mm"),
    "W4A4-clip": (QuantScheme(weights=_w(4), inputs=A4_CLIP), "cpu-int8mm"),
    "W8A8": (W8A8, "cpu-int8mm"),  # full_range activations (/127.5)
    "W6A6": (PRESETS["W6A6"], "cpu-int8mm"),  # any width: codes in int8
    "W5A5": (PRESETS["W5A5"], "cpu-int8mm"),
    "W8A8-tensor-weights": (QuantScheme(weights=_w(8, gran="tensor"), inputs=W8A8.inputs), "cpu-int8mm"),
    "W4A4-g64": (QuantScheme(weights=_w(4, 64), inputs=W4A4.inputs), "cpu-dequant"),  # group scales do not factor out
    "W8A8-asym-weights": (QuantScheme(weights=_w(8, sym=False), inputs=W8A8.inputs), "cpu-dequant"),
    "W8-asym-A8": (QuantScheme(weights=_w(8), inputs=QuantArgs(bits=8, granularity="token", dynamic=True, symmetric=False)),
                   "cpu-dequant"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CPU_SCHEMES))
def test_cpu_path_matches_reference(name, dtype, monkeypatch):
    scheme, kind = CPU_SCHEMES[name]
    sim = _sim(scheme, 200, 40, dtype=dtype)
    packed = PackedLinear.from_sim(sim)
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    with torch.no_grad():
        x1 = _x(3, 200, dtype=dtype)  # decode regime
        y1 = packed(x1)
        assert packed.kernel_path.kind == kind, packed.kernel_path
        assert y1.dtype == dtype
        if kind == "cpu-dequant":
            assert torch.equal(y1, sim(x1))  # activation-quantized: exactly the simulation
        else:
            assert _rel(y1, sim(x1)) < 1e-2  # bfloat16 arithmetic (input and output rounding, bf16 qparams)
        x2 = _x(2, 33, 200, dtype=dtype)  # 66 rows > SMALL_M: on-the-fly dequantization, exact
        y2 = packed(x2)
        assert packed.kernel_path.kind == "cpu-dequant"
        assert torch.equal(y2, sim(x2))
    assert packed._cached is None  # no dequantized copy kept


@pytest.mark.parametrize("choice", ["", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(INT8MM_SCHEMES))
def test_int8_gemm_is_the_simulation(name, dtype, choice, monkeypatch):
    """oneDNN's int8 GEMM on the simulation's own codes, at every size and every activation width, unless
    LMPRESS_INT8_GEMM=0: bit-identical to the simulation, whose integer-factored schemes are an fp32 GEMM of
    the codes with the same scale epilogue (`int_linear`). Every other scheme is the simulation exactly too."""
    scheme, fits = INT8MM_SCHEMES[name]
    kind = "cpu-dequant" if choice == "0" else fits
    inexact = kind == "cpu-int8mm" and not cpu.int8_sums("onednn")  # no oneDNN, or it sums no form exactly
    if inexact:
        kind = "cpu-dequant"
    why = ("the int8 GEMM takes" if fits == "cpu-dequant" else "sums no form" if inexact else f"{cpu.INT8MM_ENV}=0")
    sim = _sim(scheme, 200, 40, dtype=dtype)
    packed = PackedLinear.from_sim(sim)
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    if choice:
        monkeypatch.setenv(cpu.INT8MM_ENV, choice)
    else:
        monkeypatch.delenv(cpu.INT8MM_ENV, raising=False)
    with torch.no_grad():
        for x in (_x(3, 200, dtype=dtype), _x(2, 33, 200, dtype=dtype)):  # decode and > SMALL_M rows
            y = packed(x)
            assert packed.kernel_path.kind == kind and y.dtype == dtype
            assert torch.equal(y, sim(x))
            if kind == "cpu-dequant":
                assert why in packed.kernel_path.reason, packed.kernel_path.reason
    assert packed._cached is None  # no dequantized copy kept


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("wbits,abits,K", [(8, 8, 203), (4, 4, 200), (3, 8, 97), (2, 4, 64), (6, 6, 130)])
def test_int_dequant_in_blocks_is_int_linear(wbits, abits, K, static, monkeypatch):
    """Off the int8 GEMMs, large `int_factored` layers run the fp32 GEMM of the codes a block of output channels at
    a time (`cpu.linear_int_dequant`), unpacking each block into one buffer: bit-identical to `int_linear` on the
    whole unpacked weight (sums of codes are exact integers), ragged blocks and K included; small layers and
    float64 take `int_linear` itself."""
    from lmpress.quant.primitives import int_linear

    monkeypatch.setattr(cpu, "WHOLE_BYTES", 0)  # every layer takes the blocks ...
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)  # ... of 64 rows (the least): 150 channels = 64 + 64 + 22
    wa = _w(wbits)
    aa = QuantArgs(bits=abits, granularity="tensor", dynamic=False) if static else QuantArgs(bits=abits, granularity="token",
                                                                                              dynamic=True)
    qw = torch.randint(wa.qmin, wa.qmax + 1, (150, K), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    packed = pack(qw, wbits)
    sw = torch.rand(150, 1, generator=torch.Generator().manual_seed(6)) / 50
    b = _x(150, seed=7)
    s_in = torch.tensor([[0.05]]) if static else None
    for x in (_x(1, K) * 3, _x(2, 9, K) * 3):
        want = int_linear(x, qw, sw, aa, b, s_in)
        got = cpu.linear_int_dequant(x, packed, sw, wa, aa, K, b, s_in)
        assert got.shape == want.shape and torch.equal(got, want)
        x64 = x.double()
        assert torch.equal(cpu.linear_int_dequant(x64, packed, sw, wa, aa, K, b, s_in), int_linear(x64, qw, sw, aa, b, s_in))


def test_int_linear_is_an_exact_integer_gemm():
    """`int_linear` (the simulation of integer-factored schemes) against int64 arithmetic in float64:
    the integer sum is exact, then the scale epilogue in float32, in its order."""
    from lmpress.quant.primitives import compute_qparams, int_linear, quantize

    for bits, K in ((4, 4099), (8, 1000)):  # odd K; 8-bit partial sums stay under 2^24 (127 * 127 * 1000)
        a = QuantArgs(bits=bits, granularity="token", dynamic=True, symmetric=True)
        x = _x(5, K) * 4
        x[2, 3] = 300.0  # an outlier: its token's other codes shrink
        qw = torch.randint(-(1 << (bits - 1)) + 1, 1 << (bits - 1), (7, K), generator=torch.Generator().manual_seed(3))
        sw = torch.rand(7, 1, generator=torch.Generator().manual_seed(4)) / 50
        b = _x(7)
        y = int_linear(x, qw.to(torch.int8), sw, a, b)  # (5, 7)
        sx, zx = compute_qparams(x, a)
        acc = quantize(x, sx, zx, a).long() @ qw.long().T  # (5, 7) exact int64
        want = (acc.float() * sw.reshape(1, -1) * sx + b).float()
        assert torch.equal(y, want)
        assert torch.equal(int_linear(x.reshape(1, 5, K), qw, sw, a, b), want.reshape(1, 5, 7))  # (..., K) -> (..., N)


def _forced_sums(monkeypatch, sums: str, gemv: bool) -> dict[str, str]:
    """Make `cpu.int8_sums` answer 'pairs' (with `sums='pairs'`) where the probe found the GEMM exact or pairwise:
    the forms for 16-bit pair sums are exact on any CPU. fbgemm off unless `gemv`. Skips where oneDNN is absent."""
    probed = {g: cpu.int8_sums(g) for g in ("onednn", "fbgemm")}
    if not probed["onednn"] or gemv and not probed["fbgemm"]:
        pytest.skip("no int8 GEMM that sums exactly in some form on this CPU/torch")
    forced = {g: "pairs" if sums == "pairs" and v else v for g, v in probed.items()}
    if not gemv:
        forced["fbgemm"] = ""
    monkeypatch.setattr(cpu, "int8_sums", forced.get)
    return forced


@pytest.mark.parametrize("sums", ["probed", "pairs"])
@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("name", ["W8A8", "W4A4-clip", "W8A8-tensor-weights", "W4A8"])
@pytest.mark.parametrize("K", [200, 37])
def test_both_int8_gemms_are_the_simulation(name, gemv, sums, K, monkeypatch):
    """Up to `gemv_rows()` rows fbgemm's int8 GEMM (where it has an exact form), oneDNN's above: either is bit-identical
    to the simulation, in the CPU's own form or in the forms of a CPU without VNNI (`sums='pairs'`: W8A8 as q⁺ and
    q⁻ rows, W4A4 as codes + 8), and each weight copy is made only when a call of its size comes. K = 37 fills no
    int32 word of codes exactly (oneDNN's prepack once read the unpacked codes' column slice as dense rows)."""
    forced = _forced_sums(monkeypatch, sums, gemv)
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    monkeypatch.delenv(cpu.INT8MM_ENV, raising=False)
    scheme = INT8MM_SCHEMES[name][0]
    sim = _sim(scheme, K, 40)
    packed = PackedLinear.from_sim(sim)
    with torch.no_grad():
        for rows in (1, cpu.gemv_rows()):
            x = _x(rows, K) * 3
            x[0, :3] = torch.tensor([-1e3, 1e3, 0.0])  # the codes' extremes, both signs
            assert torch.equal(packed(x), sim(x)) and packed.kernel_path.kind == "cpu-int8mm"
        prep = packed._fast[1]
        if forced["onednn"] == "pairs":
            want = {"W8A8": (0, True), "W8A8-tensor-weights": (0, True), "W4A4-clip": (8, False), "W4A8": (128, False)}
            assert prep.forms["onednn"] == want[name]
        assert (prep._fbgemm is not None) == gemv and (prep._onednn is None) == gemv
        small = prep.nbytes()
        x = _x(cpu.gemv_rows() + 1, K)
        assert torch.equal(packed(x), sim(x)) and prep._onednn is not None
        assert prep.nbytes() == small + (prep._onednn.numel() if gemv else 0)


def _pairwise_sums(u: torch.Tensor, zero: int, w: torch.Tensor) -> torch.Tensor:
    """sum_k (u - zero) w as a CPU without VNNI computes it: u8 x s8 products added in adjacent pairs with int16
    saturation (vpmaddubsw), the pairs then summed in int32, minus zero x sum_k w. u (M, K), w (N, K), K even."""
    p = u.long()[:, None, :] * w.long()[None, :, :]  # (M, N, K) products
    pairs = (p[..., 0::2] + p[..., 1::2]).clamp(*cpu.PAIR_LIMITS)  # (M, N, K/2)
    return pairs.sum(-1) - zero * w.long().sum(1)[None, :]  # (M, N)


@pytest.mark.parametrize("wbits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("abits", [2, 4, 5, 6, 8])
def test_int8mm_form_sums_exactly_with_pairs_in_int16(wbits, abits, monkeypatch):
    """`int8mm_form` on a CPU that sums pairs in 16 bits: every code pair at the ranges' extremes (the worst case
    of saturation), run through a model of that arithmetic, gives the exact integer sum; the plain codes + 128 do
    not for 8-bit against 8-bit. On a CPU that sums exactly: codes + 128, one block of rows."""
    wa, aa = QuantArgs(bits=wbits), QuantArgs(bits=abits, granularity="token", dynamic=True)
    monkeypatch.setattr(cpu, "int8_sums", lambda gemm: "exact")
    assert cpu.int8mm_form(wa, aa, "onednn") == (128, False)
    monkeypatch.setattr(cpu, "int8_sums", lambda gemm: "")
    assert cpu.int8mm_form(wa, aa, "onednn") is None
    monkeypatch.setattr(cpu, "int8_sums", lambda gemm: "pairs")
    zero, split = cpu.int8mm_form(wa, aa, "onednn")
    assert split == (wbits == abits == 8) and zero == (0 if split else 1 << (abits - 1))
    q = torch.tensor([[aa.qmin] * 4, [aa.qmax] * 4, [aa.qmin, aa.qmax] * 2, [aa.qmax, aa.qmin] * 2])  # (4, 4) codes
    w = torch.tensor([[wa.qmin] * 4, [wa.qmax] * 4, [wa.qmin, wa.qmax] * 2, [wa.qmax, wa.qmin] * 2])  # (4, 4) codes
    exact = q @ w.T  # (4, 4)
    if split:
        pos, neg = q.clamp(min=0), (-q).clamp(min=0)
        got = _pairwise_sums(pos, 0, w) - _pairwise_sums(neg, 0, w)
        assert not torch.equal(_pairwise_sums(q + 128, 128, w), exact)  # the codes + 128 saturate
    else:
        got = _pairwise_sums(q + zero, zero, w)
    assert torch.equal(got, exact)


@pytest.mark.parametrize("choice", ["", "1"])
def test_int8_gemm_is_ignored_where_no_form_sums_exactly(choice, monkeypatch):
    monkeypatch.setenv(cpu.INT8MM_ENV, choice)
    monkeypatch.setattr(cpu, "int8_sums", lambda gemm: "")
    kind, why = cpu.plan(W8A8.weights, W8A8.inputs, torch.float32)
    assert kind == "dequant" and "sums no form" in why
    monkeypatch.setattr(cpu, "int8_sums", lambda gemm: "pairs")
    assert cpu.plan(W8A8.weights, W8A8.inputs, torch.float32)[0] == ("int8mm" if not cpu.int8mm_misfit(W8A8.weights, W8A8.inputs)
                                                                   else "dequant")


def test_token_codes_in_float_are_the_bytes_codes():
    x = _x(5, 77) * 4
    u, s = cpu.token_codes(x, W8A8.inputs)
    q, s2 = cpu.token_codes(x, W8A8.inputs, zero=None)
    assert q.dtype == torch.float32 and torch.equal(s, s2) and torch.equal(q, u.float() - 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,clip,full_range", [(8, 1.0, True), (8, 1.0, False), (4, 0.9, False), (6, 0.85, True), (5, 1.0, False)])
def test_token_codes_are_the_simulations_codes(bits, clip, full_range, dtype):
    """The int8 GEMM's own per-token quantizer gives the codes and scales `compute_qparams` + `quantize`
    give, bit for bit, over odd widths, all-zero and subnormal rows, clipped ranges and one-sided rows."""
    from lmpress.quant.primitives import compute_qparams, quantize

    args = QuantArgs(bits=bits, granularity="token", dynamic=True, symmetric=True, clip_ratio=clip, full_range=full_range)
    x = (torch.randn(9, 37) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)  # (9, 37): rows over six decades
    x[1] = 0  # all zero: scale 1
    x[2] = x[2].abs()  # positive only
    x[3] = -x[3].abs()  # negative only
    x[4, :] = torch.tensor(1e-45).to(dtype) if dtype == torch.float32 else 0  # the smallest subnormal: its scale underflows
    x[5, 7] = 1e4  # one outlier
    u, s = cpu.token_codes(x, args)
    ref_s, z = compute_qparams(x, args)  # (9, 1) each
    ref_q = quantize(x, ref_s, z, args)  # (9, 37) int8
    assert u.dtype == torch.uint8 and s.dtype == torch.float32 and s.shape == (9, 1)
    assert torch.equal(s, ref_s)
    assert torch.equal(u.to(torch.int16) - 128, ref_q.to(torch.int16))


def test_shared_token_codes_reuse_only_the_same_unmodified_tensor():
    """q/k/v read one tensor: its codes are computed once, and recomputed whenever they could differ."""
    a8, a4 = W8A8.inputs, QuantArgs(bits=4, granularity="token", dynamic=True, symmetric=True)
    x = _x(1, 3, 40)  # (1, 3, 40): decode-sized
    u, s = cpu.shared_token_codes(x, a8)
    fresh = cpu.token_codes(x.reshape(-1, 40), a8)
    assert torch.equal(u, fresh[0]) and torch.equal(s, fresh[1])
    assert cpu.shared_token_codes(x, a8)[0] is u  # the same tensor, unmodified: reused
    assert cpu.shared_token_codes(x.clone(), a8)[0] is not u  # an equal but other tensor: recomputed
    assert cpu.shared_token_codes(x, a4)[0] is not u  # another scheme: recomputed
    assert cpu.shared_token_codes(x, a8, zero=None)[0].dtype == torch.float32  # another form: recomputed
    u8, _ = cpu.shared_token_codes(x, a8)
    x[0, 0, 0] = 50.0  # in place: the version counter moves
    u9, s9 = cpu.shared_token_codes(x, a8)
    assert u9 is not u8 and torch.equal(u9, cpu.token_codes(x.reshape(-1, 40), a8)[0]) and s9[0, 0] > s[0, 0]
    big = _x(cpu.SMALL_M + 1, 40)  # prefill-sized: never held
    assert cpu.shared_token_codes(big, a8)[0] is not cpu.shared_token_codes(big, a8)[0]
    with torch.inference_mode():  # no version counter: never reused
        xi = _x(2, 40)
        assert cpu.shared_token_codes(xi, a8)[0] is not cpu.shared_token_codes(xi, a8)[0]


@pytest.mark.parametrize("scheme,why", [
    (QuantScheme(weights=_w(3, 64, sym=False)), "3-bit"),
    (QuantScheme(weights=_w(2, 64, sym=False)), "2-bit"),
    (QuantScheme(weights=_w(4, 16, sym=False)), "multiple of 32"),
    (QuantScheme(weights=_w(8, sym=False)), "asymmetric 8-bit"),
    (QuantScheme(weights=_w(8, 32)), "group-wise 8-bit"),
])
def test_cpu_path_dequantizes_what_the_ops_do_not_fit(scheme, why, monkeypatch):
    monkeypatch.delenv(cpu.INT8MM_ENV, raising=False)
    sim = _sim(scheme, 128, 32)
    packed = PackedLinear.from_sim(sim)
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    x = _x(1, 128)
    with torch.no_grad():
        assert torch.equal(packed(x), sim(x))
    assert packed.kernel_path.kind == "cpu-dequant" and why in packed.kernel_path.reason
    assert packed._cached is None and packed._fast is None


def test_cpu_path_float16_dequantizes(monkeypatch):
    sim = _sim(W4A16, 128, 32, dtype=torch.float16)
    packed = PackedLinear.from_sim(sim)
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    x = _x(1, 128, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(packed(x), sim(x))
    assert "bfloat16 only" in packed.kernel_path.reason


def test_cpu_path_holds_no_fp32_copy(monkeypatch):
    scheme = QuantScheme(weights=_w(4, 64, sym=False))
    packed = PackedLinear.from_sim(_sim(scheme, 576, 1536, bias=False))
    monkeypatch.setenv("LMPRESS_KERNELS", "auto")  # big enough for the fast path under auto
    packed(_x(1, 576))
    assert packed.kernel_path.kind == "cpu-int4pack"
    fp32 = 576 * 1536 * 4
    assert packed.weight_nbytes() < 0.32 * fp32  # on-disk words + qparams + the repacked int4 copy
    monkeypatch.setenv("LMPRESS_KERNELS", "ref")
    packed(_x(1, 576))  # the reference caches its fp32 weight: counted too
    assert packed.weight_nbytes() > fp32


# ============================================================ dispatch
def test_dispatch_env(monkeypatch):
    sim = _sim(W4A16, 200, 24)
    packed = PackedLinear.from_sim(sim)
    x = _x(2, 200)
    monkeypatch.setenv("LMPRESS_KERNELS", "ref")
    assert requested_backend() == "ref"
    assert torch.equal(packed(x), sim(x)) and packed.kernel_path.kind == "ref"
    monkeypatch.setenv("LMPRESS_KERNELS", "auto")  # small layer on CPU: the reference
    assert torch.equal(packed(x), sim(x)) and "small layer" in packed.kernel_path.reason
    monkeypatch.delenv(cpu.INT8MM_ENV, raising=False)
    sim8 = _sim(W4A8, 200, 24)  # ... unless it takes the int8 GEMM, which beats the reference's fake-quant
    packed8 = PackedLinear.from_sim(sim8)
    y = packed8(x)
    assert packed8.kernel_path.kind == ("cpu-int8mm" if cpu.int8_sums("onednn") else "ref")
    assert torch.equal(y, sim8(x))
    monkeypatch.setenv("LMPRESS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LMPRESS_KERNELS='cuda'"):
        packed(x)
    monkeypatch.delenv("LMPRESS_KERNELS")
    assert requested_backend() == "auto"


def test_dispatch_autograd_uses_reference(monkeypatch):
    packed = PackedLinear.from_sim(_sim(QuantScheme(weights=_w(4, 64)), 256, 256))
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    x = _x(1, 256).requires_grad_()
    packed(x).sum().backward()
    assert packed.kernel_path.kind == "ref" and x.grad is not None


@pytest.mark.skipif(INTERP, reason="only meaningful without the interpreter")
def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    packed = PackedLinear.from_sim(_sim(W4A16, 200, 24))
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        packed(_x(1, 200))


def test_checkpoint_cpu_path_end_to_end(tiny, tokens, tmp_path, monkeypatch):
    from lmpress.compress import compress, load, save

    model, _ = tiny
    compress(model, "w4a16-rtn")
    save(model, tmp_path / "ckpt")
    runtime = load(tmp_path / "ckpt")
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")  # the tiny layers are below auto's size threshold
    with torch.no_grad():
        ref = model(tokens).logits
        assert torch.equal(runtime(tokens).logits, ref)  # 3 x 40 rows: exact dequant path
        one = tokens[:1, :1]
        assert _rel(runtime(one).logits, model(one).logits) < 2e-2  # 1 row: bf16 int4 op
    kinds = {m.kernel_path.kind for m in runtime.modules() if isinstance(m, PackedLinear)}
    assert kinds == {"cpu-int4pack"}


GROUP_SCHEMES = {  # scheme, the CPU path a lone member takes at 3 rows
    "W8A8": (W8A8, "cpu-int8mm"),
    "W4A4-tensor": (QuantScheme(weights=_w(4, gran="tensor"), inputs=W4A4.inputs), "cpu-int8mm"),
    "W4A16-g64-asym": (QuantScheme(weights=_w(4, 64, sym=False)), "cpu-int4pack"),
    "W4A16-channel": (QuantScheme(weights=_w(4)), "cpu-int4pack"),
    "W8A16": (QuantScheme(weights=_w(8)), "cpu-int8pack"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(GROUP_SCHEMES))
def test_sibling_group_is_the_separate_linears(name, dtype, monkeypatch):
    """Linears reading one input run as one stacked GEMM on the CPU op paths: bit-identical to each alone,
    the other members' outputs taken only for the very same unmodified tensor."""
    from lmpress.kernels.linear import link_siblings

    scheme, kind = GROUP_SCHEMES[name]
    if kind == "cpu-int8mm" and not cpu.int8_sums("onednn"):
        kind = "cpu-dequant"  # no oneDNN int8 GEMM that sums exactly: no op path and no stacked GEMM
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    sims = [_sim(scheme, 192, n, bias=b, dtype=dtype, seed=i) for i, (n, b) in enumerate([(40, True), (24, False), (24, True)])]
    alone = [PackedLinear.from_sim(s) for s in sims]
    parent = nn.ModuleDict({k: PackedLinear.from_sim(s) for k, s in zip("qkv", sims)})
    assert link_siblings(parent, [["q", "k", "v"], ["q", "nope"]]) == 1
    grouped = list(parent.values())
    with torch.no_grad():
        for x in (_x(3, 192, dtype=dtype), _x(2, 33, 192, dtype=dtype)):  # decode; above SMALL_M
            want = [m(x) for m in alone]
            got = [m(x) for m in grouped]
            for g, w, m in zip(got, want, grouped):
                assert torch.equal(g, w)
                stacked = kind != "cpu-dequant" and (x.shape[0] == 3 or kind == "cpu-int8mm")  # bf16 ops: up to SMALL_M rows
                assert ("one GEMM for the 3 linears" in m.kernel_path.reason) == stacked, m.kernel_path
            assert not grouped[0]._group._memo  # every slice taken
        x = _x(3, 192, dtype=dtype)
        grouped[0](x)
        x.mul_(2)  # changed in place: k must not get the slice computed before
        assert torch.equal(grouped[1](x), alone[1](x))
        assert torch.equal(grouped[2](_x(3, 192, dtype=dtype, seed=7)), alone[2](_x(3, 192, dtype=dtype, seed=7)))
        with torch.inference_mode():  # no version counter: each member alone
            xi = _x(3, 192, dtype=dtype)
            assert torch.equal(grouped[1](xi), alone[1](xi)) and "one GEMM" not in grouped[1].kernel_path.reason
    if kind != "cpu-dequant":
        assert grouped[0].weight_nbytes() > alone[0].weight_nbytes()  # the stacked copy is counted, once
    else:
        assert grouped[0].weight_nbytes() == alone[0].weight_nbytes()  # nothing stacked, nothing made


def test_link_siblings_skips_mixed_schemes_and_other_modules():
    from lmpress.kernels.linear import link_siblings

    a, b = PackedLinear.from_sim(_sim(W8A8, 64, 16)), PackedLinear.from_sim(_sim(W4A8, 64, 16))
    parent = nn.ModuleDict({"a": a, "b": b, "c": nn.Linear(64, 16), "d": PackedLinear.from_sim(_sim(W8A8, 32, 16))})
    assert link_siblings(parent, [["a", "b"], ["a", "c"], ["a", "d"], ["a"]]) == 0
    assert a._group is None and b._group is None


def test_checkpoint_links_siblings_and_stays_exact(tiny, tokens, tmp_path, monkeypatch):
    """A reloaded checkpoint runs each layer's q/k/v and gate/up as one GEMM on the CPU, with the same logits."""
    from lmpress.compress import compress, load, save

    model, _ = tiny
    compress(model, "w8a8-rtn")
    save(model, tmp_path / "ckpt")
    runtime = load(tmp_path / "ckpt")
    packed = [m for m in runtime.modules() if isinstance(m, PackedLinear)]
    groups = {id(m._group) for m in packed if m._group is not None}
    assert len(groups) == 2 * runtime.config.num_hidden_layers
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    with torch.no_grad():
        got = [runtime(t).logits for t in (tokens, tokens[:1, :1])]
        stacked = 5 * runtime.config.num_hidden_layers if cpu.int8_sums("onednn") else 0  # else the dequant path
        assert sum("one GEMM" in m.kernel_path.reason for m in packed) == stacked
        for m in packed:
            m._group = None
        want = [runtime(t).logits for t in (tokens, tokens[:1, :1])]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("recipe", ["w8a8-rtn", "w4a16-rtn"])
def test_checkpoint_loaded_in_inference_mode_runs(recipe, tiny, tokens, tmp_path, monkeypatch):
    """A checkpoint loaded under torch.inference_mode (its buffers then keep no version counter, which the runtime
    copies' keys read) runs inside and outside that mode, with the logits of one loaded as usual."""
    from lmpress.compress import compress, load, save

    model, _ = tiny
    compress(model, recipe)
    save(model, tmp_path / "ckpt")
    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    with torch.no_grad():
        want = [load(tmp_path / "ckpt")(t).logits for t in (tokens, tokens[:1, :1])]
    with torch.inference_mode():
        runtime = load(tmp_path / "ckpt")
        inside = [runtime(t).logits for t in (tokens, tokens[:1, :1])]
    with torch.no_grad():
        outside = [runtime(t).logits for t in (tokens, tokens[:1, :1])]
    assert all(torch.equal(a, w) and torch.equal(b, w) for a, b, w in zip(inside, outside, want))


# ============================================================ Triton kernels (interpreter)
W4A16_CASES = [
    # M, N, K, args, dtype, split_k, layout, config
    (1, 24, 200, _w(4, 128), torch.float32, None, "nk", None),  # M=1, partial last group
    (5, 33, 200, _w(4, 64, sym=False), torch.float32, None, "nk", None),  # odd N, asym
    (3, 40, 96, _w(4), torch.float32, 2, "nk", None),  # per channel, split-K
    (17, 24, 130, _w(8, 32, sym=False), torch.float32, None, "kn", None),  # 8-bit, kn layout, odd K
    (2, 16, 77, _w(2, 16, sym=False), torch.float32, None, "nk", {"BLOCK_K": 32}),  # 2-bit, groups inside a block
    (4, 20, 160, _w(4, 64), torch.float32, 3, "nk", {"BLOCK_K": 32}),  # group-aligned blocks, 3 splits
    (3, 24, 100, _w(4, 48, sym=False), torch.float32, None, "nk", {"BLOCK_K": 32}),  # ragged: per-element gather
    (2, 24, 150, _w(4, 32, sym=False), torch.float32, None, "nk", {"BLOCK_K": 128}),  # 4 groups a block, partial
    (3, 24, 64, _w(4, gran="tensor", sym=False), torch.float32, None, "nk", None),  # per tensor
    (4, 24, 200, _w(4, 64, sym=False), torch.bfloat16, None, "nk", None),
    (4, 24, 200, _w(4, 64, sym=False), torch.float16, 2, "kn", None),
]


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("case", W4A16_CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-w{c[3].bits}-{c[3].granularity}{c[3].group_size or ''}-{str(c[4])[6:]}-split{c[5]}-{c[6]}")
def test_w4a16_gemm_matches_reference(case):
    from lmpress.kernels.w4a16_gemm import w4a16_gemm, w4a16_gemm_ref

    M, N, K, args, dtype, split, layout, config = case
    p, s, z = _quantized(N, K, args)
    if layout == "kn":
        p = to_kn_layout(p, args.bits)
    x, b = _x(M, K, dtype=dtype), _x(N, dtype=dtype, seed=2)
    kw = dict(in_features=K, group_size=args.group_size, bits=args.bits, bias=b, layout=layout)
    y = w4a16_gemm(x, p, s, z, split_k=split, config=config, **kw)
    r = w4a16_gemm_ref(x, p, s, z, **kw)
    assert y.dtype == dtype and y.shape == (M, N)
    # fp32: IEEE products, only the summation order differs. fp16/bf16: one output rounding,
    # and the interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest even).
    assert _rel(y, r) <= (1e-5 if dtype == torch.float32 else 1.5e-2)


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("shape,bits,clip,dtype,full", [
    ((3, 5, 40), 4, 1.0, torch.float32, False), ((1, 200), 8, 0.9, torch.float32, False),
    ((7, 33), 4, 0.85, torch.bfloat16, False), ((2, 100), 8, 1.0, torch.float16, False),
    ((2, 1100), 4, 1.0, torch.float32, False),
    ((4, 96), 8, 1.0, torch.float32, True), ((3, 40), 4, 0.9, torch.float32, True),  # absmax / (qmax + 1/2)
])
def test_act_quant_reproduces_fake_quantize(shape, bits, clip, dtype, full):
    from lmpress.kernels.act_quant import act_dequant, act_quant, act_quant_ref, token_args

    x = _x(*shape, dtype=dtype) * 3
    flat = x.view(-1, shape[-1])
    flat[0, :5] = torch.tensor([0.5, 1.5, -0.5, 2.5, -2.5]).to(dtype)  # ties: half to even
    if flat.shape[0] > 1:
        flat[1] = 0  # an all-zero token: scale 1
    if full and flat.shape[0] > 2:
        flat[2, 0] = -flat[2].abs().max() * 1.5  # a negative extreme: -(qmax + 1/2) rounds to qmin, kept
    q, p, s = act_quant(x, bits, clip, packed=bits == 4, block_k=256 if shape[-1] > 1000 else None, full_range=full)
    qr, sr = act_quant_ref(x, bits, clip, full_range=full)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    if full:
        assert int(q.min()) == -(1 << (bits - 1))
    if bits == 4:
        assert torch.equal(p, act_quant_ref(x, bits, clip, packed=True, full_range=full)[0])
    assert torch.equal(act_dequant(q, s, bits, dtype), fake_quantize(x, token_args(bits, clip, full)))


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("M,N,K,w_bits,a_bits,a_packed,dtype,gran", [
    (1, 24, 200, 4, 4, True, torch.float32, "channel"),  # W4A4, packed activations
    (5, 33, 77, 8, 8, False, torch.float32, "channel"),  # W8A8, odd K
    (17, 40, 130, 4, 8, False, torch.bfloat16, "channel"),  # W4A8
    (3, 16, 64, 8, 4, False, torch.float16, "tensor"),  # W8A4, per-tensor weight scale
])
def test_int_gemm_exact_accumulator(M, N, K, w_bits, a_bits, a_packed, dtype, gran):
    from lmpress.kernels.act_quant import act_quant
    from lmpress.kernels.w4a4_gemm import int_gemm, int_gemm_ref

    p, s, _ = _quantized(N, K, _w(w_bits, gran=gran))
    x, b = _x(M, K, dtype=dtype), _x(N, dtype=dtype, seed=2)
    codes, words, sx = act_quant(x, a_bits, packed=a_packed, codes=not a_packed)
    a = words if a_packed else codes
    kw = dict(in_features=K, w_bits=w_bits, a_packed=a_packed)
    acc = int_gemm(a, sx, p, s, out_dtype=torch.int32, **kw)
    assert torch.equal(acc, int_gemm_ref(a, sx, p, s, out_dtype=torch.int32, **kw))  # integer: exact
    y = int_gemm(a, sx, p, s, bias=b, out_dtype=dtype, **kw)
    r = int_gemm_ref(a, sx, p, s, bias=b, out_dtype=dtype, **kw)
    if dtype == torch.float32:
        assert torch.equal(y, r)  # same epilogue operations
    else:
        assert _rel(y, r) < 1e-2  # the interpreter's bf16 cast truncates


TRITON_SCHEMES = {
    "W4A16-g128-partial": (W4A16, "triton-w4a16"),
    "W2-asym-g16": (QuantScheme(weights=_w(2, 16, sym=False)), "triton-w2a16"),
    "W4A4": (W4A4, "triton-w4a4"),
    "W4A8": (W4A8, "triton-w4a8"),
    "W8A8": (W8A8, "triton-w8a8"),
    "W4-asym-g32-A8": (QuantScheme(weights=_w(4, 32, sym=False), inputs=A8), "triton-actquant+w4a16"),
    "W3-asym-g64": (QuantScheme(weights=_w(3, 64, sym=False)), "ref"),
    "W6A6": (PRESETS["W6A6"], "triton-w6a6"),  # 6-bit codes repacked into int8 containers for the integer GEMM
    "W3A8": (PRESETS["W3A8"], "triton-w3a8"),
    "W2A8": (PRESETS["W2A8"], "triton-w2a8"),
}


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("name", sorted(TRITON_SCHEMES))
def test_packed_linear_triton_matches_sim(name, monkeypatch):
    scheme, kind = TRITON_SCHEMES[name]
    sim = _sim(scheme, 200, 24)
    packed = PackedLinear.from_sim(sim)
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    x = _x(2, 5, 200)
    with torch.no_grad():
        y = packed(x)
        assert packed.kernel_path.kind == kind
        assert _rel(y, sim(x)) <= 1e-5


def _compress_reload_run_triton(model, recipe, tokens, tmp_path, monkeypatch):
    """Compress, save, load, then run the packed model through Triton: (runtime, its logits, the
    simulated model's logits) on two 12-token rows."""
    from lmpress.compress import compress, load, save

    compress(model, recipe)
    save(model, tmp_path / "ckpt")
    runtime = load(tmp_path / "ckpt")
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    ids = tokens[:2, :12]
    with torch.no_grad():
        return runtime, runtime(ids).logits, model(ids).logits


W8A8_VLLM_RULE = Recipe.from_yaml(
    'version: 1\nname: w8a8-rtn-127\nschemes: {lm_head: null, "re:.*": {preset: W8A8, inputs: {full_range: false}}}\nstages: [rtn]\n')


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("recipe,tol", [("w4a16-rtn", 1e-4), (W8A8_VLLM_RULE, 1e-4), ("w8a8-rtn", 1e-2)])
def test_tiny_model_end_to_end_through_triton(recipe, tol, tiny, tokens, tmp_path, monkeypatch):
    """W8A8's preset takes compressed-tensors' rule, scale = absmax / 127.5: each token's extreme
    value lands on a rounding tie (±127.5), so the integer GEMM's summation order (an ulp upstream)
    decides -127 or -128 for a negative extreme; hence the looser bound. With absmax / 127 no value
    sits on a tie by construction and the paths agree to 1e-4."""
    runtime, y, r = _compress_reload_run_triton(tiny[0], recipe, tokens, tmp_path, monkeypatch)
    kinds = {m.kernel_path.kind for m in runtime.modules() if isinstance(m, PackedLinear)}
    assert kinds == {"triton-w4a16" if recipe == "w4a16-rtn" else "triton-w8a8"}
    assert _rel(y, r) <= tol
    assert torch.equal(y.argmax(-1), r.argmax(-1))


# ============================================================ online transform fused with act_quant
def _int_factors(m, p, seed, kind):
    """(A, B, signs, norm) with small-integer entries: every partial sum of the transform is exact
    in fp32 whatever the order, so the fused kernel and the oracle see bit-identical values."""
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard":  # OnlineHadamard-like: ±1 factors, random signs, norm sqrt(n)
        from lmpress.quant.hadamard import hadamard_matrix

        A, B = hadamard_matrix(m).float(), hadamard_matrix(p).float()
        signs = (torch.randint(0, 2, (m * p,), generator=g) * 2 - 1).float()
        return A, B, signs, float(m * p) ** 0.5
    # FlatQuant-like: two dense Kronecker factors (integers in [-2, 2] here), no signs, norm 1 or 3
    A = torch.randint(-2, 3, (m, m), generator=g).float()
    B = torch.randint(-2, 3, (p, p), generator=g).float()
    return A, B, None, (3.0 if seed % 2 else 1.0)


@pytest.mark.parametrize("size,seed,tile", [(576, 0, (36, 16)), (1536, 5, (48, 32)), (160, None, (20, 8)),
                                            (64, 1, (8, 8)), (4096, 2, (64, 64)), (10, 2, None)])
def test_online_hadamard_kron_factors(size, seed, tile):
    from lmpress.kernels.online import OnlineHadamard
    from lmpress.kernels.transform_act_quant import fused_fits, kron_transform_ref
    from lmpress.quant.hadamard import hadamard_matrix

    h = OnlineHadamard(size, seed)
    kron = h.kron_factors()
    if tile is None:  # no Hadamard of order 10: the dense fallback has no factors
        assert kron is None
        return
    A, B, signs, norm = kron
    assert (A.shape[0], B.shape[0]) == tile and fused_fits(*tile) is None and norm == size ** 0.5
    s = signs if signs is not None else torch.ones(size)
    # diag(s) (A ⊗ B) is, entry for entry, diag(s) H_n: the matrix the transform was defined by
    assert torch.equal(s[:, None] * torch.kron(A, B), s[:, None] * hadamard_matrix(size).float())
    x = torch.randint(-8, 9, (3, size), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(kron_transform_ref(x, A, B, signs, norm), h(x))  # integer sums: bit-identical
    assert h.kron_factors() is kron  # cached


def test_fused_fits_limits():
    from lmpress.kernels.transform_act_quant import MAX_BLOCK, fused_fits

    assert fused_fits(112, 128) is None  # 14336 = (28·4) x 128
    assert "5504 x 2" in fused_fits(5504, 2)  # LLaMA-2's 11008: a dense 5504 factor, never fused
    assert fused_fits(MAX_BLOCK + 1, 16) is not None


@pytest.mark.parametrize("name", ["W4A4", "W8A8"])
@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_rotated_packed_linear_other_paths_apply_the_transform_first(name, backend, monkeypatch):
    from lmpress.kernels.online import OnlineHadamard, RotatedInput

    scheme = {"W4A4": W4A4, "W8A8": W8A8}[name]
    sim = _sim(scheme, 160, 24)
    T = OnlineHadamard(160, 3)
    mod = RotatedInput(T, PackedLinear.from_sim(sim))
    monkeypatch.setenv("LMPRESS_KERNELS", backend)
    monkeypatch.delenv(cpu.INT8MM_ENV, raising=False)
    # on the CPU by default: through the int8 GEMM (in a form this CPU sums exactly), which is the simulation
    kind = "ref" if backend == "ref" else "cpu-int8mm" if cpu.int8_sums("onednn") else "cpu-dequant"
    x = _x(2, 5, 160)
    with torch.no_grad():
        y, want = mod(x), sim(T(x))
    assert mod.linear.kernel_path.kind == kind
    assert torch.equal(y, want)


TQ_CASES = [  # M, m, p, kind, bits, packed, clip, dtype
    (1, 9, 16, "flat", 4, True, 1.0, torch.float32),  # one token, odd m padded to 16
    (5, 12, 32, "hadamard", 4, True, 0.9, torch.float32),
    (3, 20, 64, "flat", 8, False, 1.0, torch.float16),
    (4, 36, 16, "hadamard", 8, False, 0.85, torch.bfloat16),
    (2, 9, 128, "flat", 4, True, 0.9, torch.bfloat16),  # p = 128: the largest tile side
    (3, 12, 4, "hadamard", 4, True, 1.0, torch.float32),  # p % 8 != 0: codes packed in torch
]


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("case", TQ_CASES, ids=lambda c: f"M{c[0]}-{c[1]}x{c[2]}-{c[3]}-a{c[4]}{'p' if c[5] else ''}-clip{c[6]}-{str(c[7])[6:]}")
def test_transform_act_quant_exact_on_integer_inputs(case):
    """Small-integer activations and factors (exact in fp16/bf16 too): every partial sum is exact,
    so the transformed values are bit-identical and codes, packed words and scales must be equal."""
    from lmpress.kernels.transform_act_quant import transform_act_quant, transform_act_quant_ref

    M, m, p, kind, bits, packed, clip, dtype = case
    A, B, signs, norm = _int_factors(m, p, M, kind)
    x = torch.randint(-8, 9, (M, m * p), generator=torch.Generator().manual_seed(1)).to(dtype)
    if M > 1:
        x[1] = 0  # an all-zero token: scale 1, codes 0
    q, words, s = transform_act_quant(x, A, B, signs, bits, clip, norm=norm, packed=packed)
    qr, sr = transform_act_quant_ref(x, A, B, signs, bits, clip, norm=norm)
    assert q.shape == x.shape and q.dtype == torch.int8 and s.shape == (M,)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    if packed:
        assert torch.equal(words, transform_act_quant_ref(x, A, B, signs, bits, clip, packed=True, norm=norm)[0])
    if M > 1:
        assert s[1].item() == 1.0 and not q[1].any()


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("m,p,bits,full", [(12, 32, 8, False), (20, 16, 4, False), (36, 64, 8, False), (12, 32, 8, True)])
def test_transform_act_quant_real_valued_flatquant(m, p, bits, full):
    """Real-valued activations and FlatQuant-like factors (near-orthogonal plus noise): the kernel
    sums in another order than the oracle, so a code may be one off where a value sits within an
    ulp or two of a rounding boundary; scales agree to fp32 rounding."""
    from lmpress.kernels.transform_act_quant import transform_act_quant, transform_act_quant_ref

    g = torch.Generator().manual_seed(m + p)
    A = torch.linalg.qr(torch.randn(m, m, generator=g))[0] + 0.1 * torch.randn(m, m, generator=g)
    B = torch.linalg.qr(torch.randn(p, p, generator=g))[0] + 0.1 * torch.randn(p, p, generator=g)
    x = _x(3, 7, m * p) * 2
    q, _, s = transform_act_quant(x, A, B, None, bits, 0.9, full_range=full)
    qr, sr = transform_act_quant_ref(x, A, B, None, bits, 0.9, full_range=full)
    assert q.shape == x.shape
    assert ((s - sr).abs() / sr).max().item() <= 1e-5
    diff = (q.int() - qr.int()).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() <= 1e-3


@pytest.mark.triton
@in_interpreter
def test_transform_act_quant_checks_and_fallback():
    from lmpress.kernels.act_quant import act_quant_ref
    from lmpress.kernels.online import OnlineHadamard
    from lmpress.kernels.transform_act_quant import online_act_quant, transform_act_quant

    A, B = torch.eye(12), torch.eye(16)
    with pytest.raises(ValueError, match="must equal m·p"):
        transform_act_quant(torch.zeros(2, 100), A, B)
    with pytest.raises(ValueError, match="at most 128 a side"):
        transform_act_quant(torch.zeros(1, 12 * 256), A, torch.eye(256))
    with pytest.raises(ValueError, match="signs must have shape"):
        transform_act_quant(torch.zeros(1, 192), A, B, torch.ones(5))
    x = _x(3, 10)
    T = OnlineHadamard(10, 2)  # no Hadamard of order 10: dense, transformed in torch
    q, _, s, why = online_act_quant(x, T, 8)
    assert "dense" in why
    qr, sr = act_quant_ref(T(x), 8)
    assert torch.equal(q, qr) and torch.equal(s, sr)


ROT_SCHEMES = {  # name: (scheme, fused kind)
    "W4A4": (W4A4, "triton-rot+w4a4"),
    "W8A8": (W8A8, "triton-rot+w8a8"),
    "W4-asym-g32-A8": (QuantScheme(weights=_w(4, 32, sym=False), inputs=A8), "triton-rot+actquant+w4a16"),
    "W4A16-g128-partial": (W4A16, "triton-w4a16"),  # no activation quantization: nothing to fuse into
}


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("name", sorted(ROT_SCHEMES))
def test_rotated_packed_linear_fuses_online_hadamard(name, monkeypatch):
    """RotatedInput(OnlineHadamard, PackedLinear) on the Triton path = the unfused reference
    (transform in torch, then the simulation). Integer-valued inputs: the transformed values are
    bit-identical, so are the codes; output differences are the GEMMs' summation order only.
    Real-valued inputs: a code may be one off at a rounding boundary (see the kernel's notes)."""
    from lmpress.kernels.act_quant import act_quant_ref
    from lmpress.kernels.online import OnlineHadamard, RotatedInput
    from lmpress.kernels.transform_act_quant import online_act_quant

    scheme, kind = ROT_SCHEMES[name]
    sim = _sim(scheme, 160, 24)
    T = OnlineHadamard(160, 3)  # 160 = 20 · 8: a 20 x 8 tile
    mod = RotatedInput(T, PackedLinear.from_sim(sim))
    xi = torch.randint(-8, 9, (2, 5, 160), generator=torch.Generator().manual_seed(4)).float()
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    with torch.no_grad():
        y = mod(xi)
        assert mod.linear.kernel_path.kind == kind, mod.linear.kernel_path
        assert _rel(y, sim(T(xi))) <= 1e-5
        if scheme.inputs is not None:
            q, _, s, why = online_act_quant(xi, T, scheme.inputs.bits)
            qr, sr = act_quant_ref(T(xi), scheme.inputs.bits)
            assert why == "" and torch.equal(q, qr) and torch.equal(s, sr)
            xr = _x(4, 160) * 3
            q, _, s, _ = online_act_quant(xr, T, scheme.inputs.bits)
            qr, sr = act_quant_ref(T(xr), scheme.inputs.bits)
            assert (q.int() - qr.int()).abs().max().item() <= 1 and ((s - sr).abs() / sr).max().item() <= 1e-5


@pytest.mark.triton
@in_interpreter
def test_tiny_model_with_online_hadamard_through_triton(tiny, tokens, tmp_path, monkeypatch):
    from lmpress.compress import Recipe

    recipe = {"schemes": {"lm_head": None, "re:.*": "W8A8"}, "stages": [{"rotate": {"online": ["down_proj"]}}, "rtn"]}
    runtime, y, r = _compress_reload_run_triton(tiny[0], Recipe.from_dict(recipe), tokens, tmp_path, monkeypatch)
    kinds = {n.removesuffix(".linear").rsplit(".", 1)[-1]: m.kernel_path.kind
             for n, m in runtime.named_modules() if isinstance(m, PackedLinear)}
    assert kinds["down_proj"] == "triton-rot+w8a8" and kinds["up_proj"] == "triton-w8a8"
    assert _rel(y, r) <= 1e-4
    assert torch.equal(y.argmax(-1), r.argmax(-1))


# ============================================================ the interpreter subprocess
@pytest.mark.triton
@pytest.mark.skipif(INTERP, reason="already running under TRITON_INTERPRET=1: the triton tests ran in-process")
def test_triton_suite_in_interpreter():
    run_triton_tests_in_interpreter(__file__, LMPRESS_KERNELS="auto")
