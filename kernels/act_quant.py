"""Per-token dynamic symmetric activation quantization (int8 or int4 codes, optional clip).

Reproduces `lmpress.quant.primitives.fake_quantize(x, QuantArgs(bits, granularity="token",
dynamic=True, clip_ratio=c))` exactly, code for code:

    a     = max_k |x[m, k]|                       (fp32; = max(-min, max) with both clamped at 0)
    scale = (a * c) / d,  scale = 1 where it is 0   (d = qmax, or qmax + 1/2 with `full_range`)
    q     = clamp(round_half_even(x / scale), qmin, qmax)

- `act_quant_ref`: torch, through `compute_qparams` / `quantize` themselves.
- `_act_quant_kernel`: Triton, BLOCK_M rows per program, two passes over K (absmax, then codes).
  Division is the correctly rounded `tl.math.div_rn` (a plain `/` on fp32 compiles to an
  approximate divide on NVIDIA GPUs), and round-half-to-even is the fp32 add/subtract of
  1.5 * 2^23 (exact IEEE round-to-nearest-even for |v| < 2^22; v is clamped to qmin-2..qmax+2
  first, which does not change the clamped result). Both run identically in the interpreter,
  which has no libdevice `rint`.
- `act_quant`: checks, allocates, launches.

Outputs: int8 codes (..., K) and/or, for 4 bits, the codes packed like weights (8 per int32
along K, stored as q + 8, element i at bit 4*(i % 8) of word i // 8; `formats.pack` is the
reference), plus fp32 scales (rows,) with rows = prod(x.shape[:-1]).
"""
from __future__ import annotations

import torch

from lmpress.quant.primitives import compute_qparams, dequantize, quantize
from lmpress.quant.scheme import QuantArgs

from .dispatch import check_same_device, clamp_pow2, launchable
from .formats import pack, packed_cols

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

ACT_BITS = (2, 3, 4, 5, 6, 8)  # codes in int8 (4 bits may also come packed)


ROWS_X_K_CUDA = 2048  # elements of one program's tile on CUDA (64 x 64 spills on sm_90: `lmpress.kernels.aot`)


def token_args(bits: int, clip_ratio: float = 1.0, full_range: bool = False) -> QuantArgs:
    return QuantArgs(bits=bits, granularity="token", dynamic=True, symmetric=True, clip_ratio=clip_ratio,
                     full_range=full_range)


def act_quant_ref(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, packed: bool = False, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (..., K) — or, with `packed`, int32 words (rows, ceil(K/8)) — , scales fp32 (rows,))."""
    check_bits(bits, packed)
    args = token_args(bits, clip_ratio, full_range)
    scale, zero = compute_qparams(x, args)  # (rows, 1) each
    q = quantize(x, scale, zero, args)  # (..., K) int8
    if packed:
        q = pack(q.reshape(-1, x.shape[-1]), 4)
    return q, scale.reshape(-1)


def act_dequant(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes (..., K) and scales (rows,) -> codes * scale in `dtype`: fake_quantize's output."""
    args = token_args(bits)
    s = scales.reshape(-1, 1)
    return dequantize(codes, s, torch.zeros_like(s), args, dtype=dtype)


def check_bits(bits: int, packed: bool) -> None:
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits={bits}: use one of {list(ACT_BITS)}")
    if packed and bits != 4:
        raise ValueError("packed=True packs 4-bit codes 8 per int32; 8-bit codes are returned as int8 already")


