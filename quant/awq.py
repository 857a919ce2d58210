"""AWQ (Lin et al. 2024, arXiv:2306.00978): activation-aware per-channel weight scaling, and its
clipping search. Pure tensor functions; stage `awq` (`lmpress.compress.stages.awq`) wires them
to the decoder layers.

Scales. Linears that read one tensor x (q/k/v from the input norm, gate/up from the
post-attention norm, o_proj from v_proj, down_proj from up_proj) get W <- W·diag(s) and their
producer x <- x·diag(1/s) (folded into the norm's gain or the producing linear's rows: exact in
float). Salient input channels (large mean |x|) get s > 1, so their weights lose less to rounding.
The search, as AutoAWQ's: for alpha in {0, 1/n, ..., (n-1)/n},
    s = mean|x|^alpha / mean|Ŵ|^(1 - alpha)   (duo scaling; the paper's s = mean|x|^alpha without it)
with Ŵ the weights normalized by each quantization group's absmax, s clamped at 1e-4 and divided
by sqrt(max s · min s); the score is the mean squared error of the block that reads x (the
attention, the MLP, or the single linear) run with Q(W·diag(s))·diag(1/s) against its float
output. s = 1 (plain rounding) is scored first and kept unless a candidate beats it, so the
search never does worse than plain rounding on its own calibration tokens (with duo scaling,
alpha = 0 is s = 1 / mean|Ŵ|, not s = 1).

Clipping. Per output row and quantization group, the largest |w| kept, max·(1 - i/n) for
i < max_shrink·n, chosen to minimize the squared error of that group's partial dot products over
sampled input tokens (AutoAWQ's auto_clip: 20 steps, down to half, 512 tokens); the weights are
then clamped to ±max. q_proj and k_proj are left unclipped, as in AutoAWQ (their error is
judged through the attention scores, not their outputs).
"""
from __future__ import annotations

from typing import Callable

import torch

from .primitives import fake_quantize
from .scheme import QuantArgs

MIN_SCALE = 1e-4  # AutoAWQ's clamp of the raw scales


def group_size_of(args: QuantArgs | None, cols: int) -> int:
    """The weight quantization group along the input (the whole row for per-channel/tensor)."""
    if args is not None and args.granularity == "group" and args.group_size and cols % args.group_size == 0:
        return args.group_size
    return cols


def weight_mean(weights: list[torch.Tensor], group: int) -> torch.Tensor:
    """mean |Ŵ| per input channel (in,) over the rows of every weight (out_i, in), each row's
    groups of `group` inputs normalized by their absmax."""
    W = torch.cat([w.detach().float() for w in weights])  # (sum out, in)
    g = W.abs().reshape(W.shape[0], -1, group)  # (out, groups, group)
    g = g / g.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return g.reshape(W.shape).mean(dim=0)


def scales_for(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool = True) -> torch.Tensor:
    """The candidate scales (in,) for exponent `alpha`, normalized to geometric mid-range 1."""
    s = x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp_min(1e-12) if duo else x_mean.pow(alpha)
    s = s.clamp_min(MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(W: torch.Tensor, s: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
    """Q(W·diag(s))·diag(1/s) in W's dtype: what the readers compute on the unscaled input."""
    Ws = W.float() * s[None, :]
    q = Ws if args is None else fake_quantize(Ws, args)
    return (q / s[None, :]).to(W.dtype)


def search_scales(x_mean: torch.Tensor, weights: list[torch.Tensor], args: list[QuantArgs | None],
                  block_error: Callable[[list[torch.Tensor]], float], grid: int = 20, duo: bool = True
                  ) -> tuple[torch.Tensor, float | None, float, list[float]]:
    """(best scales (in,), best alpha (None: s = 1 won), plain rounding's error, the error of every
    alpha): `block_error(candidate weights)` is the block's output error with the readers'
    weights replaced by the candidates."""
    group = min(group_size_of(a, weights[0].shape[1]) for a in args)
    w_mean = weight_mean(weights, group)
    ones = torch.ones_like(w_mean)
    rtn = block_error([scaled_fake_quant(W, ones, a) for W, a in zip(weights, args)])
    errors, best = [], (rtn, ones, None)
    for i in range(grid):
        alpha = i / grid
        s = scales_for(x_mean.float(), w_mean, alpha, duo)
        err = block_error([scaled_fake_quant(W, s, a) for W, a in zip(weights, args)])
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], rtn, errors


@torch.no_grad()
def search_clip(W: torch.Tensor, x: torch.Tensor, args: QuantArgs, grid: int = 20, max_shrink: float = 0.5,
                rows_per_chunk: int = 256) -> torch.Tensor:
    """The clipping bound per output row and group (out, groups) that minimizes the squared error
    of each group's partial dot products with the sampled inputs `x` (tokens, in)."""
    out_f, in_f = W.shape
    group = group_size_of(args, in_f)
    xg = x.float().reshape(1, x.shape[0], -1, group)  # (1, tokens, groups, group)
    best_all = []
    for r in range(0, out_f, rows_per_chunk):
        w = W[r:r + rows_per_chunk].float().reshape(-1, 1, in_f // group, group)  # (rows, 1, groups, group)
        ref = (xg * w).sum(-1)  # (rows, tokens, groups)
        top = w.abs().amax(dim=-1, keepdim=True)  # (rows, 1, groups, 1)
        best_err = torch.full(top.shape[:-1], float("inf"))  # (rows, 1, groups)
        best = top.clone()
        for i in range(int(max_shrink * grid)):
            bound = top * (1 - i / grid)
            cw = torch.minimum(torch.maximum(w, -bound), bound)
            q = fake_quantize(cw.reshape(-1, in_f), args).reshape(cw.shape)
            err = ((xg * q).sum(-1) - ref).pow(2).mean(dim=1, keepdim=True)  # (rows, 1, groups)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], bound, best)
        best_all.append(best.reshape(best.shape[0], -1))  # (rows, groups)
    return torch.cat(best_all)


def apply_clip(W: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """W clamped to ±bound per (row, group): bound (out, groups)."""
    out_f, in_f = W.shape
    group = in_f // bound.shape[1]
    b = bound.to(W.dtype).reshape(out_f, -1, 1)  # (out, groups, 1)
    w = W.reshape(out_f, -1, group)  # (out, groups, group)
    return torch.minimum(torch.maximum(w, -b), b).reshape(out_f, in_f)


__all__ = ["MIN_SCALE", "apply_clip", "group_size_of", "scaled_fake_quant", "scales_for", "search_clip", "search_scales",
           "weight_mean"]
