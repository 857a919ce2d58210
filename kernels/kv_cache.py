"""`QuantizedKVCache`: a `transformers.Cache` holding KIVI-quantized keys and values, packed.

Per layer (`QuantizedKVLayer`) it stores, for the settings attached to that layer's attention
by `lmpress.kernels.attention` (KIVI `KVCacheArgs`, optional Q/K transform or RotateKV key
rotation):

- the first `sink_tokens` tokens in full precision;
- quantized keys: per channel over groups of G tokens (words (B, H, D, groups·W) int32, scale and
  min (B, H, D, groups) fp16), in the basis the settings quantize keys in (post-RoPE after the Q/K
  Hadamard, or pre-RoPE rotated for RotateKV); per-token keys as values when key_granularity is
  "token";
- quantized values: per token over groups of g = min(G, D) channels (words (B, H, n, D/g, W),
  scale and min (B, H, n, D/g) fp16);
- the full-precision residual: every token not yet flushed (at least the R most recent);
- under GEAR (`gear_rank` / `gear_outliers`), per block of G tokens of a head, for keys and values:
  the sparse part (int16 positions in the block, fp16 values) and the low-rank factors (fp16,
  (G, r) and (r, D)); the stored codes are those of the block without its sparse entries;
- under ZipCache (`salient` > 0; `lmpress.quant.zipcache`), per block of G tokens, for keys and
  values: the salient tokens' codes packed at salient_bits, the others' at bits, which tokens are
  salient (bool), and the layout's fp16 metadata (`zip_codes`: a token's scale and min and the
  block's channel scales; or KIVI's per-channel key ranges and per-token value groups). The attention function decides a block's salient tokens from the
  attention its queries gave them and hands the decision back (`zip_commit`); until then the
  block stays in full precision, with the scores accumulated so far (`zip_tail`).

Bit layout: `lmpress.kernels.formats.pack_unsigned`; quantize-and-pack and unpack-and-dequantize:
`lmpress.kernels.kv_quant` (Triton on CUDA, torch reference on CPU). The flush rule is
`lmpress.quant.kv_cache.quantized_keys / quantized_values`.

`update()` appends the new tokens, returns keys/values with the tokens quantized before this
call dequantized and every other token in full precision, tags the key tensor with how many
were quantized (`RUNTIME_PREFIX_ATTR`), then flushes per the rule. The "lmpress" attention
function quantizes the just-flushed tokens the same way for the queries that must see them
quantized, so the runtime attention is the simulated one. A decode step (one new token a row,
per-channel keys, neither GEAR nor ZipCache) flushes first and returns empty keys tagged with the
layer (`DECODE_STATE_ATTR`): the attention function then calls `decode_attention`, which attends
over the stored codes without building the dequantized prefix (`stored_key_scores`,
`stored_value_mix`); under RotateKV the stored pre-RoPE keys are rotated back through the Hadamard's
Kronecker factors and RoPE'd channel-major, as the codes are stored (`stored_rotated_key_scores`), with
the RoPE tables computed once a step for all layers (`_Shared.rope_tables`, `rope_columns`). Works with `model.generate(...,
**cache_kwargs(QuantizedKVCache(model)))`, batch > 1 with left padding included: positions
for RoPE (RotateKV) come from the model's `position_ids` (a forward pre-hook records them).

transformers renamed the cache argument and output field from `past_key_values` to `cache` (the
old name is deprecated): `cache_kwargs(cache)` and `returned_cache(output)` use the name
the installed transformers takes, and the pre-hook reads both.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lmpress.quant.kv_cache import (gear_apply, gear_lowrank, gear_outliers, key_rows, quantize_kv_tokens, quantized_keys,
                                    quantized_values, rows_to_keys, without_outliers)
from lmpress.quant.zipcache import salient_count, token_axis, zip_codes, zip_dequantize

from .attention import DECODE_STATE_ATTR, RUNTIME_PREFIX_ATTR, TOKEN_KV_ATTR, ZIP_STATE_ATTR, attention_modules, settings_of
from .formats import pack_bytes, pack_unsigned, packed_cols, unpack_unsigned, unsigned_codes_float
from .kv_quant import kv_pack, kv_unpack

_HOOK_ATTR = "_lmpress_kv_positions_hook"


class _Shared:
    """State shared by the layers of one cache: per-row position offset (pos = index - offset), and the
    RoPE tables of the current step (computed by the first layer that asks, reused by the others)."""

    def __init__(self) -> None:
        self._tables_key, self._tables = None, None
        self._columns_for = self._columns = None
        self.scratch = Scratch()  # the decode step's temporaries, shared by the layers (they run one after another)
        self.offset = None

    @property
    def offset(self) -> torch.Tensor | None:
        return self._offset

    @offset.setter
    def offset(self, value: torch.Tensor | None) -> None:  # (B|1, 1) long; new positions: the tables are stale
        self._offset, self._tables_key, self._tables = value, None, None

    def rope_tables(self, settings, n: int, device):
        """(positions (B|1, n), (cos, sin) each (B|1, 1, n, D)) for `settings`' rotary embedding."""
        key = (id(settings.rotary), n, str(device))
        if key != self._tables_key:
            pos = self.positions(n, device)
            self._tables_key, self._tables = key, (pos, settings.rope_tables(pos, device))
        return self._tables

    def rope_columns(self, tables):
        """`rope_columns` of the step's tables, made once a step for all layers."""
        if self._columns_for is not tables:
            self._columns, self._columns_for = rope_columns(*tables), tables
        return self._columns

    def positions(self, n: int, device) -> torch.Tensor:
        idx = torch.arange(n, device=device)[None, :]  # (1, n)
        if self.offset is None:
            return idx
        return (idx - self.offset.to(device)).clamp(min=0)  # (B|1, n)


