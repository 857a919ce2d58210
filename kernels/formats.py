"""Bit layouts of packed integer weights: the only module that knows bit order.

Layout (compressed-tensors ``pack-quantized``, see ``pack_to_int32`` in
``compressed_tensors/compressors/quantized_compressors/pack_quantized.py``, the source of this
bit order):

- codes are signed, q in [-2^(b-1), 2^(b-1)-1] (int8, as `lmpress.quant.primitives.quantize`
  returns them) and are stored unsigned, u = q + 2^(b-1);
- each row of `cols` codes is one little-endian bitstream: element i occupies bits
  [i*b, (i+1)*b) of the row, i.e. word (i*b) // 32 at shift (i*b) % 32; the stream is cut into
  int32 words, `[rows, ceil(cols*b/32)]`; bits past the last element are zero;
- for b in {2, 4, 8} (32 % b == 0) this is exactly compressed-tensors: element i in word
  i // (32//b) at shift (i % (32//b))*b, and no element straddles two words;
- 3, 5 and 6 bits follow the same bitstream rule, so an element whose bits [i*b, (i+1)*b) cross a
  32-bit boundary straddles two words (its low bits at the top of word k, its high bits at the
  bottom of word k+1); compressed-tensors 0.20 packs every width in 1..8 this way (`pack_to_int32`:
  32 elements in exactly b words, "dense cross-element packing").

int32 is signed: a word whose bit 31 is set is negative. Packing accumulates in int64 and wraps
to int32 explicitly; unpacking masks words back to [0, 2^32) before shifting.
Zero columns are allowed and round-trip: (rows, 0) <-> (rows, 0).
"""
from __future__ import annotations

import functools
import sys

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_WORD = 32
_MASK32 = (1 << _WORD) - 1


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not a supported packed width; use one of {list(SUPPORTED_BITS)}")


