"""LUT dequant-GEMM for codebook weights (SqueezeLLM): y = x @ W^T + b, W[n, k] = codebook[n, code[n, k]].

Format (`lmpress.quant.squeezellm`): `codes` int32 words (N, packed_cols(K, bits)), unsigned
`bits`-bit fields in `kernels.formats` bitstream order (element k of a row at bits
[k*bits, (k+1)*bits) of the row, so a 3-bit field may straddle two words), and `codebook` (N,
2^bits) fp16: each output channel has its own non-uniform table. The sparse part of
dense-and-sparse quantization is not this kernel's: `LUTLinear` adds it with a CSR product.

- `lut_gemm_ref`: the torch oracle (unpack, gather, F.linear), as `LUTLinear`'s CPU path.
- `_lut_gemm_kernel`: Triton. Tiling and split-K are `w4a16_gemm`'s (`SplitPlan`). For each
  BLOCK_K slab a program computes every element's bit offset, loads the word holding its low bits
  and the next one, and joins them in int64 (logical shifts), so 2-, 3- and 4-bit codes run the
  same code. The table lookup is a gather from the (N, 2^bits) codebook (L1-resident: 32 bytes a
  row at 4 bits); the fp16 entry is the weight, cast to the activation dtype and fed to `tl.dot`
  (fp32 accumulator; IEEE fp32 for fp32 activations, no TF32).
- `lut_gemm`: checks, allocates, chooses split-K, launches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_same_device, clamp_pow2
from .formats import packed_cols, unpack_unsigned
from .w4a16_gemm import FLOAT_DTYPES, SplitPlan, gemm_output

try:
    import triton
    import triton.language as tl

    from .tiles import dot_acc, store_tile, tile_ranges
    from .w4a16_gemm import prune_by_m
except ImportError:  # pragma: no cover - triton is a dependency; the reference still works
    triton = None

LUT_BITS = (2, 3, 4)


def lut_weight(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, bits: int) -> torch.Tensor:
    """The dense weight (N, K) float32: codebook[n, code[n, k]] for packed `codes` (N, packed_cols(K, bits))."""
    idx = unpack_unsigned(codes, bits, int(in_features)).long()  # (N, K)
    return codebook.float().gather(1, idx)  # (N, 2^bits) at (N, K) -> (N, K)


def lut_gemm_ref(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, in_features: int, bits: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch oracle: F.linear(x, codebook[codes] in x.dtype, bias)."""
    return F.linear(x, lut_weight(codes, codebook, in_features, bits).to(x.dtype), bias)


if triton is not None:

    @triton.jit
    def _lut_gemm_kernel(
        x_ptr, c_ptr, t_ptr, b_ptr, out_ptr,
        M, N, K, K_SPLIT, M_BUCKET, WORDS,
        stride_xm, stride_xk,
        stride_cn, stride_cw,
        stride_tn, stride_tk,
        stride_os, stride_om, stride_on,
        BITS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PARTIAL: tl.constexpr,  # split-K: store fp32 partial sums at out + pid_k * stride_os, no bias
        DOT_FP32: tl.constexpr,  # interpreter: run the dot on fp32 copies (its bf16 dot is unreliable)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        FIELD: tl.constexpr = (1 << BITS) - 1
        IS_FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32

        offs_m, offs_n, m_mask, n_mask, pid_k, k_lo, k_hi = tile_ranges(M, N, K, K_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            k_mask = offs_k < k_hi
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0,
            )  # (BM, BK), zero past K: the k-tail of the weight tile then contributes nothing
            bit = offs_k.to(tl.int64) * BITS  # (BK,) bit offset of each element in its row
            word = bit // 32
            shift = bit % 32
            wmask = k_mask[:, None] & n_mask[None, :]
            w_ptrs = c_ptr + offs_n[None, :] * stride_cn + word[:, None] * stride_cw  # (BK, BN)
            lo = tl.load(w_ptrs, mask=wmask, other=0).to(tl.int64) & 0xFFFFFFFF
            hi = tl.load(w_ptrs + stride_cw, mask=wmask & (word + 1 < WORDS)[:, None], other=0).to(tl.int64) & 0xFFFFFFFF
            u = ((lo >> shift[:, None]) | (hi << (32 - shift)[:, None])) & FIELD  # (BK, BN) codes; hi counts only if straddling
            w = tl.load(t_ptr + offs_n[None, :] * stride_tn + u * stride_tk, mask=wmask, other=0.0)  # (BK, BN) table entries
            acc = dot_acc(acc, a, w.to(x_ptr.dtype.element_ty), DOT_FP32, IS_FP32)

        store_tile(acc, out_ptr, b_ptr, pid_k, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on,
                   PARTIAL, HAS_BIAS)

    def _cuda_configs(fp32: bool = False):
        """Autotune configurations (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); each is checked for spills
        and shared memory on sm_80/90/100 by `lmpress.kernels.aot`. The per-element decode holds int64
        words and a gathered table entry per (k, n): tiles are smaller than `w4a16_gemm`'s."""
        if fp32:
            tiles = [(16, 32, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 8, 2)]
        else:
            tiles = [(16, 32, 64, 4, 3), (16, 32, 32, 4, 3), (16, 64, 32, 8, 3), (16, 64, 64, 8, 3), (32, 64, 64, 8, 3),
                     (64, 64, 32, 8, 3), (64, 128, 16, 8, 3)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                              num_stages=stages) for bm, bn, bk, warps, stages in tiles]

    _autotuned = {}

    def _cuda_kernel(fp32: bool):
        if fp32 not in _autotuned:
            _autotuned[fp32] = triton.autotune(
                configs=_cuda_configs(fp32),
                key=["M_BUCKET", "N", "K", "K_SPLIT", "BITS"],
                prune_configs_by={"early_config_prune": prune_by_m},
            )(_lut_gemm_kernel)
        return _autotuned[fp32]


