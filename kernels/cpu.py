"""CPU fast path for packed linears: torch's own weight-only int4 / int8 GEMMs on repacked weights.

What torch 2.13 provides, and what it asks for (checked numerically in tests/test_kernels.py):

- ``aten._convert_weight_to_int4pack_for_cpu(u, innerKTiles)``: u int32 (N, K) holding the
  unsigned fields 0..15 (exactly our stored ``q + 8``), N % 16 == 0; returns its own uint8
  (N, K/2) tiling. ``aten._weight_int4pack_mm_for_cpu(x, w, G, sz)`` then computes
  ``x @ W^T`` with ``W[n, k] = (u - 8) * sz[k // G, n, 0] + sz[k // G, n, 1]``, G in
  {32, 64, 128, 256}, K % G == 0, ``sz`` (K/G, N, 2) in x's dtype. Our ``(q - z) * s`` maps to
  scale ``s`` and zero ``-z * s`` (exact for symmetric weights, z = 0).
- ``torch._weight_int8pack_mm(x, w, scales)``: x @ (w * scales[:, None])^T, w int8 (N, K);
  it crashes (segfault) unless K % 8 == 0, so K is padded to a multiple of 16 here. The real
  per-channel scales are applied in fp32 after it (it gets unit bf16 scales).

Both are vectorized (AVX2 / AVX512) for bfloat16 activations only; their float32 and float16
variants are scalar loops, 15-50x slower than an fp32 matmul on this machine. So, for up to
`SMALL_M` rows (decode, batched decode, prompts up to 64 tokens; 32 without AVX-512), weight-only schemes (W4A16, W8A16) run the op in bfloat16 for float32
and bfloat16 models:

- per-channel / per-tensor weights: the op gets unit scales (and the exact integer zero point
  ``-z``), so it returns ``bf16(sum_k x_k (q - z))``; the fp32 scale is applied afterwards.
- group-wise weights: scale and ``-z * s`` rounded to bfloat16 (relative 2^-9).

That is bfloat16 arithmetic (x rounded to bf16, one bf16 output rounding): close to the
simulation, not bit-identical. SmolLM2-135M W4A16 g64: one-token logits ~2e-2 relative after
30 layers. Perplexity with the op forced on every row (`SMALL_M` raised past 512), against this
module's exact path (`w4a16-gptq`, `--n 32`, 2026-12-06): 19.311310 / 19.307857 on 64 x 512 wiki
windows (+0.018%), 20.849215 / 20.842200 on 16 (+0.034%): inside the 0.1% a default path may
differ from the simulation, so the op stays the default. Splitting x into bf16 high and low parts
(2M rows) brought 16 windows to -0.003%, in 65 s against the op's 41 s; not taken. Greedy decoding can
still leave the exact path's tokens at a near tie (batch 8, 9 of 32 tokens equal).

Schemes that quantize activations per token (symmetric dynamic codes, symmetric per-channel or
per-tensor weights: W8A8, W4A8, W4A4..., `quant.primitives.int_factored`) take ``int8mm`` at every
size: the activation codes and scales exactly as the simulation computes them (`token_codes`, the
codes of `compute_qparams` / `quantize` in 8 ops), then oneDNN's int8 GEMM (``onednn.qlinear_pointwise``
on the weight codes prepacked once by ``onednn.qlinear_prepack``; narrower codes sit in int8
containers) with unit activation scale and zero point, so it returns ``fp32(sum_k qx_k qw_k) * s_w[n]``;
the per-token scale follows. The simulation of these schemes is that computation (`int_linear`: an fp32
GEMM of the codes, exact while partial sums stay under 2^24, then the same epilogue in the same order),
so this path is bit-identical to it, at every activation width (tests/test_kernels.py). Until
2026-12-06 the simulation summed dequantized fp32 products instead; then the integer sum differed from
it by rounding, which flipped later layers' codes (w4a4kv4-quarot-rtn +1.6% perplexity at 16 windows),
and only 8-bit activations took this path by default. ``LMPRESS_INT8_GEMM=0`` (`INT8MM_ENV`) takes every
scheme off it (the same numbers through an fp32 GEMM of the unpacked codes, slower).

Up to `GEMV_M` rows (decode; `GEMV_M_PAIRS` without VNNI) the same integer sum comes from fbgemm's int8 GEMM instead
(``quantized.linear_with_input_q_dq_qweight_dq_output_fp32`` on ``quantized.linear_prepack``'s copy of the
codes, given the float codes with unit scale and zero point 128, which it turns into the same bytes), where
it has an exact form (`int8mm_form`): its fixed cost per call is lower. One thread, us a call, oneDNN /
fbgemm (2026-12-06, `torch.equal` outputs): 1 x 576 x 960 35 / 20, 1 x 576 x 3072 76 / 51, 1 x 1536 x 576
38 / 25, 2 x 576 x 3072 103 / 58, 4 x 576 x 3072 126 / 80, 1 x 4096 x 12288 2108 / 1875; from 16 rows on
oneDNN wins (16 x 576 x 3072 104 / 175, 256 x 576 x 1536 284 / 990). Each copy is made on its first use,
so a model that prefills and decodes holds both (2 x N*K bytes).

Measured here on one thread against an fp32 F.linear of the dequantized weight: 1 x 4096 x 11008
9.8 ms -> 1.0 ms, 16 x 4096 x 4096 13.5 ms -> 0.8 ms, 512 x 576 x 1536 13.2 ms -> 1.2 ms, activation
quantization included; ``torch._int_mm``, the other exact op, was 8-35x slower than fp32. oneDNN runs
signed int8 sources through a reference loop (5 s for 256 x 576 x 1536), so the codes go in as
unsigned bytes with zero point 128.

A CPU without VNNI (AVX2 only, e.g. AMD EPYC before Zen 4) adds u8 x s8 products in pairs in 16 bits
with saturation (vpmaddubsw), in oneDNN and fbgemm alike (`int8_sums` probes each): codes + 128 against
8-bit weights overflow (2 x 255 x 127). A sum is exact there while every pair fits int16, and
`int8mm_form` keeps the codes inside: narrower activations shift by -qmin only (4-bit codes as 0..15:
2 x 15 x 128), 4-bit weights take codes + 128 as they are (2 x 255 x 8), and 8-bit activations against
8-bit weights go in as two blocks of rows, q⁺ = max(q, 0) and q⁻ = max(-q, 0) (2 x 128 x 127), the
sum being their difference (twice the rows: free at decode, where reading the weight is the cost).
Probed on such a CPU (2026-12-07, AVX2 EPYC): pairs up to 2 x 129 x 127 exact, 2 x 130 x 127 wrong.
SmolLM2-135M there, packed / fp32 base decode tokens/s (`bench/decode.py --tokens 32 --repeats 3`,
1 thread, batch 1): w8a8-smoothquant-rtn 0.22x on the dequant path that such a CPU took until then
(`LMPRESS_INT8_GEMM=0`) and 0.92x in these forms, w4a4kv4-quarot-rtn 0.19x and 0.71x, greedy tokens
equal to the reference path's. The bf16 weight-only ops stay off these schemes:
codes rounded from bf16-perturbed inputs differ from the simulation's, and a 4-bit code that flips
is a large error (un-rotated SmolLM2 W4A4 RTN: +8.6% perplexity).

Everything else takes ``dequant``: the weight is dequantized on the fly (`dequantize_fast`,
bit-identical to `dequantize`), activations are fake-quantized by the torch reference, and
F.linear runs in the model's dtype (`int_factored` schemes: `int_linear` on the unpacked codes),
which reproduces the simulation exactly. That is the path
above `SMALL_M` rows for weight-only schemes (long prompts, perplexity windows: there the op, whose cost
grows with the rows, loses to dequantization + an fp32 matmul), and for 2- and 3-bit weights, group sizes that are not multiples of 32 (the op's
groups must nest in ours), asymmetric or group-wise 8-bit weights, float16 activations,
every activation-quantized scheme under ``LMPRESS_INT8_GEMM=0``, and the activation schemes the int8 GEMM cannot
express (group-wise or asymmetric weights, static or asymmetric activations).

Nothing dequantized is kept between calls: a module holds its packed buffers plus, on the op
paths, the repacked copy (int4: N*K/2 bytes; int8: N*K bytes; int8mm: N*K bytes for each of its two GEMMs in use).
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lmpress.quant.primitives import dequantize, int_codes, int_epilogue, int_factored, int_linear, sink_rows
from lmpress.quant.scheme import QuantArgs

from .formats import unpack, unsigned_codes, unsigned_codes_float

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
# rows up to which the bf16 weight-only ops beat dequantize + fp32 matmul: an int4 g64 call costs ~21 us a row at
# 1536 x 576 against ~1 ms of dequantization + the fp32 GEMM (1 thread: 662 / 1468 us at 32 rows, 1346 / 1812 at 64,
# 2764 / 2529 at 128; 2 threads 721 / 1190 at 64; 576 x 1536 and 576 x 576 alike, 2026-12-06). 16 until then: a
# 32-token prompt dequantized every weight (W4A16 time to first token ~3x the fp32 base's). Without AVX-512 the op
# is slower (AVX2 EPYC, 2026-12-08, W4A16 g64 SmolLM2 layers, 1 thread, medians of 15, op / dequant us: 1536 x 576
# 1561 / 1751 at 32 rows, 2259 / 1847 at 48; 576 x 576 579 / 559 and 835 / 679; 64 there cost ~25%): 32 there
SMALL_M = 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32
# `auto` sends smaller layers to the (cached fp32) reference: below this the int4 op's fixed cost
# (~0.1 ms a call here) exceeds a streamed fp32 GEMV (SmolLM2's 192x576 k/v: 0.10 ms against 0.05 ms
# cold at one row), and their fp32 copies are small (SmolLM2: 25 MiB of 405; the model stays < 40%)
MIN_FAST_WEIGHTS = 1 << 17
FAST_DTYPES = (torch.float32, torch.bfloat16)
# the C binding skips torch.ops' Python overload resolution (~5-10 us a call, ~200 calls a token)
_INT4_MM = getattr(torch, "_weight_int4pack_mm_for_cpu", None) or torch.ops.aten._weight_int4pack_mm_for_cpu
_QLINEAR = getattr(getattr(torch.ops, "onednn", None), "qlinear_pointwise", None)  # x86 builds with oneDNN
_GEMV = getattr(getattr(torch.ops, "quantized", None), "linear_with_input_q_dq_qweight_dq_output_fp32", None)  # fbgemm
# rows up to which fbgemm's int8 GEMM beats oneDNN's (module doc); oneDNN above. With hot weights oneDNN already
# wins at 8 rows (2 threads 44 against 51 us at 8 x 576 x 3072), but in a decode step, weights read from memory,
# fbgemm still wins there: SmolLM2 batch 8, 2 threads, W8A8 134 -> 147 tokens/s and W4A4 95 -> 101 at 8 rows
# against 4 (1 thread 95 -> 99 and 76 -> 77; `bench/decode.py`, 2026-12-06)
GEMV_M = 8
# the same on a CPU whose int8 sums go in pairs (`int8_sums` 'pairs': AVX2 without VNNI), where oneDNN's kernels are
# slower: medians of 15, 1 thread, AVX2 EPYC, 2026-12-08, fbgemm / oneDNN / fp32 us (`/tmp` script). W8A8 (split):
# 1536 x 576 16 rows 484 / 565 / 528, 32 rows 1083 / 1206 / 1084, 64 rows 2024 / 1938 / 1768; 576 x 1536 32 rows
# 938 / 1060 / 947. W4A4 (codes + 8): 32 rows 528 / 657, 64 rows 1162 / 1196, 256 rows 3847 / 3449. 2 threads alike.
# A prompt of up to 32 tokens then makes only fbgemm's copy of the codes
GEMV_M_PAIRS = 32
# "0" keeps activation-quantized schemes off oneDNN's int8 GEMM (the same numbers either way: `int_linear`)
INT8MM_ENV = "LMPRESS_INT8_GEMM"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan(weights: QuantArgs, inputs: QuantArgs | None, x_dtype: torch.dtype) -> tuple[str, str]:
    """(kind, why): ``int8mm`` (activation-quantized schemes as `INT8MM_ENV` picks, any number of rows), ``int4pack`` /
    ``int8pack`` (torch's bf16 weight-only ops, up to `SMALL_M` rows; above it the caller takes
    ``dequant``), or ``dequant`` (exact: on-the-fly dequantization + F.linear) with the reason the
    ops do not fit; for ``int8mm`` on a CPU without VNNI, the form its codes take (`int8mm_form`)."""
    if weights.type == "float" or (inputs is not None and inputs.type == "float"):
        return "dequant", "floating-point formats: exact grid lookup + fp32 GEMM (torch has no CPU FP8/FP4 GEMM)"
    if inputs is not None:
        why = int8mm_misfit(weights, inputs) or int8mm_declined()
        form = None if why else int8mm_form(weights, inputs, "onednn")
        if not why and form is None:
            why = (f"quantized activations: this CPU's oneDNN int8 GEMM ({int8_sums('onednn') or 'absent or wrong'}) sums no form "
                   "of these codes exactly; exact fake-quant + fp32 GEMM instead")
        if why:
            return "dequant", why
        zero, split = form
        if int8_sums("onednn") != "pairs":
            return "int8mm", ""
        return "int8mm", ("no VNNI (u8 x s8 pairs summed in 16 bits): " +
                          ("q⁺ and q⁻ as two blocks of rows" if split else f"codes + {zero}"))
    if x_dtype not in FAST_DTYPES:
        return "dequant", f"{x_dtype} activations: torch's CPU int4/int8 kernels are vectorized for bfloat16 only"
    if weights.bits == 4:
        if weights.granularity == "group" and not any(weights.group_size % g == 0 for g in INT4_GROUPS):
            return "dequant", f"group size {weights.group_size} is not a multiple of 32 (the int4 op's groups are 32/64/128/256)"
        return "int4pack", ""
    if weights.bits == 8:
        if weights.granularity == "group":
            return "dequant", "group-wise 8-bit weights: the int8 op takes one scale per output channel"
        if not weights.symmetric:
            return "dequant", "asymmetric 8-bit weights: the int8 op has no zero point"
        return "int8pack", ""
    return "dequant", f"{weights.bits}-bit weights: no torch CPU kernel (only 4 and 8 bits)"


def int8mm_declined() -> str:
    """Why `INT8MM_ENV` keeps activation-quantized schemes off the int8 GEMM ('' when it lets them on)."""
    if os.environ.get(INT8MM_ENV, "") == "0":
        return f"quantized activations: {INT8MM_ENV}=0, the simulation's fp32 GEMM of the codes"
    return ""


def int8mm_misfit(weights: QuantArgs, inputs: QuantArgs) -> str:
    """Why oneDNN's int8 GEMM cannot run this activation-quantized scheme exactly ('' when it can)."""
    if _QLINEAR is None or not torch.backends.mkldnn.is_available():
        return "quantized activations: this torch build has no oneDNN int8 GEMM; exact fake-quant + fp32 GEMM instead"
    if int_factored(weights, inputs):
        return ""
    if not (inputs.type == "int" and inputs.symmetric and not inputs.outliers
            and inputs.granularity == ("token" if inputs.dynamic else "tensor")):
        return (f"{'dynamic' if inputs.dynamic else 'static'} {'symmetric' if inputs.symmetric else 'asymmetric'} "
                f"{inputs.bits}-bit {inputs.granularity} activations: the int8 GEMM takes dynamic symmetric per-token "
                "or static symmetric per-tensor codes")
    return (f"{weights.bits}-bit {weights.type} {'symmetric' if weights.symmetric else 'asymmetric'} {weights.granularity} "
            "weights under quantized activations: the int8 GEMM takes symmetric integer codes with one scale per output channel")


