"""Pure tensor maths of uniform integer quantization.

Conventions (shared by every form: simulated, packed, runtime):
- integer codes are signed, q in [qmin, qmax] = [-2^(b-1), 2^(b-1)-1], held in int8;
- dequantization is (q - zero_point) * scale, zero_point = 0 for symmetric schemes;
- qparams of a 2-D tensor (rows, cols) have shape (rows, n_groups): n_groups = 1 for
  channel/token granularity, ceil(cols / group_size) for group (the last group may be
  partial), and scale/zero_point are (1, 1) for tensor granularity;
- activations (..., cols) are flattened to (rows, cols) for qparams and reshaped back;
- `type: float` schemes (FP8, NVFP4, MXFP4: `lmpress.quant.fp`) use the same shapes, zero_point
  0, and as codes the format's bit patterns (sign bit over the magnitude's index in the grid)
  as signed int8 in [qmin, qmax]: `encode_fp` / `decode_fp`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from .fp import BLOCK_FORMATS, E2M1, E4M3, FPFormat, block_scales, grid_index, grid_values, round_to_grid, tensor_scale
from .fmpq import fmpq_fake_quantize
from .scheme import QuantArgs


def n_groups(cols: int, args: QuantArgs) -> int:
    return math.ceil(cols / args.group_size) if args.granularity in ("group", "block") else 1


def qparam_rows(rows: int, args: QuantArgs) -> int:
    """Rows of a 2-D tensor's qparams: 1 per tensor, one per tile row for blocks, else `rows`."""
    return 1 if args.granularity == "tensor" else math.ceil(rows / args.group_size) if args.granularity == "block" else rows


