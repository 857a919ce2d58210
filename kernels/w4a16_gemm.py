"""Weight-only dequant-GEMM: y = x @ dequant(W)^T + b, W packed as on disk (2/4/8-bit codes).

- `w4a16_gemm_ref`: the torch oracle (unpack + `lmpress.quant.primitives.dequantize` + F.linear).
- `_w4a16_gemm_kernel`: Triton. Each program owns a BLOCK_M x BLOCK_N output tile and walks
  its share of K: it loads the BLOCK_K / (32 / bits) x BLOCK_N int32 words that hold a slab
  of codes (each once), shifts and masks the fields out in registers (a broadcast shift over a
  (words, 32 / bits, N) view reshaped to (BLOCK_K, BLOCK_N)), dequantizes them exactly as the reference does,
  ``(q - zero) * scale`` in fp32, casts to the activation dtype and feeds `tl.dot` (fp32
  accumulator; IEEE fp32 products for fp32 activations, no TF32).
- `w4a16_gemm`: checks, allocates, chooses split-K, launches.

Weight layouts (`lmpress.kernels.formats`): ``"nk"`` is the on-disk ``weight_packed``
(out, words) and is read in place; ``"kn"`` is `formats.to_kn_layout` (words, out), the same
words transposed so adjacent output channels are adjacent in memory (coalesced on GPUs). The
kernel only sees strides, so both run through the same code.

Quantization parameters: ``scale`` / ``zero_point`` float32 (out|1, n_groups) as stored;
``group_size=None`` means one group per row (channel granularity; a (1, 1) scale is tensor
granularity); a last partial group (K % group_size != 0) is handled. Asymmetric schemes pass
their zero point, symmetric ones pass None.

Split-K (decode, M <= 16): K is cut into ``split_k`` ranges whose partial sums land in an fp32
workspace (split, M, N) and are summed in a fixed order (deterministic), then bias and cast.
On CUDA the tile sizes are autotuned; under the interpreter (CPU tensors) one config is used,
chosen from the shape (the interpreter costs per block iteration, so blocks are large).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmpress.quant.primitives import dequantize
from lmpress.quant.scheme import QuantArgs

from .dispatch import check_same_device, clamp_pow2, interpreting, launchable
from .formats import from_kn_layout, packed_cols, unpack

try:
    import triton
    import triton.language as tl

    from .tiles import dot_acc, store_tile, tile_ranges
except ImportError:  # pragma: no cover - triton is a dependency; the reference still works
    triton = None

KERNEL_BITS = (2, 4, 8)  # widths whose fields never straddle an int32 word
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def weight_args(bits: int, group_size: int | None, scale: torch.Tensor, symmetric: bool) -> QuantArgs:
    """The QuantArgs that `dequantize` needs to expand stored qparams of this shape."""
    if group_size:
        return QuantArgs(bits=bits, granularity="group", group_size=int(group_size), symmetric=symmetric)
    return QuantArgs(bits=bits, granularity="tensor" if scale.shape[0] == 1 else "channel", symmetric=symmetric)


def w4a16_gemm_ref(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    *,
    in_features: int, group_size: int | None, bits: int = 4, bias: torch.Tensor | None = None, layout: str = "nk",
) -> torch.Tensor:
    """Torch oracle: F.linear(x, dequantize(unpack(W)) in x.dtype, bias)."""
    packed = from_kn_layout(weight_packed, bits) if layout == "kn" else weight_packed
    q = unpack(packed, bits, in_features)  # (N, K) int8
    args = weight_args(bits, group_size, weight_scale, weight_zero_point is None)
    zero = weight_zero_point if weight_zero_point is not None else torch.zeros_like(weight_scale)
    w = dequantize(q, weight_scale, zero, args, dtype=x.dtype)  # (N, K)
    return F.linear(x, w, bias)


if triton is not None:

    @triton.jit
    def _w4a16_gemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, K, K_SPLIT, M_BUCKET,
        stride_xm, stride_xk,
        stride_wn, stride_ww,
        stride_sn, stride_sg,
        stride_zn, stride_zg,
        stride_os, stride_om, stride_on,
        BITS: tl.constexpr,
        GROUP_SIZE: tl.constexpr,  # 0: one group per row
        HAS_ZERO: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PARTIAL: tl.constexpr,  # split-K: store fp32 partial sums at out + pid_k * stride_os, no bias
        DOT_FP32: tl.constexpr,  # interpreter: run the dot on fp32 copies (its bf16 dot is unreliable)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        PER: tl.constexpr = 32 // BITS
        OFFSET: tl.constexpr = 1 << (BITS - 1)
        FIELD: tl.constexpr = (1 << BITS) - 1
        IS_FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32

        offs_m, offs_n, m_mask, n_mask, pid_k, k_lo, k_hi = tile_ranges(M, N, K, K_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)

        if GROUP_SIZE == 0:  # one scale (and zero) per output channel, loaded once
            s_row = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)  # (BN,)
            if HAS_ZERO:
                z_row = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0.0)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            k_mask = offs_k < k_hi
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0,
            )  # (BM, BK), zero past K: the k-tail of the weight tile then contributes nothing
            w_mask = k_mask[:, None] & n_mask[None, :]
            offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)  # the words holding this slab's k
            words = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_w[:, None] * stride_ww,
                mask=(offs_w * PER < k_hi)[:, None] & n_mask[None, :], other=0,
            )  # (BK / PER, BN) int32, each word loaded once
            fields = (words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & FIELD  # (BK/PER, PER, BN)
            u = tl.reshape(fields, (BLOCK_K, BLOCK_N))  # row w * PER + j = element k0 + w * PER + j: q + OFFSET
            q = (u - OFFSET).to(tl.float32)  # past K: garbage, multiplied by the zero activations
            # dequantize: (q - zero) * scale in fp32, the reference's operations, per group layout
            if GROUP_SIZE == 0:  # one group per row
                if HAS_ZERO:
                    w = (q - z_row[None, :]) * s_row[None, :]
                else:
                    w = q * s_row[None, :]
            elif GROUP_SIZE % BLOCK_K == 0:  # the whole slab lies in one group (k0 is BLOCK_K-aligned)
                g = k0 // GROUP_SIZE
                s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)[None, :]
                if HAS_ZERO:
                    z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0.0)[None, :]
                    w = (q - z) * s
                else:
                    w = q * s
            elif BLOCK_K % GROUP_SIZE == 0:  # whole groups: one scale row per group, broadcast over it
                g = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)  # (BK / G,)
                g_mask = (g < (K + GROUP_SIZE - 1) // GROUP_SIZE)[:, None] & n_mask[None, :]
                s3 = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=g_mask, other=0.0)
                q3 = tl.reshape(q, (BLOCK_K // GROUP_SIZE, GROUP_SIZE, BLOCK_N))
                if HAS_ZERO:
                    z3 = tl.load(z_ptr + offs_n[None, :] * stride_zn + g[:, None] * stride_zg, mask=g_mask, other=0.0)
                    w = tl.reshape((q3 - z3[:, None, :]) * s3[:, None, :], (BLOCK_K, BLOCK_N))
                else:
                    w = tl.reshape(q3 * s3[:, None, :], (BLOCK_K, BLOCK_N))
            else:  # ragged groups (neither size divides the other): gather per element
                g = offs_k // GROUP_SIZE
                s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=w_mask, other=0.0)
                if HAS_ZERO:
                    z = tl.load(z_ptr + offs_n[None, :] * stride_zn + g[:, None] * stride_zg, mask=w_mask, other=0.0)
                    w = (q - z) * s
                else:
                    w = q * s
            acc = dot_acc(acc, a, w.to(x_ptr.dtype.element_ty), DOT_FP32, IS_FP32)

        store_tile(acc, out_ptr, b_ptr, pid_k, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on,
                   PARTIAL, HAS_BIAS)

    def _cuda_configs(fp32: bool = False):
        """Autotune configurations; none spills or overflows shared memory on sm_80/90/100 (`lmpress.kernels.aot`).
        fp32 activations take an FMA dot (IEEE, no TF32) that holds both operands in registers: small tiles."""
        if fp32:
            tiles = [(16, 32, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 4, 2), (16, 64, 64, 8, 2),
                     (16, 128, 32, 8, 2), (32, 64, 32, 8, 2), (64, 64, 32, 8, 2)]
        else:
            tiles = [
                # decode (M <= 16): narrow N tiles, deep K, many programs (with split-K)
                (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
                (16, 32, 256, 4, 3), (16, 128, 64, 4, 4), (16, 64, 64, 4, 4), (16, 32, 64, 4, 4),
                # small batch
                (32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 8, 4),
                # prefill
                (64, 128, 64, 8, 3), (128, 64, 64, 8, 4), (128, 128, 32, 8, 4),
                (128, 256, 32, 8, 3),
            ]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                              num_stages=stages) for bm, bn, bk, warps, stages in tiles]

    def prune_by_m(configs, named_args, **kwargs):
        """Decode (M <= 16) takes the BLOCK_M = 16 tiles; larger M the tiles no taller than it (fp_gemm too)."""
        mb = named_args["M_BUCKET"]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mb) and (mb > 16 or c.kwargs["BLOCK_M"] == 16)]
        return kept or configs[:1]

    _autotuned = {}

    def _cuda_kernel(fp32: bool):
        if fp32 not in _autotuned:
            _autotuned[fp32] = triton.autotune(
                configs=_cuda_configs(fp32),
                key=["M_BUCKET", "N", "K", "K_SPLIT"],
                prune_configs_by={"early_config_prune": prune_by_m},
            )(_w4a16_gemm_kernel)
        return _autotuned[fp32]


MAX_BLOCK_K = 256  # split-K ranges are multiples of this, so every config's BLOCK_K divides them


def choose_split(M: int, N: int, K: int, device: torch.device) -> int:
    """Split K when the output alone gives too few programs to fill the GPU (decode)."""
    if M > 16 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = -(-N // 64)
    split = 1
    while tiles * split * 2 <= 2 * sms and K // (split * 2) >= 2 * MAX_BLOCK_K:
        split *= 2
    return split


def gemm_output(x: torch.Tensor, K: int, N: int, bias: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(x2, out, done) for a dequant-GEMM y = x @ W^T + bias: x (..., K) as x2 (M, K) (a view when it can
    be), the output (M, N) in x.dtype, and whether it is already final (nothing to launch: M or N is 0,
    or K is 0 and the output is the bias). Shared by `w4a16_gemm`, `fp_gemm` and `lut_gemm`."""
    x2 = x.reshape(-1, K)  # (..., K) -> (M, K)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=device)  # (M, N)
    if out.numel() == 0:
        return x2, out, True
    if K == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return x2, out, True
    return x2, out, False


