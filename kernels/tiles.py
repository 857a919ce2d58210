"""Triton device functions shared by the GEMM kernels (inlined into each caller when it compiles,
so they have no launch and no ahead-of-time variants of their own)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped tile order: GROUP_M row-tiles in a row share the
    weight columns they read (L2 reuse). Shared by the GEMM kernels."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile over grid axis 0, in `grouped_tile` order: (offs_m (BM,), offs_n (BN,),
    m_mask, n_mask). Shared by the integer GEMMs."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def tile_ranges(M, N, K, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile and K range: (offs_m (BM,), offs_n (BN,), m_mask, n_mask, pid_k, k_lo, k_hi),
    tiles in `grouped_tile` order over grid axis 0, K split in K_SPLIT ranges over axis 1. Shared by the
    dequant-GEMM kernels."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    k_lo = pid_k * K_SPLIT
    return offs_m, offs_n, offs_m < M, offs_n < N, pid_k, k_lo, tl.minimum(k_lo + K_SPLIT, K)


@triton.jit
def dot_acc(acc, a, w, DOT_FP32: tl.constexpr, IS_FP32: tl.constexpr):
    """acc + a @ w with an fp32 accumulator: fp32 copies under the interpreter (`DOT_FP32`: its bf16
    dot is unreliable), IEEE fp32 products for fp32 activations (no TF32), else the tensor-core dot."""
    if DOT_FP32:
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    elif IS_FP32:
        acc += tl.dot(a, w, input_precision="ieee")
    else:
        acc += tl.dot(a, w)
    return acc


@triton.jit
def store_tile(acc, out_ptr, b_ptr, pid_k, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on,
               PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store a (BLOCK_M, BLOCK_N) fp32 tile: as a split-K partial sum at out + pid_k * stride_os
    (`PARTIAL`), or plus the bias, cast to the output dtype."""
    out_mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if PARTIAL:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def int_weight_tile(w_ptr, offs_n, n_mask, k0, K, stride_wn, stride_ww,
                    W_BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The signed weight codes of columns k0..k0+BLOCK_K of rows `offs_n`, transposed for the dot: int8
    (BLOCK_K, BLOCK_N), zero past K and past N. The words hold W_BITS-bit fields with an offset of
    2^(W_BITS-1), `formats.pack`'s layout; each word is loaded once. Shared by the integer GEMMs."""
    W_PER: tl.constexpr = 32 // W_BITS
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_ww = k0 // W_PER + tl.arange(0, BLOCK_K // W_PER)  # (BK / W_PER, BN) words
    ww = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_ww[:, None] * stride_ww,
                 mask=(offs_ww * W_PER < K)[:, None] & n_mask[None, :], other=0)
    fields = (ww[:, None, :] >> (tl.arange(0, W_PER) * W_BITS)[None, :, None]) & ((1 << W_BITS) - 1)
    qw = tl.reshape(fields, (BLOCK_K, BLOCK_N)) - (1 << (W_BITS - 1))  # (BK / W_PER, W_PER, BN) -> (BK, BN)
    return tl.where((offs_k < K)[:, None] & n_mask[None, :], qw, 0).to(tl.int8)