def _block_amax(x2: torch.Tensor, gs: int) -> torch.Tensor:
    """(rows, cols) -> the absmax of each gs x gs tile, (ceil(rows/gs), ceil(cols/gs)); edge tiles partial."""
    rows, cols = x2.shape
    xp = torch.nn.functional.pad(x2.abs(), (0, (-cols) % gs, 0, (-rows) % gs))  # zeros leave every absmax unchanged
    return xp.reshape(xp.shape[0] // gs, gs, xp.shape[1] // gs, gs).amax(dim=(1, 3))  # (R, gs, C, gs) -> (R, C)


def _group_view(x: torch.Tensor, args: QuantArgs) -> list[torch.Tensor]:
    """Split a (rows, cols) tensor into column blocks, one per qparam column."""
    if args.granularity == "tensor":
        return [x.reshape(1, -1)]
    if args.granularity == "group":
        return list(torch.split(x, args.group_size, dim=1))
    return [x]


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, zero_ste: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer qparams (scale, zero_point) of ranges [lo, hi] (any shape): the range widened to hold
    0 and scaled by `args.clip_ratio`; differentiable in lo and hi through the scale, and with
    `zero_ste` through the zero point too (its rounding straight-through; the same values)."""
    lo = torch.clamp(lo, max=0.0) * args.clip_ratio
    hi = torch.clamp(hi, min=0.0) * args.clip_ratio
    # divide by a tensor on the data's device: CUDA divides by a Python number through its reciprocal
    # (1 ulp off the correctly rounded quotient on H200; the kernels' `div_rn` is exact, as the CPU is)
    div = torch.full((), args.sym_divisor if args.symmetric else args.qmax - args.qmin, dtype=hi.dtype, device=hi.device)
    if args.symmetric:
        scale = torch.maximum(-lo, hi) / div
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / div
        zero = None
    # an all-zero row/group: any scale represents it exactly; 1 keeps it finite in fp16
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.clamp(args.qmin - (round_ste if zero_ste else torch.round)(lo / scale), args.qmin, args.qmax)
    return scale, zero


# --------------------------------------------------------------------------- floating-point grids


def element_format(args: QuantArgs) -> FPFormat:
    """The element grid of a `type: float` scheme: E4M3 at 8 bits, E2M1 at 4."""
    return E4M3 if args.bits == 8 else E2M1


def encode_fp(v: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Values -> the bit patterns of their nearest grid values (ties to even, saturating) as int8
    in [qmin, qmax]: the sign bit over the magnitude's index (a value rounding to 0 is +0)."""
    idx = grid_index(v, element_format(args))
    code = idx + ((v < 0) & (idx > 0)).long() * (1 << (args.bits - 1))
    return torch.where(code > args.qmax, code - (1 << args.bits), code).to(torch.int8)


def decode_fp(q: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Bit patterns (int8) -> their values, float32."""
    u = q.long() % (1 << args.bits)
    half = 1 << (args.bits - 1)
    mag = grid_values(element_format(args), q.device)[u % half]
    return torch.where(u >= half, -mag, mag)


def _float_qparams(x2: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = absmax·clip / the grid's largest value per tensor / row / token, or the block
    format's scales (E8M0 powers of two; NVFP4's E4M3 scale under a per-tensor scale, x2's own
    unless `global_scale` is given)."""
    fmt = BLOCK_FORMATS.get(args.block_format)
    # NVFP4's per-tensor scale is the unclipped tensor's, so every clip ratio (mse_clip's trials)
    # shares it and the group scales stay E4M3 values under one tensor scale
    s_t = global_scale
    if s_t is None and fmt is not None and fmt.scale == "e4m3":
        s_t = tensor_scale(x2, fmt)
    x2 = x2 * args.clip_ratio if args.clip_ratio != 1.0 else x2
    if fmt is not None:
        scale = block_scales(x2, fmt, s_t)  # (rows, n_groups)
    elif args.granularity == "block":
        scale = _block_amax(x2, args.group_size) / element_format(args).max  # (row tiles, col tiles)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        amax = torch.cat([b.abs().amax(dim=1, keepdim=True) for b in _group_view(x2, args)], 1)
        scale = amax / element_format(args).max
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.zeros_like(scale)


def compute_qparams(x: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams of `x` (..., cols) -> (scale, zero_point), each (rows, n_groups) float32.
    `global_scale`: NVFP4's tensor scale, when it is not x's own (a calibrated activation scale)."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (rows, cols)
    if args.type == "float":
        return _float_qparams(x2, args, global_scale)
    return range_to_qparams(*group_range(x2, args), args)


def group_range(x2: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each qparam group of a (rows, cols) tensor, each (rows|1, n_groups)."""
    blocks = _group_view(x2, args)
    return (torch.cat([b.amin(dim=1, keepdim=True) for b in blocks], 1),
            torch.cat([b.amax(dim=1, keepdim=True) for b in blocks], 1))


def expand_qparam(p: torch.Tensor, rows: int, cols: int, args: QuantArgs) -> torch.Tensor:
    """(rows|1, n_groups) -> (rows, cols), repeating each group's value over its columns (and each
    tile's over its rows, for blocks)."""
    if args.granularity in ("group", "block"):
        p = torch.repeat_interleave(p, args.group_size, dim=1)[:, :cols]
    if args.granularity == "block":
        p = torch.repeat_interleave(p, args.group_size, dim=0)[:rows]
    return p.expand(rows, cols)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """x (..., cols) -> int8 codes of the same shape."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (rows, cols)
    rows, cols = x2.shape
    s = expand_qparam(scale.float(), rows, cols, args)
    if args.type == "float":
        return encode_fp(x2 / s, args).reshape(x.shape)
    z = expand_qparam(zero.float(), rows, cols, args)
    q = torch.clamp(torch.round(x2 / s) + z, args.qmin, args.qmax)
    return q.to(torch.int8).reshape(x.shape)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """int codes (..., cols) -> (q - zero) * scale in `dtype`. The one dequantization every form uses."""
    q2 = q.reshape(-1, q.shape[-1])  # (rows, cols)
    rows, cols = q2.shape
    s = expand_qparam(scale.float(), rows, cols, args)
    if args.type == "float":
        return (decode_fp(q2, args) * s).to(dtype).reshape(q.shape)
    z = expand_qparam(zero.float(), rows, cols, args)
    return ((q2.float() - z) * s).to(dtype).reshape(q.shape)


def fake_quantize(x: torch.Tensor, args: QuantArgs, scale=None, zero=None) -> torch.Tensor:
    """Quantize-dequantize in the input's dtype; qparams from `x` itself unless given. A float grid
    takes its values directly (the same numbers as decoding the codes `quantize` gives, but for the
    sign of a zero), not through the codes."""
    if scale is None:
        scale, zero = compute_qparams(x, args)
    if args.type == "float":
        x2 = x.reshape(-1, x.shape[-1]).float()  # (rows, cols)
        s = expand_qparam(scale.float(), x2.shape[0], x2.shape[1], args)
        return (round_to_grid(x2 / s, element_format(args)) * s).to(x.dtype).reshape(x.shape)
    return dequantize(quantize(x, scale, zero, args), scale, zero, args, dtype=x.dtype)


_CONTINUING: ContextVar[bool] = ContextVar("lmpress_continuing_sequence", default=False)


@contextmanager
def continuing_sequence(flag: bool = True):
    """While active with `flag`, the rows a linear sees continue sequences already begun (a decode step
    over a KV cache), so none of them is a sequence's first position (`QuantArgs.sink_tokens`). The
    default, outside it, is that rows along dim -2 start at position 0: every full-sequence forward,
    and the layer-by-layer calibration."""
    token = _CONTINUING.set(flag)
    try:
        yield
    finally:
        _CONTINUING.reset(token)


def sink_rows(x: torch.Tensor, args: QuantArgs | None) -> int:
    """How many leading rows along dim -2 of x (..., T, C) are sink positions that `args.sink_tokens`
    keeps in float: 0 for a 1-D x, when rows continue a sequence, or without sink tokens."""
    if args is None or not args.sink_tokens or x.dim() < 2 or _CONTINUING.get():
        return 0
    return min(args.sink_tokens, x.shape[-2])


def without_sinks(x: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
    """x (..., T, C) without its sink rows (`sink_rows`): what static scales are calibrated on."""
    n = sink_rows(x, args)
    return x[..., n:, :] if n else x


def fake_quantize_input(x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None = None,
                        input_perm: torch.Tensor | None = None) -> torch.Tensor:
    """A scheme's activation fake-quant. Dynamic args, or a static scheme not calibrated yet
    (`input_scale` None): qparams from `x`. Calibrated static: the per-tensor `input_scale` (1, 1),
    or for NVFP4 the group scales of `x` under the tensor scale `input_scale`; the sink rows
    (`args.sink_tokens`, `sink_rows`) are returned unchanged. COMET's 4/8-bit groups
    (`args.outliers`): over the channels reordered by `input_perm` (`quant.fmpq`)."""
    n = sink_rows(x, args) if input_scale is not None else 0
    if n:  # (..., T, C) -> the first n positions in float, the rest on the static grid
        return torch.cat([x[..., :n, :], _fake_quantize_rows(x[..., n:, :], args, input_scale, input_perm)], dim=-2)
    return _fake_quantize_rows(x, args, input_scale, input_perm)


def _fake_quantize_rows(x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None,
                        input_perm: torch.Tensor | None) -> torch.Tensor:
    if args.outliers:
        return fmpq_fake_quantize(x, args, input_perm)
    if args.dynamic or input_scale is None:
        return fake_quantize(x, args)
    if args.block_format is not None:
        scale, zero = compute_qparams(x, args, global_scale=input_scale.reshape(()))
    else:
        scale = input_scale.float().reshape(1, 1)
        zero = torch.zeros_like(scale)
    return fake_quantize(x, args, scale, zero)


def int_factored(weights: QuantArgs | None, inputs: QuantArgs | None) -> bool:
    """Whether a linear under these schemes factors into an integer GEMM and a scale epilogue: symmetric
    integer weights with one scale per output channel (or per tensor) under symmetric integer activations,
    dynamic per token (W8A8, W4A8, W4A4, W6A6...) or static per tensor (one calibrated scale, MergeQuant's
    W4A4). Every form computes such a linear by `int_linear`."""
    return (weights is not None and inputs is not None and weights.type == "int" and weights.symmetric
            and weights.granularity in ("channel", "tensor") and inputs.type == "int" and inputs.symmetric
            and not inputs.outliers and (inputs.granularity == "token" if inputs.dynamic else inputs.granularity == "tensor"))


def int_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, inputs: QuantArgs,
               bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float, w_codes (N, K) integer codes (any dtype), w_scale (N|1, 1) -> (..., N) in x's dtype:
    ``(sum_k q_x[m, k] q_w[n, k]) * s_w[n] * s_x[m] + b[n]`` in float32 (float64 for float64 x), x's codes and scales as
    `compute_qparams` / `quantize` give them. The sum is an fp32 GEMM of the codes, exact (in any order)
    while its partial sums stay under 2^24 in magnitude: always for 4-bit codes with K < 2^18; for 8-bit
    codes unless a token's full-scale codes align with a row's over more than ~1000 channels. So this is,
    bit for bit, what an integer GEMM with a scale epilogue returns (oneDNN's on CPU: `kernels.cpu`), not
    the fp32 sum of dequantized products: the simulation of `int_factored` schemes is the integer kernel.
    Static inputs with their calibrated `input_scale` (1, 1): s_x is it, and the sink rows
    (`inputs.sink_tokens`, `sink_rows`) take float inputs against the dequantized weight,
    ``x @ (q_w * s_w)^T + b``, in the same dtype (as `fake_quantize_input` leaves them).
    Differentiable in x through s_x, as `fake_quantize` is."""
    n = sink_rows(x, inputs) if input_scale is not None else 0
    if n:  # (..., T, K): the first n positions of each sequence in float, the rest on the integer GEMM
        return torch.cat([float_rows(x[..., :n, :], w_codes, w_scale, bias),
                          _int_rows(x[..., n:, :], w_codes, w_scale, inputs, bias, input_scale)], dim=-2)
    return _int_rows(x, w_codes, w_scale, inputs, bias, input_scale)


def _int_rows(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, inputs: QuantArgs,
              bias: torch.Tensor | None, input_scale: torch.Tensor | None) -> torch.Tensor:
    K = x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 models (invariance tests) stay so
    q, s = int_codes(x.reshape(-1, K).float(), inputs, input_scale)  # (M, K), (M|1, 1)
    return int_epilogue(F.linear(q.to(acc), w_codes.to(acc)), w_scale, s, bias, x)


def int_codes(x2: torch.Tensor, inputs: QuantArgs, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`int_linear`'s activation side: x2 (M, K) float32 -> (codes (M, K) in float32, as `quantize` gives them;
    scales (M, 1), or (1, 1) for static inputs: their calibrated `input_scale`, or a static scheme's own range
    while not calibrated yet)."""
    if input_scale is not None:
        s = input_scale.float().reshape(1, 1)  # static: the calibrated scale
    else:
        s, _ = compute_qparams(x2, inputs)  # (M, 1), or (1, 1) for a static scheme not calibrated yet; zero points 0
    return torch.clamp(torch.round(x2 / s), inputs.qmin, inputs.qmax), s  # (M, K): `quantize`'s codes, in fp32


def int_epilogue(sums: torch.Tensor, w_scale: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None,
                 x: torch.Tensor) -> torch.Tensor:
    """`int_linear`'s epilogue: the codes' sums (M, N) -> ``sums * s_w[n] * s_x[m] + b[n]`` in their dtype, in this
    order, then in x's dtype and leading shape (..., N)."""
    acc = sums.dtype
    y = sums * w_scale.to(acc).reshape(1, -1) * s.to(acc)  # (M, N)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def float_rows(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`int_linear`'s sink rows: x (..., K) in float against the dequantized weight (q_w * s_w) (N, K), in
    float32 (float64 for float64 x), + b; every form computes them with this."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = w_codes.to(acc) * w_scale.to(acc).reshape(-1, 1)  # (N, K)
    return F.linear(x.to(acc), w, None if bias is None else bias.to(acc)).to(x.dtype)


def static_input_scale(amax: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The calibrated scale (1, 1) of static activation args from the inputs' absmax over the
    calibration set: absmax·clip / the format's largest value (int: / qmax), or NVFP4's tensor
    scale (a power of two, `fp.tensor_scale`)."""
    x = torch.stack([amax, -amax]).reshape(1, 2).float()  # a tensor with exactly this range
    if args.block_format is not None:
        return tensor_scale(x, BLOCK_FORMATS[args.block_format]).reshape(1, 1)
    return compute_qparams(x, args)[0].reshape(1, 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round-half-even forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """`fake_quantize(x, args)` (min-max qparams from x; the same codes and values) with gradients
    for learning transforms: the rounding is straight-through, and the scale and zero point stay
    functions of x's range (gradient through amax / amin, as in SpinQuant's and FlatQuant's
    quantizers). With the qparams detached, the backward of quantization would be the identity,
    the gradient of the float model, and a rotation of a rotation-invariant float model would
    see no gradient from the quantization error at all; through the scale, the loss learns that
    a token's error grows with its largest entry, the signal that flattens outliers."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (rows, cols)
    rows, cols = x2.shape
    scale, zero = compute_qparams(x2, args)  # (rows|1, n_groups), differentiable in x2
    s = expand_qparam(scale, rows, cols, args)
    if args.type == "float":
        v = x2 / s
        v = v + (round_to_grid(v.detach(), element_format(args)) - v).detach()  # straight-through
        return (v * s).to(x.dtype).reshape(x.shape)
    z = expand_qparam(zero.detach(), rows, cols, args)
    q = torch.clamp(round_ste(x2 / s) + z, args.qmin, args.qmax)
    return ((q - z) * s).to(x.dtype).reshape(x.shape)


def quant_error(x: torch.Tensor, xq: torch.Tensor) -> dict[str, float]:
    """Relative MSE and SQNR (dB) of a quantized tensor against the original."""
    x, xq = x.double(), xq.double()
    err = (x - xq).pow(2).sum().item()
    sig = x.pow(2).sum().item()
    rel = err / sig if sig > 0 else 0.0
    sqnr = float("inf") if err == 0 else 10.0 * math.log10(sig / err) if sig > 0 else float("-inf")
    return {"rel_mse": rel, "sqnr_db": sqnr}


def mse_clip_qparams(
    w: torch.Tensor, args: QuantArgs, grid: int = 40, min_ratio: float = 0.5, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row/group clip search: the ratio in [min_ratio, 1] whose fake-quant error
    sum |w - q(w)|^norm is smallest (the GPTQ reference's grid search, norm 2.4)."""
    w2 = w.reshape(-1, w.shape[-1]).float()  # (rows, cols)
    rows, cols = w2.shape
    gs = args.group_size if args.granularity == "group" else cols
    if args.granularity in ("channel", "group") and cols % gs == 0 and args.type == "int":
        step = max(1, MSE_CLIP_BLOCK // cols)
        parts = [_mse_clip_grouped(w2[r:r + step].reshape(-1, cols // gs, gs), args, grid, min_ratio, norm)
                 for r in range(0, rows, step)]  # each block: (block rows, n_groups, gs)
        return torch.cat([s for s, _ in parts], 0), torch.cat([z for _, z in parts], 0)
    best_s, best_z = compute_qparams(w2, args)
    best_err = torch.full_like(best_s, float("inf"))
    for ratio in _clip_ratios(grid, min_ratio):
        trial = QuantArgs(**{**args.to_dict(), "clip_ratio": args.clip_ratio * ratio, "mse_clip": False})
        s, z = compute_qparams(w2, trial)
        err = (w2 - dequantize(quantize(w2, s, z, trial), s, z, trial)).abs().pow(norm)  # (rows, cols)
        err = torch.cat([b.sum(dim=1, keepdim=True) for b in _group_view(err, args)], 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


MSE_CLIP_BLOCK = 1 << 18  # elements of a row block in `mse_clip_qparams` (its temporaries stay in cache)


def _clip_ratios(grid: int, min_ratio: float) -> list[float]:
    return [1.0 - (1.0 - min_ratio) * i / max(grid - 1, 1) for i in range(grid)]


def _mse_clip_grouped(W3: torch.Tensor, args: QuantArgs, grid: int, min_ratio: float, norm: float):
    """`mse_clip_qparams` on whole groups W3 (rows, n_groups, gs): the same trial qparams and codes
    as `quantize`/`dequantize`, with qparams broadcast over each group instead of expanded."""
    lo, hi = W3.amin(dim=2), W3.amax(dim=2)  # (rows, n_groups)
    best_s, best_z = range_to_qparams(lo, hi, args)
    best_err = torch.full_like(best_s, float("inf"))
    for ratio in _clip_ratios(grid, min_ratio):
        trial = QuantArgs(**{**args.to_dict(), "clip_ratio": args.clip_ratio * ratio, "mse_clip": False})
        s, z = range_to_qparams(lo, hi, trial)
        s3, z3 = s.unsqueeze(2), z.unsqueeze(2)  # (rows, n_groups, 1)
        q = torch.clamp(torch.round(W3 / s3) + z3, args.qmin, args.qmax)
        err = (W3 - (q - z3) * s3).abs_().pow_(norm).sum(dim=2)  # (rows, n_groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z