def packed_cols(cols: int, bits: int) -> int:
    """Number of int32 words holding a row of `cols` codes of `bits` bits: ceil(cols*bits/32)."""
    _check_bits(bits)
    if cols < 0:
        raise ValueError(f"cols={cols} must be non-negative")
    return -(-cols * bits // _WORD)


def _positions(cols: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit shift of each element of a row, each (cols,) int64."""
    offset = torch.arange(cols, device=device, dtype=torch.int64) * bits  # (cols,)
    return offset // _WORD, offset % _WORD


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed int8 codes (rows, cols) -> int32 words (rows, packed_cols(cols, bits))."""
    _check_bits(bits)
    if q.dtype != torch.int8:
        raise ValueError(f"pack expects int8 codes (as quantize() returns), got dtype {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor (rows, cols), got shape {tuple(q.shape)}")
    lo_q, hi_q = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo_q or int(q.max()) > hi_q):
        raise ValueError(
            f"codes out of range for {bits} bits: found [{int(q.min())}, {int(q.max())}], allowed [{lo_q}, {hi_q}]"
        )
    rows, cols = q.shape
    words = packed_cols(cols, bits)
    if _WORD % bits == 0:
        return _pack_aligned(q, bits, words)
    u = q.to(torch.int64) + (1 << (bits - 1))  # (rows, cols), in [0, 2^bits)
    word, shift = _positions(cols, bits, q.device)  # (cols,) each
    low = (u << shift) & _MASK32  # (rows, cols): the part that lands in `word`
    high = u >> (_WORD - shift)  # (rows, cols): the part spilling into word+1 (0 unless straddling)
    out = torch.zeros(rows, words, dtype=torch.int64, device=q.device)  # (rows, words)
    out.index_add_(1, word, low)  # disjoint bit fields: sum == bitwise or
    out.index_add_(1, torch.clamp(word + 1, max=max(words - 1, 0)), high)
    out = torch.where(out >= (1 << 31), out - (1 << _WORD), out)  # wrap to the signed int32 range
    return out.to(torch.int32)


def pack_trusted(q: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack` for codes the caller made in range (no range check, which reads the codes back), in byte arithmetic
    for 2/4/8 bits on a little-endian machine (`pack_bytes`; the runtime KV cache packs every new token). Other
    widths and byte orders: `pack`. Same words as `pack` (tests/test_formats.py)."""
    if bits not in (2, 4, 8) or sys.byteorder != "little" or q.dim() != 2 or q.numel() == 0:
        return pack(q, bits)
    return pack_bytes((q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8), bits)


def pack_bytes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_trusted` for unsigned codes: uint8 (rows, cols) in [0, 2^bits), made in range by the caller -> the
    int32 words `pack` gives for the signed codes u - 2^(bits-1). 2/4/8 bits on a little-endian machine: each
    byte of the bitstream is its 8 // bits codes shifted together, and the bytes viewed as the words (~4 small
    ops where `pack` takes ~15); otherwise through `pack`."""
    if u.dim() != 2:
        raise ValueError(f"pack_bytes expects a 2-D tensor (rows, cols), got shape {tuple(u.shape)}")
    if bits not in (2, 4, 8) or sys.byteorder != "little" or u.numel() == 0:
        return pack((u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), bits)
    rows, cols = u.shape
    words = packed_cols(cols, bits)
    per = 8 // bits  # codes a byte
    pad = words * (_WORD // bits) - cols
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # zero bits past the last element
    u = u.view(rows, words * 4, per)  # (rows, bytes, per): a byte's codes, lowest bits first
    if per == 1:
        return u[:, :, 0].contiguous().view(torch.int32)
    b = u[:, :, per - 1] << ((per - 1) * bits)  # (rows, bytes): a fresh tensor; the other codes or-ed in
    for k in range(per - 1):
        b |= u[:, :, k] << (k * bits) if k else u[:, :, k]
    return b.view(torch.int32)  # (rows, words): little-endian bytes in stream order


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words (rows, packed_cols(cols, bits)) -> signed int8 codes (rows, cols); inverse of pack."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack expects int32 words, got dtype {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"unpack expects a 2-D tensor (rows, words), got shape {tuple(packed.shape)}")
    words = packed_cols(cols, bits)
    if packed.shape[1] != words:
        raise ValueError(
            f"{cols} columns of {bits} bits need {words} int32 words a row, got {packed.shape[1]}"
        )
    if _WORD % bits == 0:
        return _unpack_aligned(packed, bits, cols)
    w = packed.to(torch.int64) & _MASK32  # (rows, words), unsigned view of each word
    word, shift = _positions(cols, bits, packed.device)  # (cols,) each
    low = w[:, word] >> shift  # (rows, cols)
    nxt = w[:, torch.clamp(word + 1, max=max(words - 1, 0))]  # (rows, cols): the following word
    u = (low | (nxt << (_WORD - shift))) & ((1 << bits) - 1)  # (rows, cols); nxt counts only if straddling
    return (u - (1 << (bits - 1))).to(torch.int8)


# ---- fast paths for widths that divide 32 (no element straddles a word) -----------------
def _pack_aligned(q: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    per = _WORD // bits
    rows, cols = q.shape
    u = torch.zeros(rows, words * per, dtype=torch.int32, device=q.device)  # (rows, words*per)
    u[:, :cols] = q.to(torch.int32) + (1 << (bits - 1))  # padding codes stay 0 (zero bits)
    u = u.view(rows, words, per)  # (rows, words, per): slot k of a word holds element word*per+k
    out = torch.zeros(rows, words, dtype=torch.int32, device=q.device)  # (rows, words)
    for k in range(per):  # int32 shifts wrap, so the top field lands in the sign bit as intended
        out |= u[:, :, k] << (k * bits)
    return out


def _unpack_aligned(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    per = _WORD // bits
    rows, words = packed.shape
    mask = (1 << bits) - 1
    u = torch.empty(rows, words, per, dtype=torch.int8, device=packed.device)  # (rows, words, per)
    for k in range(per):  # arithmetic shifts smear sign bits only above the field; the mask drops them
        u[:, :, k] = ((packed >> (k * bits)) & mask) - (1 << (bits - 1))
    return u.view(rows, words * per)[:, :cols]  # (rows, cols)


# ---- kernel layouts (repacked at load; the on-disk layout above stays the only stored one) ----
# "kn" layout: the same int32 words, transposed. On disk a row of the weight (one output
# channel n) is a run of words along the input dimension k: packed[n, w] holds elements
# k = w*(32//b) + j at shift j*b. A GPU kernel that walks k in its inner loop and spreads n over
# threads reads adjacent n from adjacent addresses if the words are stored [words, out]:
# kn[w, n] == packed[n, w], bit for bit (no element changes word or shift). Widths that divide
# 32 only (2, 4, 8): a 3-bit word holds no whole number of elements, so it cannot be tiled.
def to_kn_layout(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """On-disk words (out, words) -> kernel "kn" words (words, out), contiguous; inverse: `from_kn_layout`."""
    _check_bits(bits)
    if _WORD % bits:
        raise ValueError(f"the kn layout needs a width that divides 32 (2, 4, 8); {bits}-bit elements straddle words")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"to_kn_layout expects int32 words (out, words), got {packed.dtype} {tuple(packed.shape)}")
    return packed.t().contiguous()


def from_kn_layout(kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Kernel "kn" words (words, out) -> on-disk words (out, words); exact inverse of `to_kn_layout`."""
    _check_bits(bits)
    if kn.dtype != torch.int32 or kn.dim() != 2:
        raise ValueError(f"from_kn_layout expects int32 words (words, out), got {kn.dtype} {tuple(kn.shape)}")
    return kn.t().contiguous()


def unsigned_codes(packed: torch.Tensor, bits: int, cols: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """On-disk words (rows, words) -> the stored unsigned fields u = q + 2^(b-1) as `dtype` (rows, cols).

    For b = 4 this is the input torch's `_convert_weight_to_int4pack_for_cpu` expects (values in
    [0, 16), int32); its own tiled layout is torch's business, not ours. Inverse:
    ``pack((u - 2^(b-1)).to(torch.int8), bits)``.

    Fast path for b in {2, 4, 8} on a little-endian host: the int32 words of a row, read as
    bytes in memory order, are the row's bitstream bytes in order (word w's byte j holds
    stream bits [32w + 8j, 32w + 8j + 8)), so element i sits in byte (i*b) // 8 at shift
    (i*b) % 8 and never crosses a byte: byte-wide shifts and masks, no int64 detour.
    """
    _check_bits(bits)
    if _WORD % bits or sys.byteorder != "little":
        return (unpack(packed, bits, cols).to(torch.int32) + (1 << (bits - 1))).to(dtype)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unsigned_codes expects int32 words (rows, words), got {packed.dtype} {tuple(packed.shape)}")
    words = packed_cols(cols, bits)
    if packed.shape[1] != words:
        raise ValueError(f"{cols} columns of {bits} bits need {words} int32 words a row, got {packed.shape[1]}")
    rows = packed.shape[0]
    b = packed.contiguous().view(torch.uint8)  # (rows, 4*words): the bitstream's bytes in order
    u = b if bits == 8 else _spread(b, bits).view(rows, -1)  # (rows, 4*words*8//bits)
    return u[:, :cols].to(dtype)


def _spread(b: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bitstream bytes (..., n) -> their 2- or 4-bit fields, one a byte, lowest first: uint8 (..., n * 8 // bits).

    Each byte is widened to a 16-bit (4 bits: 2 fields) or 32-bit (2 bits: 4 fields) lane and its fields moved
    apart by shifts and masks inside the lane, so that on a little-endian host the lane's bytes, in memory
    order, are the fields in stream order: ~4 elementwise passes, no interleaving copy (torch.stack of the
    fields along a new last axis is a strided scalar loop, 2-3x slower: 1536 x 576 at 4 bits, 133 against 436 us).
    4 bits: x = b | b << 4 puts the high field at bits 8..11, & 0x0F0F clears the rest.
    2 bits: nibbles to 16-bit halves (x | x << 12) & 0x000F000F, then fields to bytes (x | x << 6) & 0x03030303."""
    if bits == 4:
        x = b.to(torch.int16)  # (..., n)
        x.bitwise_or_(x << 4).bitwise_and_(0x0F0F)
    else:
        x = b.to(torch.int32)  # (..., n)
        x.bitwise_or_(x << 12).bitwise_and_(0x000F000F)
        x.bitwise_or_(x << 6).bitwise_and_(0x03030303)
    return x.view(torch.uint8)  # (..., n * 8 // bits)


_WIDE = {2: torch.complex128, 4: torch.int64}  # one byte's 8 // bits float32 fields as one element (16, 8 bytes)
# 4-bit words of at least this many bytes go through `_spread` and a conversion instead of the gather: fewer ops
# for the gather (a decode step's KV codes), less time per byte for the spread (medians, 1 thread, AVX2 EPYC,
# 2026-12-08, gather / spread us: 16 KiB 79 / 114, 64 KiB 171 / 151, 1 MiB 1290 / 785; 1536 x 576 weights 417 / 267).
# At 2 bits the gather (16-byte elements) wins at every size (1536 x 576: 264 against 342 us)
SPREAD_BYTES = 1 << 15


@functools.lru_cache(maxsize=None)
def _byte_fields(bits: int, device: str) -> torch.Tensor:
    """(256,) of `_WIDE[bits]`: the b-bit fields of every byte value as float32, lowest first (bitstream order),
    each byte's row viewed as one wide element, so the lookup is a 1-D gather (about 3x faster than a row gather)."""
    byte = torch.arange(256, device=device)
    fields = torch.stack([(byte >> (j * bits)) & ((1 << bits) - 1) for j in range(8 // bits)], dim=-1).float()
    return fields.view(_WIDE[bits]).reshape(256)  # (256, 8 // bits) float32 -> (256,)


def unsigned_codes_float(packed: torch.Tensor, bits: int, cols: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`unsigned_codes` as float32, for runtime paths that multiply the codes next: int32 words (..., words) ->
    (..., cols), any leading dimensions: through a byte lookup table (one gather, no shift passes), or for 4-bit
    words of `SPREAD_BYTES` or more through `_spread`'s bytes and one conversion. `out`: a contiguous float32
    tensor of the result's size to write into (returned, viewed to its shape)."""
    _check_bits(bits)
    lead, words = packed.shape[:-1], packed.shape[-1]
    full = 4 * words * 8 // bits
    if bits == 4 and sys.byteorder == "little" and packed.numel() * 4 >= SPREAD_BYTES:
        u = _spread(packed.contiguous().view(torch.uint8), bits)[..., :cols]  # (..., cols) uint8, lead kept
        return u.to(torch.float32) if out is None else out.view(u.shape).copy_(u)
    if bits not in _WIDE or sys.byteorder != "little" or (out is not None and full != cols):
        u = unsigned_codes(packed.reshape(lead.numel(), words), bits, cols, dtype=torch.float32).reshape(*lead, cols)
        return u if out is None else out.view(u.shape).copy_(u)
    b = packed.contiguous().view(torch.uint8).reshape(-1)  # the bitstream's bytes in order, rows after rows
    table = _byte_fields(bits, str(packed.device))
    if out is not None:  # rows fill their words exactly: the gather writes the result itself
        torch.index_select(table, 0, b.int(), out=out.view(table.dtype).reshape(-1))
        return out.view(*lead, cols)
    u = torch.index_select(table, 0, b.int()).view(torch.float32)  # (bytes * 8 // bits,)
    return u.reshape(*lead, full)[..., :cols]  # (..., 4 * words * 8 // bits) -> (..., cols)


# ---- 2:4 sparsity: kept values + 2-bit positions (lmpress's own layout) -----------------------
# A row of `cols` columns is cut into ceil(cols/4) groups of 4 (the last one zero-padded); each
# group stores exactly 2 entries: their values (in the group's order of position) and their
# positions p in [0, 4), 2 bits each. The positions of a row form one 2-bit bitstream packed as
# `pack` does with u = p (i.e. pack((p - 2).to(int8), 2)): slot s of the row at bits [2s, 2s+2).
# A group with fewer than 2 nonzeros is completed with its lowest-index zero positions (padding
# columns past `cols` included), positions ascending: so the choice is canonical and
# `sparse24_compress(sparse24_decompress(v, m, cols), sparse24_mask(m, cols))` gives (v, m) back.
# Kept int4 codes are packed separately with `pack(codes, 4)` (2 bits a weight, + 1 bit of position).
SPARSE24 = (2, 4)


def sparse24_slots(cols: int) -> int:
    """Stored entries per row: 2 per group of 4 columns, the last group padded."""
    if cols < 0:
        raise ValueError(f"cols={cols} must be non-negative")
    return 2 * (-(-cols // 4))


def sparse24_compress(x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) -> (values (rows, sparse24_slots(cols)) in x.dtype, meta int32 (rows, packed_cols(slots, 2))).

    `keep` (bool, like x) names the entries to store, at most 2 per group of 4; default: x != 0.
    """
    if x.dim() != 2:
        raise ValueError(f"sparse24_compress expects a 2-D tensor (rows, cols), got shape {tuple(x.shape)}")
    keep = (x != 0) if keep is None else keep
    if keep.shape != x.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor of shape {tuple(x.shape)}, got {keep.dtype} {tuple(keep.shape)}")
    rows, cols = x.shape
    pad = (-cols) % 4
    xp = torch.cat([x, x.new_zeros(rows, pad)], 1) if pad else x  # (rows, 4G)
    kp = torch.cat([keep, keep.new_zeros(rows, pad)], 1) if pad else keep
    g = xp.shape[1] // 4
    k4 = kp.reshape(rows, g, 4)  # (rows, G, 4)
    counts = k4.sum(-1)
    if bool((counts > 2).any()):
        r, c = (counts > 2).nonzero()[0].tolist()
        raise ValueError(f"not 2:4 sparse: row {r}, columns {4 * c}..{4 * c + 3} keep {int(counts[r, c])} entries (at most 2)")
    key = (~k4).to(torch.int64) * 4 + torch.arange(4, device=x.device)  # kept first, then by position
    pos = torch.sort(torch.sort(key, dim=-1).indices[..., :2], dim=-1).values  # (rows, G, 2) ascending
    values = xp.reshape(rows, g, 4).gather(-1, pos).reshape(rows, 2 * g)
    meta = pack((pos.reshape(rows, 2 * g) - 2).to(torch.int8), 2)
    return values.contiguous(), meta


def sparse24_positions(meta: torch.Tensor, cols: int) -> torch.Tensor:
    """Column index of every stored slot, (rows, sparse24_slots(cols)) int64 (padding slots may be >= cols)."""
    slots = sparse24_slots(cols)
    p = unpack(meta, 2, slots).to(torch.int64) + 2  # (rows, slots) in [0, 4)
    return p + 4 * (torch.arange(slots, device=meta.device) // 2)


def sparse24_decompress(values: torch.Tensor, meta: torch.Tensor, cols: int,
                        fill: torch.Tensor | float = 0) -> torch.Tensor:
    """Exact inverse of `sparse24_compress`: (rows, cols) with the values at their positions and
    `fill` elsewhere (a scalar, or a (rows, cols) tensor, e.g. the zero-point codes)."""
    rows, slots = values.shape
    if slots != sparse24_slots(cols):
        raise ValueError(f"{cols} columns need {sparse24_slots(cols)} stored slots a row, got {slots}")
    pos = sparse24_positions(meta, cols)  # (rows, slots)
    width = 2 * slots
    if isinstance(fill, torch.Tensor):
        if fill.shape != (rows, cols):
            raise ValueError(f"fill must be a scalar or ({rows}, {cols}), got {tuple(fill.shape)}")
        dense = torch.cat([fill.to(values.dtype), values.new_zeros(rows, width - cols)], 1)
    else:
        dense = torch.full((rows, width), fill, dtype=values.dtype, device=values.device)
    dense.scatter_(1, pos, values)
    return dense[:, :cols]


def sparse24_mask(meta: torch.Tensor, cols: int) -> torch.Tensor:
    """The stored positions as a bool (rows, cols) mask."""
    pos = sparse24_positions(meta, cols)
    mask = torch.zeros(pos.shape[0], 2 * pos.shape[1], dtype=torch.bool, device=meta.device)
    return mask.scatter_(1, pos, True)[:, :cols]


# ---- KV-cache layout (kernels/kv_quant.py, kernels/kv_cache.py) ----------------------------
# A quantized KV group is G unsigned codes u in [0, 2^b) (asymmetric min-max: x ≈ u*scale + min)
# stored with the same bitstream rule as weights: u of element i at bits [i*b, (i+1)*b) of its
# row, rows cut into int32 words. Keys are quantized per channel over G consecutive tokens, so a
# row is one channel of one group of tokens, (batch, kv_heads, head_dim, G) -> words along the
# tokens; values per token over G consecutive head_dim channels, (batch, kv_heads, tokens, D/G, G)
# -> words along head_dim. The field values are those `pack` stores for q = u - 2^(b-1).
def pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (..., cols) in [0, 2^bits) -> int32 words (..., packed_cols(cols, bits)); inverse: `unpack_unsigned`."""
    _check_bits(bits)
    lead, cols = u.shape[:-1], u.shape[-1]
    q = (u.reshape(-1, cols).to(torch.int16) - (1 << (bits - 1))).to(torch.int8)  # (rows, cols) signed
    return pack(q, bits).reshape(*lead, packed_cols(cols, bits))


def unpack_unsigned(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words (..., packed_cols(cols, bits)) -> unsigned codes (..., cols) as uint8; exact inverse of `pack_unsigned`."""
    _check_bits(bits)
    lead = packed.shape[:-1]
    u = unsigned_codes(packed.reshape(-1, packed.shape[-1]), bits, cols, dtype=torch.uint8)  # (rows, cols): byte-wide fast path
    return u.reshape(*lead, cols)