@dataclass(frozen=True)
class SplitPlan:
    """How a dequant-GEMM launch covers K (shared by `w4a16_gemm` and `fp_gemm`): `k_split` columns a
    program along the grid's second axis (`n_split` of them; more than one writes fp32 partial sums
    summed afterwards in a fixed order, so deterministic), and `cfg`, the pinned tile (the
    interpreter, tests), or None for the CUDA autotuner."""

    M: int
    N: int
    k_split: int
    n_split: int
    cfg: dict | None
    interp: bool

    @classmethod
    def make(cls, M: int, N: int, K: int, device: torch.device, split_k: int | None, config: dict | None) -> "SplitPlan":
        interp = interpreting(device)
        split = split_k if split_k is not None else choose_split(M, N, K, device)
        if interp or config is not None:
            cfg = dict(config or {})
            cfg.setdefault("BLOCK_M", clamp_pow2(M, 16, 64))
            cfg.setdefault("BLOCK_N", clamp_pow2(N, 16, 128))
            cfg.setdefault("BLOCK_K", clamp_pow2(-(-K // max(split, 1)), 16, 128))
            cfg.setdefault("GROUP_M", 8)
            if min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) < 16:
                raise ValueError(f"block sizes must be >= 16 (tl.dot), got {cfg}")
            align = cfg["BLOCK_K"]
        else:
            cfg, align = None, MAX_BLOCK_K
        k_split = -(-(-(-K // max(split, 1))) // align) * align  # ceil(K / split) rounded up to the alignment
        return cls(M, N, k_split, -(-K // k_split), cfg, interp)

    @property
    def partial(self) -> bool:
        return self.n_split > 1

    def target(self, out: torch.Tensor) -> torch.Tensor:
        """Where the kernel writes: (splits, M, N) fp32 partial sums, or `out` (M, N) as (1, M, N)."""
        if self.partial:
            return torch.empty(self.n_split, self.M, self.N, dtype=torch.float32, device=out.device)
        return out.unsqueeze(0)

    def launch(self, kernel, autotuned, args: tuple, meta: dict, bias, device: torch.device) -> None:
        """Run `kernel` with the pinned tile, or `autotuned` (its CUDA autotuner) when there is none."""
        meta = dict(meta, HAS_BIAS=bias is not None and not self.partial, PARTIAL=self.partial, DOT_FP32=self.interp)
        if self.cfg is not None:
            grid = (triton.cdiv(self.M, self.cfg["BLOCK_M"]) * triton.cdiv(self.N, self.cfg["BLOCK_N"]), self.n_split)
            launchable(kernel, device)[grid](*args, **meta, **self.cfg)
        else:
            def grid(META):
                return (triton.cdiv(self.M, META["BLOCK_M"]) * triton.cdiv(self.N, META["BLOCK_N"]), self.n_split)

            autotuned[grid](*args, **meta)

    def finish(self, target: torch.Tensor, out: torch.Tensor, bias) -> None:
        if self.partial:
            acc = target.sum(0)  # (M, N), fixed order: deterministic
            if bias is not None:
                acc += bias.float()
            out.copy_(acc)


def w4a16_gemm(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    *,
    in_features: int, group_size: int | None, bits: int = 4, bias: torch.Tensor | None = None, layout: str = "nk",
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequant(W)^T + bias, in x.dtype, through the Triton kernel.

    `split_k`: None picks it (CUDA, M <= 16); an int forces it. `config`: BLOCK_M/BLOCK_N/
    BLOCK_K (>= 16, powers of two) to pin the tile (tests); default: autotuned on CUDA, chosen
    from the shape under the interpreter.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use w4a16_gemm_ref")
    K = int(in_features)
    if bits not in KERNEL_BITS:
        raise ValueError(f"w4a16_gemm handles {list(KERNEL_BITS)}-bit weights; {bits}-bit fields straddle int32 words: use w4a16_gemm_ref")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}: cast them first")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {K}")
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(f"weight_packed must be int32 words (2-D), got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    words = packed_cols(K, bits)
    if layout == "nk":
        N, have = weight_packed.shape
        stride_wn, stride_ww = weight_packed.stride()
    elif layout == "kn":
        have, N = weight_packed.shape
        stride_ww, stride_wn = weight_packed.stride()
    else:
        raise ValueError(f"layout={layout!r}: use 'nk' (on disk, (out, words)) or 'kn' (formats.to_kn_layout)")
    if have != words:
        raise ValueError(
            f"K={K} codes of {bits} bits need {words} int32 words per output channel, weight_packed has {have}; "
            f"pack the codes zero-padded to a multiple of {32 // bits} columns with formats.pack"
        )
    ng = -(-K // group_size) if group_size else 1
    if weight_scale.dim() != 2 or weight_scale.shape[1] != ng or weight_scale.shape[0] not in (1, N):
        raise ValueError(f"weight_scale must be ({N} or 1, {ng}) for K={K}, group_size={group_size}; got {tuple(weight_scale.shape)}")
    if weight_zero_point is not None and weight_zero_point.shape != weight_scale.shape:
        raise ValueError(f"weight_zero_point {tuple(weight_zero_point.shape)} must match weight_scale {tuple(weight_scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    device = check_same_device(x=x, weight_packed=weight_packed, weight_scale=weight_scale,
                               weight_zero_point=weight_zero_point, bias=bias)

    x2, out, done = gemm_output(x, K, N, bias, device)  # (M, K), (M, N)
    if done:
        return out.reshape(*x.shape[:-1], N)
    M = x2.shape[0]
    scale = weight_scale.float()
    zero = weight_zero_point.float() if weight_zero_point is not None else scale  # dummy when absent
    stride_sn = scale.stride(0) if scale.shape[0] == N and N > 1 else 0
    stride_zn = zero.stride(0) if zero.shape[0] == N and N > 1 else 0

    plan = SplitPlan.make(M, N, K, device, split_k, config)
    target = plan.target(out)  # (splits, M, N)

    args = (
        x2, weight_packed, scale, zero, bias if bias is not None else scale, target,
        M, N, K, plan.k_split, clamp_pow2(M, 1, 1 << 30),
        x2.stride(0), x2.stride(1),
        stride_wn, stride_ww,
        stride_sn, scale.stride(1),
        stride_zn, zero.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
    )
    meta = dict(BITS=bits, GROUP_SIZE=int(group_size) if group_size else 0, HAS_ZERO=weight_zero_point is not None)
    plan.launch(_w4a16_gemm_kernel, _cuda_kernel(x.dtype == torch.float32) if plan.cfg is None else None, args, meta,
                bias, device)
    plan.finish(target, out, bias)
    return out.reshape(*x.shape[:-1], N)


def aot_variants():
    """What the CUDA path launches, for the ahead-of-time compile check (`lmpress.kernels.aot`): every
    autotune configuration for each activation dtype (4-bit, groups of 128, zero point, bias), the
    split-K partial-sum form of the decode tiles, and 2/8-bit and per-channel weights on one tile."""
    from .aot import ACT_DTYPES, Variant

    def variant(act, cfg, label, **meta):
        out = "*fp32" if meta.get("PARTIAL") else act
        types = dict(x_ptr=act, w_ptr="*i32", s_ptr="*fp32", z_ptr="*fp32", b_ptr=act, out_ptr=out)
        const = dict(BITS=4, GROUP_SIZE=128, HAS_ZERO=True, HAS_BIAS=True, PARTIAL=False, DOT_FP32=False, **cfg.kwargs)
        const.update(meta)
        return Variant(_w4a16_gemm_kernel, types, const, cfg.num_warps, cfg.num_stages, label)

    for dt, act in ACT_DTYPES.items():
        configs = _cuda_configs(dt == "fp32")
        for cfg in configs:
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            yield variant(act, cfg, f"{dt} {tile} w{cfg.num_warps} s{cfg.num_stages}")
            if dt == "fp16" and cfg.kwargs["BLOCK_M"] == 16:
                yield variant(act, cfg, f"{dt} {tile} split-K", PARTIAL=True, HAS_BIAS=False)
        cfg = configs[1]
        for bits in (2, 8):
            yield variant(act, cfg, f"{dt} {bits}-bit", BITS=bits)
        yield variant(act, cfg, f"{dt} per-channel symmetric", GROUP_SIZE=0, HAS_ZERO=False)
