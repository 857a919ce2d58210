"""SmoothQuant: migrate activation outliers into the weights with per-channel scales.

For a group of linears reading the same input X (in_features channels), with per-channel
activation range a_j = max|X_j| (calibration) and weight range w_j = max over the group of
max|W[:, j]|, the smoothing factor is s_j = a_j^α / w_j^(1-α). The input is divided by s (folded
into whatever produces it: an RMSNorm gain, or the rows of a preceding linear) and the readers'
columns multiplied by s, so the float product is unchanged. Source: Xiao et al., "SmoothQuant"
(ICML 2023), eq. 4.
"""
from __future__ import annotations

import torch


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """s (in,) from activation absmax (in,) and the readers' weights, each (out_i, in)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)  # (in,)
    a = act_absmax.double().clamp(min=eps)
    w = w_absmax.double().clamp(min=eps)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=eps)


@torch.no_grad()
def fold_smoothing(s: torch.Tensor, producer_weight: torch.Tensor, readers: list[torch.nn.Linear],
                   producer_bias: torch.Tensor | None = None, offset: float = 0.0) -> None:
    """Divide the producer's output channels by s and multiply the readers' input columns by s,
    in float64, in place. `producer_weight` is an RMSNorm gain (in,) or a linear weight (in, k);
    a norm whose gain is offset + w (Gemma's 1 + w) gets w <- (offset + w) / s - offset."""
    s64 = s.double()
    shape = (-1,) + (1,) * (producer_weight.dim() - 1)  # (in,) or (in, 1)
    producer_weight.copy_(((producer_weight.double() + offset) / s64.view(shape) - offset).to(producer_weight.dtype))
    if producer_bias is not None:
        producer_bias.copy_((producer_bias.double() / s64).to(producer_bias.dtype))
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * s64[None, :]).to(lin.weight.dtype))


# ------------------------------------------------------------------ MergeQuant's static per-channel steps
CHANNEL_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(19))  # 1.0 .. 0.1


def static_tensor_ratio(x: torch.Tensor, args) -> float:
    """The clip ratio r of `CHANNEL_CLIP_GRID` whose static per-tensor step r · max|x| / args.sym_divisor
    gives the least squared error of activations x (N, C) on the symmetric int grid of `args` (codes
    clamped to [qmin, qmax]): MergeQuant's adaptive clipping for one calibrated scale (static inputs
    with `mse_clip`). Heavy-tailed inputs (down_proj's, whose per-token absmax spans 5-9x on SmolLM2)
    lose far less to clipping their few largest tokens than to a coarse grid for all the others."""
    xf = x.reshape(-1, x.shape[-1]).float()  # (N, C)
    amax = float(xf.abs().amax().clamp(min=1e-8))

    def err(r: float) -> float:
        step = r * amax / args.sym_divisor
        return float(((xf / step).round().clamp(args.qmin, args.qmax) * step - xf).square().sum())
    return min(CHANNEL_CLIP_GRID, key=err)


def static_channel_steps(x: torch.Tensor, args, clip_search: bool = True) -> torch.Tensor:
    """Static per-channel quantization steps (C,) for activations x (N, C) under symmetric int input
    `args`: step_c = r_c · max|x_c| / args.sym_divisor, with r_c (`clip_search`) the ratio of
    `CHANNEL_CLIP_GRID` with the least squared error of channel c's values on that grid (codes
    clamped to [qmin, qmax]), else 1. MergeQuant's quantization step migration divides the
    producer of x by these steps and multiplies its readers' columns by them, so the activation is
    quantized by rounding alone (a static scale of 1)."""
    xf = x.reshape(-1, x.shape[-1]).float()  # (N, C)
    amax = xf.abs().amax(dim=0).clamp(min=1e-8)  # (C,)
    ratios = CHANNEL_CLIP_GRID if clip_search else (1.0,)
    best, best_err = None, None
    for r in ratios:
        step = r * amax / args.sym_divisor
        err = ((xf / step).round().clamp(args.qmin, args.qmax) * step - xf).square().sum(dim=0)  # (C,)
        if best is None:
            best, best_err = step, err
        else:
            take = err < best_err
            best, best_err = torch.where(take, step, best), torch.where(take, err, best_err)
    return best
