"""Pruning masks and importance scores: pure tensor functions.

A mask is a bool tensor shaped like the weight (out, in): True = keep. Scores are float tensors
of the same shape: larger = more important.

- `nm_mask(scores, n, m)`: N:M along the input dimension: in every run of `m` consecutive input
  columns of a row, keep the `n` highest scores (ties to the lower column). A last partial run
  of r < m columns (in % m != 0) keeps min(n, r) of its columns, so every group holds at most
  `n` kept weights and every full group exactly `n`.
- `unstructured_mask(scores, sparsity, per_row)`: drop the round(sparsity * count) lowest scores
  of the whole matrix (magnitude pruning's comparison group) or of each row (Wanda's).
- `magnitude_scores(W)` = |W|; `wanda_scores(W, col_norms)` = |W_ij| · ‖X_j‖₂ (Sun et al., 2023,
  "A Simple and Effective Pruning Approach for Large Language Models").
- `parse_structure("2:4")` -> (2, 4); "unstructured" -> None.
"""
from __future__ import annotations

import torch

SUPPORTED_M = (4, 8, 16)


def parse_structure(structure: str) -> tuple[int, int] | None:
    """'N:M' -> (n, m) with 0 < n < m, m in {4, 8, 16}; 'unstructured' -> None."""
    if structure == "unstructured":
        return None
    n, sep, m = str(structure).partition(":")
    if not (sep and n.isdigit() and m.isdigit()):
        raise ValueError(f"structure={structure!r}: use 'N:M' (e.g. '2:4', '4:8') or 'unstructured'")
    n, m = int(n), int(m)
    if m not in SUPPORTED_M or not 0 < n < m:
        raise ValueError(f"structure={structure!r}: N:M needs 0 < N < M and M in {list(SUPPORTED_M)}")
    return n, m


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W|, (out, in) float32."""
    return W.detach().float().abs()


def wanda_scores(W: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂, (out, in) float32; `col_norms` (in,) are the input column norms over the
    calibration tokens (`HessianAccumulator.col_norms`)."""
    if W.dim() != 2 or col_norms.shape != (W.shape[1],):
        raise ValueError(f"wanda_scores: weight {tuple(W.shape)} needs col_norms of shape ({W.shape[-1]},), got {tuple(col_norms.shape)}")
    return W.detach().float().abs() * col_norms.to(W.device, torch.float32)[None, :]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` best of every `m` consecutive input columns (see the module note), (out, in) bool."""
    if scores.dim() != 2:
        raise ValueError(f"nm_mask expects 2-D scores (out, in), got shape {tuple(scores.shape)}")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"nm_mask: need integers 0 < n < m, got n={n!r}, m={m!r}")
    rows, cols = scores.shape
    full = cols - cols % m
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if full:
        s = scores[:, :full].float().reshape(rows, full // m, m)  # (out, groups, m)
        # stable descending sort: equal scores keep the lower column first
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :n]  # (out, groups, n)
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)
        mask[:, :full] = keep.reshape(rows, full)
    r = cols - full
    if r:
        tail = scores[:, full:].float()  # (out, r)
        k = min(n, r)
        order = torch.sort(tail, dim=-1, descending=True, stable=True).indices[:, :k]
        mask[:, full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(-1, order, True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Drop the round(sparsity · count) lowest scores of the matrix (or of each row), (out, in) bool."""
    if scores.dim() != 2:
        raise ValueError(f"unstructured_mask expects 2-D scores (out, in), got shape {tuple(scores.shape)}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1)")
    rows, cols = scores.shape
    s = scores.float()
    if per_row:
        k = int(round(sparsity * cols))
        mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
        if k:
            drop = torch.sort(s, dim=1, stable=True).indices[:, :k]  # (out, k)
            mask.scatter_(1, drop, False)
        return mask
    k = int(round(sparsity * s.numel()))
    mask = torch.ones(s.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.sort(s.flatten(), stable=True).indices[:k]] = False
    return mask.reshape(rows, cols)


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """OWL's layer outlier ratio D_l: the fraction of (Wanda) scores above m times their mean
    (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity")."""
    return float((scores > m * scores.mean()).float().mean())


def owl_shifts(ratios, lam: float) -> list[float]:
    """Per-layer sparsity shifts from the outlier ratios: (D_l - min D) scaled into [0, 2λ], then
    centred (mean 0), so the average sparsity stays the target; a layer's sparsity becomes
    target - shift (more outliers: denser)."""
    d = torch.tensor(list(ratios), dtype=torch.float64)
    span = float(d.max() - d.min())
    shift = ((d - d.min()) / span * 2 * lam) if span > 0 else torch.zeros_like(d)
    return (shift - shift.mean()).tolist()


def check_nm(mask_or_weight: torch.Tensor, n: int, m: int, exact: bool = True) -> None:
    """Raise if a group of `m` columns holds more than `n` kept (nonzero) entries, or, with
    `exact`, if a full group holds fewer than `n` or a tail group fewer than min(n, r)."""
    x = mask_or_weight if mask_or_weight.dtype == torch.bool else mask_or_weight != 0
    rows, cols = x.shape
    pad = (-cols) % m
    xp = torch.cat([x, x.new_zeros(rows, pad)], 1) if pad else x
    counts = xp.reshape(rows, -1, m).sum(-1)  # (out, groups)
    if bool((counts > n).any()):
        raise AssertionError(f"{int((counts > n).sum())} groups of {m} hold more than {n} kept entries (max {int(counts.max())})")
    if exact:
        want = torch.full_like(counts, n)
        if pad:
            want[:, -1] = min(n, m - pad)
        if bool((counts != want).any()):
            raise AssertionError(f"{int((counts != want).sum())} groups of {m} do not keep exactly {n} entries (min {int(counts.min())})")


def sparsity_of(W: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((W == 0).sum()) / max(W.numel(), 1)
