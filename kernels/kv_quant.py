"""KV-cache quantize-and-pack / unpack-and-dequantize: torch references, Triton kernels, wrappers.

A row is one quantization group of G values (a key channel over G tokens, or G head_dim
channels of one value token; see `lmpress.quant.kv_cache`). Asymmetric min-max:

    scale = fp16(max((hi - lo) / (2^b - 1), 1e-5)),  min = fp16(lo),  u = clamp(round((x - min) / scale), 0, 2^b - 1)

with [lo, hi] the row's range (shrunk about its midpoint by a clip ratio; with clip search the
ratio of `KV_CLIP_GRID` with the least squared error, per row), round half to even, arithmetic
in float32 with the fp16-rounded scale and min. Codes are packed by `lmpress.kernels.formats`'
bitstream rule (element i at bits [i*b, (i+1)*b) of its row's int32 words). Dequantization:
x̂ = u * scale + min in float32, cast to the requested dtype.

- `kv_quant_ref` / `kv_dequant_ref`: torch; the oracle, and the CPU path.
- `_kv_quant_kernel` / `_kv_dequant_kernel`, wrappers `kv_quant` / `kv_dequant`: Triton (G a
  power of two with G*b a multiple of 32).
- `kv_pack` / `kv_unpack`: what the runtime cache calls: Triton on CUDA (or on CPU with
  LMPRESS_KERNELS=triton under TRITON_INTERPRET=1), the reference otherwise.
"""
from __future__ import annotations

import torch

from lmpress.quant.kv_cache import MIN_SCALE, minmax_dequantize, minmax_quantize
from lmpress.quant.scheme import KV_BITS, KV_CLIP_GRID

from .dispatch import check_same_device, clamp_pow2, launchable, requested_backend, triton_available
from .formats import pack_unsigned, packed_cols, unsigned_codes_float

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None


