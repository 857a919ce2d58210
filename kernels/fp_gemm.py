"""Dequant-GEMM for floating-point weights: y = x @ dequant(W)^T + b, W = FP8 E4M3 or FP4 E2M1 codes.

Formats (`type: float` schemes, `lmpress.quant.fp`): FP8 E4M3 per channel or per tensor (float32
scales), MXFP8 (E4M3 in groups of 32, power-of-two scales), NVFP4 (E2M1 in groups of 16, the E4M3
group scale times the power-of-two tensor scale, stored as one float32) and MXFP4 (E2M1 in groups
of 32, power-of-two scales). The dequantized weight is decode(code) * scale, exactly
`PackedLinear.dequantized_weight()`; there is no zero point.

- `fp_gemm_ref`: the torch oracle (unpack + `lmpress.quant.primitives.dequantize` + F.linear).
- `_fp_gemm_kernel`: Triton. The tiling is `w4a16_gemm`'s: each program owns a BLOCK_M x BLOCK_N
  output tile and walks its share of K, loading the int32 words of a slab of codes once and
  shifting the 8- or 4-bit fields out in registers. A field u is stored offset-binary (u = code +
  2^(bits-1), `kernels.formats.pack`), so the format's bit pattern is p = u ^ 2^(bits-1): sign, then
  exponent e and mantissa m. The magnitude is decoded arithmetically, exactly: an integer
  significand sig = m (+ 2^man when e > 0, the implicit one) times the power of two
  2^(max(e, 1) - bias - man), built from its float32 bits; E4M3 (bias 7, man 3) and E2M1 (bias 1,
  man 1) run the same code. It is then multiplied by its scale in fp32 (the reference's one
  rounding), cast to the activation dtype and fed to `tl.dot` (fp32 accumulator; IEEE fp32
  products for fp32 activations, no TF32). No native FP8/FP4 MMA: the activations are high
  precision here (a scheme that quantizes them is fake-quantized in torch by the caller).
- `fp_gemm`: checks, allocates, chooses split-K, launches.

Layouts: ``weight_packed`` int32 (out, packed_cols(in, bits)) as on disk (`formats.pack`), read in
place; ``weight_scale`` float32 (out|1, n_groups): (out, 1) per channel, (1, 1) per tensor,
(out, in / group_size) for the block formats (in must be a multiple of the group size there).
E4M3's NaN pattern (S.1111.111) is never produced by `encode_fp`; the kernel would read it as 480.

Split-K (decode, M <= 16) and tile choice as in `w4a16_gemm`: fp32 partial sums per K range summed
in a fixed order; autotuned on CUDA, one config from the shape under the interpreter.

Sources: the OCP 8-bit Floating Point Specification (OFP8) rev 1.0 (E4M3: bias 7, subnormals
m/8 * 2^-6) and OCP Microscaling Formats (MX) v1.0 (E2M1: bias 1, values 0, 0.5, 1, 1.5, 2, 3, 4, 6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmpress.quant.primitives import dequantize
from lmpress.quant.scheme import QuantArgs

from .dispatch import check_same_device, clamp_pow2
from .formats import packed_cols, unpack
from .w4a16_gemm import FLOAT_DTYPES, SplitPlan, gemm_output

try:
    import triton
    import triton.language as tl

    from .tiles import dot_acc, store_tile, tile_ranges
    from .w4a16_gemm import prune_by_m
except ImportError:  # pragma: no cover - triton is a dependency; the reference still works
    triton = None


def fp_format_name(args: QuantArgs) -> str:
    """"fp8" (per channel / tensor), "mxfp8", "nvfp4" or "mxfp4": the weight format of a float scheme."""
    return args.block_format or "fp8"


def fp_gemm_ref(
    x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, args: QuantArgs, in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch oracle: F.linear(x, dequantize(unpack(W)) in x.dtype, bias), as PackedLinear's reference."""
    q = unpack(weight_packed, args.bits, int(in_features))  # (N, K) int8 bit patterns
    w = dequantize(q, weight_scale, torch.zeros_like(weight_scale), args, dtype=x.dtype)  # (N, K)
    return F.linear(x, w, bias)


