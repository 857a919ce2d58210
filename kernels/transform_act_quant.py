"""An online Kronecker-factored transform fused with per-token activation quantization.

    y = ((x ∘ s) (A ⊗ B)) / norm          (over the last dim, n = m·p; s: optional ±1 signs)
    codes, scales = act_quant(y, bits, clip_ratio)

This serves QuaRot's online Hadamard (`OnlineHadamard.kron_factors()`: A = H_m ⊗ H_{p/b},
B = H_b, norm = sqrt(n), s its random signs) and FlatQuant's two Kronecker factors
(A = P1, B = P2, norm = 1, no signs) in one pass over the activation.

Maths: a row x viewed as X (m, p), row-major (element a·p + b at X[a, b]), gives
x (A ⊗ B) = Aᵀ X B, again read row-major. So one program per token row loads X as one
(BLOCK_A, BLOCK_B) tile (m, p padded to powers of two >= 16: the smallest `tl.dot`), computes
Y = X B and Z = Aᵀ Y with two fp32 `tl.dot`s (input_precision="ieee": TF32 would round the
inputs to 10 mantissa bits), divides by `norm` with the correctly rounded `div_rn`, then
quantizes exactly as `act_quant` does (per-token absmax, clip, scale = a·c / qmax,
round-half-even, clamp) and writes int8 codes and/or packed int4 words and fp32 scales.
fp16/bf16 inputs are cast to fp32 on load (the transform runs in fp32; the interpreter's bf16
dot is broken anyway).

Agreement with the unfused path (transform in torch, then `act_quant`): the sums run in another
order than `hadamard_transform`'s butterflies, so transformed values may differ by an ulp or two,
and a code by one where a value sits on a rounding boundary. Where every partial sum is exact
(small-integer inputs and ±1 or small-integer factors) the values are bit-identical, and so are
codes and scales: `transform_act_quant_ref` (fp32, then `act_quant_ref`) is the oracle.
Unlike the unfused path on fp16/bf16 activations, which transforms in the activation dtype,
the fused transform never rounds to 16 bits.

Limits: BLOCK_A, BLOCK_B <= `MAX_BLOCK` (= 128) under the interpreter; compiled for CUDA, the
tile is at most `MAX_TILE_CUDA` (= 64 x 64) elements: the ahead-of-time compile
(`lmpress.kernels.aot`) shows 128 x 64 and 128 x 128 tiles spilling (1.7 and 5.1 KB of stack per
thread on sm_90 at 32 warps, the register file's limit: the fp32 FMA dots hold both operands in
registers), while 64 x 64 at 32 warps does not. Larger factors are refused (`fused_fits`), and
`online_act_quant` then transforms in torch and quantizes with `act_quant`. Packed int4 straight from the kernel
needs p % 8 == 0 (eight codes of a word in one tile row); otherwise the codes are packed in torch.
On CUDA the kernel has not been run in this repository yet (no GPU here): only the interpreter has.
"""
from __future__ import annotations

import torch

from .act_quant import check_bits, act_quant, act_quant_ref, token_args
from .dispatch import check_same_device, launchable, next_pow2
from .formats import pack, packed_cols

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_BLOCK = 128
MAX_TILE_CUDA = 64 * 64
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def kron_transform_ref(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, signs: torch.Tensor | None = None, norm: float = 1.0
) -> torch.Tensor:
    """((x ∘ signs) (A ⊗ B)) / norm over the last dim, in fp32: Aᵀ X B with X = x viewed (m, p)."""
    m, p = A.shape[0], B.shape[0]
    x = x.float()
    if signs is not None:
        x = x * signs.float()
    X = x.reshape(*x.shape[:-1], m, p)  # (..., m, p): element a·p + b at [a, b]
    Z = torch.matmul(A.float().t(), torch.matmul(X, B.float()))  # (..., m, p): Aᵀ X B
    if norm != 1.0:
        Z = Z / torch.tensor(norm, dtype=torch.float32, device=Z.device)  # one correctly rounded division
    return Z.reshape(x.shape)


