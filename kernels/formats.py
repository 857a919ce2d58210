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
- 3 bits is lmpress's own layout (compressed-tensors defines none): the same bitstream rule,
  so an element whose bits [i*3, i*3+3) cross a 32-bit boundary straddles two words (its low
  bits at the top of word k, its high bits at the bottom of word k+1).

int32 is signed: a word whose bit 31 is set is negative. Packing accumulates in int64 and wraps
to int32 explicitly; unpacking masks words back to [0, 2^32) before shifting.
Zero columns are allowed and round-trip: (rows, 0) <-> (rows, 0).
"""
from __future__ import annotations

import sys

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
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
    per, mask = 8 // bits, (1 << bits) - 1
    if per == 1:
        u = b
    else:
        u = torch.stack([(b >> (j * bits)) & mask for j in range(per)], dim=-1).view(rows, -1)  # (rows, 4*words*per)
    return u[:, :cols].to(dtype)
