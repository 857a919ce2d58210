"""Round-to-nearest weight quantization (optionally with an MSE clipping search)."""
from __future__ import annotations

import torch

from .primitives import compute_qparams, mse_clip_qparams, quantize
from .scheme import QuantArgs


def rtn_quantize(W: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (out, in) -> (q int8 (out, in), scale (out|1, n_groups), zero (out|1, n_groups))."""
    if W.dim() != 2:
        raise ValueError(f"rtn_quantize expects a 2-D weight (out, in), got shape {tuple(W.shape)}")
    if args.dynamic:
        raise ValueError("rtn_quantize quantizes weights offline; got dynamic QuantArgs")
    scale, zero = mse_clip_qparams(W, args) if args.mse_clip else compute_qparams(W, args)
    return quantize(W, scale, zero, args), scale, zero
