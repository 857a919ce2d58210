"""2:4 sparse GEMM: y = x @ W^T + b with W stored in the packed 2:4 format (`formats.sparse24_*`):
kept values (2 of every 4 input columns; int codes packed as `formats.pack` does, or floats)
plus 2-bit positions.

- `sparse24_dense_weight`: the dense (out, in) weight, exactly as the simulated model holds it
  (codes dequantized with `(q - zero) * scale` in fp32, cast once; zeros where pruned).
- `sparse24_gemm_ref`: the torch oracle (dense weight + F.linear); the CPU path.
- `_sparse24_gemm_kernel`: Triton. A program owns a BLOCK_M x BLOCK_N output tile; for each slab
  of BLOCK_K input columns (BLOCK_K / 4 groups) it loads the two stored slots of every group
  (values, or the int32 words holding their codes, shifted and masked in registers and
  dequantized with their group's qparams) and their 2-bit positions, and for each position
  p in 0..3 builds the (BLOCK_K / 4, BLOCK_N) weight slab of columns 4g + p (the slot whose
  position is p, else 0) and multiplies it with the matching strided slab of x: four `tl.dot`s
  per slab, no dense weight ever stored. fp32 accumulator; fp32 activations use IEEE products.
- `sparse24_gemm`: checks shapes (with what to pad), allocates, launches.

Quantization parameters as `w4a16_gemm`: scale / zero point (out|1, n_groups) float32 over the
dense input columns; `group_size` must be a multiple of 4 for the kernel (a group of 4 columns
then shares one qparam); other group sizes take the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_same_device, clamp_pow2, interpreting, launchable
from .formats import packed_cols, sparse24_positions, sparse24_slots, unpack

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

KERNEL_BITS = (2, 4, 8)


def sparse24_dense_weight(values, meta, scale=None, zero_point=None, *, in_features: int, bits: int | None = None,
                          group_size: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (out, in) weight in `dtype`: float values scattered, or codes dequantized then scattered."""
    K = int(in_features)
    slots = sparse24_slots(K)
    pos = sparse24_positions(meta, K)  # (N, slots) column of every slot
    N = meta.shape[0]
    if bits is None:
        v = values.to(dtype)
    else:
        q = unpack(values, bits, slots).float()  # (N, slots)
        ng = scale.shape[1]
        g = torch.clamp(pos // group_size, max=ng - 1) if group_size else torch.zeros_like(pos)  # (N, slots)
        s = scale.float().expand(N, ng).gather(1, g)
        z = zero_point.float().expand(N, ng).gather(1, g) if zero_point is not None else torch.zeros_like(s)
        v = ((q - z) * s).to(dtype)  # the same operations as quant.primitives.dequantize
    dense = torch.zeros(N, 2 * slots, dtype=dtype, device=values.device)
    return dense.scatter_(1, pos, v)[:, :K]


def sparse24_gemm_ref(x, values, meta, scale=None, zero_point=None, *, in_features: int, bits: int | None = None,
                      group_size: int | None = None, bias=None) -> torch.Tensor:
    """Torch oracle: F.linear(x, dense weight in x.dtype, bias)."""
    w = sparse24_dense_weight(values, meta, scale, zero_point, in_features=in_features, bits=bits,
                              group_size=group_size, dtype=x.dtype)
    return F.linear(x, w, bias)


if triton is not None:

    @triton.jit
    def _sparse24_gemm_kernel(
        x_ptr, v_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_xk,
        stride_vn, stride_vc,
        stride_mn, stride_mw,
        stride_sn, stride_sg,
        stride_zn, stride_zg,
        stride_om, stride_on,
        BITS: tl.constexpr,  # 0: float values
        PER: tl.constexpr,  # codes per int32 word (32 // BITS; 1 for float values)
        FIELD: tl.constexpr,  # (1 << BITS) - 1
        OFFSET: tl.constexpr,  # 1 << (BITS - 1): stored unsigned = code + OFFSET
        GROUP_SIZE: tl.constexpr,  # 0: one group per row
        HAS_ZERO: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        BG: tl.constexpr = BLOCK_K // 4  # groups of 4 columns per slab
        IS_FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        m_mask = offs_m < M
        n_mask = offs_n < N
        G = (K + 3) // 4
        if BITS > 0 and GROUP_SIZE == 0:
            s_row = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]  # (1, BN)
            if HAS_ZERO:
                z_row = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0.0)[None, :]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            g = k0 // 4 + tl.arange(0, BG)  # (BG,) group index
            gn_mask = (g < G)[:, None] & n_mask[None, :]  # (BG, BN)
            c0 = 2 * g  # slot 0 of each group; slot 1 is c0 + 1
            # positions: 2-bit fields, 16 per int32 word
            mw0 = tl.load(meta_ptr + offs_n[None, :] * stride_mn + (c0 // 16)[:, None] * stride_mw, mask=gn_mask, other=0)
            p0 = (mw0 >> ((c0 % 16) * 2)[:, None]) & 3  # (BG, BN)
            p1 = (mw0 >> ((c0 % 16) * 2 + 2)[:, None]) & 3  # slot 1 sits in the same word (c0 even)
            if BITS == 0:
                v0 = tl.load(v_ptr + offs_n[None, :] * stride_vn + c0[:, None] * stride_vc, mask=gn_mask, other=0.0).to(tl.float32)
                v1 = tl.load(v_ptr + offs_n[None, :] * stride_vn + (c0 + 1)[:, None] * stride_vc, mask=gn_mask, other=0.0).to(tl.float32)
            else:
                w0 = tl.load(v_ptr + offs_n[None, :] * stride_vn + (c0 // PER)[:, None] * stride_vc, mask=gn_mask, other=0)
                w1 = tl.load(v_ptr + offs_n[None, :] * stride_vn + ((c0 + 1) // PER)[:, None] * stride_vc, mask=gn_mask, other=0)
                q0 = (((w0 >> ((c0 % PER) * BITS)[:, None]) & FIELD) - OFFSET).to(tl.float32)
                q1 = (((w1 >> (((c0 + 1) % PER) * BITS)[:, None]) & FIELD) - OFFSET).to(tl.float32)
                if GROUP_SIZE == 0:
                    s = s_row
                    if HAS_ZERO:
                        z = z_row
                else:  # a group of 4 columns lies in one quantization group (GROUP_SIZE % 4 == 0)
                    qg = (4 * g) // GROUP_SIZE
                    s = tl.load(s_ptr + offs_n[None, :] * stride_sn + qg[:, None] * stride_sg, mask=gn_mask, other=0.0)
                    if HAS_ZERO:
                        z = tl.load(z_ptr + offs_n[None, :] * stride_zn + qg[:, None] * stride_zg, mask=gn_mask, other=0.0)
                if HAS_ZERO:
                    v0 = (q0 - z) * s
                    v1 = (q1 - z) * s
                else:
                    v0 = q0 * s
                    v1 = q1 * s
            v0 = v0.to(x_ptr.dtype.element_ty)
            v1 = v1.to(x_ptr.dtype.element_ty)
            for p in tl.static_range(4):
                w = tl.where(p0 == p, v0, 0.0) + tl.where(p1 == p, v1, 0.0)  # (BG, BN): columns 4g + p
                col = 4 * g + p  # (BG,)
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk,
                            mask=m_mask[:, None] & (col < K)[None, :], other=0.0)  # (BM, BG)
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                elif IS_FP32:
                    acc += tl.dot(a, w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(a, w.to(x_ptr.dtype.element_ty))

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    def _cuda_configs(fp32: bool = False):
        """Autotune configurations; none spills or overflows shared memory on sm_80/90/100 (`lmpress.kernels.aot`).
        fp32 activations take an FMA dot (IEEE, no TF32): small tiles."""
        tiles = [(16, 32, 64, 4, 2), (16, 64, 64, 4, 2), (32, 32, 64, 4, 2), (16, 64, 64, 8, 2)] if fp32 else \
            [(16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (32, 64, 128, 8, 3), (64, 64, 128, 8, 3), (64, 128, 64, 8, 3)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in tiles]

    _autotuned = {}

    def _cuda_kernel(fp32: bool):
        if fp32 not in _autotuned:
            _autotuned[fp32] = triton.autotune(configs=_cuda_configs(fp32), key=["M", "N", "K"])(_sparse24_gemm_kernel)
        return _autotuned[fp32]


def sparse24_gemm(x, values, meta, scale=None, zero_point=None, *, in_features: int, bits: int | None = None,
                  group_size: int | None = None, bias=None, config: dict | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ W^T + bias through the Triton kernel; W in the packed 2:4 format.

    `bits=None`: `values` are floats (N, slots); else int32 words (N, packed_cols(slots, bits))
    with `scale` (and `zero_point` for asymmetric schemes). `config`: BLOCK_M/BLOCK_N/BLOCK_K to pin
    the tile (BLOCK_M, BLOCK_N >= 16, BLOCK_K >= 64, powers of two); default autotuned on CUDA.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use sparse24_gemm_ref")
    K = int(in_features)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}: cast them first")
    slots = sparse24_slots(K)
    N = meta.shape[0]
    if meta.dtype != torch.int32 or tuple(meta.shape) != (N, packed_cols(slots, 2)):
        raise ValueError(f"meta must be int32 ({N}, {packed_cols(slots, 2)}) for K={K} (formats.sparse24_compress), got {meta.dtype} {tuple(meta.shape)}")
    if bits is None:
        if tuple(values.shape) != (N, slots) or not values.dtype.is_floating_point:
            raise ValueError(f"float values must be ({N}, {slots}), got {values.dtype} {tuple(values.shape)}")
    else:
        if bits not in KERNEL_BITS:
            raise ValueError(f"sparse24_gemm handles {list(KERNEL_BITS)}-bit codes; use sparse24_gemm_ref for {bits} bits")
        if values.dtype != torch.int32 or tuple(values.shape) != (N, packed_cols(slots, bits)):
            raise ValueError(f"packed codes must be int32 ({N}, {packed_cols(slots, bits)}), got {values.dtype} {tuple(values.shape)}")
        if scale is None:
            raise ValueError("quantized values need weight_scale")
        if group_size and group_size % 4:
            raise ValueError(f"group_size={group_size} must be a multiple of 4 for the kernel; use sparse24_gemm_ref")
        ng = -(-K // group_size) if group_size else 1
        if scale.dim() != 2 or scale.shape[1] != ng or scale.shape[0] not in (1, N):
            raise ValueError(f"scale must be ({N} or 1, {ng}), got {tuple(scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    device = check_same_device(x=x, values=values, meta=meta, scale=scale, zero_point=zero_point, bias=bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=device)
    if M == 0 or N == 0 or K == 0:
        out.zero_()
        if bias is not None and K == 0:
            out += bias.to(out.dtype)
        return out.reshape(*lead, N)
    s = scale.float() if scale is not None else out.new_zeros(1, 1, dtype=torch.float32)
    z = zero_point.float() if zero_point is not None else s
    stride_sn = s.stride(0) if s.shape[0] == N and N > 1 else 0
    stride_zn = z.stride(0) if z.shape[0] == N and N > 1 else 0
    args = (x2, values, meta, s, z, bias if bias is not None else s, out, M, N, K,
            x2.stride(0), x2.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
            stride_sn, s.stride(1), stride_zn, z.stride(1), out.stride(0), out.stride(1))
    meta_args = dict(BITS=bits or 0, PER=32 // bits if bits else 1, FIELD=(1 << bits) - 1 if bits else 0,
                     OFFSET=1 << (bits - 1) if bits else 0, GROUP_SIZE=int(group_size) if (bits and group_size) else 0,
                     HAS_ZERO=zero_point is not None and bits is not None, HAS_BIAS=bias is not None,
                     DOT_FP32=interpreting(device))
    if interpreting(device) or config is not None:
        cfg = dict(config or {})
        cfg.setdefault("BLOCK_M", clamp_pow2(M, 16, 64))
        cfg.setdefault("BLOCK_N", clamp_pow2(N, 16, 64))
        cfg.setdefault("BLOCK_K", clamp_pow2(K, 64, 256))
        if min(cfg["BLOCK_M"], cfg["BLOCK_N"]) < 16 or cfg["BLOCK_K"] < 64:
            raise ValueError(f"BLOCK_M, BLOCK_N must be >= 16 and BLOCK_K >= 64 (tl.dot on BLOCK_K/4), got {cfg}")
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        launchable(_sparse24_gemm_kernel, device)[grid](*args, **meta_args, **cfg)
    else:
        def grid(META):
            return (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(N, META["BLOCK_N"]))

        _cuda_kernel(x.dtype == torch.float32)[grid](*args, **meta_args)
    return out.reshape(*lead, N)


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): every
    autotune configuration for each activation dtype with 4-bit grouped asymmetric values, then on one
    tile (the second) float values (no quantization) and 8-bit per-channel codes."""
    from .aot import ACT_DTYPES, Variant

    def variant(act, cfg, label, values="*i32", **meta):
        types = dict(x_ptr=act, v_ptr=values, meta_ptr="*i32", s_ptr="*fp32", z_ptr="*fp32", b_ptr=act, out_ptr=act)
        const = dict(BITS=4, PER=8, FIELD=15, OFFSET=8, GROUP_SIZE=128, HAS_ZERO=True, HAS_BIAS=True, DOT_FP32=False,
                     **cfg.kwargs)
        const.update(meta)
        return Variant(_sparse24_gemm_kernel, types, const, cfg.num_warps, cfg.num_stages, label)

    for dt, act in ACT_DTYPES.items():
        configs = _cuda_configs(dt == "fp32")
        for cfg in configs:
            yield variant(act, cfg, f"{dt} " + "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
        yield variant(act, configs[1], f"{dt} float values", values=act, BITS=0, PER=1, FIELD=0, OFFSET=0,
                      GROUP_SIZE=0, HAS_ZERO=False)
        yield variant(act, configs[1], f"{dt} 8-bit per-channel", BITS=8, PER=4, FIELD=255, OFFSET=128, GROUP_SIZE=0,
                      HAS_ZERO=False)
