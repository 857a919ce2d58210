"""GPTQ (Frantar et al., 2022): weight quantization that minimizes the layer's output error.

For a linear with weight W (out, in) and input Hessian H = (2/N) Σ xᵀx (in, in), GPTQ chooses
integer codes column by column so that ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` (the squared output error
summed over the calibration tokens, times 2/N) is small: after a column is rounded, its error
is spread over the columns not yet quantized, weighted by the inverse Hessian. The per-column
update uses the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): with e = (w_j - ŵ_j) / U_jj,

    W[:, k] -= e · U[j, k]    for every k > j.

Lazy batch updates: inside a block of `block_size` columns the updates touch only the block;
the rest of the matrix receives the block's accumulated errors in one matmul at the block end
(same result, far fewer memory passes).

Choices made here:
- dampening: ``H + damp · mean(diag H) · I``, `damp` relative to the mean diagonal of the live
  inputs; if a Cholesky factorization fails the dampening is multiplied by 10 (logged), a few
  times, before giving up with `GPTQError`;
- dead inputs (H_jj = 0: the column never saw a nonzero input) get H_jj = 1 so the factorization
  exists; their row of H⁻¹ has no off-diagonal entries, so their rounding error moves nothing,
  and their weights are simply rounded (kept, not zeroed: they cost nothing on the calibration
  objective and stay faithful if the input turns out nonzero later);
- act-order (columns processed by decreasing H_jj) with *static groups*: the qparams of each
  natural-order group are computed from the original weight before the columns are permuted,
  so codes and qparams come back in natural order and the packed format needs no g_idx;
- without act-order and with `static_groups=False`, a group's qparams are computed when the
  algorithm reaches its first column, from the weights as updated so far (the classic GPTQ);
  blocks are then aligned to groups so each group starts with up-to-date columns;
- channel and tensor qparams are always computed up front from the original weight;
- `args.mse_clip` uses `mse_clip_qparams` wherever qparams are computed.

Outputs follow quant/primitives.py: codes int8 (out, in), scale/zero (out, n_groups) for
channel/group (the last group may be partial), (1, 1) for tensor; `dequantize(q, scale, zero,
args)` is Ŵ, which is what `SimQuantLinear.set_quantized(q, scale, zero)` installs.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch

from .fp import round_to_grid
from .primitives import compute_qparams, dequantize, element_format, encode_fp, expand_qparam, mse_clip_qparams, n_groups
from .scheme import QuantArgs

log = logging.getLogger(__name__)

DAMP_RETRIES = 4  # each retry multiplies the dampening by 10


class GPTQError(RuntimeError):
    """GPTQ cannot proceed (e.g. the dampened Hessian is not positive definite)."""


def layer_objective(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) in float64: the layer's output error on the calibration inputs."""
    D = (W.double() - W_hat.to(W.device).double()).to(H.device)  # (out, in)
    return float(((D @ H.double()) * D).sum())


