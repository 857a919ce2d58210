"""Bit layout of packed weights: round trips, exact bit positions, errors."""
import pytest
import torch

from lmpress.kernels.formats import SUPPORTED_BITS, pack, pack_bytes, pack_trusted, packed_cols, unpack


def _reference_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit loop: element i of a row at bits [i*bits, (i+1)*bits) of a little-endian stream."""
    rows, cols = q.shape
    words = [[0] * packed_cols(cols, bits) for _ in range(rows)]
    for r, row in enumerate(q.tolist()):
        for i, value in enumerate(row):
            u = value + (1 << (bits - 1))
            for b in range(bits):
                pos = i * bits + b
                words[r][pos // 32] |= ((u >> b) & 1) << (pos % 32)
    signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]
    return torch.tensor(signed, dtype=torch.int32).reshape(rows, -1)  # (rows, words)


def _random_codes(rows, cols, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (rows, cols), generator=g, dtype=torch.int64)
    if q.numel():  # make sure both extremes appear
        q.view(-1)[0], q.view(-1)[-1] = lo, hi
    return q.to(torch.int8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (17, 100), (2, 11), (4, 0), (0, 5), (6, 64)])
def test_pack_trusted_is_pack(bits, shape):
    q = _random_codes(*shape, bits)
    p = pack_trusted(q, bits)
    assert p.dtype == torch.int32 and torch.equal(p, pack(q, bits))
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)  # the unsigned codes, as the KV cache makes them
    assert torch.equal(pack_bytes(u, bits), p)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (17, 100), (2, 11), (4, 0), (0, 5)])
def test_round_trip_matches_reference(bits, shape):
    q = _random_codes(*shape, bits)
    p = pack(q, bits)
    assert p.dtype == torch.int32 and tuple(p.shape) == (shape[0], packed_cols(shape[1], bits))
    assert torch.equal(unpack(p, bits, shape[1]), q)
    if shape[0]:
        assert torch.equal(p, _reference_pack(q, bits))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_values(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for value in (lo, hi):
        q = torch.full((3, 37), value, dtype=torch.int8)
        assert torch.equal(unpack(pack(q, bits), bits, 37), q)
    q = torch.full((1, 32), hi, dtype=torch.int8)  # every stored bit set -> every full word is -1
    assert torch.equal(pack(q, bits), torch.full((1, bits), -1, dtype=torch.int32))


def test_packed_cols():
    assert [packed_cols(c, 4) for c in (0, 1, 8, 9)] == [0, 1, 1, 2]
    assert [packed_cols(c, 3) for c in (10, 11, 32, 33)] == [1, 2, 3, 4]
    assert [packed_cols(c, 2) for c in (16, 17)] == [1, 2]
    assert [packed_cols(c, 8) for c in (4, 5)] == [1, 2]


def test_int4_bit_positions_by_hand():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)  # stored u = 0, 1, ..., 15
    # element i at shift 4*i: word 0 = 0x76543210, word 1 = 0xFEDCBA98 (negative as int32)
    expected = torch.tensor([[0x76543210, 0xFEDCBA98 - (1 << 32)]], dtype=torch.int32)
    assert torch.equal(pack(q, 4), expected)
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8, 0]], dtype=torch.int8)  # u = 9..15, 0, 8
    assert torch.equal(pack(q, 4), torch.tensor([[0x0FEDCBA9, 0x8]], dtype=torch.int32))


def test_other_widths_by_hand():
    assert pack(torch.tensor([[-1, 0, 1]], dtype=torch.int8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    w8 = 0 | 255 << 8 | 128 << 16 | 129 << 24
    assert pack(torch.tensor([[-128, 127, 0, 1]], dtype=torch.int8), 8).tolist() == [[w8 - (1 << 32)]]
    # 3 bits: element 10 occupies bits 30..32, straddling words 0 and 1
    q = torch.full((1, 11), -4, dtype=torch.int8)  # u = 0
    q[0, 10] = 3  # u = 7
    assert pack(q, 3).tolist() == [[(0b11 << 30) - (1 << 32), 0b1]]


def test_errors():
    q = torch.zeros(2, 8, dtype=torch.int8)
    for bits in (1, 7, 16, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            pack(q, bits)
    with pytest.raises(ValueError, match="int8"):
        pack(q.to(torch.int32), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack(q.reshape(-1), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[-3]], dtype=torch.int8), 2)
    p = pack(q, 4)
    with pytest.raises(ValueError, match="int32"):
        unpack(p.to(torch.int64), 4, 8)
    with pytest.raises(ValueError, match="words"):
        unpack(p, 4, 9)
    with pytest.raises(ValueError, match="2-D"):
        unpack(p.reshape(-1), 4, 8)
    with pytest.raises(ValueError, match="non-negative"):
        packed_cols(-1, 4)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("cols", [1, 31, 32, 45, 100])
def test_every_width_is_compressed_tensors_dense_packing(bits, cols):
    """compressed-tensors 0.20 packs every width in 1..8 as one little-endian bitstream a row (`pack_to_int32`):
    ours, bit for bit, straddling fields included."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=g).to(torch.int8)
    assert torch.equal(pack(q, bits), helpers.pack_to_int32(q, bits))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (2, 4, 64), (3, 2, 130), (4, 0)])
@pytest.mark.parametrize("spread", [False, True])
def test_unsigned_codes_float_is_unsigned_codes_by_lookup(bits, shape, spread, monkeypatch):
    """The runtime unpacks (`unsigned_codes`, and `unsigned_codes_float`: byte lookup, or `_spread` bytes for 4-bit
    words past `SPREAD_BYTES`, forced here by `spread`) read the fields `unpack` decodes, + 2^(b-1), over any
    leading dimensions, non-contiguous words included."""
    from lmpress.kernels import formats
    from lmpress.kernels.formats import unsigned_codes, unsigned_codes_float

    monkeypatch.setattr(formats, "SPREAD_BYTES", 0 if spread else 1 << 40)

    *lead, cols = shape
    q = _random_codes(int(torch.Size(lead).numel()), cols, bits, seed=cols)
    w = pack(q, bits)  # (rows, words)
    ref = (unpack(w, bits, cols).float() + (1 << (bits - 1))).reshape(*lead, cols)
    for dtype in (torch.uint8, torch.int32):
        assert torch.equal(unsigned_codes(w, bits, cols, dtype).float().reshape(*lead, cols), ref)
    got = unsigned_codes_float(w.reshape(*lead, w.shape[1]), bits, cols)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    if len(lead) == 2:
        assert torch.equal(unsigned_codes_float(w.reshape(*lead, w.shape[1]).transpose(0, 1), bits, cols), ref.transpose(0, 1))
    out = torch.full((ref.numel() + 3,), float("nan"))[:ref.numel()]  # a reused buffer: rows that fill their words or not
    into = unsigned_codes_float(w.reshape(*lead, w.shape[1]), bits, cols, out=out)
    assert into.data_ptr() == out.data_ptr() and torch.equal(into, ref)
