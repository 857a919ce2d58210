"""Q/K scaling around RoPE, after FireQ (Baek et al. 2025, arXiv:2505.20839): keys are divided
and queries multiplied channel by channel, so Q·Kᵀ is unchanged while the keys' outlier channels
(INT4 per-token cache) hand range to the queries (FP8).

Per decoder layer, with D = head_dim and the RoPE pairs (i, i + D/2) of transformers' convention:

- pre-RoPE: a factor per (KV head, channel), equal within each RoPE pair, so it commutes with the
  rotation and folds exactly into k_proj (rows divided) and q_proj (rows of every query head of
  the group multiplied): free at run time (`fold_pre_rope`);
- post-RoPE: a factor per (KV head, channel) with no pair constraint, applied online to the
  rotated keys and queries (`LmpressAttention.qk_post_scale`): it reaches the channels whose
  range RoPE mixes within a pair.

The factors follow SmoothQuant's balance s = amax_k^α / amax_q^(1-α) over the calibration set
(`balance`; α = 0.5 meets in the middle), the query side taken over the query heads of each KV
group. The paper's own formula for its factors is not reproduced here (lmpress's rule, from the
paper's description); the placement (pre-RoPE folded, post-RoPE online) is the paper's.
"""
from __future__ import annotations

import torch
from torch import nn

MIN_FACTOR, MAX_FACTOR = 1e-4, 1e4


def balance(amax_k: torch.Tensor, amax_q: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s = amax_k^α / amax_q^(1-α) elementwise (1 where either range is 0), clamped to [1e-4, 1e4]."""
    k, q = amax_k.double(), amax_q.double()
    s = k.pow(alpha) / q.pow(1 - alpha)
    s = torch.where((k > 0) & (q > 0), s, torch.ones_like(s))
    return s.clamp(MIN_FACTOR, MAX_FACTOR).float()


def per_kv_group(amax_q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(heads, D) query ranges -> (n_kv, D): the largest over the query heads sharing each KV head."""
    heads, d = amax_q.shape
    return amax_q.reshape(n_kv, heads // n_kv, d).amax(dim=1)  # (n_kv, group, D) -> (n_kv, D)


def pair_shared(s: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D) with channels i and i + D/2 (one RoPE pair) given their larger factor."""
    half = s.shape[-1] // 2
    m = torch.maximum(s[..., :half], s[..., half:])
    return torch.cat([m, m], dim=-1)


@torch.no_grad()
def fold_pre_rope(q_proj: nn.Linear, k_proj: nn.Linear, s: torch.Tensor, n_heads: int) -> None:
    """Divide k_proj's output channels by `s` (n_kv, D) and multiply q_proj's by it (each query
    head by its KV head's factors), in place: Q·Kᵀ is unchanged; exact in float64."""
    n_kv, d = s.shape
    sk = s.reshape(-1).to(k_proj.weight)  # (n_kv * D,)
    sq = s.repeat_interleave(n_heads // n_kv, dim=0).reshape(-1).to(q_proj.weight)  # (heads * D,)
    k_proj.weight.div_(sk[:, None])
    q_proj.weight.mul_(sq[:, None])
    if k_proj.bias is not None:
        k_proj.bias.div_(sk)
    if q_proj.bias is not None:
        q_proj.bias.mul_(sq)


def scale_qk(query: torch.Tensor, key: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE: query (B, heads, T, D) times and key (B, n_kv, T, D) divided by `s` (n_kv, D)."""
    group = query.shape[1] // s.shape[0]
    sq = s.repeat_interleave(group, dim=0)[None, :, None, :].to(query.dtype)  # (1, heads, 1, D)
    return query * sq, key / s[None, :, None, :].to(key.dtype)


__all__ = ["balance", "fold_pre_rope", "pair_shared", "per_kv_group", "scale_qk"]
