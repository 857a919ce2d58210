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
