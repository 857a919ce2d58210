"""ZipCache (He et al. 2024, arXiv:2405.14256): mixed 2/4-bit KV cache with salient tokens.

Settings: `KVCacheArgs` with `salient` > 0 (key_granularity token). Keys and values are flushed
in blocks of G = `group_size` tokens, R = `residual` tokens after the block's last one arrives
(the flush rule of `lmpress.quant.kv_cache`, whole blocks as under GEAR).

- Saliency: the *normalized accumulated attention* of token s, the attention probability it
  received summed over every query that saw it (all query heads), divided by how many queries saw
  it. The plain accumulated score favours early tokens, which more queries see (the lower-triangle
  effect the paper corrects). The score of a block's tokens is taken from the queries decoded
  before the block is flushed, each query seeing the cache as it is when it is decoded, so only
  the rows of queries against the keys are formed, never a per-token accumulation over a full
  attention matrix of the future.
- Bits: in each block, the round(`salient` · G) tokens with the highest score (the earlier token
  on ties) are coded at `salient_bits`, the rest at `bits`. One decision per token, shared by K
  and V and by every KV head.
- Codes, two layouts (`zip_codes`):
  - key_granularity token: channel-separable token-wise quantization (the paper's keys), for K
    and V: per block, every channel c of every head is divided by sqrt(max_t |x[t, c]|) (fp16),
    which flattens the channel outliers of keys; then each token is one row over all KV heads'
    channels, asymmetric min-max at its bits (scale and min fp16). Metadata per element: 16 / G
    (channel scales) + 32 / (kv_heads · head_dim) (a token's scale and min).
  - key_granularity channel: KIVI's layout with per-token bits. Keys: one min-max range per
    channel of the block (scale at salient_bits' resolution and min, fp16), a salient token coded
    on all 2^sb levels, the others on every (2^sb-1)/(2^b-1)-th one (4 levels of 16 at 2/4 bits).
    Values: per token in groups of min(G, head_dim) channels, min-max at the token's bits.
    Metadata: 32 / G (keys) and 32 / min(G, head_dim) (values) per element.

`zip_attention` is the decode-exact simulation: blocks are decided in flush order, and the
queries before each flush are scored against the cache as they see it.
"""
from __future__ import annotations

import torch

from .kv_cache import MIN_SCALE, Basis, decode_masks, kv_mixed_attention, minmax_dequantize, minmax_quantize, quantized_keys
from .scheme import KVCacheArgs

PARAM_DTYPE = torch.float16


def salient_count(args: KVCacheArgs) -> int:
    """Tokens of a block coded at salient_bits."""
    return int(round(args.salient * args.group_size))


def zip_bits(args: KVCacheArgs, kv_heads: int, head_dim: int) -> float:
    """Bits per quantized element, K and V averaged: codes (salient tokens at salient_bits) and metadata."""
    G = args.group_size
    k = salient_count(args)
    codes = (k * args.salient_bits + (G - k) * args.bits) / G
    if args.key_granularity == "token":  # channel scales per block, a token's scale and min over all heads
        return codes + 16 / G + 32 / (kv_heads * head_dim)
    return codes + (32 / G + 32 / min(G, head_dim)) / 2  # keys: scale, min per channel a block; values per token group


def salient_tokens(score: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """score (B, G) of one block's tokens -> bool (B, G): the salient_count highest (the earlier on ties)."""
    k = salient_count(args)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)


def channel_scales(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, G, D) one block -> (B, H, D) fp16: sqrt of each channel's abs-max over the block (1 where 0)."""
    amax = x.float().abs().amax(dim=2)  # (B, H, D)
    return torch.where(amax > 0, amax.sqrt(), torch.ones_like(amax)).to(PARAM_DTYPE)


def token_axis(args: KVCacheArgs, keys: bool) -> int:
    """The axis of `zip_codes`' codes that runs over the block's tokens."""
    return 1 if args.key_granularity == "token" else (3 if keys else 2)


def _mixed(rows: torch.Tensor, hi: torch.Tensor, args: KVCacheArgs):
    """Min-max rows at salient_bits where `hi` (broadcast to rows' leading dims), else bits: (u, scale, min)."""
    lo_q = minmax_quantize(rows, args.bits, args.clip_ratio, args.clip_search)
    hi_q = minmax_quantize(rows, args.salient_bits, args.clip_ratio, args.clip_search)
    return tuple(torch.where(hi[..., None] if i == 0 else hi, h, lo) for i, (h, lo) in enumerate(zip(hi_q, lo_q)))


