"""COMET's W4Ax GEMM: 4-bit (or 8-bit) weights x activations whose channel groups are 4- or 8-bit.

    acc_g[m, n] = sum_{k in group g} qx[m, k] * qw[n, k]          (int32, exact)
    y[m, n]     = s_w[n] * sum_g acc_g[m, n] * s_x[m, g] (+ bias[n]) (fp32, stored in the activation dtype)

The activation codes (int8 (M, K)) and their per-token-group scales (fp32 (M, n_groups)) come from
`quant.fmpq.fmpq_quantize`, with the channels reordered so that the 8-bit (outlier) groups lead;
both widths sit in int8 containers, so one `tl.dot` serves every group and the mixed precision
costs nothing in the inner loop. The weights are symmetric per-channel (or per-tensor) codes
packed as `formats.pack` lays them out (4- or 8-bit fields in int32 words), with their columns in
the same channel order as the activations (`PackedLinear` keeps that copy next to the on-disk
words). One K step is one activation group (BLOCK_K = group_size, a power of two >= 32).

- `w4ax_gemm_ref`: torch oracle (each group's integer product in float64, exact).
- `_w4ax_gemm_kernel`: Triton.
- `w4ax_gemm`: checks, allocates, launches. ``out_dtype=torch.float32`` for the tests.
"""
from __future__ import annotations

import torch

from .dispatch import check_same_device, clamp_pow2, interpreting, launchable
from .formats import packed_cols, unpack

try:
    import triton
    import triton.language as tl

    from .tiles import int_weight_tile, tile_offsets
except ImportError:  # pragma: no cover
    triton = None

W_BITS = (4, 8)


