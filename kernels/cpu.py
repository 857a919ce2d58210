"""CPU fast path for packed linears: torch's own weight-only int4 / int8 GEMMs on repacked weights.

What torch 2.13 provides, and what it asks for (checked numerically in tests/test_kernels.py):

- ``aten._convert_weight_to_int4pack_for_cpu(u, innerKTiles)``: u int32 (N, K) holding the
  unsigned fields 0..15 (exactly our stored ``q + 8``), N % 16 == 0; returns its own uint8
  (N, K/2) tiling. ``aten._weight_int4pack_mm_for_cpu(x, w, G, sz)`` then computes
  ``x @ W^T`` with ``W[n, k] = (u - 8) * sz[k // G, n, 0] + sz[k // G, n, 1]``, G in
  {32, 64, 128, 256}, K % G == 0, ``sz`` (K/G, N, 2) in x's dtype. Our ``(q - z) * s`` maps to
  scale ``s`` and zero ``-z * s`` (exact for symmetric weights, z = 0).
- ``torch._weight_int8pack_mm(x, w, scales)``: x @ (w * scales[:, None])^T, w int8 (N, K);
  it crashes (segfault) unless K % 8 == 0, so K is padded to a multiple of 16 here.

Both are vectorized (AVX2 / AVX512) for bfloat16 activations only; their float32 and float16
variants are scalar loops, 15-50x slower than an fp32 matmul on this machine. So the fast path
runs the op in bfloat16 for float32 and bfloat16 models (float16 activations use the
reference):

- per-channel / per-tensor weights: the op gets unit scales (and the exact integer zero point
  ``-z``), so it returns ``bf16(sum_k x_k (q - z))``; the fp32 scale is applied afterwards.
- group-wise weights: scale and ``-z * s`` rounded to bfloat16 (relative 2^-9).
- quantized activations (W4A8, W4A4, W8A8): the per-token codes (from the torch reference
  `act_quant_ref`, so identical to the simulation's) go in as bfloat16 (exact: |q| <= 128)
  and the token scale is applied in fp32 afterwards. The only rounding then is the op's
  bfloat16 output (relative 2^-9), plus the input's rounding to bf16 for weight-only schemes.

This is bfloat16 arithmetic: close to the simulation, not bit-identical (SmolLM2-135M W4A16
g64: one-token logits ~2e-2 relative after 30 layers; perplexity +0.13% on 16 x 512 wiki
windows with the op forced on every row; tiny layers in tests ~1e-3). Above `SMALL_M` rows
(prefill, perplexity) the op loses to an fp32 matmul, and there the path dequantizes the
weight on the fly (`dequantize_fast`, bit-identical to `dequantize`) and runs F.linear, which
is exact with respect to the simulation. Nothing dequantized is kept between calls: the
module holds its packed buffers plus the repacked copy (int4: N*K/2 bytes; int8: N*K).

Not served (the caller falls back to the reference): 2- and 3-bit weights, group sizes that
are not multiples of 32 (the op's groups must nest in ours), asymmetric or group-wise 8-bit
weights, float16 activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmpress.quant.primitives import dequantize, expand_qparam
from lmpress.quant.scheme import QuantArgs

from .formats import unsigned_codes

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
SMALL_M = 16  # rows up to which the bf16 weight-only ops beat dequantize + fp32 matmul (measured: 1536x576, 576x1536)
MIN_FAST_WEIGHTS = 1 << 16  # `auto` uses the fast path only for layers at least this big
FAST_DTYPES = (torch.float32, torch.bfloat16)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan(weights: QuantArgs, x_dtype: torch.dtype) -> tuple[str | None, str]:
    """(kind, why): kind ``int4pack`` / ``int8pack``, or None with the reason it does not fit."""
    if x_dtype not in FAST_DTYPES:
        return None, f"{x_dtype} activations: torch's CPU int4/int8 kernels are vectorized for bfloat16 only"
    if weights.bits == 4:
        if weights.granularity == "group" and not any(weights.group_size % g == 0 for g in INT4_GROUPS):
            return None, f"group size {weights.group_size} is not a multiple of 32 (the int4 op's groups are 32/64/128/256)"
        return "int4pack", ""
    if weights.bits == 8:
        if weights.granularity == "group":
            return None, "group-wise 8-bit weights: the int8 op takes one scale per output channel"
        if not weights.symmetric:
            return None, "asymmetric 8-bit weights: the int8 op has no zero point"
        return "int8pack", ""
    return None, f"{weights.bits}-bit weights: no torch CPU kernel (only 4 and 8 bits)"


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


def linear_small_m(x2: torch.Tensor, prep: Int4Pack | Int8Pack, row_scale: torch.Tensor | None,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) float activations (or integer codes, with their fp32 `row_scale` (M,)) -> (M, N).

    Decode calls this ~200 times a token, so it issues as few torch ops as it can: cast in,
    the op, cast out (plus the fp32 scale / bias multiplies where the scheme has them)."""
    xb = x2.to(torch.bfloat16)
    if xb.shape[1] != prep.k_padded:
        xb = F.pad(xb, (0, prep.k_padded - xb.shape[1]))
    if isinstance(prep, Int4Pack):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, prep.weight, prep.group, prep.scale_zero)
        if y.shape[1] != prep.out_features:
            y = y[:, : prep.out_features]
    else:
        y = torch._weight_int8pack_mm(xb, prep.weight, prep.ones)
    if prep.col_scale is None and row_scale is None and bias is None:
        return y.to(out_dtype)
    y = y.float()
    if prep.col_scale is not None:
        y = y * prep.col_scale
    if row_scale is not None:
        y = y * row_scale.reshape(-1, 1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def dequantize_fast(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs,
                    in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype`, bit-identical to `dequantize(unpack(...))`.

    Byte-wide unpacking (`formats.unsigned_codes`, uint8 temporaries), one fp32 buffer, and the
    qparams applied in place and broadcast per group: ``(u - (z + 2^(b-1))) * s``, where
    ``u - (z + 2^(b-1))`` is the same exact small integer as the reference's ``q - z``.
    """
    K, bits = int(in_features), args.bits
    N = packed.shape[0]
    u = unsigned_codes(packed, bits, K, torch.uint8 if 32 % bits == 0 else torch.int32)  # (N, K)
    w = torch.empty(N, K, dtype=torch.float32, device=packed.device)
    w.copy_(u)
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


def reference_weight(packed, scale, zero, args, in_features, dtype):
    """The oracle the fast dequantization must equal."""
    from .formats import unpack

    z = zero if zero is not None else torch.zeros_like(scale)
    return dequantize(unpack(packed, args.bits, in_features), scale, z, args, dtype=dtype)