if triton is not None:

    @triton.jit
    def _fp_gemm_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
        M, N, K, K_SPLIT, M_BUCKET,
        stride_xm, stride_xk,
        stride_wn, stride_ww,
        stride_sn, stride_sg,
        stride_os, stride_om, stride_on,
        BITS: tl.constexpr,  # 8: E4M3, 4: E2M1
        GROUP_SIZE: tl.constexpr,  # 0: one scale per row (per channel; per tensor with stride_sn = 0)
        HAS_BIAS: tl.constexpr,
        PARTIAL: tl.constexpr,  # split-K: store fp32 partial sums at out + pid_k * stride_os, no bias
        DOT_FP32: tl.constexpr,  # interpreter: run the dot on fp32 copies (its bf16 dot is unreliable)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        PER: tl.constexpr = 32 // BITS
        OFFSET: tl.constexpr = 1 << (BITS - 1)  # pack's offset, and the sign bit of the pattern
        FIELD: tl.constexpr = (1 << BITS) - 1
        MAN: tl.constexpr = 3 if BITS == 8 else 1  # E4M3 / E2M1 mantissa bits
        EXP: tl.constexpr = BITS - 1 - MAN
        BIAS: tl.constexpr = (1 << (EXP - 1)) - 1
        IS_FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
        tl.static_assert(GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_K == 0 or BLOCK_K % GROUP_SIZE == 0)

        offs_m, offs_n, m_mask, n_mask, pid_k, k_lo, k_hi = tile_ranges(M, N, K, K_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)

        if GROUP_SIZE == 0:  # one scale per output channel, loaded once
            s_row = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)  # (BN,)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & (offs_k < k_hi)[None, :], other=0.0,
            )  # (BM, BK), zero past K: the k-tail of the weight tile then contributes nothing
            offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)  # the words holding this slab's k
            words = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_w[:, None] * stride_ww,
                mask=(offs_w * PER < k_hi)[:, None] & n_mask[None, :], other=0,
            )  # (BK / PER, BN) int32, each word loaded once
            fields = (words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & FIELD  # (BK/PER, PER, BN)
            u = tl.reshape(fields, (BLOCK_K, BLOCK_N))  # row w * PER + j = element k0 + w * PER + j
            # decode: p = sign | exponent | mantissa; |v| = sig * 2^(max(e, 1) - BIAS - MAN), exact in fp32.
            # Every field decodes to a finite value, so those past K (zero activations) or N (not stored) add nothing.
            p = u ^ OFFSET
            e = (p >> MAN) & ((1 << EXP) - 1)
            sig = (p & ((1 << MAN) - 1)) + tl.where(e > 0, 1 << MAN, 0)
            unit = ((tl.maximum(e, 1) + (127 - BIAS - MAN)) << 23).to(tl.float32, bitcast=True)  # a power of two
            v = sig.to(tl.float32) * unit
            v = tl.where(p >= OFFSET, -v, v)  # (BK, BN) the code's value, decode_fp's
            # times the scale in fp32: the reference's one rounding
            if GROUP_SIZE == 0:
                w = v * s_row[None, :]
            elif GROUP_SIZE % BLOCK_K == 0:  # the whole slab lies in one group (k0 is BLOCK_K-aligned)
                s = tl.load(s_ptr + offs_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask, other=0.0)
                w = v * s[None, :]
            else:  # whole groups: one scale row per group, broadcast over it
                g = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)  # (BK / G,)
                g_mask = (g < K // GROUP_SIZE)[:, None] & n_mask[None, :]
                s3 = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=g_mask, other=0.0)
                v3 = tl.reshape(v, (BLOCK_K // GROUP_SIZE, GROUP_SIZE, BLOCK_N))  # (BK / G, G, BN)
                w = tl.reshape(v3 * s3[:, None, :], (BLOCK_K, BLOCK_N))  # (BK, BN)
            acc = dot_acc(acc, a, w.to(x_ptr.dtype.element_ty), DOT_FP32, IS_FP32)

        store_tile(acc, out_ptr, b_ptr, pid_k, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on,
                   PARTIAL, HAS_BIAS)

    def _cuda_configs(fp32: bool = False):
        """Autotune configurations (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); none spills or overflows
        shared memory on sm_80/90/100 (`lmpress.kernels.aot`). The decode costs registers: w4a16_gemm's
        16x64x256 and 128x256x32 tiles spill here, and the 32- and 64-row tiles take 8 warps. fp32
        activations take an FMA dot (IEEE, no TF32) that holds both operands in registers: small tiles."""
        if fp32:
            tiles = [(16, 32, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 8, 2), (16, 64, 64, 8, 2), (32, 64, 32, 8, 2)]
        else:
            tiles = [
                # decode (M <= 16): narrow N tiles, deep K, many programs (with split-K)
                (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 64, 4, 4), (16, 32, 64, 4, 4),
                # small batch
                (32, 64, 128, 8, 4), (32, 128, 64, 4, 4), (64, 64, 64, 8, 4), (64, 128, 64, 8, 4),
                # prefill
                (64, 128, 64, 8, 3), (128, 128, 32, 8, 4),
            ]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                              num_stages=stages) for bm, bn, bk, warps, stages in tiles]

    _autotuned = {}

    def _cuda_kernel(fp32: bool):
        if fp32 not in _autotuned:
            _autotuned[fp32] = triton.autotune(
                configs=_cuda_configs(fp32),
                key=["M_BUCKET", "N", "K", "K_SPLIT", "BITS", "GROUP_SIZE"],
                prune_configs_by={"early_config_prune": prune_by_m},
            )(_fp_gemm_kernel)
        return _autotuned[fp32]


