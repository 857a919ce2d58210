"""Integer GEMM on quantized activations and weights: W4A4, W4A8, W8A8 (and W8A4).

    acc[m, n] = sum_k qx[m, k] * qw[n, k]              (int32, exact)
    y[m, n]   = acc * s_w[n] * s_x[m] (+ bias[n])       (fp32 epilogue, stored in the activation dtype;
                                                        the simulation's `int_linear`, in its order)

Activations come from `act_quant` (per-token symmetric codes: int8 (M, K), or 4-bit codes
packed 8 per int32 along K); weights are the on-disk ``weight_packed`` (4- or 8-bit fields,
per-channel or per-tensor symmetric scales), read in place. Hopper has no int4 tensor-core MMA:
both operands are unpacked to int8 in registers and meet in an int8 `tl.dot` with an int32
accumulator. Group-wise or asymmetric weights do not factor out of the integer sum this way;
`PackedLinear` serves those with activation fake-quant + `w4a16_gemm` instead.

- `w4a4_gemm_ref` / `w8a8_gemm_ref`: torch oracles (the integer product in float64, exact for
  |acc| < 2^53, so it also runs on CUDA where integer matmul does not).
- `_w4a4_gemm_kernel`: Triton, one kernel for every width pair (constexpr A_BITS / W_BITS).
- `w4a4_gemm` / `w8a8_gemm` / `int_gemm`: checks, allocates, launches. ``out_dtype=torch.int32``
  returns the raw accumulator (the tests compare it exactly).
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


def _channel_scale(s: torch.Tensor, N: int) -> torch.Tensor:
    if s.dim() == 2 and s.shape[1] != 1:
        raise ValueError(f"weight scale {tuple(s.shape)} has {s.shape[1]} groups per row; the integer GEMM needs "
                         "per-channel (N, 1) or per-tensor (1, 1) scales (group-wise weights: fake-quant x + w4a16_gemm)")
    s = s.reshape(-1).float()
    if s.numel() not in (1, N):
        raise ValueError(f"weight scale has {s.numel()} values; need {N} (per channel) or 1 (per tensor)")
    return s.expand(N)


def int_gemm_ref(
    a: torch.Tensor, s_x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, *,
    in_features: int, w_bits: int, a_packed: bool = False, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch oracle. a: int8 codes (..., K) or packed int4 words (M, ceil(K/8)); s_x (M,)."""
    K = int(in_features)
    qa = unpack(a, 4, K) if a_packed else a.reshape(-1, K)  # (M, K) int8
    qw = unpack(weight_packed, w_bits, K)  # (N, K) int8
    acc = (qa.double() @ qw.double().t()).to(torch.int32)  # exact: |acc| < 2^53
    lead = a.shape[:-1] if not a_packed else (qa.shape[0],)
    if out_dtype == torch.int32:
        return acc.reshape(*lead, -1)
    y = acc.float() * _channel_scale(weight_scale, qw.shape[0])[None, :] * s_x.reshape(-1, 1).float()  # `int_linear`'s order
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, -1)


def w4a4_gemm_ref(a, s_x, weight_packed, weight_scale, *, in_features, a_packed=False, bias=None, out_dtype=torch.float32):
    """Oracle for 4-bit weights (and 4- or 8-bit activation codes)."""
    return int_gemm_ref(a, s_x, weight_packed, weight_scale, in_features=in_features, w_bits=4,
                        a_packed=a_packed, bias=bias, out_dtype=out_dtype)


def w8a8_gemm_ref(a, s_x, weight_packed, weight_scale, *, in_features, bias=None, out_dtype=torch.float32):
    """Oracle for 8-bit weights and int8 activation codes."""
    return int_gemm_ref(a, s_x, weight_packed, weight_scale, in_features=in_features, w_bits=8,
                        bias=bias, out_dtype=out_dtype)


