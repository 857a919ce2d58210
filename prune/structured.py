"""Structured pruning: drop whole FFN channels or attention heads, physically shrinking the
matrices. Pure functions over weights and calibration statistics.

Importance (calibration-based, the structured analogue of Wanda's |W|·‖X‖, cf. Wanda-sp in
An et al., 2024, "Fluctuation-based Adaptive Structured Pruning"): removing input channel c of a
linear with weight W (out, in) removes W[:, c]·x_c from its output, of energy Σ_t x_tc²·‖W[:, c]‖²
when channels are uncorrelated. So:

- FFN channel c (row c of gate/up, column c of down): ‖X_c‖₂ · ‖W_down[:, c]‖₂, with X the
  down projection's input (the gated activation);
- attention head h (rows of q_proj, columns of o_proj): sqrt(Σ_{j in h} ‖X_j‖₂² · ‖W_o[:, j]‖₂²),
  with X the o projection's input.

Heads are removed the same number per key/value group (grouped-query attention needs every KV
head to serve the same number of query heads); k_proj / v_proj keep all their heads.
"""
from __future__ import annotations

import torch
from torch import nn


def ffn_channel_scores(down_weight: torch.Tensor, down_in_norms: torch.Tensor) -> torch.Tensor:
    """(intermediate,) importance of every FFN channel."""
    return down_in_norms.float() * down_weight.detach().float().norm(dim=0)


def head_scores(o_weight: torch.Tensor, o_in_norms: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(n_heads,) importance of every query head."""
    e = o_in_norms.float().pow(2) * o_weight.detach().float().pow(2).sum(0)  # (heads*head_dim,)
    return e.reshape(-1, head_dim).sum(1).sqrt()  # (heads,)


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best entries, in their original order (ties to the lower index)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"keep_top: k={k} must lie in [1, {scores.numel()}]")
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def keep_heads(scores: torch.Tensor, n_kv: int, keep_per_group: int) -> torch.Tensor:
    """Query heads to keep, `keep_per_group` of each KV group's heads (original order)."""
    n_heads = scores.numel()
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not split into {n_kv} KV groups")
    g = n_heads // n_kv
    kept = [keep_top(scores[i * g:(i + 1) * g], keep_per_group) + i * g for i in range(n_kv)]
    return torch.cat(kept)


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The feature indices (heads*head_dim) of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).reshape(-1)


def shrink_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding only the given output rows and/or input columns of `linear`."""
    W = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        W = W[rows.to(W.device)]
        b = b[rows.to(W.device)] if b is not None else None
    if cols is not None:
        W = W[:, cols.to(W.device)]
    new = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if b is not None:
            new.bias.copy_(b)
    new.requires_grad_(linear.weight.requires_grad)
    return new