def _check(codes, s_x, weight_packed, weight_scale, K: int, group_size: int, w_bits: int):
    if w_bits not in W_BITS:
        raise ValueError(f"w_bits={w_bits}: the W4Ax GEMM reads 4- or 8-bit weight fields (repack others to 8 bits)")
    if codes.dtype != torch.int8 or codes.shape[-1] != K:
        raise ValueError(f"activation codes must be int8 (..., {K}), got {codes.dtype} {tuple(codes.shape)}; "
                         "produce them with quant.fmpq.fmpq_quantize")
    M = codes.reshape(-1, K).shape[0]
    n_groups = -(-K // group_size)
    if tuple(s_x.reshape(M, -1).shape) != (M, n_groups):
        raise ValueError(f"s_x must be ({M}, {n_groups}): one scale per token and group of {group_size} channels, "
                         f"got {tuple(s_x.shape)}")
    words = packed_cols(K, w_bits)
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2 or weight_packed.shape[1] != words:
        raise ValueError(f"weight_packed must be int32 (N, {words}) for K={K} at {w_bits} bits, got "
                         f"{weight_packed.dtype} {tuple(weight_packed.shape)}")
    N = weight_packed.shape[0]
    s = weight_scale.reshape(-1).float()
    if weight_scale.dim() == 2 and weight_scale.shape[1] != 1 or s.numel() not in (1, N):
        raise ValueError(f"weight scale {tuple(weight_scale.shape)}: the W4Ax GEMM needs per-channel (N, 1) or per-tensor (1, 1)")
    return M, N, s.expand(N)


def w4ax_gemm_ref(codes: torch.Tensor, s_x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, *,
                  in_features: int, group_size: int, w_bits: int = 4, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch oracle: codes int8 (..., K), s_x (M, n_groups), weight words (N, K*w_bits/32) in the same channel order."""
    K = int(in_features)
    M, N, sw = _check(codes, s_x, weight_packed, weight_scale, K, group_size, w_bits)
    qa = codes.reshape(M, K).double()  # (M, K)
    qw = unpack(weight_packed, w_bits, K).double()  # (N, K)
    sx = s_x.reshape(M, -1).double()
    y = torch.zeros(M, N, dtype=torch.float64, device=codes.device)
    for g, k0 in enumerate(range(0, K, group_size)):
        acc = qa[:, k0:k0 + group_size] @ qw[:, k0:k0 + group_size].t()  # exact integers
        y += acc.float().double() * sx[:, g:g + 1]  # as the kernel: int32 -> fp32, times the group scale
    y = y.float() * sw[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*codes.shape[:-1], N)


if triton is not None:

    @triton.jit
    def _w4ax_gemm_kernel(
        a_ptr, sa_ptr, w_ptr, sw_ptr, b_ptr, out_ptr,
        M, N, K, M_BUCKET,
        stride_am, stride_ak,
        stride_sam, stride_sag,
        stride_wn, stride_ww,
        stride_om, stride_on,
        W_BITS: tl.constexpr,  # 4 or 8: width of the weight fields in the int32 words
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # BLOCK_K is the activation group size: one scale per token for each K step
        offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=m_mask[:, None] & k_mask[None, :], other=0)  # (BM, BK) int8, 4- or 8-bit codes
            w = int_weight_tile(w_ptr, offs_n, n_mask, k0, K, stride_wn, stride_ww, W_BITS, BLOCK_K, BLOCK_N)  # (BK, BN)
            acc = tl.dot(a, w, out_dtype=tl.int32)  # exact
            sa = tl.load(sa_ptr + offs_m * stride_sam + (k0 // BLOCK_K) * stride_sag, mask=m_mask, other=0.0)
            y += acc.to(tl.float32) * sa[:, None]

        sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0)
        y = y * sw[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, y.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    def _cuda_configs():
        # BLOCK_K is fixed by the group size; (BLOCK_M, BLOCK_N, warps, stages); 128 x 128 spills on sm_80
        return [(16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 8, 4), (64, 128, 8, 4), (128, 64, 8, 3)]

    _autotuned = None

    def _cuda_kernel():
        global _autotuned
        if _autotuned is None:
            cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
                    for bm, bn, w, s in _cuda_configs()]

            def prune(configs, named_args, **kwargs):
                mb = named_args["M_BUCKET"]
                kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mb) and (mb > 16 or c.kwargs["BLOCK_M"] == 16)]
                return kept or configs[:1]

            _autotuned = triton.autotune(configs=cfgs, key=["M_BUCKET", "N", "K", "BLOCK_K"],
                                         prune_configs_by={"early_config_prune": prune})(_w4ax_gemm_kernel)
        return _autotuned


def w4ax_gemm(codes: torch.Tensor, s_x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, *,
              in_features: int, group_size: int, w_bits: int = 4, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32, config: dict | None = None) -> torch.Tensor:
    """Triton W4Ax GEMM; arguments as `w4ax_gemm_ref`. Returns (..., N) in `out_dtype`."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use w4ax_gemm_ref")
    K, G = int(in_features), int(group_size)
    if G < 32 or G & (G - 1):
        raise ValueError(f"group_size={G}: the W4Ax kernel takes one group a K step, a power of two >= 32 (int8 tl.dot)")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype={out_dtype}: use the activation dtype (float16/bfloat16/float32)")
    M, N, sw = _check(codes, s_x, weight_packed, weight_scale, K, G, w_bits)
    lead, a2, sx = codes.shape[:-1], codes.reshape(M, K), s_x.reshape(M, -1).float()
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    device = check_same_device(codes=a2, s_x=sx, weight_packed=weight_packed, weight_scale=sw, bias=bias)
    sw = sw.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    args = (a2, sx, weight_packed, sw, bias if bias is not None else sw, out,
            M, N, K, clamp_pow2(M, 1, 1 << 30),
            a2.stride(0), a2.stride(1), sx.stride(0), sx.stride(1),
            weight_packed.stride(0), weight_packed.stride(1), out.stride(0), out.stride(1))
    meta = dict(W_BITS=w_bits, HAS_BIAS=bias is not None, BLOCK_K=G)
    if interpreting(device) or config is not None:
        cfg = dict(config or {})
        cfg.setdefault("BLOCK_M", clamp_pow2(M, 16, 64))
        cfg.setdefault("BLOCK_N", clamp_pow2(N, 16, 128))
        cfg.setdefault("GROUP_M", 8)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        launchable(_w4ax_gemm_kernel, device)[grid](*args, **meta, **cfg)
    else:
        def grid(META):
            return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)

        _cuda_kernel()[grid](*args, **meta)
    return out.reshape(*lead, N)


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): every
    tile configuration at groups of 64 (4-bit weights, fp16 out, bias), then on one tile groups of
    128, bf16 and fp32 out, and 8-bit weights."""
    from .aot import Variant

    def variant(cfg, label, out="*fp16", **meta):
        bm, bn, warps, stages = cfg
        types = dict(a_ptr="*i8", sa_ptr="*fp32", w_ptr="*i32", sw_ptr="*fp32", b_ptr="*fp32", out_ptr=out)
        const = dict(W_BITS=4, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8)
        const.update(meta)
        return Variant(_w4ax_gemm_kernel, types, const, warps, stages, label)

    configs = _cuda_configs()
    for cfg in configs:
        yield variant(cfg, f"{cfg[0]}x{cfg[1]}x64 w{cfg[2]}")
    yield variant(configs[0], "groups of 128", BLOCK_K=128)
    yield variant(configs[0], "bf16 out", out="*bf16")
    yield variant(configs[0], "fp32 out", out="*fp32")
    yield variant(configs[0], "8-bit weights", W_BITS=8)