if triton is not None:

    @triton.jit
    def _w4a4_gemm_kernel(
        a_ptr, sa_ptr, w_ptr, sw_ptr, b_ptr, out_ptr,
        M, N, K, M_BUCKET,
        stride_am, stride_ak,
        stride_wn, stride_ww,
        stride_swn,
        stride_om, stride_on,
        A_PACKED: tl.constexpr,  # activations: 4-bit codes packed 8 per int32 along K (else int8 codes)
        W_BITS: tl.constexpr,  # 4 or 8: width of the weight fields in the int32 words
        HAS_BIAS: tl.constexpr,
        EPILOGUE: tl.constexpr,  # False: store the int32 accumulator
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a_mask = m_mask[:, None] & k_mask[None, :]
            if A_PACKED:  # (BM, BK / 8) words -> (BM, BK / 8, 8) fields -> (BM, BK) codes
                offs_aw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                aw = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_aw[None, :] * stride_ak,
                             mask=m_mask[:, None] & (offs_aw * 8 < K)[None, :], other=0)
                qa = tl.reshape(((aw[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15) - 8, (BLOCK_M, BLOCK_K))
                a = tl.where(a_mask, qa, 0).to(tl.int8)  # zero past K
            else:
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0)
            w = int_weight_tile(w_ptr, offs_n, n_mask, k0, K, stride_wn, stride_ww, W_BITS, BLOCK_K, BLOCK_N)  # (BK, BN)
            acc += tl.dot(a, w, out_dtype=tl.int32)

        out_mask = m_mask[:, None] & n_mask[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        if EPILOGUE:
            sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=0.0)
            sw = tl.load(sw_ptr + offs_n * stride_swn, mask=n_mask, other=0.0)
            y = acc.to(tl.float32) * sw[None, :] * sa[:, None]  # s_w first: `quant.primitives.int_linear`'s order
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.store(out_ptrs, acc, mask=out_mask)

    def _cuda_configs():
        cfgs = []
        # none spills or overflows shared memory on sm_80/90/100 (`lmpress.kernels.aot`)
        for bm, bn, bk, warps, stages in [
            (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (32, 64, 128, 4, 4),
            (64, 64, 128, 8, 4), (64, 128, 128, 8, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
        ]:
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                      num_warps=warps, num_stages=stages))
        return cfgs

    def _prune(configs, named_args, **kwargs):
        mb = named_args["M_BUCKET"]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mb) and (mb > 16 or c.kwargs["BLOCK_M"] == 16)]
        return kept or configs[:1]

    _autotuned = None

    def _cuda_kernel():
        global _autotuned
        if _autotuned is None:
            _autotuned = triton.autotune(configs=_cuda_configs(), key=["M_BUCKET", "N", "K"],
                                         prune_configs_by={"early_config_prune": _prune})(_w4a4_gemm_kernel)
        return _autotuned