class QuantizedKVLayer(DynamicLayer):
    """One layer's KIVI cache (see the module doc)."""

    is_croppable = False

    def __init__(self, settings, shared: _Shared):
        super().__init__()
        if settings is None or not settings.kivi:
            raise ValueError(
                "QuantizedKVCache stores KIVI settings (per-channel keys or a residual window); this attention has "
                f"{'none' if settings is None or settings.kv is None else 'the per-token form: PerTokenKVLayer holds it'}"
            )
        self.settings, self.args, self.shared = settings, settings.kv, shared
        self.n = 0  # tokens held
        self.nk = self.nv = 0  # tokens quantized (from position sink_tokens on)
        self.sink_k = self.sink_v = None
        self.kw = self.ks = self.km = None  # key words, scales, mins
        self.vw = self.vs = self.vm = None
        self.kg = self.vg = None  # GEAR parts per block: (idx, vals, A, Bt), blocks along dim 2
        self.kz = self.vz = None  # ZipCache parts: (hi words, lo words, salient, *metadata per block), blocks on dim 1
        self.zip_tail = None  # ZipCache: (acc (B, n), cnt (n,)) scores of the n unflushed tokens
        self._zip_shape: dict[bool, tuple] = {}  # keys / values: a token's code shape after the token axis
        self._to_b = self._from_b = self._tables = None

    # ---- transformers' layer API ------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.sink_k = key_states[:, :, :0]
        self.sink_v = value_states[:, :, :0]
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.head_dim = D
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        a, S = self.args, self.args.sink_tokens
        L = key_states.shape[2]
        take = min(L, S - self.sink_k.shape[2])
        if take > 0:
            self.sink_k = torch.cat([self.sink_k, key_states[:, :, :take]], dim=2)
            self.sink_v = torch.cat([self.sink_v, value_states[:, :, :take]], dim=2)
        self.keys = torch.cat([self.keys, key_states[:, :, max(take, 0):]], dim=2)
        self.values = torch.cat([self.values, value_states[:, :, max(take, 0):]], dim=2)
        self.n += L
        positions, tables = (self.shared.rope_tables(self.settings, self.n, self.device)
                             if self.settings.key_rotation is not None else (None, None))
        to_b, from_b = self.settings.key_basis(positions, key_states, tables)
        if L == 1 and not a.zipcache and not a.gear and a.key_granularity == "channel":
            # decode: flush first, then the attention function reads the layer itself (`decode_attention`)
            self._flush(quantized_keys(self.n, a), quantized_values(self.n, a), to_b)
            self._from_b = from_b if self.settings.key_rotation is not None else None  # a Q/K transform: q enters the basis
            self._tables = tables
            keys, values = self.keys[:, :, :0], self.values[:, :, :0]  # fresh empty views carry the tag
            setattr(keys, DECODE_STATE_ATTR, self)
            return keys, values
        keys = torch.cat([self.sink_k, self._stored_keys(from_b), self.keys], dim=2)
        values = torch.cat([self.sink_v, self._stored_values(), self.values], dim=2)
        setattr(keys, RUNTIME_PREFIX_ATTR, (self.nk, self.nv))
        if a.zipcache:  # the attention function decides the blocks to flush and calls zip_commit
            setattr(keys, ZIP_STATE_ATTR, self)
            self._to_b = to_b
        else:
            self._flush(quantized_keys(self.n, a), quantized_values(self.n, a), to_b)
        return keys, values

    # ---- decode without the dequantized prefix ----------------------------------------------
    def decode_attention(self, query: torch.Tensor, attention_mask, scaling: float | None, qk=None) -> torch.Tensor:
        """Attention of one new query per row, query (B, Hq, 1, D), against this layer as it stands after the
        step's flush (what the decode-exact simulation shows that query), without building the dequantized
        prefix: the stored keys' per-channel scale and min go into the query (`stored_key_scores`) and the
        values' per-token ones into the probabilities (`stored_value_mix`); codes are read through a byte lookup
        table. Under RotateKV the stored keys are dequantized and rotated back (`from_basis`); under a Q/K
        transform the query and the full-precision keys enter the basis the stored keys are in. Returns
        (B, 1, Hq, D) like transformers' attention functions."""
        a = self.args
        B, Hq, L, D = query.shape
        H = self.sink_k.shape[1]
        ct = torch.promote_types(query.dtype, torch.float32)  # compute type
        sink_k, res_k = self.sink_k, self.keys
        if qk is not None:
            query, sink_k, res_k = qk(query), qk(sink_k), qk(res_k)
        q = query.reshape(B, H, Hq // H * L, D).to(ct)  # (B, H, gq, D): query heads under their KV head

        def dot(k):  # (B, H, gq, n)
            return torch.matmul(q, k.to(ct).transpose(-1, -2))

        scores = [dot(sink_k)]
        if self.nk:
            if self._from_b is None:
                scores.append(stored_key_scores(q, self.kw, self.ks, self.km, a.bits, a.group_size, self.shared.scratch))
            else:  # RotateKV: pre-RoPE keys, rotated back and RoPE'd at their positions, from the codes
                S = a.sink_tokens
                cs = self.shared.rope_columns(self._tables)
                scores.append(dot(self._stored_keys(self._from_b)) if cs is None else stored_rotated_key_scores(
                    q, self.kw, self.ks, self.km, a.bits, a.group_size, self.settings.key_rotation, cs[..., S:S + self.nk],
                    self.shared.scratch))
        scores.append(dot(res_k))
        s = torch.cat(scores, dim=-1) * (D ** -0.5 if scaling is None else scaling)  # (B, H, gq, T)
        T = s.shape[-1]
        if attention_mask is not None:  # (B|1, 1, 1, T): broadcasts over (H, gq)
            m = attention_mask[..., -T:]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(ct)
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # fully masked (pad) rows -> 0
        ns = self.sink_v.shape[2]
        out = torch.matmul(p[..., :ns], self.sink_v.to(ct)) + torch.matmul(p[..., ns + self.nv:], self.values.to(ct))
        if self.nv:
            out = out + stored_value_mix(p[..., ns:ns + self.nv], self.vw, self.vs, self.vm, a.bits, D, self.shared.scratch)
        return out.to(query.dtype).reshape(B, Hq, L, D).transpose(1, 2).contiguous()  # (B, 1, Hq, D)

    # ---- ZipCache ---------------------------------------------------------------------------
    def zip_commit(self, his: list[torch.Tensor], tail) -> None:
        """Flush the next len(his) blocks of G tokens, block i's salient tokens `his[i]` (bool (B, G)), and keep
        `tail` (acc, cnt), the scores of the tokens still unflushed (`lmpress.quant.zipcache.zip_attention`)."""
        a, S, G = self.args, self.args.sink_tokens, self.args.group_size
        for hi in his:
            sl = slice(S + self.nk, S + self.nk + G)
            kb = self.keys[:, :, :G]
            kb = kb if self._to_b is None else self._to_b(kb, sl)
            self.kz = self._zip_cat(self.kz, self._zip_pack(kb, hi, keys=True))
            self.vz = self._zip_cat(self.vz, self._zip_pack(self.values[:, :, :G], hi, keys=False))
            self.keys, self.values = self.keys[:, :, G:].contiguous(), self.values[:, :, G:].contiguous()
            self.nk += G
            self.nv += G
        self.zip_tail = tuple(t.detach() for t in tail)

    def _zip_pack(self, x: torch.Tensor, hi: torch.Tensor, keys: bool):
        """One block (B, H, G, D) -> (hi words (B, k, W), lo words (B, G-k, W'), hi (B, G), *meta (B, 1, ...)): the codes
        with their token axis first, the salient tokens' rows packed at salient_bits, the others at bits."""
        a = self.args
        u, meta = zip_codes(x, hi, a, keys)
        t = u.movedim(token_axis(a, keys), 1)  # (B, G, ...): a token's codes after the token axis
        self._zip_shape[keys] = t.shape[2:]
        B, G = t.shape[:2]
        rows = t.reshape(B, G, -1)  # (B, G, R)
        k = salient_count(a)
        hw = pack_unsigned(rows[hi].reshape(B, k, -1), a.salient_bits)  # rows in position order
        lw = pack_unsigned(rows[~hi].reshape(B, G - k, -1), a.bits)
        return (hw, lw, hi, *(m[:, None] for m in meta))

    @staticmethod
    def _zip_cat(old, new):
        return new if old is None else tuple(torch.cat([o, t], dim=1) for o, t in zip(old, new))

    def _zip_unpack(self, parts, keys: bool) -> torch.Tensor:
        """Inverse of the `_zip_pack`s of nb blocks: (B, H, nb*G, D) in the cache's dtype."""
        a = self.args
        hw, lw, hi, *meta = parts
        B, nb = meta[0].shape[:2]
        G, k = a.group_size, salient_count(a)
        inner = self._zip_shape[keys]
        R = int(torch.Size(inner).numel())
        rows = torch.empty(B, nb * G, R, dtype=torch.uint8, device=hw.device)
        rows[hi] = unpack_unsigned(hw, a.salient_bits, R).reshape(-1, R)
        rows[~hi] = unpack_unsigned(lw, a.bits, R).reshape(-1, R)
        u = rows.reshape(B * nb, G, *inner).movedim(1, token_axis(a, keys))  # blocks as a batch
        x = zip_dequantize(u, tuple(m.reshape(B * nb, *m.shape[2:]) for m in meta), hi.reshape(B * nb, G), a, keys,
                           self.dtype)  # (B*nb, H, G, D)
        H, D = x.shape[1], x.shape[3]
        return x.reshape(B, nb, H, G, D).permute(0, 2, 1, 3, 4).reshape(B, H, nb * G, D)

    # ---- storage ----------------------------------------------------------------------------
    def _stored_keys(self, from_b) -> torch.Tensor:
        if self.nk == 0:
            return self.keys[:, :, :0]
        a = self.args
        if a.zipcache:
            kb = self._zip_unpack(self.kz, keys=True)
        elif a.key_granularity == "token":
            kb = self._unpack_tokens(self.kw, self.ks, self.km)
        else:
            kb = self._unpack_key_groups(self.kw, self.ks, self.km)  # (B, H, nk, D)
        if self.kg is not None:
            kb = gear_apply(kb, *self.kg, a)
        S = a.sink_tokens
        return kb if from_b is None else from_b(kb, slice(S, S + self.nk)).to(self.dtype)

    def _stored_values(self) -> torch.Tensor:
        if self.nv == 0:
            return self.values[:, :, :0]
        if self.args.zipcache:
            return self._zip_unpack(self.vz, keys=False)
        vb = self._unpack_tokens(self.vw, self.vs, self.vm)
        return vb if self.vg is None else gear_apply(vb, *self.vg, self.args)

    def _gear(self, x: torch.Tensor, pack, unpack, old):
        """GEAR on the block(s) x (B, H, n, D): pack the codes of x without its sparse part (`pack(x')` returns
        what `unpack(...)` reads back, dequantized), fit the low-rank part of the rest; returns (packed, parts)."""
        idx, vals = gear_outliers(x, self.args)
        packed = pack(without_outliers(x, idx, self.args))
        A, Bt = gear_lowrank(x, unpack(*packed), idx, self.args)
        parts = (idx, vals, A, Bt)
        return packed, parts if old is None else tuple(torch.cat([o, t], dim=2) for o, t in zip(old, parts))

    def _unpack_tokens(self, w, s, m) -> torch.Tensor:
        a = self.args
        B, H, n, ng = s.shape
        g = self.head_dim // ng
        flat = kv_unpack(w.reshape(-1, packed_cols(g, a.bits)), s.reshape(-1), m.reshape(-1), a.bits, g, self.dtype)
        return flat.reshape(B, H, n, ng * g)

    def _pack_key_groups(self, kb: torch.Tensor):
        """Keys (B, H, n, D), n a multiple of G -> per-channel groups packed: words (B, H, D, n/G * W), scale and min (B, H, D, n/G)."""
        a = self.args
        rows = key_rows(kb, a.group_size)  # (B, H, D, n/G, G)
        B, H, D, ng, G = rows.shape
        w, s, m = kv_pack(rows.reshape(-1, G), a.bits, a.clip_ratio, a.clip_search)
        return w.reshape(B, H, D, ng * w.shape[-1]), s.reshape(B, H, D, ng), m.reshape(B, H, D, ng)

    def _unpack_key_groups(self, w, s, m) -> torch.Tensor:
        """Inverse of `_pack_key_groups`, dequantized: (B, H, n, D) in the cache's dtype."""
        a = self.args
        B, H, D, ng = s.shape
        G = a.group_size
        flat = kv_unpack(w.reshape(-1, packed_cols(G, a.bits)), s.reshape(-1), m.reshape(-1), a.bits, G, self.dtype)
        return rows_to_keys(flat.reshape(B, H, D, ng, G))

    def _pack_tokens(self, x: torch.Tensor):
        a = self.args
        B, H, n, D = x.shape
        g = min(a.group_size, D)
        w, s, m = kv_pack(x.reshape(-1, g), a.bits, a.clip_ratio, a.clip_search)  # rows (B*H*n*D/g, g)
        return w.reshape(B, H, n, D // g, -1), s.reshape(B, H, n, D // g), m.reshape(B, H, n, D // g)

    @staticmethod
    def _cat(old, new, dim):
        return new if old is None else torch.cat([old, new], dim=dim)

    def _flush(self, nk: int, nv: int, to_b) -> None:
        a, S = self.args, self.args.sink_tokens
        dk, dv = nk - self.nk, nv - self.nv
        if dk > 0:
            kb = self.keys[:, :, :dk]
            if to_b is not None:
                kb = to_b(kb, slice(S + self.nk, S + nk))
            if a.key_granularity == "token":
                w, s, m = self._pack_tokens(kb)
                self.kw, self.ks, self.km = (self._cat(o, t, 2) for o, t in zip((self.kw, self.ks, self.km), (w, s, m)))
            else:
                if a.gear:
                    (w, s, m), self.kg = self._gear(kb, self._pack_key_groups, self._unpack_key_groups, self.kg)
                else:
                    w, s, m = self._pack_key_groups(kb)
                self.kw, self.ks, self.km = (self._cat(o, t, 3) for o, t in zip((self.kw, self.ks, self.km), (w, s, m)))
            self.keys = self.keys[:, :, dk:].contiguous()
            self.nk = nk
        if dv > 0:
            if a.gear:
                (w, s, m), self.vg = self._gear(self.values[:, :, :dv], self._pack_tokens, self._unpack_tokens, self.vg)
            else:
                w, s, m = self._pack_tokens(self.values[:, :, :dv])
            self.vw, self.vs, self.vm = (self._cat(o, t, 2) for o, t in zip((self.vw, self.vs, self.vm), (w, s, m)))
            self.values = self.values[:, :, dv:].contiguous()
            self.nv = nv

    def tensors(self) -> list[torch.Tensor]:
        parts = [t for p in (self.kg, self.vg, self.kz, self.vz, self.zip_tail) if p is not None for t in p]
        return [t for t in (self.sink_k, self.sink_v, self.keys, self.values, self.kw, self.ks, self.km,
                            self.vw, self.vs, self.vm, *parts) if t is not None]

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes of every stored tensor; `float_bytes`: count the full-precision tokens (sinks, residual) at that
        many bytes an element, as a model of that width would hold them (2: an fp16/bf16 model)."""
        fp = {id(t) for t in (self.sink_k, self.sink_v, self.keys, self.values) if t is not None}
        return sum(t.numel() * (float_bytes if float_bytes is not None and id(t) in fp else t.element_size())
                   for t in self.tensors())

    # ---- batch operations ---------------------------------------------------------------------
    def _map(self, fn) -> None:
        for name in ("sink_k", "sink_v", "keys", "values", "kw", "ks", "km", "vw", "vs", "vm"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        for name in ("kg", "vg", "kz", "vz"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(fn(t) for t in getattr(self, name)))
        if self.zip_tail is not None:  # acc has a batch dimension, cnt does not
            self.zip_tail = (fn(self.zip_tail[0]), self.zip_tail[1])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.n = self.nk = self.nv = 0
        self.sink_k = self.sink_v = self.kw = self.ks = self.km = self.vw = self.vs = self.vm = self.kg = self.vg = None
        self.kz = self.vz = self.zip_tail = self._to_b = self._from_b = self._tables = None
        self._zip_shape = {}
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedKVCache cannot be cropped (quantized groups cannot be partially removed)")


class PerTokenKVLayer(DynamicLayer):
    """One layer's cache in the per-token (QuaRot) form: each token's keys, after the attention's online Q/K
    transform (R3), and its values are quantized once, as they enter (`quant.kv_cache.quantize_kv_tokens`),
    and kept as packed codes with float32 scales and zero points per token and group. `update` returns the
    whole cache dequantized, tagged (`TOKEN_KV_ATTR`) so that the attention function only transforms the query.

    Keys and values are stacked on a leading axis of 2 and quantized, packed, stored and dequantized
    together: a decode step costs ~25 small ops a layer, whatever the length.
    - words int32 (2, B, H, T, packed_cols(Dp, bits));
    - scale and zero point + 2^(bits-1) float32 (2, B, H, T, Dp / g).

    The simulation (and a DynamicCache) instead transforms and fake-quantizes every cached token again at every
    step. Tokens are quantized on their own and the transform acts on each row alone, so a prefill through this
    layer is bit-identical to it (tests/test_kv2.py). A decode step differs only where the transform
    sums one token's rows in another order than the whole prefix's (`quant.hadamard.DENSE_ROWS`): fp32 rounding.
    At 4 bits and groups of 64 it holds 0.31x the bytes of an fp16 DynamicCache (0.5 byte of codes and 8 bytes
    of qparams per 64 elements, against 2 bytes an element)."""

    is_croppable = True

    def __init__(self, settings):
        super().__init__()
        why = settings.token_cache_misfit() if settings is not None else "no lmpress attention settings"
        if why:
            raise ValueError(f"PerTokenKVLayer holds the per-token integer KV form; this attention has {why}")
        self.settings, self.args = settings, settings.kv
        self.words = self.scale = self.zero = None  # (2, B, H, T, ...): keys then values, token axis 3

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        a, qk = self.args, self.settings.qk
        kv = torch.stack([qk(key_states) if qk is not None else key_states, value_states])  # (2, B, H, L, D)
        # (2, B, H, L, Dp) uint8 codes and the zero point both + 2^(bits-1), scale: (2, B, H, L, Dp / g)
        u, sc, z = quantize_kv_tokens(kv, a.bits, a.group_size, a.symmetric, a.clip_ratio, unsigned=True)
        words = pack_bytes(u.reshape(-1, u.shape[-1]), a.bits).reshape(*u.shape[:-1], -1)  # (2, B, H, L, words)
        if self.words is None:
            self.words, self.scale, self.zero = words, sc, z
        else:
            self.words, self.scale, self.zero = (torch.cat([o, n], dim=3) for o, n in
                                                 ((self.words, words), (self.scale, sc), (self.zero, z)))
        keys, values = self._dequantized().unbind(0)  # (B, H, T, D) each
        setattr(keys, TOKEN_KV_ATTR, True)
        return keys, values

    def _dequantized(self) -> torch.Tensor:
        """(2, B, H, T, D) in the model's dtype: `dequantize_kv_tokens` of the stored codes, bit for bit, as
        (u - (z + 2^(bits-1))) * s on the unsigned codes u read through a byte lookup table."""
        ng = self.scale.shape[-1]
        g = min(self.args.group_size, self.head_dim)
        u = unsigned_codes_float(self.words, self.args.bits, ng * g)  # (2, B, H, T, Dp) float32
        lead = u.shape[:-1]
        x = (u.view(*lead, ng, g) - self.zero[..., None]).mul_(self.scale[..., None]).view(*lead, ng * g)
        if ng * g != self.head_dim:
            x = x[..., : self.head_dim]
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def get_seq_length(self) -> int:
        return 0 if self.words is None else self.words.shape[3]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.words, self.scale, self.zero) if t is not None]

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes of the stored codes and qparams (it holds no full-precision token: `float_bytes` does not apply)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _map(self, fn) -> None:  # fn acts on dim 0 = batch: the stacked k/v axis stays in front
        if self.words is not None:
            self.words, self.scale, self.zero = (torch.stack([fn(t[0]), fn(t[1])]) for t in (self.words, self.scale, self.zero))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.words is not None:  # each token on its own: its codes simply go
            self.words, self.scale, self.zero = (t[:, :, :, :tokens_to_remove] for t in (self.words, self.scale, self.zero))

    def offload(self) -> None:
        if self.words is not None:
            self.words, self.scale, self.zero = (t.to("cpu", non_blocking=True) for t in (self.words, self.scale, self.zero))

    def prefetch(self) -> None:
        if self.words is not None and self.words.device != self.device:
            self.words, self.scale, self.zero = (t.to(self.device, non_blocking=True) for t in (self.words, self.scale, self.zero))

    def reset(self) -> None:
        self.words = self.scale = self.zero = None
        self.keys = self.values = None
        self.is_initialized = False


def stored_key_scores(q: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int,
                      G: int, scratch: "Scratch | None" = None) -> torch.Tensor:
    """q · k for per-channel quantized keys without dequantizing them: with k = s·u + m per (channel, group of G
    tokens), q·k = (q ⊙ s)·u + q·m. q (B, H, gq, D) float; words (B, H, D, ng·W), scale/min (B, H, D, ng) ->
    scores (B, H, gq, ng·G) in q's dtype, token order. `scratch`: where the float codes go (`Scratch`)."""
    B, H, D, ng = scale.shape
    words = w.reshape(B, H, D, ng, -1).transpose(2, 3)  # (B, H, ng, D, W): a group's channels
    u = unsigned_codes_float(words, bits, G, out=_codes_buffer(scratch, B * H * ng * D * G, q.device)).to(q.dtype)  # (B, H, ng, D, G)
    qs = q[:, :, None] * scale.to(q.dtype).transpose(2, 3)[:, :, :, None, :]  # (B, H, ng, gq, D)
    sc = torch.matmul(qs, u) + torch.matmul(q, mn.to(q.dtype)).transpose(2, 3)[..., None]  # (B, H, ng, gq, G)
    return sc.transpose(2, 3).reshape(B, H, q.shape[2], ng * G)  # (B, H, gq, ng·G)


def rope_columns(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """RoPE tables cos, sin, each (B|1, 1, n, D), as the columns `stored_rotated_key_scores` takes: (B|1, 1, 2, D, n);
    None when their halves differ (not rotate-half RoPE: the caller takes the general path)."""
    h = cos.shape[-1] // 2
    if not (torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:])):
        return None
    return torch.stack([cos, sin], dim=2).transpose(-1, -2).contiguous()


def stored_rotated_key_scores(q: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, G: int,
                              kr, cs: torch.Tensor, scratch: "Scratch | None" = None) -> torch.Tensor:
    """q · RoPE(R⁻¹ k̂) over RotateKV's stored keys k̂, from their codes and channel-major throughout (a row is one
    channel's tokens, as the codes are stored): the codes dequantized, rotated back by `kr.inverse_columns` (the
    Hadamard's Kronecker factors and one row gather, not a dense size x size matmul over every token), and RoPE as
    two products with the step's tables, since with r = R⁻¹k̂, q·RoPE(r) = q·(r∘C) + q'·(r∘S), q' = (q₂, −q₁) (its
    halves swapped, the first negated; C, S the cos and sin tables, halves repeated, as rotate-half RoPE has them).
    q (B, H, gq, D); words (B, H, D, ng·W), scale/min (B, H, D, ng); cs (B|1, 1, 2, D, ng·G): cos and sin at the
    stored tokens' positions (`rope_columns`) -> scores (B, H, gq, ng·G) in q's dtype. Computed in float32
    (float64 for float64 queries), as `key_basis`' from_basis. `scratch`: buffers reused across calls for the
    temporaries (megabytes at long contexts)."""
    B, H, D, ng = scale.shape
    T = ng * G
    ct = torch.promote_types(q.dtype, torch.float32)
    sc = scratch if scratch is not None and ct == torch.float32 else Scratch(keep=False)
    u = unsigned_codes_float(w.reshape(B, H, D, ng, -1), bits, G, out=sc.get("codes", B * H * D * T, torch.float32, q.device))
    k = u.to(ct).view(B, H, D, ng, G)  # (B, H, D, ng, G), its own buffer
    k.mul_(scale.to(ct)[..., None]).add_(mn.to(ct)[..., None])  # dequantized as `minmax_dequantize` does
    gh = kr.group_heads
    r = kr.inverse_columns(k.view(B, H // gh, gh * D, T),  # (B, groups, size, T): rotated back, channel order
                           lambda i: sc.get(f"rotate{i}", B * H * D * T, ct, q.device))
    z = torch.mul(r.view(B, H, 1, D, T), cs.to(ct), out=sc.get("rope", 2 * B * H * D * T, ct, q.device).view(B, H, 2, D, T))
    h = D // 2
    q2 = torch.cat([q, q[..., h:], -q[..., :h]], dim=-1).to(ct)  # (B, H, gq, 2D): q then q'
    return torch.matmul(q2, z.view(B, H, 2 * D, T)).to(q.dtype)  # (B, H, gq, T)


def _codes_buffer(scratch: "Scratch | None", numel: int, device) -> torch.Tensor | None:
    return None if scratch is None else scratch.get("codes", numel, torch.float32, device)


class Scratch:
    """Named buffers reused from call to call (and layer to layer) for a decode step's temporaries. At 4k tokens
    these are megabytes each; a fresh tensor that size is fresh pages from the OS every time (glibc maps large
    allocations and unmaps them on free), and their page faults cost more than the arithmetic: one layer's
    RotateKV key scores at 3904 tokens took 10.3 ms a call with fresh tensors, 2.9 ms with glibc's mapping
    threshold raised (2026-12-07, 1 thread, EPYC). `keep=False`: plain fresh tensors."""

    def __init__(self, keep: bool = True):
        self.keep, self._bufs = keep, {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A flat, contiguous tensor of `numel` elements (contents undefined)."""
        if not self.keep:
            return torch.empty(numel, dtype=dtype, device=device)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._bufs[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def stored_value_mix(p: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int,
                     D: int, scratch: "Scratch | None" = None) -> torch.Tensor:
    """p @ v for per-token quantized values without dequantizing them: with v = s·u + m per (token, group of g
    channels), p·v = (p ⊙ s)·u + p·m. p (B, H, gq, n) float; words (B, H, n, D/g, W), scale/min (B, H, n, D/g) ->
    (B, H, gq, D) in p's dtype. `scratch`: where the float codes go (`Scratch`)."""
    B, H, n, ng = scale.shape
    g = D // ng
    words = w.transpose(2, 3)  # (B, H, ng, n, W)
    u = unsigned_codes_float(words, bits, g, out=_codes_buffer(scratch, B * H * n * D, p.device)).to(p.dtype)  # (B, H, ng, n, g)
    ps = p[:, :, None] * scale.to(p.dtype).transpose(2, 3)[:, :, :, None, :]  # (B, H, ng, gq, n)
    out = torch.matmul(ps, u) + torch.matmul(p, mn.to(p.dtype)).transpose(2, 3)[..., None]  # (B, H, ng, gq, g)
    return out.transpose(2, 3).reshape(B, H, p.shape[2], ng * g)  # (B, H, gq, D)


class QuantizedKVCache(Cache):
    """KIVI-quantized KV cache for a model whose attention modules carry lmpress KV settings.

        cache = QuantizedKVCache(model)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=128, **cache_kwargs(cache))
        cache.nbytes()  # bytes held
    """

    def __init__(self, model: nn.Module, arch=None):
        self.shared = _Shared()
        if arch is not None:
            attns = [attn for _, attn in attention_modules(model, arch)]
        else:  # the attention modules of the decoder layers, in order: those numbered by transformers
            attns = sorted((m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
                            and hasattr(m, "head_dim")), key=lambda m: m.layer_idx)
            n = getattr(model.config, "num_hidden_layers", len(attns))
            if len(attns) != n:
                raise ValueError(f"found {len(attns)} attention modules (with layer_idx and head_dim) for {n} decoder "
                                 "layers; pass arch=lmpress.compress.arch_for(model)")
        layers = [_layer_for(settings_of(attn), self.shared) for attn in attns]
        super().__init__(layers=layers)
        _install_positions_hook(model)

    def note_positions(self, position_ids: torch.Tensor | None, q_len: int | None) -> None:
        """Record the per-row position offset of the coming forward (called by the model pre-hook)."""
        if position_ids is None or q_len is None:
            if self.get_seq_length() == 0:
                self.shared.offset = None
            return
        last = self.get_seq_length() + q_len - 1
        self.shared.offset = last - position_ids[:, -1:].long()  # (B|1, 1)

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes held by every stored tensor (packed codes, scales, mins, full-precision tokens, offsets);
        `float_bytes` counts the full-precision tokens at that width (2: as an fp16 model holds them)."""
        extra = 0 if self.shared.offset is None else self.shared.offset.numel() * self.shared.offset.element_size()
        return sum(layer.nbytes(float_bytes) for layer in self.layers) + extra

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.shared.offset is not None and self.shared.offset.shape[0] > 1:
            self.shared.offset = self.shared.offset.index_select(0, beam_idx.to(self.shared.offset.device))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.shared.offset is not None and self.shared.offset.shape[0] > 1:
            self.shared.offset = self.shared.offset[indices]

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.shared.offset is not None and self.shared.offset.shape[0] > 1:
            self.shared.offset = self.shared.offset.repeat_interleave(repeats, dim=0)


def _layer_for(settings, shared: _Shared) -> DynamicLayer:
    """KIVI settings -> QuantizedKVLayer; the per-token integer form -> PerTokenKVLayer (else their errors)."""
    if settings is not None and settings.kv is not None and settings.kv.per_token_only:
        return PerTokenKVLayer(settings)
    return QuantizedKVLayer(settings, shared)


def runtime_cache_misfit(model: nn.Module, per_token: bool = False) -> str:
    """Why `QuantizedKVCache(model)` cannot hold this model's cache ('' when it can): every attention module
    (with layer_idx and head_dim) must carry KIVI or per-token integer KV settings (`per_token`: the latter)."""
    attns = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "head_dim")]
    if not attns:
        return "no attention modules with layer_idx and head_dim"
    for attn in attns:
        s = settings_of(attn)
        if s is None or s.kv is None:
            return f"layer {attn.layer_idx} has no KV settings"
        if s.kv.per_token_only and s.token_cache_misfit():
            return f"layer {attn.layer_idx}: {s.token_cache_misfit()}"
        if per_token and not s.kv.per_token_only:
            return f"layer {attn.layer_idx}: KIVI settings (pass QuantizedKVCache(model) yourself)"
    return ""


_DEFAULT_HOOK_ATTR = "_lmpress_default_cache_hook"


def _default_cache_pre_hook(module, args, kwargs):
    if kwargs.get("use_cache") is not True:
        return None
    # the cache under either name: transformers still takes `past_key_values` after the rename (deprecated), and a
    # new cache beside it under the other name would replace the caller's (the step then sees no prefix)
    name = next((k for k in (cache_kwarg(), "cache", "past_key_values") if kwargs.get(k) is not None), cache_kwarg())
    cache = kwargs.get(name)
    if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):  # none, or generate's fresh one
        return args, {**kwargs, name: QuantizedKVCache(module)}
    return None


def use_runtime_cache(model: nn.Module, enable: bool = True) -> bool:
    """Make `QuantizedKVCache(model)` the cache of every forward called with ``use_cache=True`` that brings no
    cache (or an empty DynamicCache, as `generate` does), for a model whose attention modules all carry the
    per-token integer KV form: its tokens are then transformed and quantized once, as they enter, not at every
    step, and kept as codes (`PerTokenKVLayer`). `compress.load` calls it. Returns whether it did
    (`runtime_cache_misfit` says why not); ``enable=False`` takes it back (the DynamicCache and the
    simulation's attention, which fake-quantizes the whole prefix at every step)."""
    if not enable:
        handle = getattr(model, _DEFAULT_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            setattr(model, _DEFAULT_HOOK_ATTR, None)
        return False
    if runtime_cache_misfit(model, per_token=True):
        return False
    if getattr(model, _DEFAULT_HOOK_ATTR, None) is None:
        _install_positions_hook(model)  # before ours runs: ours is prepended, so the cache it makes sees its positions
        setattr(model, _DEFAULT_HOOK_ATTR,
                model.register_forward_pre_hook(_default_cache_pre_hook, with_kwargs=True, prepend=True))
    return True


# ---- the cache argument's name ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """The keyword a model's forward (and `generate`) takes its KV cache under in the installed
    transformers: ``cache`` since the rename, ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{cache_kwarg(): cache}``: pass it as ``model(ids, **cache_kwargs(cache))``."""
    return {cache_kwarg(): cache}


def returned_cache(output):
    """The cache a forward returned (``output.cache``, or ``output.past_key_values`` before the rename)."""
    for name in ("cache", "past_key_values"):
        if name in getattr(type(output), "__dataclass_fields__", {}):
            return getattr(output, name)
    raise AttributeError(f"{type(output).__name__} carries no cache: call the model with use_cache=True")


def _positions_pre_hook(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, QuantizedKVCache):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        q_len = ids.shape[1] if ids is not None else (emb.shape[1] if emb is not None else None)
        cache.note_positions(kwargs.get("position_ids"), q_len)
    return None


def _install_positions_hook(model: nn.Module) -> None:
    if getattr(model, _HOOK_ATTR, None) is None:
        setattr(model, _HOOK_ATTR, model.register_forward_pre_hook(_positions_pre_hook, with_kwargs=True))


def dynamic_cache_nbytes(cache) -> int:
    """Bytes held by a transformers DynamicCache's key/value tensors."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


__all__ = ["PerTokenKVLayer", "QuantizedKVCache", "QuantizedKVLayer", "runtime_cache_misfit", "use_runtime_cache", "cache_kwarg", "cache_kwargs", "dynamic_cache_nbytes", "returned_cache"]