@contextmanager
def single_thread(device: torch.device | str):
    """One intra-op thread on CPU (a no-op elsewhere), restored on exit. GPTQ's column loop is many
    small ops (a column, a group); handing each to a thread pool costs far more than the op
    itself, badly so on a loaded machine (torch.round on 3k elements: 0.01 ms alone, 15 ms with two
    busy threads). Its large ops (factorization, block updates, the objective) keep the pool:
    1.3-1.6x faster on 2 threads for SmolLM2's shapes."""
    device = torch.device(device)
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _qparams(W: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return mse_clip_qparams(W, args) if args.mse_clip else compute_qparams(W, args)


def inverse_cholesky(H: torch.Tensor, rev: torch.Tensor, dead_rev: torch.Tensor, damp: float,
                      live_mean: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U (float32, processing order) of (H_p + λI)⁻¹, where H_p is H with rows
    and columns in processing order p = rev.flip(0), λ = damp · live_mean; retries with more damp.

    With J the order reversal, J·H_p·J = L·Lᵀ gives H_p⁻¹ = (J·L⁻¹·J)ᵀ(J·L⁻¹·J): U = J·L⁻¹·J is the
    upper Cholesky factor of H_p⁻¹, from one factorization and one triangular solve. J·H_p·J is
    H gathered in the reversed order `rev` (one copy), and the solve runs in place on its
    right-hand side, so at most two (in, in) float64 matrices live besides H (for a 8192-wide
    down_proj: 1 GiB, where copies for the damping, the flips and the solve took 2.5 GiB)."""
    d = damp
    for attempt in range(DAMP_RETRIES + 1):
        Hr = H[rev[:, None], rev[None, :]].to(torch.float64)  # (in, in) = J·H_p·J, a fresh copy
        Hr[dead_rev, :] = 0.0
        Hr[:, dead_rev] = 0.0
        Hr.diagonal()[dead_rev] = 1.0  # an identity block for dead inputs: their error propagates nowhere
        Hr.diagonal().add_(d * live_mean)
        L, info = torch.linalg.cholesky_ex(Hr)
        del Hr
        if int(info) == 0:
            Linv = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
            torch.linalg.solve_triangular(L, Linv, upper=False, out=Linv)  # L⁻¹, in place
            del L
            if bool(torch.isfinite(Linv).all()) and bool((Linv.diagonal() > 0).all()):
                return Linv.to(torch.float32).flip(0, 1), d
            del Linv
        else:
            del L
        if attempt < DAMP_RETRIES:
            log.warning("gptq: Cholesky failed with damp=%g (relative to mean diag %.3g); retrying with damp=%g",
                        d, live_mean, d * 10)
            d *= 10
    raise GPTQError(
        f"GPTQ: the Hessian is not positive definite even with damp={d:g} (started at {damp:g}, "
        f"{DAMP_RETRIES} retries x10); the calibration inputs are degenerate or non-finite: check the "
        f"calibration data and the model's activations, or quantize this module with RTN"
    )


def dead_inputs(H: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(dead (in,) bool: H_jj <= 0, the mean diagonal of the live inputs): what the dampening is relative to."""
    diag = H.diagonal()
    dead = diag <= 0
    return dead, (float(diag[~dead].double().mean()) if int(dead.sum()) < H.shape[0] else 1.0)


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, dXX: torch.Tensor, alpha: float, damp: float = 0.01) -> torch.Tensor:
    """GPTAQ's target (Li et al., 2025, "asymmetric calibration"): the weight W* (out, in) whose GPTQ
    on the quantized model's inputs x̃ matches the float model's output W x, x its float inputs.

    With H = (2/N) Σ x̃ x̃ᵀ and dXX = (2/N) Σ (x - x̃) x̃ᵀ (both (in, in), over the same N tokens),
    min_Q Σ |W x - Q x̃|² = min_Q tr((Q - W*) H (Q - W*)ᵀ) + const, where W* = W + W dXX H⁻¹ (the
    normal equations). `alpha` scales the correction (GPTAQ uses 0.25; 1 is the exact least squares);
    H is dampened as GPTQ dampens it (`damp` of the mean live diagonal; dead inputs get H_jj = 1), so
    alpha = 1 with a tiny `damp` gives the least-squares weight. Computed in float64, returned float32.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]) or dXX.shape != H.shape:
        raise ValueError(f"asymmetric_target: W (out, in), H and dXX (in, in), got {tuple(W.shape)}, {tuple(H.shape)}, "
                         f"{tuple(dXX.shape)}")
    Hd = H.double().clone()  # (in, in)
    dead, live_mean = dead_inputs(Hd)
    diag = Hd.diagonal()
    diag[dead] = 1.0
    diag.add_(damp * live_mean)
    M = W.double() @ dXX.double().to(W.device)  # (out, in)
    correction = torch.linalg.solve(Hd.to(W.device), M.T).T  # M Hd⁻¹ (Hd symmetric): (out, in)
    return (W.double() + alpha * correction).float()


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """(U, damp used): U the upper Cholesky factor (float32, natural column order) of the dampened
    inverse Hessian, as `gptq_quantize` uses it, for solvers on other grids (quant/gguf.py). Dead
    inputs (H_jj = 0) get an identity block; failed factorizations retry with more dampening."""
    dead, live_mean = dead_inputs(H)
    rev = torch.arange(H.shape[0], device=H.device).flip(0)
    return inverse_cholesky(H, rev, dead[rev], damp, live_mean)


def _check(W: torch.Tensor, H: torch.Tensor, args: QuantArgs, block_size: int, damp: float,
           act_order: bool, static_groups: bool) -> None:
    if W.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight (out, in), got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"gptq_quantize: H has shape {tuple(H.shape)}; a weight with {cols} input columns needs ({cols}, {cols})")
    if not isinstance(args, QuantArgs) or args.dynamic:
        raise ValueError("gptq_quantize quantizes weights offline; pass static (dynamic: false) QuantArgs")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size={block_size!r} must be a positive integer (e.g. 128)")
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"gptq_quantize: damp={damp!r} must be a positive number (fraction of the mean Hessian diagonal, e.g. 0.01)")
    if act_order and not static_groups and args.granularity == "group":
        raise ValueError(
            "gptq_quantize: act_order with static_groups=False would form groups in permuted order and "
            "need a g_idx, which the packed format does not have; use static_groups=True"
        )
    if not bool(torch.isfinite(H).all()):
        raise GPTQError("GPTQ: the Hessian has NaN or inf entries; the layer's calibration inputs are not finite")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("gptq_quantize: the weight has NaN or inf entries")


def _quantize_block(W1, E1, U1, Q, i1, i2, gs, lazy, args, scale, zero, S, Z) -> None:
    """Columns i1..i2 (one block): round each, spread its error over the block's later columns.
    W1 (out, b) the block's weights, updated in place; E1 (out, b) receives the scaled errors;
    U1 (b, b) the block of the inverse-Hessian factor; Q (out, in) receives the codes."""
    qmin, qmax = float(args.qmin), float(args.qmax)
    fmt = element_format(args) if args.type == "float" else None
    for i in range(i2 - i1):
        j = i1 + i
        if lazy:
            g = j // gs
            if j % gs == 0:  # first column of a group: qparams from the up-to-date weights
                s_g, z_g = _qparams(W1[:, i:i + gs], args)  # (out, 1): the slice is one group
                scale[:, g], zero[:, g] = s_g[:, 0], z_g[:, 0]
            s, z = scale[:, g], zero[:, g]
        else:
            s, z = S[:, j], Z[:, j]
        w = W1[:, i]  # (out,)
        if fmt is not None:  # a float grid: Q holds the grid values (encoded once at the end)
            v = round_to_grid(w / s, fmt)
            Q[:, j] = v
            e = (w - v * s) / U1[i, i]  # (out,)
        else:
            q = torch.clamp(torch.round(w / s) + z, qmin, qmax)  # as primitives.quantize
            Q[:, j] = q
            e = (w - (q - z) * s) / U1[i, i]  # (out,)
        W1[:, i:].addmm_(e[:, None], U1[i:i + 1, i:], alpha=-1.0)  # rank-1 (addr_ is far slower on CPU)
        E1[:, i] = e


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    args: QuantArgs,
    block_size: int = 128, damp: float = 0.01, act_order: bool = False, static_groups: bool = True,
    *,
    objective: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Quantize W (out, in) against the input Hessian H (in, in).

    Returns (q int8 (out, in), scale, zero, stats); stats holds `loss` (the layer objective
    tr((W-Ŵ) H (W-Ŵ)ᵀ) with the H given, undampened; None with `objective=False`), `damp` (the
    dampening finally used), `dead` (inputs with H_jj = 0), `act_order`, `static_groups`. Runs on H's device.
    """
    _check(W, H, args, block_size, damp, act_order, static_groups)
    return _solve(W, H, args, block_size, damp, act_order, static_groups, objective)


def _solve(W, H, args, block_size, damp, act_order, static_groups, objective):
    out_dev = W.device
    dev = H.device
    rows, cols = W.shape
    W0 = W.detach().to(dev, torch.float32)  # (out, in) original
    H = H.detach().to(dev)

    diag = H.diagonal()
    dead, live_mean = dead_inputs(H)  # (in,)
    n_dead = int(dead.sum())

    grouped = args.granularity == "group"
    gs = args.group_size if grouped else cols
    # block float formats take their scales from the whole weight (NVFP4's per-tensor scale): static
    lazy = grouped and not static_groups and not act_order and args.block_format is None
    ng = n_groups(cols, args)
    if lazy:
        scale = torch.empty(rows, ng, dtype=torch.float32, device=dev)
        zero = torch.empty(rows, ng, dtype=torch.float32, device=dev)
    else:
        scale, zero = _qparams(W0, args)  # (out|1, n_groups) from the original weight

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    Wk = W0.clone() if perm is None else W0[:, perm].contiguous()  # working copy, processing order
    rev = (perm if perm is not None else torch.arange(cols, device=dev)).flip(0)  # processing order, reversed
    U, damp_used = inverse_cholesky(H, rev, dead[rev], damp, live_mean)  # (in, in) upper, float32

    if not lazy:  # per-column qparams in processing order
        S = expand_qparam(scale.float(), rows, cols, args)  # (out, in)
        Z = expand_qparam(zero.float(), rows, cols, args)
        if perm is not None:
            S, Z = S[:, perm], Z[:, perm]
        S, Z = S.contiguous(), Z.contiguous()
    Q = torch.empty(rows, cols, dtype=torch.float32, device=dev)  # codes (float formats: grid values) in processing order

    step = max(1, block_size // gs) * gs if lazy else block_size  # lazy groups never straddle blocks
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1 = Wk[:, i1:i2].clone()  # (out, b) this block, receives the in-block updates
        E1 = torch.zeros_like(W1)  # (out, b) scaled errors, for the lazy update of the rest
        U1 = U[i1:i2, i1:i2]
        with single_thread(dev):  # a column at a time: ops too small for a thread pool
            _quantize_block(W1, E1, U1, Q, i1, i2, gs, lazy, args, scale, zero, None if lazy else S, None if lazy else Z)
        if i2 < cols:
            Wk[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    q = encode_fp(Q, args) if args.type == "float" else Q.to(torch.int8)
    stats = {
        "loss": layer_objective(W0, dequantize(q, scale, zero, args), H) if objective else None,
        "damp": damp_used,
        "dead": n_dead,
        "act_order": bool(act_order),
        "static_groups": not lazy,
    }
    return q.to(out_dev), scale.to(out_dev), zero.to(out_dev), stats


@torch.no_grad()
def gptq_quantize_shared(
    weights: list[torch.Tensor],
    H: torch.Tensor,
    args: QuantArgs,
    block_size: int = 128, damp: float = 0.01, act_order: bool = False, static_groups: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]:
    """`gptq_quantize` for several weights that read the same input (e.g. q, k and v).

    GPTQ treats rows independently given H, so with per-channel or per-group qparams the
    weights are stacked along their output dimension and solved in one pass (one factorization,
    one column loop): the same codes as separate calls, at a fraction of the cost. Tensor
    granularity shares one scale across a whole weight, so those are solved one by one.
    Returns one (q, scale, zero, stats) per weight; each stats' `loss` is that weight's own.
    """
    if not weights:
        return []
    if len(weights) == 1 or args.granularity in ("tensor", "block"):  # scales that span rows: one weight at a time
        return [gptq_quantize(W, H, args, block_size, damp, act_order, static_groups) for W in weights]
    cols = {W.shape[-1] for W in weights}
    if any(W.dim() != 2 for W in weights) or len(cols) != 1:
        raise ValueError(f"gptq_quantize_shared: weights must be 2-D with the same input width, got {[tuple(W.shape) for W in weights]}")
    sizes = [W.shape[0] for W in weights]
    q, scale, zero, stats = gptq_quantize(torch.cat([W.to(H.device) for W in weights]), H, args, block_size, damp,
                                          act_order, static_groups, objective=False)
    out = []
    for W, qi, si, zi in zip(weights, q.split(sizes), scale.split(sizes), zero.split(sizes)):
        qi, si, zi = qi.contiguous().to(W.device), si.contiguous().to(W.device), zi.contiguous().to(W.device)
        loss = layer_objective(W.float(), dequantize(qi, si, zi, args), H)
        out.append((qi, si, zi, {**stats, "loss": loss}))
    return out