PAIR_LIMITS = (-32768, 32767)  # int16: where a CPU without VNNI adds each two u8 x s8 products (vpmaddubsw saturates)


def _gemm_sums(gemm: str, u: torch.Tensor, zero: int, w: torch.Tensor) -> bool | None:
    """Whether `gemm` ('onednn' or 'fbgemm') computes sum_k (u - zero) w exactly for uint8 u (M, K) and int8 w (N, K)
    (None: not in this build, or it refuses)."""
    exact = ((u.to(torch.int64) - zero) @ w.to(torch.int64).T).float()  # (M, N)
    N = w.shape[0]
    try:
        if gemm == "onednn":
            if _QLINEAR is None or not torch.backends.mkldnn.is_available():
                return None
            y = _QLINEAR(u, 1.0, zero, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(N),
                         torch.zeros(N, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "")
        else:
            if _GEMV is None or "fbgemm" not in torch.backends.quantized.supported_engines:
                return None
            y = _GEMV(u.float() - zero, 1.0, zero, _fbgemm_prepack(w, torch.ones(N)))
    except RuntimeError:
        return None
    return bool(torch.equal(y, exact))


@functools.lru_cache(maxsize=None)
def int8_sums(gemm: str) -> str:
    """How `gemm` ('onednn' or 'fbgemm') sums u8 x s8 products on this CPU, probed once on extreme codes:
    'exact' (VNNI / AMX: int32 throughout); 'pairs' (no VNNI, e.g. AVX2-only AMD EPYC before Zen 4: adjacent
    products are added in pairs in 16 bits with saturation (vpmaddubsw), so a sum is exact only while every
    pair stays inside `PAIR_LIMITS`: `int8mm_form` keeps the codes there); '' (absent, or wrong even then)."""
    K, N = 256, 16
    w = torch.full((N, K), 127, dtype=torch.int8)
    w[1::2] = -128  # (N, K): rows of +127 and -128, the int8 extremes
    if _gemm_sums(gemm, torch.full((4, K), 255, dtype=torch.uint8), 128, w):  # pairs 2 x 255 x 127 overflow int16
        return "exact"
    if _gemm_sums(gemm, torch.full((4, K), 128, dtype=torch.uint8), 0, w):  # pairs 2 x 128 x 127, 2 x 128 x -128 fit
        return "pairs"
    return ""


def gemv_rows() -> int:
    """Rows up to which `linear_int8mm` takes fbgemm's GEMM (where it has an exact form): `GEMV_M`, or `GEMV_M_PAIRS`
    where oneDNN's sums go in pairs."""
    return GEMV_M_PAIRS if int8_sums("onednn") == "pairs" else GEMV_M


def int8mm_form(weights: QuantArgs, inputs: QuantArgs, gemm: str) -> tuple[int, bool] | None:
    """How activation codes q in [inputs.qmin, inputs.qmax] go into `gemm` against weight codes in [weights.qmin,
    weights.qmax] so that the integer sum is exact on this CPU (`int8_sums`): (zero point, split), the bytes being
    q + zero point; `split`: q⁺ = max(q, 0) and q⁻ = max(-q, 0) as two blocks of rows, zero point 0, and the sum is
    the first block's minus the second's. None: no exact form. Where sums are 'exact', q + 128. Where they are
    'pairs', the smallest shift that makes the codes unsigned (q - qmin: 4-bit codes as 0..15) when every pair of
    products then fits int16, else the split (8-bit activations against 8-bit weights: q + 128 reaches 255, and
    2 x 255 x 127 does not fit; q⁺ and q⁻ reach 128, and 2 x 128 x 127 does)."""
    sums = int8_sums(gemm)
    if sums == "exact":
        return 128, False
    if sums != "pairs":
        return None

    def fits(top: int) -> bool:  # codes u in [0, top]: every pair u1 w1 + u2 w2 inside int16
        return PAIR_LIMITS[0] <= 2 * top * weights.qmin and 2 * top * weights.qmax <= PAIR_LIMITS[1]

    if fits(inputs.qmax - inputs.qmin):
        return -inputs.qmin, False
    if fits(max(inputs.qmax, -inputs.qmin)):
        return 0, True
    return None


def _fbgemm_prepack(w: torch.Tensor, col_scale: torch.Tensor):
    """fbgemm's packed form of int8 codes w (N, K) with per-channel scales (a torch ScriptObject)."""
    N = w.shape[0]
    prev = torch.backends.quantized.engine
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; this one only carries w
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(w, col_scale.double(), torch.zeros(N, dtype=torch.int64), 0)
        try:
            torch.backends.quantized.engine = "fbgemm"
            return torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = prev


@dataclass(eq=False)
class Int8MM:
    """Weight codes for the exact int8 GEMMs, each copy prepacked on its first use: oneDNN's
    (`onednn.qlinear_prepack`) above `gemv_rows()` rows, fbgemm's (`quantized.linear_prepack`) up to it, where
    fbgemm has an exact form. `forms`: each GEMM's `int8mm_form` for these codes (None: that GEMM stays unused)."""

    codes: Callable[[], torch.Tensor]  # -> (N, K) int8 codes, read from the packed words when a copy is made
    col_scale: torch.Tensor  # fp32 (N,)
    zero: torch.Tensor  # int64 (N,) zeros: symmetric weights
    inputs: QuantArgs  # the activations' scheme: their codes are computed as the simulation does
    in_features: int  # K
    forms: dict[str, tuple[int, bool] | None]  # "onednn" / "fbgemm" -> (zero point, split) or None
    _onednn: torch.Tensor | None = field(default=None, repr=False)  # int8, oneDNN's blocked layout
    _fbgemm: Any = field(default=None, repr=False)  # fbgemm's packed codes (a ScriptObject)

    def onednn(self) -> torch.Tensor:
        if self._onednn is None:
            self._onednn = torch.ops.onednn.qlinear_prepack(self.codes(), None)
        return self._onednn

    def fbgemm(self):
        if self._fbgemm is None:  # a split form subtracts before scaling: unit scales in the copy then
            split = self.forms["fbgemm"][1]
            self._fbgemm = _fbgemm_prepack(self.codes(), torch.ones_like(self.col_scale) if split else self.col_scale)
        return self._fbgemm

    def nbytes(self) -> int:
        N = self.col_scale.numel()
        n = N * 4 + self.zero.numel() * 8
        if self._onednn is not None:
            n += self._onednn.numel()
        if self._fbgemm is not None:  # the N x K codes and fbgemm's int32 column sums
            n += N * self.in_features + 4 * N
        return n


def prepare_int8mm(packed: torch.Tensor | Callable[[], torch.Tensor], scale: torch.Tensor, args: QuantArgs, in_features: int,
                   inputs: QuantArgs) -> Int8MM:
    """`packed`: the int32 words (N, words), or a function returning them (a sibling group's stacked words, so
    that they exist only while a copy is made). No GEMM's copy is made here: each on its first use."""
    words = packed if callable(packed) else (lambda: packed)
    N = scale.shape[0] if scale.shape[0] != 1 else words().shape[0]
    K = int(in_features)
    col = scale.float().cpu().reshape(-1).expand(N).contiguous()
    forms = {g: int8mm_form(args, inputs, g) for g in ("onednn", "fbgemm")}
    # contiguous: where K is not a multiple of the words' fields, `unpack` returns a column slice, and
    # oneDNN's prepack reads its argument as dense rows (every output wrong for K % 4 != 0 at 8 bits, until 2026-12-08)
    return Int8MM(lambda: unpack(words().cpu(), args.bits, K).contiguous(), col, torch.zeros(N, dtype=torch.int64), inputs, K, forms)


def token_codes(x2: torch.Tensor, args: QuantArgs, zero: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (codes + `zero` as uint8 (M, K), or with `zero=None` the codes themselves in float32
    (fbgemm's GEMM takes those), scales fp32 (M, 1)) of dynamic symmetric per-token
    integer activations: bit-identical to `compute_qparams` + `quantize` (tests/test_kernels.py), in 8 torch
    ops where the generic pair takes ~30, which a decode step pays once per linear. oneDNN's fast kernels
    take unsigned activations (signed int8 takes a reference loop, ~1000x slower here), so the codes go in
    shifted (by 128, or as `int8mm_form` says) and the zero point takes it back."""
    xf = x2.float()  # (M, K)
    # range_to_qparams' symmetric range max(-min(x, 0), max(x, 0)) * clip is absmax * clip exactly
    # (negation is exact and rounding a product by clip >= 0 is monotone)
    s = xf.abs().amax(1, keepdim=True)  # (M, 1)
    if args.clip_ratio != 1.0:
        s = s * args.clip_ratio
    s = s / torch.full((), args.sym_divisor)
    s = torch.where(s > 0, s, 1.0)  # an all-zero row: scale 1, as there
    q = (xf / s).round_().clamp_(args.qmin, args.qmax)  # (M, K) integers in [qmin, qmax], exact in fp32
    return (q, s) if zero is None else (q.add_(zero).to(torch.uint8), s)


def static_codes(x2: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor, zero: int | None = 128
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_codes` for static symmetric per-tensor inputs: codes round(x / s) clamped under the calibrated
    scale s (1, 1), bit-identical to `quantize` with it; the scale is returned as it is. The GEMM on them
    is the simulation's `int_linear` bit for bit, as for per-token codes."""
    s = input_scale.float().reshape(1, 1)
    q = (x2.float() / s).round_().clamp_(args.qmin, args.qmax)  # (M, K) integers in [qmin, qmax], exact in fp32
    return (q, s) if zero is None else (q.add_(zero).to(torch.uint8), s)


_LAST = threading.local()  # .codes: (x, x._version, args, zero, u, s) of the last decode-sized call


def shared_token_codes(x: torch.Tensor, args: QuantArgs, zero: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_codes` of x (..., K), taken from the previous call when that one quantized this very tensor
    (the same object, unmodified since: its `_version`) under an equal scheme. A decoder's q/k/v
    projections read one normed hidden state and gate/up another, so a decode step computes 4 sets of
    codes a layer instead of 7. Only up to `SMALL_M` rows (the memo holds the input until the next call)
    and not for inference-mode tensors (they keep no version counter)."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] > SMALL_M or x.is_inference():
        return token_codes(x2, args, zero)
    last = getattr(_LAST, "codes", None)
    if (last is not None and last[0] is x and last[1] == x._version and (last[2] is args or last[2] == args)
            and last[3] == zero):
        return last[4], last[5]
    u, s = token_codes(x2, args, zero)
    _LAST.codes = (x, x._version, args, zero, u, s)
    return u, s


def linear_int8mm(x: torch.Tensor, prep: Int8MM, bias: torch.Tensor | None, out_dtype: torch.dtype,
                  input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K) float activations -> (M, N): the simulation's per-token codes (or with `input_scale` (1, 1),
    static inputs' codes round(x / s) clamped), the exact integer GEMM (fbgemm's up to `gemv_rows()` rows where
    it has an exact form, oneDNN's otherwise) in its `int8mm_form`, then ``* s_w[n] * s_x[m]`` (+ bias) in fp32.
    A split form sums q⁺ and q⁻ rows apart under unit scales; their difference is the integer sum (exact:
    each half is an integer under 2^24 in fp32 while the simulation's own sums are), then the same epilogue."""
    if input_scale is not None:
        codes = lambda zero: static_codes(x.reshape(-1, x.shape[-1]), prep.inputs, input_scale, zero)  # noqa: E731
    else:
        codes = lambda zero: shared_token_codes(x, prep.inputs, zero)  # noqa: E731
    gemm = "fbgemm" if x.numel() <= gemv_rows() * x.shape[-1] and prep.forms["fbgemm"] is not None else "onednn"
    zero, split = prep.forms[gemm]
    if split:
        q, sx = codes(None)  # (M, K) fp32 q, (M|1, 1) fp32
        M = q.shape[0]
        q = torch.cat([q, q.neg()])  # (2M, K): q rows, then -q rows, negatives to clamp to 0 (q⁺, q⁻)
        if gemm == "fbgemm":  # it quantizes to uint8, clamping to [0, 255] itself
            y = _GEMV(q, 1.0, 0, prep.fbgemm())  # (2M, N) fp32 sums: unit scales in this copy
        else:
            y = _QLINEAR(q.clamp_(min=0).to(torch.uint8), 1.0, 0, prep.onednn(), torch.ones_like(prep.col_scale), prep.zero,
                         None, 1.0, 0, torch.float32, "none", [], "")
        y = torch.sub(y[:M], y[M:]).mul_(prep.col_scale)  # (M, N) fp32(sum_k q_k qw_k) * s_w[n]
    elif gemm == "fbgemm":
        q, sx = codes(None)  # (M, K) fp32 q, (M|1, 1) fp32
        y = _GEMV(q, 1.0, zero, prep.fbgemm())  # fp32(sum_k q_k qw_k) * s_w[n]: it quantizes q / 1 + zero exactly
    else:
        u, sx = codes(zero)  # (M, K) uint8 q + zero, (M|1, 1) fp32
        y = _QLINEAR(u, 1.0, zero, prep.onednn(), prep.col_scale, prep.zero, None, 1.0, 0, torch.float32, "none", [], "")
    y = y.mul_(sx)  # y is the GEMM's fresh output (or the split's difference)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@dataclass
class Int4Pack:
    """A 4-bit weight repacked for `_weight_int4pack_mm_for_cpu` (padded to N % 16, K % G)."""

    weight: torch.Tensor  # uint8 (Npad, Kpad / 2), torch's tiling
    scale_zero: torch.Tensor  # bf16 (Kpad / G, Npad, 2): (scale, -zero * scale) per op group and column
    group: int  # G
    in_features: int
    k_padded: int
    out_features: int
    col_scale: torch.Tensor | None  # fp32 (N,): per-channel scale applied after the op (unit-scale form)

    def nbytes(self) -> int:
        extra = self.col_scale.numel() * 4 if self.col_scale is not None else 0
        return self.weight.numel() * self.weight.element_size() + self.scale_zero.numel() * self.scale_zero.element_size() + extra


@dataclass
class Int8Pack:
    """An 8-bit per-channel symmetric weight as int8 (N, Kpad) for `_weight_int8pack_mm`."""

    weight: torch.Tensor  # int8 (N, Kpad)
    ones: torch.Tensor  # bf16 (N,): unit scales, the real ones are applied in fp32 after the op
    col_scale: torch.Tensor  # fp32 (N,)
    in_features: int
    k_padded: int

    def nbytes(self) -> int:
        return self.weight.numel() + self.ones.numel() * 2 + self.col_scale.numel() * 4


def prepare_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs,
                 in_features: int, dtype: torch.dtype = torch.bfloat16) -> Int4Pack:
    """Repack on-disk 4-bit words and qparams into the int4 op's form; `dtype` is the
    activation dtype the op will see (bfloat16 on the fast path; float32 lets tests check the
    conversion without bf16 rounding)."""
    K, N = int(in_features), packed.shape[0]
    if args.granularity == "group":
        G = next(g for g in INT4_GROUPS if args.group_size % g == 0)
        k_pad = _round_up(K, G)
    else:  # one group per row: any G, the qparams repeat; pick the largest that wastes no padding
        k_pad = _round_up(K, 32)
        G = next(g for g in INT4_GROUPS if k_pad % g == 0)
    n_pad = _round_up(N, 16)
    u = torch.full((n_pad, k_pad), 8, dtype=torch.int32)  # 8 = code 0 in the padding
    u[:N, :K] = unsigned_codes(packed.cpu(), 4, K)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    ng = k_pad // G
    s = scale.float().cpu().expand(N, -1)  # (N, n_groups) ((1, 1) for tensor granularity)
    z = (zero.float().cpu() if zero is not None else torch.zeros_like(scale, dtype=torch.float32)).expand(N, -1)
    if args.granularity == "group":
        idx = torch.arange(ng) * G // args.group_size  # our group of each of the op's groups
        s_g, zt_g = s[:, idx], -z[:, idx] * s[:, idx]  # (N, ng)
        col = None
    else:  # unit scale in the op, exact integer zero; the fp32 scale afterwards
        s_g, zt_g = torch.ones(N, ng), (-z[:, :1]).expand(N, ng)
        col = s[:, 0].contiguous()
    sz = torch.zeros(ng, n_pad, 2, dtype=torch.float32)
    sz[:, :N, 0] = s_g.t()
    sz[:, :N, 1] = zt_g.t()
    sz[:, N:, 0] = 1.0
    return Int4Pack(w, sz.to(dtype).contiguous(), G, K, k_pad, N, col)


def prepare_int8(packed: torch.Tensor, scale: torch.Tensor, args: QuantArgs, in_features: int) -> Int8Pack:
    from .formats import unpack

    K, N = int(in_features), packed.shape[0]
    k_pad = _round_up(max(K, 1), 16)
    w = torch.zeros(N, k_pad, dtype=torch.int8)
    w[:, :K] = unpack(packed.cpu(), 8, K)
    col = scale.float().cpu().reshape(-1).expand(N).contiguous()
    return Int8Pack(w, torch.ones(N, dtype=torch.bfloat16), col, K, k_pad)


def _pad_k(x2: torch.Tensor, k_pad: int) -> torch.Tensor:
    return x2 if x2.shape[1] == k_pad else F.pad(x2, (0, k_pad - x2.shape[1]))


def linear_small_m(x2: torch.Tensor, prep: Int4Pack | Int8Pack, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) float activations -> (M, N) through the bf16 op.

    Decode calls this ~200 times a token, so it issues as few torch ops as it can: cast in,
    the op, cast out (plus the fp32 per-channel scale and bias where the layer has them)."""
    xb = x2.to(torch.bfloat16)
    if xb.shape[1] != prep.k_padded:
        xb = F.pad(xb, (0, prep.k_padded - xb.shape[1]))
    if isinstance(prep, Int4Pack):
        y = _INT4_MM(xb, prep.weight, prep.group, prep.scale_zero)
        if y.shape[1] != prep.out_features:
            y = y[:, : prep.out_features]
    else:
        y = torch._weight_int8pack_mm(xb, prep.weight, prep.ones)
    if prep.col_scale is None and bias is None:
        return y.to(out_dtype)
    y = y.float()
    if prep.col_scale is not None:
        y = y * prep.col_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _fields_float(packed: torch.Tensor, bits: int, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The unsigned fields (q + 2^(b-1)) of int32 words (N, words) as a contiguous float32 (N, K), in `out` (N*K
    elements) when given: 2 and 4 bits through `formats.unsigned_codes_float` (one byte-table gather at 2 bits; at 4,
    fields spread to bytes and converted into the buffer), other widths through `formats.unsigned_codes` and a copy."""
    if bits in (2, 4) and packed.device.type == "cpu":
        w = unsigned_codes_float(packed, bits, K, out=out)  # a view of a fresh buffer when K is ragged and no out
        return w if w.is_contiguous() else w.contiguous()
    u = unsigned_codes(packed, bits, K, torch.uint8 if 32 % bits == 0 else torch.int32)  # (N, K)
    w = torch.empty(u.shape, dtype=torch.float32, device=packed.device) if out is None else out.view(u.shape)
    return w.copy_(u)


def dequantize_fast(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs,
                    in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype`, bit-identical to `dequantize(unpack(...))`.

    Byte-wide unpacking (2 and 4 bits: `formats.unsigned_codes_float`, 1536 x 576 int4 g64 in 459 us against 545
    through the byte table it used until 2026-12-08, medians, 1 thread, AVX2 EPYC; else `formats.unsigned_codes` and a copy), and the
    qparams applied in place and broadcast per group: ``(u - (z + 2^(b-1))) * s``, where
    ``u - (z + 2^(b-1))`` is the same exact small integer as the reference's ``q - z``.
    """
    K, bits = int(in_features), args.bits
    if args.type == "float":  # codes are bit patterns: the reference's grid lookup
        return dequantize(unpack(packed, bits, K), scale, torch.zeros_like(scale), args, dtype)
    N = packed.shape[0]
    w = _fields_float(packed, bits, K)  # (N, K)
    s = scale.float()
    zo = (zero.float() if zero is not None else torch.zeros_like(s)) + float(1 << (bits - 1))
    if args.granularity == "group":
        g = args.group_size
        full = K // g  # whole groups; a partial last group is done on its own
        if full:
            wg = w[:, : full * g].view(N, full, g)
            wg.sub_(zo[:, :full, None]).mul_(s[:, :full, None])
        if full * g < K:
            w[:, full * g:].sub_(zo[:, full:full + 1]).mul_(s[:, full:full + 1])
    else:
        w.sub_(zo).mul_(s)  # (N|1, 1) broadcast
    return w if dtype == torch.float32 else w.to(dtype)


CHUNK_BYTES = 1 << 21  # fp32 bytes of weight dequantized at a time on the dequant path, for large layers
WHOLE_BYTES = 1 << 23  # layers up to this many fp32 bytes are dequantized whole


def linear_dequant(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   args: QuantArgs, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, dequantize(W), bias) with W dequantized on the fly and dropped afterwards.

    Layers up to WHOLE_BYTES of fp32 weight: one `dequantize_fast` and the very F.linear the simulation
    runs (bit-identical to it). Larger ones: blocks of ~CHUNK_BYTES of output channels, so the dequantized
    block stays in cache and no layer-sized buffer is faulted in per call; equal to the simulation within
    fp32 summation order. ms a call, 1 thread, EPYC (bench load), int4 g64 (`/tmp` script, session 27):

    | M x K x N | bare fp32 matmul | blocks of 2 MiB | whole |
    |---|---:|---:|---:|
    | 256 x 576 x 1536 | 4.51 | 5.67 | 5.22 |
    | 256 x 1536 x 576 | 4.78 | 6.52 | 5.13 |
    | 256 x 576 x 3072 | 9.70 | 11.12 | 10.17 |
    | 128 x 4096 x 4096 | 50.1 | 56.7 | 115.9 |
    | 128 x 4096 x 11008 | 143.7 | 156.0 | 304.2 |
    """
    K, N = int(in_features), packed.shape[0]
    if N * K * 4 <= WHOLE_BYTES:
        return F.linear(x, dequantize_fast(packed, scale, zero, args, K, x.dtype), bias)
    rows = max(64, CHUNK_BYTES // (4 * max(K, 1)))
    x2 = x.reshape(-1, K)
    y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    per_row = scale.shape[0] != 1
    for n0 in range(0, N, rows):
        sl = slice(n0, min(N, n0 + rows))
        s = scale[sl] if per_row else scale
        z = zero[sl] if zero is not None and per_row else zero
        w = dequantize_fast(packed[sl], s, z, args, K, x.dtype)
        y[:, sl] = F.linear(x2, w, None if bias is None else bias[sl])
    return y.view(*x.shape[:-1], N)


def linear_int_dequant(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, weights: QuantArgs, inputs: QuantArgs,
                       in_features: int, bias: torch.Tensor | None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The simulation of an `int_factored` scheme, `int_linear`, on the packed words, off the int8 GEMMs.

    Layers up to WHOLE_BYTES of fp32 codes (and float64 inputs, and static inputs' sink rows): the weight's
    codes unpacked whole and `int_linear` itself. Larger ones: x's codes once (`int_codes`), the fp32 GEMM of the
    codes in blocks of ~CHUNK_BYTES of output channels, each block's codes unpacked into one reused buffer, then
    `int_epilogue`. Bit-identical to `int_linear`: every sum of codes is an exact integer in fp32 (under 2^24),
    so the blocks' order of summation cannot change it. A 7B-shaped layer (1 x 4096 x 11008, 8-bit) unpacked
    whole took 405 ms for `unpack` alone (1 thread, AVX2 EPYC, 2026-12-07); that made an AVX2 CPU's W8A8
    decode 0.02x of fp32 before it had an int8 GEMM form (`int8mm_form`). In blocks: 16 ms (8-bit), 31 ms (4-bit,
    whose byte-table unpack is the larger part), against ~8 ms for the bare fp32 GEMM; the 7B-shaped stack's
    decode on this path (`LMPRESS_INT8_GEMM=0 python -P bench/stack7b.py --threads 1`) 0.02x -> 0.47x of fp32
    for W8A8, 0.21x -> 0.24x for W4A4."""
    K, N, bits = int(in_features), packed.shape[0], weights.bits
    if (N * K * 4 <= WHOLE_BYTES or x.dtype == torch.float64
            or (input_scale is not None and sink_rows(x, inputs))):
        return int_linear(x, unpack(packed, bits, K), scale, inputs, bias, input_scale)
    q, s = int_codes(x.reshape(-1, K).float(), inputs, input_scale)  # (M, K), (M|1, 1)
    sums = torch.empty(q.shape[0], N, dtype=torch.float32, device=x.device)  # (M, N)
    rows = max(64, CHUNK_BYTES // (4 * max(K, 1)))
    w = torch.empty(min(rows, N), K, dtype=torch.float32, device=x.device)  # one block's codes, reused
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        wb = _fields_float(packed[n0:n1], bits, K, out=w[: n1 - n0])  # (n, K)
        sums[:, n0:n1] = F.linear(q, wb.sub_(1 << (bits - 1)))  # signed codes: q_w = u - 2^(b-1)
    return int_epilogue(sums, scale, s, bias, x)


def reference_weight(packed, scale, zero, args, in_features, dtype):
    """The oracle the fast dequantization must equal."""
    from .formats import unpack

    z = zero if zero is not None else torch.zeros_like(scale)
    return dequantize(unpack(packed, args.bits, in_features), scale, z, args, dtype=dtype)
