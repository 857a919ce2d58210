"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), optionally joint with weight quantization.

For a linear with weight W (out, in) and input Hessian H = (2/N) Σ xᵀx, the columns are swept
left to right in blocks of `block_size`. With U the upper Cholesky factor of the dampened
H⁻¹ (the same factor GPTQ uses, `lmpress.quant.gptq.inverse_cholesky`), the OBS saliency of
dropping w_ij is w_ij² / U_jj² (U_jj² = [H⁻¹]_jj restricted to the columns not yet processed):

- N:M: when the sweep reaches the first column of a group of M, the N columns of each row with
  the largest w²/U_jj² (on the weights as updated so far) are kept, the others pruned;
- unstructured: at the start of each block, the `sparsity` fraction of the block's entries
  with the smallest w²/U_jj² is pruned (one threshold per block: SparseGPT's adaptive mask).

Each column is then replaced by its target (0 where pruned; with `quant`, the quantized value
where kept, so pruning and rounding errors are compensated together) and the error
e = (w - ŵ) / U_jj is spread over the later columns: W[:, k] -= e · U[j, k] (lazy block updates,
as in GPTQ).

Quantization inside the sweep (`quant` QuantArgs): channel/tensor qparams are computed up front
from the original weight; group qparams when the sweep reaches a group's first column, from the
weights as updated so far with the pruning decided then (N:M groups not yet reached are masked
provisionally by their current saliency), so the range covers what is kept. A pruned weight's
code is the zero point, which dequantizes to exactly 0 (qparam ranges always contain 0).

`refit=True` (float weights only) then replaces the kept weights of every row by the exact
minimizer of the damped layer objective given the mask: with H_d = H + λI and S the row's kept
columns, ŵ_S = [H_d]_SS⁻¹ [H_d w]_S (w the original row; ŵ = 0 off S). The sweep's OBS updates
only move columns to the right of each pruned one, so its weights are not this optimum; the
refit lowers the layer objective further for the same mask (cf. Boža, "Fast and Optimal Weight
Update for Pruned Large Language Models", 2024, which solves the same least squares by ADMM).

Dead inputs (H_jj = 0) get H_jj = 1 and their weights are zeroed first (free to prune: they never
saw a nonzero input), as in the SparseGPT reference code. Dampening: H + damp · mean(diag H) · I.
"""
from __future__ import annotations

import logging
import math

import torch

from lmpress.quant.gptq import inverse_cholesky, layer_objective, single_thread
from lmpress.quant.primitives import compute_qparams, dequantize, expand_qparam
from lmpress.quant.scheme import QuantArgs

from .masks import nm_mask

log = logging.getLogger(__name__)


def _check(W, H, nm, sparsity, quant, block_size, damp) -> None:
    if W.dim() != 2:
        raise ValueError(f"sparsegpt_prune expects a 2-D weight (out, in), got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"sparsegpt_prune: H has shape {tuple(H.shape)}; {cols} input columns need ({cols}, {cols})")
    if nm is None:
        if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsegpt_prune: unstructured pruning needs sparsity in [0, 1), got {sparsity!r}")
    else:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"sparsegpt_prune: N:M needs 0 < N < M, got {n}:{m}")
        if block_size % m:
            raise ValueError(f"sparsegpt_prune: block_size={block_size} must be a multiple of M={m} (groups must not straddle blocks)")
        if quant is not None and quant.granularity == "group" and quant.group_size % m:
            raise ValueError(f"sparsegpt_prune: group_size={quant.group_size} must be a multiple of M={m}")
    if quant is not None:
        if not isinstance(quant, QuantArgs) or quant.dynamic:
            raise ValueError("sparsegpt_prune: quant must be static (dynamic: false) weight QuantArgs")
        if quant.granularity == "group" and block_size % quant.group_size and quant.group_size % block_size:
            raise ValueError(f"sparsegpt_prune: block_size={block_size} and group_size={quant.group_size}: one must divide the other")
        if quant.mse_clip:
            raise ValueError("sparsegpt_prune: mse_clip is not supported inside the joint sweep; use min-max qparams")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"sparsegpt_prune: block_size={block_size!r} must be a positive integer (e.g. 128)")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"sparsegpt_prune: damp={damp!r} must be a positive number (e.g. 0.01)")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("sparsegpt_prune: the Hessian has NaN or inf entries")


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    nm: tuple[int, int] | None = (2, 4),
    sparsity: float | None = None,
    quant: QuantArgs | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    refit: bool = False,
) -> dict:
    """Prune (and optionally quantize) W (out, in) against H (in, in). Runs on H's device.

    Returns a dict: `weight` (the new float32 weight, zeros where pruned), `mask` (bool, True =
    kept), with `quant`: `codes` int8, `scale`, `zero` (dequantize(codes, scale, zero) == weight);
    `loss` = tr((W-Ŵ) H (W-Ŵ)ᵀ) with the undampened H; `damp` used; `dead` inputs.
    """
    _check(W, H, nm, sparsity, quant, block_size, damp)
    if refit and quant is not None:
        raise ValueError("sparsegpt_prune: refit needs float weights (quant=None): quantized kept values must stay on their grid")
    with single_thread(H.device):
        out = _sweep(W, H, nm, sparsity, quant, block_size, damp)
    if refit:
        W0 = W.detach().to(H.device, torch.float32)
        out["sweep_loss"] = out["loss"]
        out["weight"] = masked_least_squares(W0, H, out["mask"], out["damp"])
        out["loss"] = layer_objective(W0, out["weight"], H)
    return out


@torch.no_grad()
def masked_least_squares(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp: float, rows_per_chunk: int = 64) -> torch.Tensor:
    """argmin over Ŵ with Ŵ = 0 where `mask` is False of tr((W-Ŵ) H_d (W-Ŵ)ᵀ), H_d = H + damp·mean(diag H)·I
    (dead inputs: H_jj = 1, as in the sweep). Row by row ŵ_S = [H_d]_SS⁻¹ [H_d w]_S, for chunks of rows
    at once: each row's kept columns are gathered, padded to the chunk's largest count with identity
    rows and zero right-hand sides (so unstructured masks work too). The batched Cholesky runs in
    float32 (the precision of the sweep's own factor; 2x faster than float64 and half the gather
    traffic), a chunk whose float32 factorization fails is redone in float64."""
    rows, cols = W.shape
    Hd = H.detach().to(torch.float64).clone()  # (in, in)
    diag = Hd.diagonal()
    dead = diag <= 0
    live = diag[~dead]
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    diag[dead] = 1.0
    diag.add_(damp * (float(live.mean()) if live.numel() else 1.0))
    W64 = W.to(Hd.device, torch.float64)
    W64[:, dead] = 0.0
    rhs_full = (W64 @ Hd).to(torch.float32)  # (out, in): [H_d w] per row (H_d symmetric)
    Hd32 = Hd.to(torch.float32)
    mask = mask.to(Hd.device)
    out = torch.zeros(rows, cols, dtype=torch.float32, device=Hd.device)
    counts = mask.sum(1)  # (out,)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # kept columns first, in column order
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, rows)
        k = int(counts[r0:r1].max())
        if k == 0:
            continue
        idx = order[r0:r1, :k]  # (R, k) kept column indices (padded with pruned ones)
        b = rhs_full[r0:r1].gather(1, idx)  # (R, k)
        A = Hd32[idx[:, :, None], idx[:, None, :]]  # (R, k, k) = [H_d]_SS per row
        valid = torch.arange(k, device=Hd.device)[None, :] < counts[r0:r1, None]  # (R, k)
        if not bool(valid.all()):  # padded slots: identity rows / columns, zero right-hand side
            A.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0.0)
            A.diagonal(dim1=1, dim2=2)[~valid] = 1.0
            b.masked_fill_(~valid, 0.0)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            log.warning("sparsegpt refit: float32 Cholesky failed for rows %d..%d; redoing them in float64", r0, r1)
            L = torch.linalg.cholesky(A.double())
            b = b.double()
        x = torch.cholesky_solve(b[:, :, None], L)[:, :, 0].to(torch.float32)  # (R, k)
        out[r0:r1].scatter_(1, idx, x.masked_fill(~valid, 0.0))
    return out


def _sweep(W, H, nm, sparsity, quant, block_size, damp) -> dict:
    dev = H.device
    rows, cols = W.shape
    W0 = W.detach().to(dev, torch.float32)
    H = H.detach()
    diag = H.diagonal()
    dead = diag <= 0
    n_dead = int(dead.sum())
    live_mean = float(diag[~dead].double().mean()) if n_dead < cols else 1.0
    rev = torch.arange(cols - 1, -1, -1, device=dev)  # natural column order, reversed (see inverse_cholesky)
    U, damp_used = inverse_cholesky(H, rev, dead[rev], damp, live_mean)  # (in, in) upper factor of H⁻¹, float32
    Wk = W0.clone()
    Wk[:, dead] = 0.0
    d2 = U.diagonal().pow(2)  # (in,) the saliency denominators

    grouped = quant is not None and quant.granularity == "group"
    gs = quant.group_size if grouped else cols
    if quant is not None:
        if grouped:
            scale = torch.ones(rows, -(-cols // gs), dtype=torch.float32, device=dev)
            zero = torch.zeros_like(scale)
        else:
            scale, zero = compute_qparams(W0, quant)  # (out|1, 1)
            S = expand_qparam(scale, rows, 1, quant)[:, 0].contiguous()  # (out,)
            Z = expand_qparam(zero, rows, 1, quant)[:, 0].contiguous()
        codes = torch.empty(rows, cols, dtype=torch.float32, device=dev)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=dev)

    step = block_size
    if grouped and gs > block_size:
        step = gs  # a group never straddles a block (then block_size divides gs)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1 = Wk[:, i1:i2].clone()  # (out, b)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if nm is None:
            sal = W1.pow(2) / d2[i1:i2][None, :]  # (out, b)
            k = int(round(float(sparsity) * sal.numel()))
            keep1 = torch.ones_like(W1, dtype=torch.bool)
            if k:
                keep1.view(-1)[torch.sort(sal.flatten(), stable=True).indices[:k]] = False
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            j = i1 + i
            if nm is not None and i % nm[1] == 0:
                hi = min(i + nm[1], i2 - i1)
                sal = W1[:, i:hi].pow(2) / d2[j:j + hi - i][None, :]
                keep1[:, i:hi] = nm_mask(sal, *nm)
            if grouped and j % gs == 0:
                hi = min(i + gs, i2 - i1)
                prov = keep1[:, i:hi].clone()
                if nm is not None:  # groups of M not reached yet: provisional masks from current saliency
                    prov = nm_mask(W1[:, i:hi].pow(2) / d2[j:j + hi - i][None, :], *nm)
                    first = min(nm[1], hi - i)
                    prov[:, :first] = keep1[:, i:i + first]
                s_g, z_g = compute_qparams(W1[:, i:hi] * prov, quant)  # (out, 1)
                scale[:, j // gs], zero[:, j // gs] = s_g[:, 0], z_g[:, 0]
            w = W1[:, i]  # (out,)
            kept = keep1[:, i]
            if quant is not None:
                if grouped:
                    s, z = scale[:, j // gs], zero[:, j // gs]
                else:
                    s, z = S, Z
                q = torch.clamp(torch.round(w / s) + z, quant.qmin, quant.qmax)
                q = torch.where(kept, q, z)  # pruned: the zero point, i.e. exactly 0
                codes[:, j] = q
                target = (q - z) * s
            else:
                target = torch.where(kept, w, torch.zeros_like(w))
            e = (w - target) / U1[i, i]  # (out,)
            W1[:, i:].addmm_(e[:, None], U1[i:i + 1, i:], alpha=-1.0)
            W1[:, i] = target
            E1[:, i] = e
        Wk[:, i1:i2] = W1
        mask[:, i1:i2] = keep1
        if i2 < cols:
            Wk[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)

    out = {"mask": mask, "damp": damp_used, "dead": n_dead}
    if quant is not None:
        q8 = codes.to(torch.int8)
        out.update(codes=q8, scale=scale, zero=zero)
        Wk = dequantize(q8, scale, zero, quant)
    Wk = torch.where(mask, Wk, torch.zeros_like(Wk))
    out["weight"] = Wk
    out["loss"] = layer_objective(W0, Wk, H)
    return out