def transform_act_quant_ref(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, signs: torch.Tensor | None, bits: int,
    clip_ratio: float = 1.0, packed: bool = False, norm: float = 1.0, full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch oracle: `kron_transform_ref` then `act_quant_ref` -> (int8 codes (..., n) or packed
    int32 words (rows, n/8), fp32 scales (rows,))."""
    _check_factors(x, A, B, signs)
    return act_quant_ref(kron_transform_ref(x, A, B, signs, norm), bits, clip_ratio, packed, full_range)


def fused_fits(m: int, p: int, cuda: bool = False) -> str | None:
    """None when factors of sizes (m, p) fit one tile of the fused kernel (compiled for CUDA when
    `cuda`, else interpreted), else why not."""
    ba, bb = max(16, next_pow2(m)), max(16, next_pow2(p))
    if ba > MAX_BLOCK or bb > MAX_BLOCK:
        return f"Kronecker factors {m} x {p} pad to a {ba} x {bb} tile; the fused kernel takes at most {MAX_BLOCK} a side"
    if cuda and ba * bb > MAX_TILE_CUDA:
        return f"Kronecker factors {m} x {p} pad to a {ba} x {bb} tile; on CUDA the fused kernel takes at most {MAX_TILE_CUDA} elements (larger tiles spill)"
    return None


def _num_warps(ba: int, bb: int) -> int:
    """Warps for a BLOCK_A x BLOCK_B tile: none of these spills on sm_80/90/100 (`lmpress.kernels.aot`)."""
    return 4 if ba * bb <= 1024 else 8 if ba * bb <= 2048 else 32


def _check_factors(x, A, B, signs) -> None:
    if A.dim() != 2 or A.shape[0] != A.shape[1] or B.dim() != 2 or B.shape[0] != B.shape[1]:
        raise ValueError(f"A and B must be square matrices, got {tuple(A.shape)} and {tuple(B.shape)}")
    n = A.shape[0] * B.shape[0]
    if x.shape[-1] != n:
        raise ValueError(f"x's last dim {x.shape[-1]} must equal m·p = {A.shape[0]}·{B.shape[0]} = {n}")
    if signs is not None and tuple(signs.shape) != (n,):
        raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")


if triton is not None:

    @triton.jit
    def _transform_act_quant_kernel(
        x_ptr, a_ptr, b_ptr, sg_ptr, q_ptr, pk_ptr, s_ptr,
        m, p, stride_xm, stride_xk, stride_qm, stride_pm,
        clip, norm, qdiv,
        QMAX: tl.constexpr,
        HAS_SIGNS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        WRITE_CODES: tl.constexpr,
        WRITE_PACKED: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ia = tl.arange(0, BLOCK_A)  # (BA,): row of the (m, p) view
        ib = tl.arange(0, BLOCK_B)  # (BB,): column
        a_in, b_in = ia < m, ib < p
        mask = a_in[:, None] & b_in[None, :]  # (BA, BB)
        k = ia[:, None] * p + ib[None, :]  # (BA, BB): element index in the token row
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SIGNS:
            x = x * tl.load(sg_ptr + k, mask=mask, other=0.0)
        Bm = tl.load(b_ptr + ib[:, None] * p + ib[None, :], mask=b_in[:, None] & b_in[None, :], other=0.0)  # (BB, BB)
        y = tl.dot(x, Bm, input_precision="ieee")  # X B; padding rows/columns stay 0
        At = tl.load(a_ptr + ia[None, :] * m + ia[:, None], mask=a_in[:, None] & a_in[None, :], other=0.0)  # Aᵀ[c, a] = A[a, c]
        z = tl.dot(At, y, input_precision="ieee")  # Aᵀ X B
        if HAS_NORM:
            z = tl.math.div_rn(z, norm)

        # per-token quantization: the same operations as _act_quant_kernel (see act_quant.py)
        amax = tl.max(tl.max(tl.abs(z), axis=1), axis=0)
        scale = tl.math.div_rn(amax * clip, qdiv)
        scale = tl.where(scale > 0.0, scale, 1.0)
        tl.store(s_ptr + row, scale)
        v = tl.math.div_rn(z, scale)
        v = tl.minimum(tl.maximum(v, -QMAX - 3.0), QMAX + 2.0)
        r = (v + 12582912.0) - 12582912.0  # round half to even (1.5 * 2^23)
        q = tl.minimum(tl.maximum(r, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
        if WRITE_CODES:
            tl.store(q_ptr + row * stride_qm + k, q.to(tl.int8), mask=mask)
        if WRITE_PACKED:  # p % 8 == 0: element a·p + b in word a·p/8 + b//8 at bit 4·(b % 8)
            u = tl.where(mask, q + 8, 0)
            shifted = u << ((ib % 8) * 4)[None, :]
            words = tl.sum(tl.reshape(shifted, (BLOCK_A, BLOCK_B // 8, 8)), axis=2)  # disjoint fields: sum == or
            j = tl.arange(0, BLOCK_B // 8)
            w_offs = ia[:, None] * (p // 8) + j[None, :]  # (BA, BB/8)
            tl.store(pk_ptr + row * stride_pm + w_offs, words, mask=a_in[:, None] & (j * 8 < p)[None, :])


def transform_act_quant(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, signs: torch.Tensor | None = None, bits: int = 4,
    clip_ratio: float = 1.0, *, norm: float = 1.0, codes: bool = True, packed: bool = False,
    full_range: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Triton: quantize ((x ∘ signs)(A ⊗ B)) / norm per token -> (int8 codes (..., n) or None,
    packed int32 words (rows, ceil(n/8)) or None, fp32 scales (rows,)). A (m, m), B (p, p),
    n = m·p; both factors at most `MAX_BLOCK` after padding (see `fused_fits`)."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use transform_act_quant_ref")
    check_bits(bits, packed)
    if not codes and not packed:
        raise ValueError("ask for codes, packed words, or both")
    if x.dtype not in _FLOATS:
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio={clip_ratio} must lie in (0, 1]")
    if not float(norm) > 0.0:
        raise ValueError(f"norm={norm} must be positive")
    _check_factors(x, A, B, signs)
    m, p = A.shape[0], B.shape[0]
    why = fused_fits(m, p, x.device.type == "cuda")
    if why:
        raise ValueError(why + ": run kron_transform_ref (or the module) and act_quant instead")
    device = check_same_device(x=x, A=A, B=B, signs=signs)
    n = m * p
    x2 = x.reshape(-1, n)  # (rows, n)
    M = x2.shape[0]
    A32, B32 = A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous()
    s32 = signs.to(torch.float32).contiguous() if signs is not None else None
    in_kernel_pack = packed and p % 8 == 0
    want_codes = codes or (packed and not in_kernel_pack)
    q = torch.empty(M, n, dtype=torch.int8, device=device) if want_codes else None
    pk = torch.empty(M, packed_cols(n, 4), dtype=torch.int32, device=device) if in_kernel_pack else None
    s = torch.empty(M, dtype=torch.float32, device=device)
    if M:
        ba, bb = max(16, next_pow2(m)), max(16, next_pow2(p))
        launchable(_transform_act_quant_kernel, device)[(M,)](
            x2, A32, B32, s32 if s32 is not None else s, q if want_codes else s, pk if in_kernel_pack else s, s,
            m, p, x2.stride(0), x2.stride(1), n if want_codes else 0, pk.stride(0) if in_kernel_pack else 0,
            float(torch.tensor(clip_ratio, dtype=torch.float32)), float(torch.tensor(norm, dtype=torch.float32)),
            token_args(bits, full_range=full_range).sym_divisor,
            QMAX=(1 << (bits - 1)) - 1, HAS_SIGNS=s32 is not None, HAS_NORM=float(norm) != 1.0,
            WRITE_CODES=want_codes, WRITE_PACKED=in_kernel_pack, BLOCK_A=ba, BLOCK_B=bb,
            num_warps=_num_warps(ba, bb),
        )
    if packed and not in_kernel_pack:
        pk = pack(q, 4)  # (M, ceil(n/8))
    return (q.reshape(x.shape) if codes else None), pk, s


def online_act_quant(
    x: torch.Tensor, transform: torch.nn.Module, bits: int, clip_ratio: float = 1.0, *,
    codes: bool = True, packed: bool = False, full_range: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, str]:
    """act_quant(transform(x)) for a runtime online transform, fused when it exposes
    `kron_factors()` (-> (A, B, signs, norm) or None) and they fit one tile; otherwise the
    transform runs in torch first. Returns (codes, packed, scales, why it was not fused or "")."""
    kron = transform.kron_factors(x.device) if hasattr(transform, "kron_factors") else None
    why = "no Kronecker factors (dense transform)" if kron is None else \
        fused_fits(kron[0].shape[0], kron[1].shape[0], x.device.type == "cuda")
    if why:
        q, pk, s = act_quant(transform(x), bits, clip_ratio, codes=codes, packed=packed, full_range=full_range)
        return q, pk, s, why
    A, B, signs, norm = kron
    return (*transform_act_quant(x, A, B, signs, bits, clip_ratio, norm=norm, codes=codes, packed=packed,
                                 full_range=full_range), "")


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): every
    Kronecker factor tile the CUDA path takes (square and 2:1, up to MAX_TILE_CUDA elements), signs and
    norm on, codes and packed words, for each activation dtype, with the wrapper's num_warps."""
    from .aot import ACT_DTYPES, Variant

    for dt, act in ACT_DTYPES.items():
        for ba, bb in ((16, 16), (32, 16), (32, 32), (64, 32), (64, 64)):
            types = dict(x_ptr=act, a_ptr="*fp32", b_ptr="*fp32", sg_ptr="*fp32", q_ptr="*i8", pk_ptr="*i32",
                         s_ptr="*fp32", clip="fp32", norm="fp32", qdiv="fp32")
            const = dict(QMAX=7, HAS_SIGNS=True, HAS_NORM=True, WRITE_CODES=True, WRITE_PACKED=True, BLOCK_A=ba,
                         BLOCK_B=bb)
            yield Variant(_transform_act_quant_kernel, types, const, num_warps=_num_warps(ba, bb),
                          label=f"{dt} {ba}x{bb}")