def int_gemm(
    a: torch.Tensor, s_x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, *,
    in_features: int, w_bits: int, a_packed: bool = False, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32, config: dict | None = None,
) -> torch.Tensor:
    """Triton integer GEMM. a: int8 codes (..., K), or packed 4-bit words (M, ceil(K/8)) with
    `a_packed`; s_x fp32 (M,); weight_packed int32 (N, ceil(K*w_bits/32)) as on disk;
    weight_scale (N, 1) or (1, 1). Returns (..., N) in `out_dtype` (int32: the accumulator)."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use int_gemm_ref")
    K = int(in_features)
    if w_bits not in W_BITS:
        raise ValueError(f"w_bits={w_bits}: the integer GEMM reads 4- or 8-bit weight fields")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.int32):
        raise ValueError(f"out_dtype={out_dtype}: use the activation dtype (float16/bfloat16/float32) or int32")
    if a_packed:
        if a.dtype != torch.int32 or a.dim() != 2 or a.shape[1] != packed_cols(K, 4):
            raise ValueError(f"packed activations must be int32 (M, {packed_cols(K, 4)}) for K={K}, got {a.dtype} {tuple(a.shape)}; "
                             "produce them with act_quant(..., packed=True)")
        lead, a2 = (a.shape[0],), a
    else:
        if a.dtype != torch.int8 or a.shape[-1] != K:
            raise ValueError(f"activation codes must be int8 (..., {K}), got {a.dtype} {tuple(a.shape)}; produce them with act_quant")
        lead, a2 = a.shape[:-1], a.reshape(-1, K)
    M = a2.shape[0]
    words = packed_cols(K, w_bits)
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2 or weight_packed.shape[1] != words:
        raise ValueError(f"weight_packed must be int32 (N, {words}) for K={K} at {w_bits} bits, got "
                         f"{weight_packed.dtype} {tuple(weight_packed.shape)}; pack zero-padded codes with formats.pack")
    N = weight_packed.shape[0]
    sw = _channel_scale(weight_scale, N)
    sx = s_x.reshape(-1).float()
    if sx.numel() != M:
        raise ValueError(f"s_x has {sx.numel()} scales for {M} rows of activations")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    device = check_same_device(a=a2, s_x=sx, weight_packed=weight_packed, weight_scale=sw, bias=bias)
    out = torch.empty(M, N, dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    if K == 0:
        out.zero_()
        if bias is not None and out_dtype != torch.int32:
            out += bias.to(out_dtype)
        return out.reshape(*lead, N)
    args = (
        a2, sx, weight_packed, sw, bias if bias is not None else sx, out,
        M, N, K, clamp_pow2(M, 1, 1 << 30),
        a2.stride(0), a2.stride(1),
        weight_packed.stride(0), weight_packed.stride(1),
        sw.stride(0),
        out.stride(0), out.stride(1),
    )
    meta = dict(A_PACKED=a_packed, W_BITS=w_bits, HAS_BIAS=bias is not None, EPILOGUE=out_dtype != torch.int32)
    if interpreting(device) or config is not None:
        cfg = dict(config or {})
        cfg.setdefault("BLOCK_M", clamp_pow2(M, 16, 64))
        cfg.setdefault("BLOCK_N", clamp_pow2(N, 16, 128))
        cfg.setdefault("BLOCK_K", clamp_pow2(K, 32, 128))
        cfg.setdefault("GROUP_M", 8)
        if min(cfg["BLOCK_M"], cfg["BLOCK_N"]) < 16 or cfg["BLOCK_K"] < 32:
            raise ValueError(f"block sizes: BLOCK_M, BLOCK_N >= 16 and BLOCK_K >= 32 (int8 tl.dot), got {cfg}")
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        launchable(_w4a4_gemm_kernel, device)[grid](*args, **meta, **cfg)
    else:
        def grid(META):
            return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)

        _cuda_kernel()[grid](*args, **meta)
    return out.reshape(*lead, N)


def w4a4_gemm(a, s_x, weight_packed, weight_scale, *, in_features, a_packed=False, bias=None,
              out_dtype=torch.float32, config=None):
    """4-bit weights (on disk) x 4-bit (int8 or packed) or 8-bit activation codes."""
    return int_gemm(a, s_x, weight_packed, weight_scale, in_features=in_features, w_bits=4, a_packed=a_packed,
                    bias=bias, out_dtype=out_dtype, config=config)


def w8a8_gemm(a, s_x, weight_packed, weight_scale, *, in_features, bias=None, out_dtype=torch.float32, config=None):
    """8-bit weights (on disk, 4 per int32) x int8 activation codes."""
    return int_gemm(a, s_x, weight_packed, weight_scale, in_features=in_features, w_bits=8, bias=bias,
                    out_dtype=out_dtype, config=config)


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): every
    autotune configuration (int8 activation codes, 4-bit weights, fp16 out, bias), then on one tile
    each other output dtype (int32: no epilogue), packed 4-bit activations and 8-bit weights."""
    from .aot import Variant

    def variant(cfg, label, out="*fp16", a="*i8", **meta):
        types = dict(a_ptr=a, sa_ptr="*fp32", w_ptr="*i32", sw_ptr="*fp32", b_ptr="*fp32", out_ptr=out)
        const = dict(A_PACKED=False, W_BITS=4, HAS_BIAS=True, EPILOGUE=True, **cfg.kwargs)
        const.update(meta)
        return Variant(_w4a4_gemm_kernel, types, const, cfg.num_warps, cfg.num_stages, label)

    configs = _cuda_configs()
    for cfg in configs:
        yield variant(cfg, "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f" w{cfg.num_warps}")
    cfg = configs[0]
    yield variant(cfg, "bf16 out", out="*bf16")
    yield variant(cfg, "fp32 out", out="*fp32")
    yield variant(cfg, "int32 out", out="*i32", EPILOGUE=False, HAS_BIAS=False)
    yield variant(cfg, "packed 4-bit activations", a="*i32", A_PACKED=True)
    yield variant(cfg, "W8A8", W_BITS=8)