if triton is not None:

    @triton.jit
    def _act_quant_kernel(
        x_ptr, q_ptr, p_ptr, s_ptr,
        M, K, stride_xm, stride_xk, stride_qm, stride_pm,
        clip, qdiv,
        QMAX: tl.constexpr,
        WRITE_CODES: tl.constexpr,
        WRITE_PACKED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        r_mask = rows < M
        offs = tl.arange(0, BLOCK_K)

        amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            mask = r_mask[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        a = tl.max(amax, axis=1)  # (BM,)
        scale = tl.math.div_rn(a * clip, qdiv)
        scale = tl.where(scale > 0.0, scale, 1.0)
        tl.store(s_ptr + rows, scale, mask=r_mask)

        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            mask = r_mask[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(x, scale[:, None])
            v = tl.minimum(tl.maximum(v, -QMAX - 3.0), QMAX + 2.0)
            r = (v + 12582912.0) - 12582912.0  # round half to even (1.5 * 2^23)
            q = tl.minimum(tl.maximum(r, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
            if WRITE_CODES:
                tl.store(q_ptr + rows[:, None] * stride_qm + k[None, :], q.to(tl.int8), mask=mask)
            if WRITE_PACKED:  # 4-bit: fields q + 8, element k at bit 4 * (k % 8) of word k // 8
                u = tl.where(mask, q + 8, 0)
                shifted = u << ((k % 8) * 4)[None, :]
                words = tl.sum(tl.reshape(shifted, (BLOCK_M, BLOCK_K // 8, 8)), axis=2)  # disjoint fields: sum == or
                w_offs = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                tl.store(p_ptr + rows[:, None] * stride_pm + w_offs[None, :], words,
                         mask=r_mask[:, None] & (w_offs * 8 < K)[None, :])


def act_quant(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, *, codes: bool = True, packed: bool = False,
    block_k: int | None = None, full_range: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Triton: (int8 codes (..., K) or None, packed int32 words (rows, ceil(K/8)) or None, scales fp32 (rows,))."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use act_quant_ref")
    check_bits(bits, packed)
    if not codes and not packed:
        raise ValueError("ask for codes, packed words, or both")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio={clip_ratio} must lie in (0, 1]")
    device = check_same_device(x=x)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    q = torch.empty(M, K, dtype=torch.int8, device=device) if codes else None
    p = torch.empty(M, packed_cols(K, 4), dtype=torch.int32, device=device) if packed else None
    s = torch.empty(M, dtype=torch.float32, device=device)
    if M and K:
        cuda = device.type == "cuda"
        bk = block_k or clamp_pow2(K, 16, 1024 if cuda else 4096)
        if bk < 16 or bk & (bk - 1):
            raise ValueError(f"block_k={bk} must be a power of two >= 16")
        bm = clamp_pow2(M, 1, max(1, (ROWS_X_K_CUDA if cuda else 16384) // bk))  # rows per program
        dummy = s
        launchable(_act_quant_kernel, device)[(triton.cdiv(M, bm),)](
            x2, q if codes else dummy, p if packed else dummy, s,
            M, K, x2.stride(0), x2.stride(1), K if codes else 0, p.stride(0) if packed else 0,
            float(torch.tensor(clip_ratio, dtype=torch.float32)), token_args(bits, full_range=full_range).sym_divisor,
            QMAX=(1 << (bits - 1)) - 1, WRITE_CODES=codes, WRITE_PACKED=packed, BLOCK_M=bm, BLOCK_K=bk,
        )
    elif M:
        s.fill_(1.0)
    return (q.reshape(x.shape) if codes else None), p, s


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): for each
    activation dtype, the row widths the wrapper picks (BLOCK_K 64 / 256 / 1024 with BLOCK_M =
    ROWS_X_K_CUDA // BLOCK_K), 4-bit codes and packed words, and 8-bit codes."""
    from .aot import ACT_DTYPES, Variant

    for dt, act in ACT_DTYPES.items():
        for bk in (64, 256, 1024):
            for bits in ((4, 8) if bk != 256 else ACT_BITS):  # the other widths change QMAX only: one tile
                types = dict(x_ptr=act, q_ptr="*i8", p_ptr="*i32", s_ptr="*fp32", clip="fp32", qdiv="fp32")
                const = dict(QMAX=(1 << (bits - 1)) - 1, WRITE_CODES=True, WRITE_PACKED=bits == 4, BLOCK_M=ROWS_X_K_CUDA // bk,
                             BLOCK_K=bk)
                yield Variant(_act_quant_kernel, types, const, label=f"{dt} BLOCK_K {bk} {bits}-bit")
