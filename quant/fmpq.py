"""COMET's fine-grained mixed-precision activation quantization (FMPQ), as pure tensor maths.

COMET (Liu et al., "COMET: Towards Practical W4A4KV4 LLMs Serving", arXiv 2410.12168) splits a
linear's input channels into blocks (128 channels in the paper) and observes that activation
outliers sit in a few fixed channels. It reorders the channels so that the outlier channels fall
into as few blocks as possible, quantizes those blocks to INT8 and every other block to INT4,
each block of each token with its own symmetric scale, and runs one W4Ax GEMM over the mixed
layout (both widths in int8 containers here).

Here, for `QuantArgs(granularity="group", group_size=G, dynamic=True, outliers=p)`:
- the channel order `perm` (int64 (in,)) sorts the input channels by their absmax over the
  calibration tokens, largest first (`channel_order`); uncalibrated, it is the identity;
- the first `high_groups(in, args)` = round(p * n_groups) groups of the reordered channels take
  `args.outlier_bits` (8), the rest `args.bits` (4): so the outlier channels are the 8-bit ones;
- every (token, group) takes scale = absmax * clip_ratio / its width's divisor (qmax, or
  (qmax - qmin) / 2 with `full_range`); codes are signed int8.
The GEMM sums over the reordered channels, so a packed weight is read with its columns in `perm`
order (`kernels.w4ax_gemm`).
"""
from __future__ import annotations

import math

import torch

from .scheme import QuantArgs


def n_channel_groups(in_features: int, args: QuantArgs) -> int:
    return math.ceil(in_features / args.group_size)


def high_groups(in_features: int, args: QuantArgs) -> int:
    """How many leading groups (of the reordered channels) take `outlier_bits`: round(p * groups),
    half up, at most all of them."""
    n = n_channel_groups(in_features, args)
    return min(n, math.floor(args.outliers * n + 0.5))


def group_bits(in_features: int, args: QuantArgs) -> torch.Tensor:
    """Bits of each channel group, int64 (n_groups,): `outlier_bits` for the first `high_groups`."""
    n = n_channel_groups(in_features, args)
    bits = torch.full((n,), args.bits, dtype=torch.int64)
    bits[:high_groups(in_features, args)] = args.outlier_bits
    return bits


def average_bits(in_features: int, args: QuantArgs) -> float:
    """Code bits per input element (channels weighted: a partial last group counts its channels)."""
    G, hi = args.group_size, high_groups(in_features, args)
    n_hi = min(in_features, hi * G)
    return (n_hi * args.outlier_bits + (in_features - n_hi) * args.bits) / in_features


def channel_order(amax: torch.Tensor) -> torch.Tensor:
    """The reordering of the channels (int64 (in,)) by calibration absmax (in,), largest first;
    ties keep the original order."""
    return torch.sort(amax.float(), descending=True, stable=True).indices


def _divisors(in_features: int, args: QuantArgs, device) -> torch.Tensor:
    """absmax / scale of each group's width, float32 (n_groups,)."""
    bits = group_bits(in_features, args).to(device)
    qmax = (2 ** (bits - 1) - 1).float()
    return qmax + 0.5 if args.full_range else qmax  # full range: (qmax - qmin) / 2 = qmax + 1/2


def fmpq_quantize(x: torch.Tensor, args: QuantArgs, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., in) -> (codes int8 (rows, in) in `perm` order, scales float32 (rows, n_groups))."""
    K, G = x.shape[-1], args.group_size
    x2 = x.reshape(-1, K).float()  # (rows, in)
    if perm is not None:
        x2 = x2.index_select(1, perm.to(x2.device))
    rows, n = x2.shape[0], n_channel_groups(K, args)
    pad = n * G - K
    xg = torch.nn.functional.pad(x2, (0, pad)).reshape(rows, n, G)  # (rows, in) -> (rows, groups, G); zeros pad
    div = _divisors(K, args, x2.device)  # (groups,)
    scale = xg.abs().amax(dim=2) * args.clip_ratio / div  # (rows, groups)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    lim = div.floor()  # qmax of each group's width
    q = torch.clamp(torch.round(xg / scale.unsqueeze(2)), -lim.unsqueeze(1) - 1, lim.unsqueeze(1))  # qmin = -qmax - 1
    return q.reshape(rows, n * G)[:, :K].to(torch.int8), scale


def fmpq_dequantize(codes: torch.Tensor, scale: torch.Tensor, args: QuantArgs, perm: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes (rows, in) in `perm` order, scales (rows, n_groups)) -> values (rows, in) in the original order."""
    rows, K = codes.shape
    s = torch.repeat_interleave(scale.float(), args.group_size, dim=1)[:, :K]  # (rows, groups) -> (rows, in)
    v = codes.float() * s
    if perm is not None:
        out = torch.empty_like(v)
        out[:, perm.to(v.device)] = v  # back to the original channel order
        v = out
    return v.to(dtype)


def fmpq_fake_quantize(x: torch.Tensor, args: QuantArgs, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize x (..., in) in its dtype, channels in the original order."""
    codes, scale = fmpq_quantize(x, args, perm)
    return fmpq_dequantize(codes, scale, args, perm, dtype=x.dtype).reshape(x.shape)
