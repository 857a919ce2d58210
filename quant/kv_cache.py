"""Simulated KV-cache quantization (fake-quant of keys and values inside attention).

`fake_quantize_kv(x, bits, group_size)` quantizes-dequantizes a key or value tensor
(B, heads, T, head_dim) per head and per token, in groups of `group_size` consecutive
head_dim elements (a group never spans two heads: a group larger than head_dim is clamped to
head_dim; a last partial group is allowed), asymmetric min-max by default, with an optional
clip ratio. This is the per-token form QuaRot evaluates; KIVI's per-channel keys and the
full-precision residual window belong to the runtime KV cache (a later issue).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .primitives import fake_quantize
from .scheme import KV_BITS, KVCacheArgs, QuantArgs


def fake_quantize_kv(
    x: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, clip_ratio: float = 1.0
) -> torch.Tensor:
    """Quantize-dequantize `x` (B, heads, T, head_dim) per head, per token, groups along head_dim.

    Returns a tensor of the same shape and dtype. Qparams come from each group's own min/max
    (the range always includes 0, as for every lmpress quantizer).
    """
    if x.dim() != 4:
        raise ValueError(f"fake_quantize_kv expects (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    if bits not in KV_BITS:
        raise ValueError(f"fake_quantize_kv: bits={bits!r}; use one of {list(KV_BITS)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"fake_quantize_kv: group_size={group_size!r} must be a positive integer")
    d = x.shape[-1]
    g = min(group_size, d)
    pad = (-d) % g
    # zero padding leaves every group's qparams unchanged (the range is clamped to include 0)
    xp = F.pad(x, (0, pad)) if pad else x
    rows = xp.reshape(-1, g)  # (B * heads * T * groups, g): one row per (head, token, group)
    args = QuantArgs(bits=bits, granularity="channel", symmetric=symmetric, clip_ratio=clip_ratio)
    out = fake_quantize(rows, args).reshape(xp.shape)
    return out[..., :d] if pad else out


def check_kv_args(args: KVCacheArgs) -> None:
    """Raise NotImplementedError for the KV settings the simulated quantizer does not cover yet."""
    if args.key_granularity != "token":
        raise NotImplementedError(
            f"kv_cache.key_granularity={args.key_granularity!r}: the simulated KV quantizer does per-token groups "
            "along head_dim for keys and values; per-channel keys (KIVI) come with the runtime KV cache. "
            "Set `kv_cache: {..., key_granularity: token}` in the recipe."
        )
    if args.residual:
        raise NotImplementedError(
            f"kv_cache.residual={args.residual}: a full-precision residual window comes with the runtime KV cache "
            "(KIVI); the simulated quantizer quantizes every token. Set residual: 0."
        )


def fake_quantize_keys_values(
    key: torch.Tensor, value: torch.Tensor, args: KVCacheArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both K and V (B, kv_heads, T, head_dim) fake-quantized with the recipe's KV settings."""
    check_kv_args(args)
    kq = fake_quantize_kv(key, args.bits, args.group_size, symmetric=args.symmetric)
    vq = fake_quantize_kv(value, args.bits, args.group_size, symmetric=args.symmetric)
    return kq, vq