def lut_gemm(
    x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, *, bits: int, in_features: int,
    bias: torch.Tensor | None = None, split_k: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """y (..., N) = x (..., K) @ codebook[codes]^T + bias, in x.dtype, through the Triton kernel.

    `split_k`: None picks it (CUDA, M <= 16); an int forces it. `config`: BLOCK_M/BLOCK_N/BLOCK_K
    (>= 16, powers of two) to pin the tile (tests); default: autotuned on CUDA, from the shape under
    the interpreter."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use lut_gemm_ref")
    K = int(in_features)
    if bits not in LUT_BITS:
        raise ValueError(f"lut_gemm reads {list(LUT_BITS)}-bit codes, got bits={bits}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}: cast them first")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {K}")
    if codes.dtype != torch.int32 or codes.dim() != 2:
        raise ValueError(f"codes must be int32 words (2-D), got {codes.dtype} {tuple(codes.shape)}")
    N, words = codes.shape
    if words != packed_cols(K, bits):
        raise ValueError(f"K={K} codes of {bits} bits need {packed_cols(K, bits)} int32 words per output channel, "
                         f"codes has {words}; pack them with formats.pack_unsigned")
    if codebook.shape != (N, 1 << bits):
        raise ValueError(f"codebook must be ({N}, {1 << bits}) for {bits}-bit codes, got {tuple(codebook.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    device = check_same_device(x=x, codes=codes, codebook=codebook, bias=bias)

    x2, out, done = gemm_output(x, K, N, bias, device)  # (M, K), (M, N)
    if done:
        return out.reshape(*x.shape[:-1], N)
    M = x2.shape[0]

    plan = SplitPlan.make(M, N, K, device, split_k, config)
    target = plan.target(out)  # (splits, M, N)
    kargs = (
        x2, codes, codebook, bias if bias is not None else codebook, target,
        M, N, K, plan.k_split, clamp_pow2(M, 1, 1 << 30), words,
        x2.stride(0), x2.stride(1),
        codes.stride(0), codes.stride(1),
        codebook.stride(0), codebook.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
    )
    plan.launch(_lut_gemm_kernel, _cuda_kernel(x.dtype == torch.float32) if plan.cfg is None else None, kargs,
                dict(BITS=bits), bias, device)
    plan.finish(target, out, bias)
    return out.reshape(*x.shape[:-1], N)


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): every
    autotune configuration for each activation dtype at 3 and 4 bits (fp16 codebooks, bias), and the
    split-K partial-sum form of the fp16 decode tiles."""
    from .aot import ACT_DTYPES, Variant

    for dt, act in ACT_DTYPES.items():
        for cfg in _cuda_configs(dt == "fp32"):
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            for bits in (3, 4):
                metas = [dict(PARTIAL=False, HAS_BIAS=True)]
                if dt == "fp16" and cfg.kwargs["BLOCK_M"] == 16:
                    metas.append(dict(PARTIAL=True, HAS_BIAS=False))
                for meta in metas:
                    out = "*fp32" if meta["PARTIAL"] else act
                    types = dict(x_ptr=act, c_ptr="*i32", t_ptr="*fp16", b_ptr=act, out_ptr=out)
                    const = dict(BITS=bits, DOT_FP32=False, **meta, **cfg.kwargs)
                    label = f"{dt} {tile} w{cfg.num_warps} s{cfg.num_stages} {bits}-bit" + (" split-K" if meta["PARTIAL"] else "")
                    yield Variant(_lut_gemm_kernel, types, const, cfg.num_warps, cfg.num_stages, label)
