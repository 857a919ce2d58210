"""KV-cache quantization maths: the per-token form (QuaRot) and KIVI with residual window and sinks.

Two forms, chosen by `KVCacheArgs.per_token_only`:

- per-token (QuaRot): `fake_quantize_kv(x, bits, group_size)` quantizes-dequantizes K and V
  (B, heads, T, head_dim) per head and per token in groups along head_dim, min-max with the
  range clamped to include 0 (as every lmpress weight quantizer). Every token, every position.
  The FP8 cache (`type: float`) is this form with static E4M3 scales (`fake_quantize_kv_fp8`).

- KIVI (Liu et al. 2024, arXiv:2402.02750): keys per channel over groups of G consecutive tokens,
  values per token over groups of G head_dim channels (G clamped to head_dim), asymmetric
  min-max x ≈ u·scale + min with u in [0, 2^b) and scale, min stored in float16 (the runtime
  cache stores exactly these, `lmpress.kernels.kv_quant`); an optional clip of each group's
  range about its midpoint (`clip_ratio`, or per group the best ratio of `KV_CLIP_GRID` for the
  squared error, `clip_search`). The first `sink_tokens` tokens are never quantized.

  Flush rule (which tokens the cache holds quantized when it holds n tokens, the current one
  included): quantized keys are [S, S + qk(n)) and values [S, S + qv(n)) with
      qk(n) = G · floor(max(0, n - S - R) / G)   (keys per channel: whole groups of G tokens)
      qv(n) = max(0, n - S - R)                  (values per token: token by token)
  so the most recent R tokens are always in full precision; a key group is flushed as soon as
  it is complete and its newest token is R tokens old, leaving R..R+G-1 keys and exactly R
  values in full precision (KIVI's queue of R values; KIVI's reference code flushes the key
  residual R tokens at a time when it reaches R, which can leave as few as 1 full-precision key:
  this rule keeps at least R, for the same memory up to G tokens). With per-token keys
  (key_granularity: token) qk = qv.

  Decode-exact simulation: in a forward over T positions the query at absolute position t sees
  the cache as it is when t is decoded (n = t + 1): key s is quantized iff S <= s < S + qk(t+1),
  value s iff S <= s < S + qv(t+1). A group's quantized values never change once complete
  (keys: G fixed tokens; values: one token), so one quantized copy of K and V serves all queries
  and a per-(query, key) mask picks the quantized or the full-precision entry
  (`kv_mixed_attention`). Perplexity therefore sees every position as token-by-token decoding
  would, and the runtime cache (`lmpress.kernels.kv_cache.QuantizedKVCache`) gives the same.

Keys may be quantized in another basis (`to_basis`/`from_basis`): after QuaRot's online Q/K
Hadamard (post-RoPE), or RotateKV's pre-RoPE grouped-head rotation (`KeyRotation`): undo RoPE,
reorder channels, Hadamard across the grouped heads; the inverse and RoPE are applied to the
dequantized keys (online). Values' per-head rotation is folded offline into v_proj / o_proj
(`fold_value_rotation`), like QuaRot's R2.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fp import E4M3, round_to_grid
from .hadamard import hadamard_factors, hadamard_matrix, hadamard_transform, has_hadamard, random_hadamard, random_signs
from .primitives import dequantize
from .scheme import KV_BITS, KV_CLIP_GRID, KVCacheArgs, QuantArgs

PARAM_DTYPE = torch.float16  # scale and min as the runtime cache stores them
MIN_SCALE = 1e-5


# =========================================================================== per-token form (QuaRot)
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
    return dequantize_kv_tokens(*quantize_kv_tokens(x, bits, group_size, symmetric, clip_ratio), bits, symmetric,
                                clip_ratio, x.shape[-1], x.dtype)


def _token_args(bits: int, symmetric: bool, clip_ratio: float) -> QuantArgs:
    return QuantArgs(bits=bits, granularity="channel", symmetric=symmetric, clip_ratio=clip_ratio)  # rows: (token, group)


def quantize_kv_tokens(x: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                       clip_ratio: float = 1.0, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token form's codes of `x` (B, heads, T, head_dim): (int8 codes (B, heads, T, Dp), scale and zero
    point float32 (B, heads, T, Dp / g)), g = min(group_size, head_dim), Dp = head_dim padded to whole groups.
    Each token's groups are quantized on their own, so the codes of a concatenation are the concatenated codes
    (the runtime cache quantizes each token once, `kernels.kv_cache.PerTokenKVLayer`). `fake_quantize_kv` is
    `dequantize_kv_tokens` of these. `unsigned`: the codes and the zero point both shifted by 2^(bits-1)
    (uint8 codes in [0, 2^bits), the form the runtime cache packs and stores), the same integers otherwise."""
    d = x.shape[-1]
    g = min(group_size, d)
    pad = (-d) % g
    # zero padding leaves every group's qparams unchanged (the range is clamped to include 0)
    xp = F.pad(x, (0, pad)) if pad else x
    rows = xp.reshape(-1, g).float()  # (B * heads * T * groups, g): one row per (head, token, group)
    args = _token_args(bits, symmetric, clip_ratio)
    # `compute_qparams` + `quantize` of these rows (channel granularity: one range a row) in ~12 ops where the
    # generic pair takes ~30; a decode step pays this per layer (tests/test_kv2.py checks it bit for bit)
    lo, hi = torch.aminmax(rows, dim=1, keepdim=True)  # (rows, 1) each
    lo, hi = lo.clamp_(max=0.0), hi.clamp_(min=0.0)  # the range widened to hold 0
    if clip_ratio != 1.0:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    div = torch.full((), args.sym_divisor if symmetric else args.qmax - args.qmin, dtype=hi.dtype, device=hi.device)
    scale = (torch.maximum(-lo, hi) if symmetric else hi - lo) / div
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero group: scale 1
    zero = torch.zeros_like(scale) if symmetric else (args.qmin - torch.round(lo / scale)).clamp_(args.qmin, args.qmax)
    q = (rows / scale).round_().add_(zero).clamp_(args.qmin, args.qmax)  # (rows, g) integers in [qmin, qmax]
    if unsigned:  # integers below 2^bits: the shift is exact in fp32
        half = float(1 << (bits - 1))
        q, zero = q.add_(half).to(torch.uint8), zero + half
    else:
        q = q.to(torch.int8)
    lead = (*xp.shape[:-1], xp.shape[-1] // g)  # (B, heads, T, groups)
    return q.reshape(xp.shape), scale.reshape(lead), zero.reshape(lead)


def dequantize_kv_tokens(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
                         clip_ratio: float, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv_tokens`: codes (..., Dp) int8 (or the same integers as float32), scale / zero
    (..., Dp / g) -> (..., head_dim) in `dtype`, through `dequantize` (bit-identical to `fake_quantize_kv`)."""
    g = q.shape[-1] // scale.shape[-1]
    args = _token_args(bits, symmetric, clip_ratio)
    out = dequantize(q.reshape(-1, g), scale.reshape(-1, 1), zero.reshape(-1, 1), args, dtype=dtype).reshape(q.shape)
    return out[..., :head_dim] if q.shape[-1] != head_dim else out


def fake_quantize_kv_fp8(x: torch.Tensor, scale: torch.Tensor | None, per_head: bool = False) -> torch.Tensor:
    """`x` (B, heads, T, head_dim) rounded to FP8 E4M3 (ties to even, saturating at ±448) with the
    static `scale`, one value or one per head (any shape holding them: (1,), (heads,), (heads, 1, 1));
    None (not calibrated yet): x's own absmax / 448, per tensor or per head. Same shape and dtype."""
    if scale is None:
        amax = x.detach().abs().amax(dim=(0, 2, 3)) if per_head else x.detach().abs().amax().reshape(1)  # (heads|1,)
        scale = torch.where(amax > 0, amax.float() / E4M3.max, torch.ones_like(amax, dtype=torch.float32))
    s = scale.to(x.device, torch.float32).reshape(1, -1, 1, 1)  # broadcast over (B, heads, T, D)
    return (round_to_grid(x.float() / s, E4M3) * s).to(x.dtype)


def check_kv_args(args: KVCacheArgs, head_dim: int | None = None) -> None:
    """Raise ValueError for KV settings that do not fit a head_dim (KIVI value groups must tile it)."""
    if head_dim is None or args.per_token_only or (args.zipcache and args.key_granularity == "token"):  # rows of whole tokens
        return
    g = min(args.group_size, head_dim)
    if head_dim % g:
        raise ValueError(
            f"kv_cache.group_size={args.group_size}: value groups run along head_dim={head_dim} and must tile it; "
            f"use a divisor of {head_dim} or a group_size >= {head_dim}"
        )


def fake_quantize_keys_values(
    key: torch.Tensor, value: torch.Tensor, args: KVCacheArgs, scales: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both K and V (B, kv_heads, T, head_dim) fake-quantized with per-token settings (QuaRot form),
    or to FP8 with the static (k_scale, v_scale) `scales` (each None until calibrated)."""
    if not args.per_token_only:
        raise ValueError("fake_quantize_keys_values is the per-token form; KIVI settings go through kv_mixed_attention")
    if args.is_float:
        k_scale, v_scale = scales or (None, None)
        per_head = args.scale == "head"
        return fake_quantize_kv_fp8(key, k_scale, per_head), fake_quantize_kv_fp8(value, v_scale, per_head)
    kq = fake_quantize_kv(key, args.bits, args.group_size, symmetric=args.symmetric)
    vq = fake_quantize_kv(value, args.bits, args.group_size, symmetric=args.symmetric)
    return kq, vq


# =========================================================================== KIVI group quantizer
def _range(lo: torch.Tensor, hi: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    if ratio == 1.0:
        return lo, hi
    mid, half = (lo + hi) * 0.5, (hi - lo) * (0.5 * ratio)
    return mid - half, mid + half


def _params(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scale, min) rounded through float16, as stored."""
    scale = ((hi - lo) / qmax).clamp_min(MIN_SCALE).to(PARAM_DTYPE).float()
    return scale, lo.to(PARAM_DTYPE).float()


def _codes(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round((x - mn) / scale).clamp_(0, qmax)  # float32 codes


def minmax_quantize(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max over the last dim (one group a row): (u uint8 (..., G), scale fp16 (...,), min fp16 (...,)).

    x ≈ u·scale + min. With `clip_search` every ratio of `KV_CLIP_GRID` is tried per group and
    the one with the least squared error kept (the first on ties)."""
    if bits not in KV_BITS:
        raise ValueError(f"minmax_quantize: bits={bits!r}; use one of {list(KV_BITS)}")
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)  # (...,)
    ratios = KV_CLIP_GRID if clip_search else (float(clip_ratio),)
    best = None
    for r in ratios:
        scale, mn = _params(*_range(lo, hi, r), qmax)
        u = _codes(xf, scale[..., None], mn[..., None], qmax)
        if len(ratios) == 1:
            best = (u, scale, mn)
            break
        err = (u * scale[..., None] + mn[..., None] - xf).square().sum(-1)  # (...,)
        if best is None:
            best = (u, scale, mn, err)
        else:
            take = err < best[3]
            best = (torch.where(take[..., None], u, best[0]), torch.where(take, scale, best[1]),
                    torch.where(take, mn, best[2]), torch.where(take, err, best[3]))
    u, scale, mn = best[:3]
    return u.to(torch.uint8), scale.to(PARAM_DTYPE), mn.to(PARAM_DTYPE)


def minmax_dequantize(u: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """u (..., G) codes (uint8, or float32 holding them), scale/min (...,) -> values (..., G) in `dtype` (computed in
    float32)."""
    return (u.float() * scale.float()[..., None] + mn.float()[..., None]).to(dtype)


def key_rows(k: torch.Tensor, group: int) -> torch.Tensor:
    """Keys (B, H, n, D), n a multiple of G -> per-channel groups (B, H, D, n/G, G): a row is G tokens of one channel."""
    B, H, n, D = k.shape
    return k.reshape(B, H, n // group, group, D).permute(0, 1, 4, 2, 3)  # (B, H, D, n/G, G)


def rows_to_keys(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of `key_rows`: (B, H, D, n/G, G) -> (B, H, n, D)."""
    B, H, D, ng, G = rows.shape
    return rows.permute(0, 1, 3, 4, 2).reshape(B, H, ng * G, D)


def token_rows(v: torch.Tensor, group: int) -> torch.Tensor:
    """Per-token tensor (B, H, n, D) -> groups along head_dim (B, H, n, D/g, g), g = min(G, D)."""
    B, H, n, D = v.shape
    g = min(group, D)
    return v.reshape(B, H, n, D // g, g)


def fake_quantize_keys_kivi(k: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """Quantize-dequantize keys (B, H, n, D) as the cache stores them (n a multiple of G for per-channel keys)."""
    if args.key_granularity == "token":
        return fake_quantize_tokens_kivi(k, args)
    u, s, m = minmax_quantize(key_rows(k, args.group_size), args.bits, args.clip_ratio, args.clip_search)
    return rows_to_keys(minmax_dequantize(u, s, m, k.dtype))


def fake_quantize_tokens_kivi(v: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """Quantize-dequantize per-token tensors (B, H, n, D) (values) as the cache stores them."""
    u, s, m = minmax_quantize(token_rows(v, args.group_size), args.bits, args.clip_ratio, args.clip_search)
    return minmax_dequantize(u, s, m, v.dtype).reshape(v.shape)


# =========================================================================== flush rule
def quantized_keys(n, args: KVCacheArgs):
    """How many keys (from position sink_tokens on) the cache holds quantized when it holds n tokens.
    `n` an int or an integer tensor."""
    free = n - args.sink_tokens - args.residual
    if isinstance(free, torch.Tensor):
        free = free.clamp(min=0)
    else:
        free = max(0, free)
    return free if args.key_granularity == "token" and not args.zipcache else (free // args.group_size) * args.group_size


def quantized_values(n, args: KVCacheArgs):
    """How many values (from position sink_tokens on) the cache holds quantized when it holds n tokens
    (whole blocks of group_size tokens under GEAR and ZipCache, as keys)."""
    if args.blockwise:
        return quantized_keys(n, args)
    free = n - args.sink_tokens - args.residual
    return free.clamp(min=0) if isinstance(free, torch.Tensor) else max(0, free)


def decode_masks(T: int, q_len: int, args: KVCacheArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mk, mv) bool (q_len, T): key / value s is quantized for the query at absolute position T - q_len + i."""
    t = torch.arange(T - q_len, T, device=device)  # (q_len,) absolute query positions
    s = torch.arange(T, device=device)  # (T,)
    S = args.sink_tokens
    mk = (s[None, :] >= S) & (s[None, :] < S + quantized_keys(t + 1, args)[:, None])
    mv = (s[None, :] >= S) & (s[None, :] < S + quantized_values(t + 1, args)[:, None])
    return mk, mv


Basis = Callable[[torch.Tensor, slice], torch.Tensor]


def quantized_copy(
    key: torch.Tensor,
    value: torch.Tensor,
    args: KVCacheArgs,
    prefix: tuple[int, int] = (0, 0),
    to_basis: Basis | None = None,
    from_basis: Basis | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (B, H, T, D) with every token the cache will have flushed by position T-1 replaced by
    its quantized value. Tokens [S, S + prefix) are already quantized (a runtime cache returns them
    dequantized) and are kept as they are. `to_basis(k, sl)` / `from_basis(kb, sl)` map keys of
    positions `sl` into / out of the basis keys are quantized in."""
    T, S = key.shape[2], args.sink_tokens
    k_lo, k_hi = S + prefix[0], S + quantized_keys(T, args)
    v_lo, v_hi = S + prefix[1], S + quantized_values(T, args)
    kq, vq = key, value
    if k_hi > k_lo:
        if args.key_granularity == "channel" and (k_lo - S) % args.group_size:
            raise ValueError(f"quantized key prefix {prefix[0]} is not a whole number of groups of {args.group_size}")
        sl = slice(k_lo, k_hi)
        kb = key[:, :, sl]
        kb = to_basis(kb, sl) if to_basis is not None else kb
        kb = gear_fake_quantize(kb, args, fake_quantize_keys_kivi) if args.gear else fake_quantize_keys_kivi(kb, args)
        kb = from_basis(kb, sl) if from_basis is not None else kb
        kq = key.clone()
        kq[:, :, sl] = kb.to(key.dtype)
    if v_hi > v_lo:
        vq = value.clone()
        vb = value[:, :, v_lo:v_hi]
        vq[:, :, v_lo:v_hi] = gear_fake_quantize(vb, args, fake_quantize_tokens_kivi) if args.gear else fake_quantize_tokens_kivi(vb, args)
    return kq, vq


# =========================================================================== GEAR
GEAR_ITERS = 4  # power iterations of the low-rank fit


def _blocks(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, n, D), n a multiple of G -> (B, H, n/G, G, D): one block per G tokens of a head."""
    B, H, n, D = x.shape
    return x.reshape(B, H, n // group, group, D)


def gear_outliers(x: torch.Tensor, args: KVCacheArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """GEAR's sparse part: per block of G tokens of a head, the `gear_outliers` share of entries with the
    largest magnitude: (idx int16 (B, H, n/G, k) flat positions in the (G, D) block, vals fp16 (B, H, n/G, k))."""
    blk = _blocks(x, args.group_size).flatten(-2).float()  # (B, H, nb, G*D)
    k = int(round(args.gear_outliers * blk.shape[-1]))
    idx = blk.abs().topk(k, dim=-1).indices.sort(dim=-1).values  # (B, H, nb, k), ascending positions
    return idx.to(torch.int16), blk.gather(-1, idx).to(PARAM_DTYPE)


def _outlier_mask(shape, idx: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """bool (B, H, nb, G*D): True at the sparse part's positions."""
    B, H, n, D = shape
    mask = torch.zeros(B, H, n // args.group_size, args.group_size * D, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, idx.long(), True)


def without_outliers(x: torch.Tensor, idx: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """x (B, H, n, D) with the sparse part's entries set to 0 (what the quantizer sees)."""
    mask = _outlier_mask(x.shape, idx, args).reshape(x.shape)
    return x.masked_fill(mask, 0)


def lowrank(R: torch.Tensor, rank: int, iters: int = GEAR_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` fit of R (..., m, n) by subspace (power) iteration from a fixed seeded start:
    (A (..., m, r), Bt (..., r, n)) with A @ Bt = R Q Qᵀ, Q (..., n, r) orthonormal. Deterministic."""
    n = R.shape[-1]
    r = min(rank, *R.shape[-2:])
    Q = torch.randn(n, r, generator=torch.Generator().manual_seed(0)).to(R)  # (n, r)
    Q = torch.linalg.qr(Q.expand(*R.shape[:-2], n, r)).Q  # (..., n, r)
    for _ in range(iters):
        P = torch.linalg.qr(R @ Q).Q  # (..., m, r)
        Q = torch.linalg.qr(R.transpose(-1, -2) @ P).Q  # (..., n, r)
    return R @ Q, Q.transpose(-1, -2)


def gear_lowrank(x: torch.Tensor, dq: torch.Tensor, idx: torch.Tensor, args: KVCacheArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-rank part of the error x - dq off the sparse positions, per block: (A fp16 (B, H, nb, G, r),
    Bt fp16 (B, H, nb, r, D)); empty factors (r = 0) without `gear_rank`."""
    mask = _outlier_mask(x.shape, idx, args).reshape(x.shape)
    R = _blocks((x.float() - dq.float()).masked_fill(mask, 0), args.group_size)  # (B, H, nb, G, D)
    if args.gear_rank == 0:
        return R[..., :0].to(PARAM_DTYPE), R[..., :0, :].to(PARAM_DTYPE)
    A, Bt = lowrank(R, args.gear_rank)
    return A.to(PARAM_DTYPE), Bt.to(PARAM_DTYPE)


def gear_apply(dq: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
               args: KVCacheArgs) -> torch.Tensor:
    """The GEAR reconstruction (B, H, n, D) in dq's dtype: dq + A @ Bt (fp16 factors, float32 sum), and the
    sparse part's exact (fp16) entries at their positions."""
    out = _blocks(dq.float(), args.group_size)  # (B, H, nb, G, D)
    if A.shape[-1]:
        out = out + A.float() @ Bt.float()
    flat = out.flatten(-2)  # (B, H, nb, G*D)
    if idx.shape[-1]:
        flat = flat.scatter(-1, idx.long(), vals.float())
    return flat.reshape(dq.shape).to(dq.dtype)


def gear_fake_quantize(x: torch.Tensor, args: KVCacheArgs, quantize: Callable) -> torch.Tensor:
    """GEAR on (B, H, n, D), n a multiple of G: the sparse part out, `quantize(x', args)` (KIVI keys or
    values), the low-rank fit of the rest of the error; as the runtime cache stores it."""
    idx, vals = gear_outliers(x, args)
    dq = quantize(without_outliers(x, idx, args), args)
    A, Bt = gear_lowrank(x, dq, idx, args)
    return gear_apply(dq, idx, vals, A, Bt, args)


def gear_bits(args: KVCacheArgs, head_dim: int) -> float:
    """GEAR's extra bits per cached element: sparse entries (fp16 value + int16 position) and the fp16 factors."""
    G, D = args.group_size, head_dim
    k = int(round(args.gear_outliers * G * D))
    return (k * 32 + args.gear_rank * (G + D) * 16) / (G * D)


def kv_mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_q: torch.Tensor,
    value_q: torch.Tensor,
    args: KVCacheArgs,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Causal attention where query i (absolute position T - q_len + i) sees key/value s quantized
    (key_q / value_q) or not (key / value) by the flush rule. q (B, Hq, q_len, D), k/v (B, Hkv, T, D);
    query head j reads KV head j // (Hq / Hkv) (GQA, as transformers' repeat_kv).
    `attention_mask`: None (causal), bool (B|1, 1, q_len, T) True = attend, or additive float.
    Returns (B, q_len, Hq, D) like transformers' attention functions."""
    B, Hq, L, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    groups = Hq // Hkv
    scaling = D ** -0.5 if scaling is None else scaling
    qg = query.reshape(B, Hkv, groups, L, D)  # query heads grouped under their KV head
    mixed = not (key_q is key and value_q is value)  # nothing quantized in this call's view: one branch
    mk, mv = decode_masks(T, L, args, device=query.device)  # (L, T) each

    def kT(k):  # (B, Hkv, 1, D, T)
        return k.transpose(-1, -2)[:, :, None]

    if not mixed:
        scores = torch.matmul(qg, kT(key))
    elif L == 1:  # one query: one effective key set
        scores = torch.matmul(qg, kT(torch.where(mk[0][:, None], key_q, key)))
    else:
        scores = torch.where(mk, torch.matmul(qg, kT(key_q)), torch.matmul(qg, kT(key)))
    scores = scores * scaling  # (B, Hkv, groups, L, T)
    if attention_mask is None:
        t = torch.arange(T - L, T, device=query.device)
        causal = torch.arange(T, device=query.device)[None, :] <= t[:, None]  # (L, T)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., -T:].unsqueeze(2), float("-inf"))
    else:
        scores = scores + attention_mask[..., -T:].unsqueeze(2)
    probs = torch.softmax(scores if scores.dtype == torch.float64 else scores.float(), dim=-1)
    probs = probs.nan_to_num_(0.0).to(query.dtype)  # fully masked (pad) rows -> 0
    if not mixed:
        out = torch.matmul(probs, value[:, :, None])
    elif L == 1:
        out = torch.matmul(probs, torch.where(mv[0][:, None], value_q, value)[:, :, None])
    else:
        mvf = mv.to(probs.dtype)
        out = torch.matmul(probs * (1 - mvf), value[:, :, None]) + torch.matmul(probs * mvf, value_q[:, :, None])
    return out.reshape(B, Hq, L, D).transpose(1, 2).contiguous()  # (B, L, Hq, D)


# =========================================================================== RoPE and RotateKV
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE convention (halves rotated); cos/sin broadcast against x (B, H, T, D)."""
    return x * cos + rotate_half(x) * sin


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `apply_rope` (also with an attention scaling folded into cos/sin)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def key_positions(T: int, position_ids: torch.Tensor | None, device=None) -> torch.Tensor:
    """Positions (B|1, T) of the T cached tokens given the position ids of the last ones (B|1, q_len):
    consecutive, ending at position_ids[:, -1]; left padding (positions below 0) clamped to 0, as
    transformers' generate() gives pad tokens position 0."""
    idx = torch.arange(T, device=device)
    if position_ids is None:
        return idx[None, :]
    last = position_ids[:, -1:].to(device=device, dtype=torch.long)  # (B|1, 1)
    return (idx[None, :] - (T - 1) + last).clamp(min=0)


def zigzag_order(magnitude: torch.Tensor, block: int) -> torch.Tensor:
    """A channel order (size n) spreading large channels evenly over the n / block Hadamard blocks:
    channels sorted by decreasing magnitude are dealt block by block in a snake (0..nb-1, nb-1..0, ...).
    Returns perm with perm[j] = the source channel placed at position j."""
    n = magnitude.numel()
    nb = n // block
    ranked = torch.argsort(magnitude.float(), descending=True, stable=True)
    perm = torch.empty(n, dtype=torch.long)
    for r, ch in enumerate(ranked.tolist()):
        rnd, k = divmod(r, nb)
        b = k if rnd % 2 == 0 else nb - 1 - k
        perm[b * block + rnd] = ch
    return perm


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a @ b, into `out` (viewed to the product's shape) when given."""
    if out is None:
        return torch.matmul(a, b)
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    return torch.matmul(a, b, out=out.view(shape))


class KeyRotation(nn.Module):
    """RotateKV's pre-RoPE key transform: within each group of `group_heads` KV heads, the
    group's group_heads·head_dim pre-RoPE channels are reordered (`perm`, outlier-aware, from
    calibration) and multiplied by a block-diagonal Hadamard of blocks of `block` channels.

    forward(k_pre (B, H, T, D)) -> rotated (B, H, T, D) (the channel labels of a group are
    re-laid out over its heads); inverse() undoes it. Rebuilt from `spec()`."""

    def __init__(self, n_kv: int, head_dim: int, group_heads: int, block: int, seed: int,
                 perm: list[list[int]] | None = None):
        super().__init__()
        if n_kv % group_heads:
            raise ValueError(f"rotate_kv.group_heads={group_heads} must divide the {n_kv} KV heads")
        size = group_heads * head_dim
        if size % block:
            raise ValueError(f"rotate_kv.block={block} must divide group_heads*head_dim={size}")
        self.n_kv, self.head_dim, self.group_heads, self.block, self.seed = n_kv, head_dim, group_heads, block, seed
        n_groups = n_kv // group_heads
        if perm is None:
            P = torch.arange(size).expand(n_groups, size).clone()
        else:
            P = torch.as_tensor(perm, dtype=torch.long)
            if P.shape != (n_groups, size) or not all(torch.equal(torch.sort(p).values, torch.arange(size)) for p in P):
                raise ValueError(f"KeyRotation.perm must be {n_groups} permutations of {size} channels")
        self.register_buffer("perm", P, persistent=False)  # (groups, size)
        self.register_buffer("inv_perm", torch.argsort(P, dim=-1), persistent=False)
        Q = random_hadamard(block, seed).to(torch.float32)  # (block, block) orthogonal
        self.register_buffer("Q", Q, persistent=False)
        # Q = diag(s) · (H_m ⊗ H_p) / sqrt(block) when a Hadamard of that order is known (random_hadamard):
        # applied as signs and a fast transform (m x m matmul + FWHT), O(block·(m + log p)) a row, not O(block²)
        self.fast = has_hadamard(block)
        if self.fast:
            Hm, self.p = hadamard_factors(block)
            self.register_buffer("Hm", Hm.to(torch.float32), persistent=False)
            self.register_buffer("signs", random_signs(block, seed).to(torch.float32), persistent=False)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        B, H, T, D = x.shape
        return x.transpose(1, 2).reshape(B, T, H // self.group_heads, self.group_heads * D)  # (B, T, groups, size)

    def _ungrouped(self, y: torch.Tensor, shape) -> torch.Tensor:
        B, H, T, D = shape
        return y.reshape(B, T, H, D).transpose(1, 2)

    def _blocks(self, y: torch.Tensor, inverse: bool) -> torch.Tensor:
        """y @ Q (or y @ Qᵀ) on every block of `block` channels of the last dim."""
        shp = y.shape
        yb = y.reshape(*shp[:-1], shp[-1] // self.block, self.block)  # (..., blocks, block)
        if not self.fast:
            return torch.matmul(yb, (self.Q.T if inverse else self.Q).to(y.dtype)).reshape(shp)
        s = self.signs.to(y.dtype)
        if inverse:  # y Qᵀ = (y (H_mᵀ ⊗ H_p) / sqrt(b)) ∘ s
            return (hadamard_transform(yb, self.Hm.T.to(y.dtype), self.p) * s).reshape(shp)
        return hadamard_transform(yb * s, self.Hm.to(y.dtype), self.p).reshape(shp)  # (y ∘ s)(H_m ⊗ H_p) / sqrt(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._grouped(x)
        y = torch.gather(y, -1, self.perm.expand(*y.shape[:2], -1, -1))
        return self._ungrouped(self._blocks(y, inverse=False), x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        y = self._blocks(self._grouped(x), inverse=True)
        y = torch.gather(y, -1, self.inv_perm.expand(*y.shape[:2], -1, -1))
        return self._ungrouped(y, x.shape)

    def inverse_columns(self, k: torch.Tensor, scratch: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """`inverse` of channel-major keys: k (..., groups, size, T), a group's channels down the rows and the tokens
        along the last dim -> the same layout, each group's channels back in their own order (its heads after one
        another). As columns the inverse of a block is Y = diag(s)(H_m ⊗ H_p) X / sqrt(block): H_m mixes the block's
        m slabs of p rows (one matmul, N = p·T), then each slab takes its own signed, scaled H_p (one batched
        matmul, N = T); one row gather undoes the reorder. 2·T·size·(m + p) flops against the dense 2·T·size²
        (SmolLM2's 192 channels: T·192·28 multiply-adds, not T·192·192). Blocks without a known Hadamard take
        their dense Q. `scratch(i)`: a buffer of k's dtype and size for step i (0, 1), to write into instead of
        fresh tensors (the result is then scratch(1))."""
        *lead, groups, size, T = k.shape
        b = self.block
        new = (lambda i: None) if scratch is None else (lambda i: scratch(i).view(k.shape))
        X = k.reshape(*lead, groups, size // b, b, T)  # (..., groups, blocks, block, T)
        if self.fast:
            Hm, Sp = self._column_factors(k.dtype, k.device)  # (m, m) ±1, (m, p, p): diag(s/√b) H_p per slab
            m, p = Hm.shape[0], self.p
            if m > 1:
                X = _matmul(Hm, X.reshape(*lead, groups, size // b, m, p * T), new(1))  # (..., m, p·T): slabs mixed
            Y = _matmul(Sp, X.reshape(*lead, groups, size // b, m, p, T), new(0))  # (..., m, p, T)
        else:
            Y = _matmul(self.Q.to(k.dtype), X, new(0))  # rows x Qᵀ are the columns Q X
        Y = Y.reshape(*lead, groups, size, T)
        if groups == 1:
            return torch.index_select(Y, -2, self.inv_perm[0], out=new(1))
        return torch.stack([Y[..., g, :, :].index_select(-2, self.inv_perm[g]) for g in range(groups)], dim=-3, out=new(1))

    def _column_factors(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_column_cache", {})
        key = (dtype, str(device))
        if key not in cache:
            m, p = self.Hm.shape[0], self.p
            Hp = hadamard_matrix(p).to(torch.float64)
            s = self.signs.to(torch.float64).reshape(m, p, 1) / math.sqrt(self.block)  # (m, p, 1): slab a's signs
            cache[key] = (self.Hm.to(dtype=dtype, device=device), (s * Hp).to(dtype=dtype, device=device))
        return cache[key]

    def spec(self) -> dict:
        return {"n_kv": self.n_kv, "head_dim": self.head_dim, "group_heads": self.group_heads, "block": self.block,
                "seed": self.seed, "perm": self.perm.tolist()}

    @classmethod
    def from_spec(cls, spec: dict) -> "KeyRotation":
        return cls(int(spec["n_kv"]), int(spec["head_dim"]), int(spec["group_heads"]), int(spec["block"]),
                   int(spec["seed"]), spec.get("perm"))

    def extra_repr(self) -> str:
        return f"group_heads={self.group_heads}, block={self.block}, seed={self.seed}"


@torch.no_grad()
def fold_value_rotation(v_proj: nn.Linear, o_proj: nn.Linear, n_heads: int, n_kv: int, Q: torch.Tensor) -> None:
    """Rotate every KV head's values by the orthogonal Q (head_dim, head_dim), folded offline:
    v_proj rows of head h W_h <- Qᵀ W_h (b_h <- b_h Q), o_proj columns of every query head W_j <- W_j Q.
    The attention output is unchanged; the cache holds v Q."""
    d = Q.shape[0]
    Q64 = Q.to(torch.float64)
    W = v_proj.weight.detach().to(torch.float64).reshape(n_kv, d, -1)  # (kv heads, d, hidden)
    v_proj.weight.copy_(torch.matmul(Q64.T, W).reshape(n_kv * d, -1).to(v_proj.weight.dtype))
    if v_proj.bias is not None:
        b = v_proj.bias.detach().to(torch.float64).reshape(n_kv, d)
        v_proj.bias.copy_((b @ Q64).reshape(-1).to(v_proj.bias.dtype))
    Wo = o_proj.weight.detach().to(torch.float64).reshape(-1, n_heads, d)  # (hidden, heads, d)
    o_proj.weight.copy_(torch.matmul(Wo, Q64).reshape(-1, n_heads * d).to(o_proj.weight.dtype))


__all__ = [
    "fake_quantize_kv", "quantize_kv_tokens", "dequantize_kv_tokens", "fake_quantize_kv_fp8", "check_kv_args", "fake_quantize_keys_values", "minmax_quantize", "minmax_dequantize",
    "key_rows", "rows_to_keys", "token_rows", "fake_quantize_keys_kivi", "fake_quantize_tokens_kivi",
    "quantized_keys", "quantized_values", "decode_masks", "quantized_copy", "kv_mixed_attention", "gear_fake_quantize",
    "apply_rope", "invert_rope", "key_positions", "zigzag_order", "KeyRotation", "fold_value_rotation",
]