def fp_gemm(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    args: QuantArgs, in_features: int, bias: torch.Tensor | None = None,
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequant(W)^T + bias, in x.dtype, through the Triton kernel.

    `args`: the scheme's weight QuantArgs (``type: float``). `split_k`: None picks it (CUDA,
    M <= 16); an int forces it. `config`: BLOCK_M/BLOCK_N/BLOCK_K (>= 16, powers of two) to pin the
    tile (tests); default: autotuned on CUDA, chosen from the shape under the interpreter.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use fp_gemm_ref")
    K = int(in_features)
    if args.type != "float":
        raise ValueError(f"fp_gemm runs type: float weights (FP8, NVFP4, MXFP4), got type {args.type!r}: use w4a16_gemm")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}: cast them first")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {K}")
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(f"weight_packed must be int32 words (2-D), got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    N, words = weight_packed.shape
    if words != packed_cols(K, args.bits):
        raise ValueError(f"K={K} codes of {args.bits} bits need {packed_cols(K, args.bits)} int32 words per output "
                         f"channel, weight_packed has {words}; pack the codes with formats.pack")
    gs = args.group_size if args.granularity == "group" else 0
    if gs and K % gs:
        raise ValueError(f"{fp_format_name(args)} needs in_features a multiple of its group size {gs}, got K={K}")
    ng = K // gs if gs else 1
    if weight_scale.dim() != 2 or weight_scale.shape[1] != ng or weight_scale.shape[0] not in (1, N):
        raise ValueError(f"weight_scale must be ({N} or 1, {ng}) for {fp_format_name(args)} with K={K}; got {tuple(weight_scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    device = check_same_device(x=x, weight_packed=weight_packed, weight_scale=weight_scale, bias=bias)

    x2, out, done = gemm_output(x, K, N, bias, device)  # (M, K), (M, N)
    if done:
        return out.reshape(*x.shape[:-1], N)
    M = x2.shape[0]
    scale = weight_scale.float()
    stride_sn = scale.stride(0) if scale.shape[0] == N and N > 1 else 0  # per tensor: every row reads row 0

    plan = SplitPlan.make(M, N, K, device, split_k, config)
    target = plan.target(out)  # (splits, M, N)

    kargs = (
        x2, weight_packed, scale, bias if bias is not None else scale, target,
        M, N, K, plan.k_split, clamp_pow2(M, 1, 1 << 30),
        x2.stride(0), x2.stride(1),
        weight_packed.stride(0), weight_packed.stride(1),
        stride_sn, scale.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
    )
    plan.launch(_fp_gemm_kernel, _cuda_kernel(x.dtype == torch.float32) if plan.cfg is None else None, kargs,
                dict(BITS=args.bits, GROUP_SIZE=gs), bias, device)
    plan.finish(target, out, bias)
    return out.reshape(*x.shape[:-1], N)


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): every
    autotune configuration for each activation dtype with FP8 per-channel weights and with NVFP4 (the two
    field widths; groups of 16 inside a slab), bias; the split-K partial-sum form of the fp16 decode
    tiles; MXFP4 and MXFP8 (groups of 32) on one tile. FP8 per tensor is per channel with stride 0."""
    from .aot import ACT_DTYPES, Variant

    def variant(act, cfg, label, **meta):
        out = "*fp32" if meta.get("PARTIAL") else act
        types = dict(x_ptr=act, w_ptr="*i32", s_ptr="*fp32", b_ptr=act, out_ptr=out)
        const = dict(BITS=8, GROUP_SIZE=0, HAS_BIAS=True, PARTIAL=False, DOT_FP32=False, **cfg.kwargs)
        const.update(meta)
        return Variant(_fp_gemm_kernel, types, const, cfg.num_warps, cfg.num_stages, label)

    for dt, act in ACT_DTYPES.items():
        configs = _cuda_configs(dt == "fp32")
        for cfg in configs:
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            yield variant(act, cfg, f"{dt} {tile} w{cfg.num_warps} s{cfg.num_stages} fp8")
            yield variant(act, cfg, f"{dt} {tile} w{cfg.num_warps} s{cfg.num_stages} nvfp4", BITS=4, GROUP_SIZE=16)
            if dt == "fp16" and cfg.kwargs["BLOCK_M"] == 16:
                yield variant(act, cfg, f"{dt} {tile} fp8 split-K", PARTIAL=True, HAS_BIAS=False)
        cfg = configs[1]
        yield variant(act, cfg, f"{dt} mxfp4", BITS=4, GROUP_SIZE=32)
        yield variant(act, cfg, f"{dt} mxfp8", BITS=8, GROUP_SIZE=32)