def _check(bits: int, x: torch.Tensor | None = None) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"KV quantization: bits={bits!r}; use one of {list(KV_BITS)}")
    if x is not None and (x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
        raise ValueError(f"expected float rows (rows, G), got {x.dtype} {tuple(x.shape)}")


def _ratios(clip_ratio: float, clip_search: bool) -> tuple[float, ...]:
    return tuple(KV_CLIP_GRID) if clip_search else (float(clip_ratio),)


# ---- references ---------------------------------------------------------------------------
def kv_quant_ref(x: torch.Tensor, bits: int, clip_ratio: float = 1.0, clip_search: bool = False):
    """x (rows, G) float -> (words int32 (rows, ceil(G*b/32)), scale fp16 (rows,), min fp16 (rows,))."""
    _check(bits, x)
    u, scale, mn = minmax_quantize(x, bits, clip_ratio, clip_search)
    return pack_unsigned(u, bits), scale, mn


def kv_dequant_ref(words: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(words (rows, W), scale (rows,), min (rows,)) -> values (rows, G) in `dtype`."""
    _check(bits)
    return minmax_dequantize(unsigned_codes_float(words, bits, group), scale, mn, dtype)  # codes read by byte lookup


# ---- Triton -------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _kv_quant_kernel(
        x_ptr, w_ptr, s_ptr, m_ptr, r_ptr, R, stride_x,
        QMAX: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, PER: tl.constexpr,
        NCLIP: tl.constexpr, MINS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
        rmask = rows < R
        cols = tl.arange(0, G)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        lo = tl.min(x, axis=1)
        hi = tl.max(x, axis=1)
        best_e = tl.full((BLOCK_R,), float("inf"), tl.float32)
        best_s = tl.zeros((BLOCK_R,), tl.float32)
        best_m = tl.zeros((BLOCK_R,), tl.float32)
        for i in tl.static_range(NCLIP):
            r = tl.load(r_ptr + i)
            mid = (lo + hi) * 0.5
            half = (hi - lo) * (0.5 * r)
            lo_i = tl.where(r == 1.0, lo, mid - half)
            hi_i = tl.where(r == 1.0, hi, mid + half)
            scale = tl.maximum(tl.math.div_rn(hi_i - lo_i, QMAX * 1.0), MINS)
            scale = scale.to(tl.float16).to(tl.float32)
            mn = lo_i.to(tl.float16).to(tl.float32)
            if NCLIP == 1:
                best_s = scale
                best_m = mn
            else:
                v = tl.math.div_rn(x - mn[:, None], scale[:, None])
                v = tl.minimum(tl.maximum(v, -2.0), QMAX + 2.0)
                u = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, 0.0), QMAX * 1.0)
                d = u * scale[:, None] + mn[:, None] - x
                e = tl.sum(d * d, axis=1)
                take = e < best_e
                best_e = tl.where(take, e, best_e)
                best_s = tl.where(take, scale, best_s)
                best_m = tl.where(take, mn, best_m)
        v = tl.math.div_rn(x - best_m[:, None], best_s[:, None])
        v = tl.minimum(tl.maximum(v, -2.0), QMAX + 2.0)
        u = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, 0.0), QMAX * 1.0).to(tl.int32)  # round half to even
        shifts = tl.arange(0, PER) * BITS
        words = tl.sum(tl.reshape(u, (BLOCK_R, W, PER)) << shifts[None, None, :], axis=2)  # disjoint fields: sum == or
        tl.store(w_ptr + rows[:, None] * W + tl.arange(0, W)[None, :], words, mask=rmask[:, None])
        tl.store(s_ptr + rows, best_s.to(tl.float16), mask=rmask)
        tl.store(m_ptr + rows, best_m.to(tl.float16), mask=rmask)

    @triton.jit
    def _kv_dequant_kernel(
        w_ptr, s_ptr, m_ptr, o_ptr, R,
        MASK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, PER: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        words = tl.load(w_ptr + rows[:, None] * W + tl.arange(0, W)[None, :], mask=rmask[:, None], other=0)  # (BR, W)
        shifts = tl.arange(0, PER) * BITS
        u = (words[:, :, None] >> shifts[None, None, :]) & MASK  # arithmetic shift: the mask drops smeared sign bits
        u = tl.reshape(u, (BLOCK_R, G)).to(tl.float32)
        scale = tl.load(s_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
        mn = tl.load(m_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        out = u * scale[:, None] + mn[:, None]
        tl.store(o_ptr + rows[:, None] * G + tl.arange(0, G)[None, :], out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def triton_shape_ok(group: int, bits: int) -> bool:
    """Whether the Triton kernels take rows of `group` codes of `bits` bits (G a power of two, G*b % 32 == 0)."""
    return group >= 1 and group & (group - 1) == 0 and (group * bits) % 32 == 0


def _need_triton(group: int, bits: int) -> None:
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use kv_quant_ref / kv_dequant_ref")
    if not triton_shape_ok(group, bits):
        raise ValueError(f"the Triton KV kernels need G a power of two with G*bits a multiple of 32; got G={group}, bits={bits}: "
                         "use the reference (kv_quant_ref) or a group_size such as 64")


def kv_quant(x: torch.Tensor, bits: int, clip_ratio: float = 1.0, clip_search: bool = False):
    """Triton: same contract as `kv_quant_ref`."""
    _check(bits, x)
    R, G = x.shape
    _need_triton(G, bits)
    device = check_same_device(x=x)
    x = x.contiguous()
    W = packed_cols(G, bits)
    words = torch.empty(R, W, dtype=torch.int32, device=device)
    scale = torch.empty(R, dtype=torch.float16, device=device)
    mn = torch.empty(R, dtype=torch.float16, device=device)
    ratios = torch.tensor(_ratios(clip_ratio, clip_search), dtype=torch.float32, device=device)
    if R:
        br = clamp_pow2(R, 1, max(1, (2048 if ratios.numel() > 1 else 4096) // G))  # the clip search spills at 4096
        launchable(_kv_quant_kernel, device)[(triton.cdiv(R, br),)](
            x, words, scale, mn, ratios, R, x.stride(0),
            QMAX=(1 << bits) - 1, BITS=bits, G=G, W=W, PER=32 // bits, NCLIP=ratios.numel(), MINS=MIN_SCALE, BLOCK_R=br,
        )
    return words, scale, mn


def kv_dequant(words: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton: same contract as `kv_dequant_ref`."""
    _check(bits)
    _need_triton(group, bits)
    device = check_same_device(words=words, scale=scale, mn=mn)
    R, W = words.shape
    if W != packed_cols(group, bits):
        raise ValueError(f"{group} codes of {bits} bits need {packed_cols(group, bits)} words a row, got {W}")
    out = torch.empty(R, group, dtype=dtype, device=device)
    if R:
        br = clamp_pow2(R, 1, max(1, 4096 // group))
        launchable(_kv_dequant_kernel, device)[(triton.cdiv(R, br),)](
            words.contiguous(), scale.contiguous(), mn.contiguous(), out, R,
            MASK=(1 << bits) - 1, BITS=bits, G=group, W=W, PER=32 // bits, BLOCK_R=br,
        )
    return out


# ---- dispatch -----------------------------------------------------------------------------
def _use_triton(device: torch.device, group: int, bits: int) -> bool:
    backend = requested_backend()
    if backend in ("ref", "cpu") or not triton_available() or not triton_shape_ok(group, bits):
        return False
    return device.type == "cuda" or backend == "triton"


def kv_pack(x: torch.Tensor, bits: int, clip_ratio: float = 1.0, clip_search: bool = False):
    """Quantize and pack rows (rows, G): Triton where it runs, the reference otherwise."""
    if _use_triton(x.device, x.shape[-1], bits):
        return kv_quant(x, bits, clip_ratio, clip_search)
    return kv_quant_ref(x, bits, clip_ratio, clip_search)


def kv_unpack(words: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack and dequantize rows: Triton where it runs, the reference otherwise."""
    if _use_triton(words.device, group, bits):
        return kv_dequant(words, scale, mn, bits, group, dtype)
    return kv_dequant_ref(words, scale, mn, bits, group, dtype)


__all__ = ["kv_quant_ref", "kv_dequant_ref", "kv_quant", "kv_dequant", "kv_pack", "kv_unpack", "triton_shape_ok"]


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): quantize
    (one clip ratio, and the clip search) and dequantize, 2/4/8 bits, groups of 32/64/128, fp16/bf16/fp32
    rows; BLOCK_R as the wrappers pick for many rows."""
    from .aot import ACT_DTYPES, Variant

    for dt, act in ACT_DTYPES.items():
        for bits in KV_BITS:
            for G in (32, 64, 128):
                W, per = packed_cols(G, bits), 32 // bits
                for nclip in (1, len(KV_CLIP_GRID)):
                    types = dict(x_ptr=act, w_ptr="*i32", s_ptr="*fp16", m_ptr="*fp16", r_ptr="*fp32")
                    const = dict(QMAX=(1 << bits) - 1, BITS=bits, G=G, W=W, PER=per, NCLIP=nclip, MINS=MIN_SCALE,
                                 BLOCK_R=(2048 if nclip > 1 else 4096) // G)
                    yield Variant(_kv_quant_kernel, types, const, label=f"quant {dt} KV{bits} G{G} clips {nclip}")
                types = dict(w_ptr="*i32", s_ptr="*fp16", m_ptr="*fp16", o_ptr=act)
                const = dict(MASK=(1 << bits) - 1, BITS=bits, G=G, W=W, PER=per, BLOCK_R=4096 // G)
                yield Variant(_kv_dequant_kernel, types, const, label=f"dequant {dt} KV{bits} G{G}")