def zip_codes(x: torch.Tensor, hi: torch.Tensor, args: KVCacheArgs, keys: bool):
    """One block x (B, H, G, D), hi bool (B, G) -> (u uint8, meta): token t coded at salient_bits where hi[t].

    key_granularity token (the paper's channel-separable token-wise form, K and V alike): u (B, G, H*D),
    meta (scale (B, G), min (B, G), channel scales (B, H, D)), all fp16.
    key_granularity channel (KIVI's layout): keys u (B, H, D, G), one range per channel of the block (meta
    scale at salient_bits' resolution, min: (B, H, D)), a token at bits taking every (2^sb-1)/(2^b-1)-th
    level of it; values u (B, H, G, D/g, g), meta scale, min (B, H, G, D/g), per token in groups of g."""
    B, H, G, D = x.shape
    if args.key_granularity == "token":
        c = channel_scales(x)
        rows = (x.float() / c.float()[:, :, None]).permute(0, 2, 1, 3).reshape(B, G, H * D)  # (B, G, H*D): a token's row
        u, s, m = _mixed(rows, hi, args)
        return u, (s, m, c)
    if keys:
        rows = x.float().permute(0, 1, 3, 2)  # (B, H, D, G): a channel's G tokens
        top = (1 << args.salient_bits) - 1
        scale, mn = _kivi_range(rows, top, args.clip_ratio)
        step = _key_steps(scale, hi, args)  # (B, H, D, G)
        levels = torch.where(hi, top, (1 << args.bits) - 1)[:, None, None, :]  # (B, 1, 1, G)
        u = torch.minimum(torch.round((rows - mn.float()[..., None]) / step).clamp_(min=0), levels.float())
        return u.to(torch.uint8), (scale, mn)
    g = min(args.group_size, D)
    rows = x.reshape(B, H, G, D // g, g)  # (B, H, G, D/g, g): a token's channel groups
    u, s, m = _mixed(rows, hi[:, None, :, None], args)
    return u, (s, m)


def _kivi_range(rows: torch.Tensor, top: int, clip_ratio: float):
    """(scale, min) fp16 of rows (..., G) over the last dim, `top` levels, the range clipped about its midpoint."""
    lo, hi = rows.amin(-1), rows.amax(-1)
    if clip_ratio != 1.0:
        mid, half = (lo + hi) * 0.5, (hi - lo) * (0.5 * clip_ratio)
        lo, hi = mid - half, mid + half
    return ((hi - lo) / top).clamp_min(MIN_SCALE).to(PARAM_DTYPE), lo.to(PARAM_DTYPE)


def _key_steps(scale: torch.Tensor, hi: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """Per-token steps (B, H, D, G) of KIVI-layout keys: the fp16 scale, times (2^sb-1)/(2^b-1) off the salient tokens."""
    ratio = ((1 << args.salient_bits) - 1) / ((1 << args.bits) - 1)
    mult = torch.where(hi, 1.0, ratio).to(torch.float32)[:, None, None, :]  # (B, 1, 1, G)
    return scale.float()[..., None] * mult


def zip_dequantize(u: torch.Tensor, meta: tuple, hi: torch.Tensor, args: KVCacheArgs, keys: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `zip_codes`: (B, H, G, D) in `dtype` (computed in float32)."""
    if args.key_granularity == "token":
        s, m, c = meta
        B, H, D = c.shape
        rows = minmax_dequantize(u, s, m, torch.float32)  # (B, G, H*D)
        return (rows.reshape(B, -1, H, D).permute(0, 2, 1, 3) * c.float()[:, :, None]).to(dtype)
    if keys:
        scale, mn = meta
        x = u.float() * _key_steps(scale, hi, args) + mn.float()[..., None]  # (B, H, D, G)
        return x.permute(0, 1, 3, 2).to(dtype)
    s, m = meta
    B, H, G, ng, g = u.shape
    return minmax_dequantize(u, s, m, torch.float32).reshape(B, H, G, ng * g).to(dtype)


def zip_fake_quantize(x: torch.Tensor, hi: torch.Tensor, args: KVCacheArgs, keys: bool) -> torch.Tensor:
    """One block (B, H, G, D) as the cache stores it, dequantized."""
    u, meta = zip_codes(x, hi, args, keys)
    return zip_dequantize(u, meta, hi, args, keys, x.dtype)


def blocks_to_flush(T: int, args: KVCacheArgs, prefix: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] of the blocks a cache holding T tokens has flushed beyond its first `prefix` quantized tokens."""
    S, G = args.sink_tokens, args.group_size
    return [(a, a + G) for a in range(S + prefix, S + quantized_keys(T, args), G)]


def _accumulate(acc, cnt, query, key, kq, mk_all, rows: slice, attention_mask, scaling) -> None:
    """Add the attention probabilities of the queries at absolute positions `rows` (the cache as each
    sees it when decoded) to acc (B, T), summed over query heads, and the number of queries that saw
    each key to cnt (T,)."""
    B, Hq, L, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    t0 = T - L
    q = query[:, :, rows.start - t0:rows.stop - t0].reshape(B, Hkv, Hq // Hkv, -1, D)  # (B, Hkv, g, Lc, D)
    mk = mk_all[rows.start - t0:rows.stop - t0]  # (Lc, T): which keys each of these queries sees quantized
    scores = torch.where(mk, q @ kq.transpose(-1, -2)[:, :, None], q @ key.transpose(-1, -2)[:, :, None]).float() * scaling
    t = torch.arange(rows.start, rows.stop, device=query.device)
    seen = torch.arange(T, device=query.device)[None, :] <= t[:, None]  # (Lc, T) causal
    scores = scores.masked_fill(~seen, float("-inf"))
    if attention_mask is not None:
        m = attention_mask[..., rows.start - t0:rows.stop - t0, -T:].unsqueeze(2)  # (B|1, 1, 1, Lc, T)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # (B, Hkv, g, Lc, T)
    acc += probs.sum(dim=(1, 2, 3))
    cnt += seen.sum(0).to(cnt.dtype)


def zip_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    args: KVCacheArgs,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    prefix: int = 0,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    to_basis: Basis | None = None,
    from_basis: Basis | None = None,
):
    """Decode-exact ZipCache attention. q (B, Hq, L, D); k, v (B, Hkv, T, D) with the first `prefix`
    tokens after the sinks already quantized (a runtime cache's, as it returns them) and `tail` =
    (acc (B, n), cnt (n,)), the scores accumulated by earlier calls for the n unflushed tokens that
    precede this call's queries. Returns (out (B, L, Hq, D), hi [bool (B, G)] a block flushed in this
    call, tail after this call for the tokens still unflushed)."""
    B, Hq, L, D = query.shape
    T = key.shape[2]
    S = args.sink_tokens
    scaling = D ** -0.5 if scaling is None else scaling
    t0 = T - L
    acc = torch.zeros(B, T, device=key.device)
    cnt = torch.zeros(T, device=key.device)
    if tail is not None and tail[1].numel():
        n = tail[1].numel()
        acc[:, S + prefix:S + prefix + n] = tail[0].to(acc)
        cnt[S + prefix:S + prefix + n] = tail[1].to(cnt)
    kq, vq = key.clone(), value.clone()
    mk_all = decode_masks(T, L, args, device=query.device)[0]  # (L, T), once for every chunk of queries
    his = []
    done = t0  # queries of this call scored so far: [t0, done)
    for a, b in blocks_to_flush(T, args, prefix):
        first = b + args.residual - 1  # the first query that sees the block quantized
        if first > done:
            _accumulate(acc, cnt, query, key, kq, mk_all, slice(done, first), attention_mask, scaling)
            done = first
        hi = salient_tokens(acc[:, a:b] / cnt[a:b].clamp(min=1), args)
        sl = slice(a, b)
        kb = key[:, :, sl] if to_basis is None else to_basis(key[:, :, sl], sl)
        kb = zip_fake_quantize(kb, hi, args, keys=True)
        kq[:, :, sl] = (kb if from_basis is None else from_basis(kb, sl)).to(key.dtype)
        vq[:, :, sl] = zip_fake_quantize(value[:, :, sl], hi, args, keys=False)
        his.append(hi)
    if T > done:
        _accumulate(acc, cnt, query, key, kq, mk_all, slice(done, T), attention_mask, scaling)
    out = kv_mixed_attention(query, key, value, kq, vq, args, attention_mask, scaling)
    lo = S + quantized_keys(T, args)
    return out, his, (acc[:, lo:], cnt[lo:])
