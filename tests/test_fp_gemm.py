"""fp_gemm (FP8 / NVFP4 / MXFP4 / MXFP8 dequant-GEMM) against its torch oracle under Triton's interpreter,
and PackedLinear's Triton path for float schemes.

The `triton` tests run in a subprocess started with TRITON_INTERPRET=1 (`test_triton_suite_in_interpreter`;
see tests/_interpreter.py). The ahead-of-time CUDA compile of every variant is tests/test_aot.py's (it walks
`aot.KERNEL_MODULES`). fp32 activations: the dequantized weight is bit-identical (identity activations), and
so is the product when every partial sum is exact (integer activations on power-of-two-ish scales); otherwise
only the summation order differs from F.linear's.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmpress.kernels.dispatch import interpreter_ready
from lmpress.kernels.formats import pack, packed_cols, unpack
from lmpress.kernels.fp_gemm import fp_gemm, fp_gemm_ref
from lmpress.kernels.linear import PackedLinear
from lmpress.quant.primitives import dequantize
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import QuantArgs, QuantScheme
from lmpress.quant.sim import SimQuantLinear
from _interpreter import run_triton_tests_in_interpreter

INTERP = interpreter_ready()
in_interpreter = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 at start-up; run by test_triton_suite_in_interpreter")

FORMATS = {
    "fp8": QuantArgs(bits=8, type="float"),  # E4M3, per channel
    "fp8-tensor": QuantArgs(bits=8, type="float", granularity="tensor"),
    "nvfp4": QuantArgs(bits=4, type="float", granularity="group", group_size=16, scale_format="e4m3"),
    "mxfp4": QuantArgs(bits=4, type="float", granularity="group", group_size=32, scale_format="e8m0"),
    "mxfp8": QuantArgs(bits=8, type="float", granularity="group", group_size=32, scale_format="e8m0"),
}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _quantized(N, K, args, seed=0, spread=True):
    """RTN codes of a random (N, K) weight, packed: (weight_packed, weight_scale). `spread`: rows over
    four decades, so the scales (and E4M3's subnormals) vary."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    if spread:
        W = W * torch.logspace(-2, 2, N)[:, None]
    q, s, _ = rtn_quantize(W, args)
    return pack(q, args.bits), s


def _every_code(N, K, args, seed=0):
    """(N, K) int8 codes holding every bit pattern of the format (E4M3's NaN patterns excepted), shuffled."""
    n = 1 << args.bits
    codes = torch.arange(n) - n // 2  # every signed int8 code of `bits` bits
    if args.bits == 8:
        codes = codes[(codes % 128) != 127]  # S.1111.111 is NaN in E4M3: encode_fp never makes it
    g = torch.Generator().manual_seed(seed)
    reps = codes.repeat(-(-N * K // len(codes)))
    return reps[torch.randperm(len(reps), generator=g)[: N * K]].reshape(N, K).to(torch.int8)  # (N, K)


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ============================================================ fp_gemm vs fp_gemm_ref (interpreter)
CASES = [
    # M, N, K, format, dtype, bias, split_k, config
    (1, 24, 64, "fp8", torch.float32, True, None, None),
    (5, 40, 96, "nvfp4", torch.float32, False, None, None),
    (5, 24, 96, "mxfp4", torch.float16, True, None, None),
    (1, 40, 64, "mxfp8", torch.float16, False, None, None),
    (5, 24, 40, "fp8", torch.float32, True, None, None),  # K not a multiple of 32: a partial word-slab
    (1, 40, 40, "fp8-tensor", torch.float16, True, None, None),
    (5, 24, 64, "nvfp4", torch.float16, True, None, None),
    (1, 24, 96, "mxfp4", torch.float32, False, None, None),
    (1, 24, 96, "nvfp4", torch.float32, True, 3, {"BLOCK_K": 32}),  # split-K: 3 partial sums, bias after
    (5, 24, 96, "mxfp4", torch.float32, True, None, {"BLOCK_K": 16}),  # a slab inside one group of 32
    (5, 40, 64, "fp8", torch.float32, False, 2, {"BLOCK_N": 16}),  # several N tiles, split-K without bias
    (5, 24, 64, "nvfp4", torch.bfloat16, True, None, None),
]


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{c[3]}-{str(c[4])[6:]}"
                         f"{'-bias' if c[5] else ''}{f'-split{c[6]}' if c[6] else ''}{'-cfg' if c[7] else ''}")
def test_fp_gemm_matches_reference(case):
    M, N, K, fmt, dtype, with_bias, split, config = case
    args = FORMATS[fmt]
    p, s = _quantized(N, K, args)
    x = _x(M, K, dtype=dtype)
    b = _x(N, dtype=dtype, seed=2) if with_bias else None
    y = fp_gemm(x, p, s, args=args, in_features=K, bias=b, split_k=split, config=config)
    r = fp_gemm_ref(x, p, s, args, K, b)
    assert y.dtype == dtype and y.shape == (M, N)
    # fp32: IEEE products, only the summation order differs. fp16: one output rounding.
    # bf16: the interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest even).
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert _rel(y, r) <= tol


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_code_dequantizes_bit_identically(fmt, dtype):
    """Identity activations: y = W^T, one product a term, whatever the summation order, so the kernel's
    decode * scale (and its cast) must give dequantize()'s bits for every code of the format."""
    args = FORMATS[fmt]
    N, K = 24, 64
    _, s = _quantized(N, K, args, spread=False)
    p = pack(_every_code(N, K, args), args.bits)
    eye = torch.eye(K, dtype=dtype)  # (K, K): M = K rows
    y = fp_gemm(eye, p, s, args=args, in_features=K)  # (K, N)
    r = fp_gemm_ref(eye, p, s, args, K)
    assert torch.equal(y, r)
    w = dequantize(unpack(p, args.bits, K), s, torch.zeros_like(s), args, dtype=dtype)  # (N, K)
    assert torch.equal(y, w.t())


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_exact_sums_give_the_references_bits(fmt):
    """Small-integer activations and bias on FP4 weights with power-of-two(-ish) scales: every product and
    partial sum is exact in fp32, so the kernel's order and F.linear's give the same bits."""
    args = FORMATS[fmt]
    M, N, K = 5, 40, 96
    p, s = _quantized(N, K, args, spread=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (2, M, K), generator=g).float()  # (2, M, K): leading dimensions kept
    b = torch.randint(-8, 9, (N,), generator=g).float()
    y = fp_gemm(x, p, s, args=args, in_features=K, bias=b)
    assert y.shape == (2, M, N)
    assert torch.equal(y, fp_gemm_ref(x, p, s, args, K, b))


# ============================================================ input checks (no kernel launch)
def test_fp_gemm_says_what_is_wrong():
    args, K, N = FORMATS["nvfp4"], 64, 24
    p, s = _quantized(N, K, args)
    x = _x(3, K)

    def refuses(match, *a, **kw):
        with pytest.raises(ValueError, match=match) as e:
            fp_gemm(*a, **{"args": args, "in_features": K, **kw})
        assert "\n" not in str(e.value)

    refuses("type: float weights", x, p, s, args=QuantArgs(bits=4))
    refuses("activations must be float16, bfloat16 or float32", x.to(torch.int32), p, s)
    refuses("x has 63 input features, the weight 64", x[:, :63], p, s)
    refuses("int32 words", x, p.long(), s)
    refuses("need 8 int32 words per output channel, weight_packed has 7", x, p[:, :7], s)
    K40 = 40
    p40 = torch.zeros(N, packed_cols(K40, 4), dtype=torch.int32)
    refuses("nvfp4 needs in_features a multiple of its group size 16, got K=40", _x(3, K40), p40, s, in_features=K40)
    refuses(r"weight_scale must be \(24 or 1, 4\)", x, p, s[:, :3])
    refuses(r"weight_scale must be \(24 or 1, 4\)", x, p, s[:5])
    refuses(r"bias must be \(24,\)", x, p, s, bias=torch.zeros(N + 1))
    refuses("all operands must be on one device", x, p, s, bias=torch.zeros(N, device="meta"))


# ============================================================ PackedLinear through fp_gemm (interpreter)
A8_TOKEN = QuantArgs(bits=8, granularity="token", dynamic=True)
PACKED_SCHEMES = {  # name: (scheme, kernel path kind, reason contains)
    "FP8-dynamic": (QuantScheme(weights=FORMATS["fp8"], inputs=QuantArgs(bits=8, type="float", granularity="token",
                                                                         dynamic=True)), "triton-fp-fp8", "fp8 activations"),
    "NVFP4A16": (QuantScheme(weights=FORMATS["nvfp4"]), "triton-fp-nvfp4", ""),
    "MXFP4": (QuantScheme(weights=FORMATS["mxfp4"], inputs=QuantArgs(**{**FORMATS["mxfp4"].to_dict(), "dynamic": True})),
              "triton-fp-mxfp4", "mxfp4 activations"),
    "MXFP8A16": (QuantScheme(weights=FORMATS["mxfp8"]), "triton-fp-mxfp8", ""),
    "FP8-static": (QuantScheme(weights=FORMATS["fp8-tensor"], inputs=QuantArgs(bits=8, type="float", granularity="tensor")),
                   "triton-fp-fp8", "fp8 activations"),  # a calibrated input_scale
    "FP8-weights-int8-tokens": (QuantScheme(weights=FORMATS["fp8"], inputs=A8_TOKEN), "triton-fp-fp8", "int8 activations"),
    "int8-weights-fp8-tokens": (QuantScheme(weights=QuantArgs(bits=8), inputs=QuantArgs(bits=8, type="float", granularity="token",
                                                                                     dynamic=True)), "triton-w4a16", "fake-quantized"),
}


def _sim(scheme, in_f, out_f, x):
    torch.manual_seed(0)
    sim = SimQuantLinear(nn.Linear(in_f, out_f), scheme)
    sim.set_quantized(*rtn_quantize(sim.weight.detach().float(), scheme.weights))
    if scheme.inputs is not None and not scheme.inputs.dynamic:
        sim.set_input_scale(x.abs().amax())
    return sim


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("name", sorted(PACKED_SCHEMES))
def test_packed_linear_runs_float_schemes_through_fp_gemm(name, monkeypatch):
    scheme, kind, why = PACKED_SCHEMES[name]
    x = _x(2, 5, 64)
    sim = _sim(scheme, 64, 24, x)
    packed = PackedLinear.from_sim(sim)
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    with torch.no_grad():
        y = packed(x)
        assert packed.kernel_path.kind == kind and why in packed.kernel_path.reason
        assert kind.startswith("triton-fp") or name.startswith("int8-weights")
        assert _rel(y, sim(x)) <= 1e-6


@pytest.mark.triton
@in_interpreter
def test_online_transform_before_float_weights_is_applied_in_torch(monkeypatch):
    """Integer per-token inputs on FP8 weights: act_quant's fused transform does not apply (fp_gemm takes
    high-precision activations), so the transform runs first, then the fake-quant."""
    scheme, _, _ = PACKED_SCHEMES["FP8-weights-int8-tokens"]
    x = _x(3, 64)
    sim = _sim(scheme, 64, 24, x)
    packed = PackedLinear.from_sim(sim)
    transform = nn.Linear(64, 64, bias=False)
    monkeypatch.setenv("LMPRESS_KERNELS", "triton")
    with torch.no_grad():
        y = packed(x, transform=transform)
        assert packed.kernel_path.kind == "triton-fp-fp8"
        assert _rel(y, sim(transform(x))) <= 1e-6


# ============================================================ the interpreter subprocess
@pytest.mark.triton
@pytest.mark.skipif(INTERP, reason="already running under TRITON_INTERPRET=1: the triton tests ran in-process")
def test_triton_suite_in_interpreter():
    run_triton_tests_in_interpreter(__file__, LMPRESS_KERNELS="auto")
