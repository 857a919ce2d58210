"""Learned rounding (SignRound, Cheng et al. 2023, arXiv:2309.05516, the method of Intel's AutoRound):
per weight a rounding offset V in [-0.5, 0.5], per quantization group multipliers alpha, beta in
[0.5, 1] of the group's min and max, trained by signed gradient descent on a decoder block's output
error. Pure tensor functions; stage `signround` (`lmpress.compress.stages.signround`) trains them.

    lo, hi = group min / max of W                       (rows, groups)
    scale, zero = range_to_qparams(alpha·lo, beta·hi)   (lmpress's integer qparams: range holds 0)
    q = clamp(round(W / scale + V) + zero, qmin, qmax)  (round straight-through)
    Ŵ = (q - zero) · scale

V = 0, alpha = beta = 1 is round-to-nearest with min-max qparams, the starting point. The result is
codes, scales and zero points on the scheme's own grid, so it packs and exports like GPTQ's.
SignSGD (AutoRound's defaults): p <- p - lr·sign(dL/dp), lr = 1/iters decaying linearly to 0, then
V clamped to [-0.5, 0.5] and alpha, beta to [0.5, 1].
"""
from __future__ import annotations

import torch

from .primitives import expand_qparam, group_range, range_to_qparams, round_ste
from .scheme import QuantArgs

V_BOUND = 0.5
SCALE_RANGE = (0.5, 1.0)
LOSSES = ("mse", "normed")


def check_args(args: QuantArgs) -> str | None:
    """Why `args` cannot be learned here (None: it can): integer channel / group weights only."""
    if args.type != "int":
        return f"{args.type} grids (learned rounding here is for integer grids)"
    if args.granularity not in ("channel", "group"):
        return f"{args.granularity}-wise scales (channel or group only)"
    if args.mse_clip:
        return "mse_clip (the learned alpha / beta are the clipping search)"
    return None


def init_params(W: torch.Tensor, args: QuantArgs) -> dict[str, torch.Tensor]:
    """V (rows, cols) = 0 and alpha, beta (rows, groups) = 1: round-to-nearest."""
    lo, _ = group_range(W.detach().float().reshape(W.shape[0], -1), args)
    return {"V": torch.zeros_like(W, dtype=torch.float32), "alpha": torch.ones_like(lo), "beta": torch.ones_like(lo)}


def qparams(W: torch.Tensor, p: dict[str, torch.Tensor], args: QuantArgs, zero_grad: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) (rows, groups) of W with the learned range multipliers; differentiable in alpha, beta
    (the zero point too with `zero_grad`, its rounding straight-through)."""
    lo, hi = group_range(W.detach().float(), args)
    return range_to_qparams(lo * p["alpha"], hi * p["beta"], args, zero_ste=zero_grad)


def dequant(W: torch.Tensor, p: dict[str, torch.Tensor], args: QuantArgs, zero_grad: bool = False) -> torch.Tensor:
    """Ŵ (rows, cols), float32, differentiable in V (straight-through), alpha and beta. `zero_grad`
    (AutoRound's zero point, round_ste(-min / scale)): the gradient also flows through the zero point,
    which reaches alpha and beta where the codes clamp at the grid's ends; else the zero point is a
    constant of each step. The values are the same either way."""
    rows, cols = W.shape
    scale, zero = qparams(W, p, args, zero_grad)
    s = expand_qparam(scale, rows, cols, args)
    z = expand_qparam(zero if zero_grad else zero.detach(), rows, cols, args)
    q = torch.clamp(round_ste(W.detach().float() / s + p["V"]) + z, args.qmin, args.qmax)
    return (q - z) * s


@torch.no_grad()
def codes(W: torch.Tensor, p: dict[str, torch.Tensor], args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes (rows, cols), scale, zero (rows, groups)): `dequantize` of them is `dequant(W, p)`."""
    rows, cols = W.shape
    scale, zero = qparams(W, p, args)
    s = expand_qparam(scale, rows, cols, args)
    z = expand_qparam(zero, rows, cols, args)
    q = torch.clamp(torch.round(W.float() / s + p["V"]) + z, args.qmin, args.qmax)
    return q.to(torch.int8), scale, zero


def output_error(out: torch.Tensor, target: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """The training loss of a block's output `out` against `target`, both (..., tokens, hidden).

    `mse` (AutoRound's): the mean squared error over every element. `normed`: each token's squared
    error is first divided by the mean square of its target token over the hidden dimension,
    which is what the next block's RMSNorm (and the final norm) divides that token by. In a
    LLaMA-style residual stream the attention-sink token carries massive activations: on
    SmolLM2-135M from layer 11 to 27 its squared norm is 1,000 to 27,000 times the median token's.
    It then holds 25-93% of the plain squared error of a W3 RTN model's block outputs against the
    float model's, while its relative error (0.03) is a quarter to an eighth of the other tokens'
    (session 33 probe). `mse` spends the learning on that token; `normed` weighs every token's
    relative error alike.
    """
    d = (out - target).pow(2)  # (..., tokens, hidden)
    if loss == "normed":
        ms = target.pow(2).mean(dim=-1, keepdim=True)  # (..., tokens, 1)
        d = d / torch.maximum(ms, ms.mean() * 1e-6 + 1e-30)  # a zero target token: a floor, not a division by 0 (no host sync)
    elif loss != "mse":
        raise ValueError(f"loss={loss!r} is not one of {', '.join(LOSSES)}")
    return d.mean()


@torch.no_grad()
def sign_step(params: list[dict[str, torch.Tensor]], lr: float) -> None:
    """One SignSGD step on every parameter with a gradient, then the clamps; gradients cleared."""
    for p in params:
        for k, t in p.items():
            if t.grad is not None:
                t -= lr * torch.sign(t.grad)
                t.grad = None
        p["V"].clamp_(-V_BOUND, V_BOUND)
        p["alpha"].clamp_(*SCALE_RANGE)
        p["beta"].clamp_(*SCALE_RANGE)


__all__ = ["LOSSES", "SCALE_RANGE", "V_BOUND", "check_args", "codes", "dequant", "init_params", "output_error", "qparams",
           "sign_step"]
