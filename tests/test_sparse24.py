"""The packed 2:4 format (kernels/formats.py), its runtime module (Sparse24Linear) and the
sparse24_gemm Triton kernel against its reference (interpreter, in a subprocess as in
tests/test_kernels.py: TRITON_INTERPRET=1 must be set before triton is first imported)."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from lmpress.kernels.dispatch import interpreter_ready
from lmpress.kernels.formats import (pack, packed_cols, sparse24_compress, sparse24_decompress, sparse24_mask,
                                     sparse24_positions, sparse24_slots, unpack)
from lmpress.kernels.linear import PackedLinear, Sparse24Linear
from lmpress.kernels.sparse24_gemm import sparse24_dense_weight, sparse24_gemm_ref
from lmpress.prune.masks import check_nm, nm_mask
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import QuantArgs, QuantScheme
from lmpress.quant.sim import SimQuantLinear
from _interpreter import run_triton_tests_in_interpreter

INTERP = interpreter_ready()
in_interpreter = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 at start-up; run by test_sparse24_triton_in_interpreter")
ODD_COLS = [1, 2, 3, 5, 6, 7, 13, 64, 67, 130]


def _sparse(rows, cols, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    return (W * nm_mask(W.abs(), 2, 4)).to(dtype)


# ============================================================ format
@pytest.mark.parametrize("cols", ODD_COLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_odd_shapes(cols, dtype):
    W = _sparse(5, cols, seed=cols, dtype=dtype)
    W[1] = 0  # an all-pruned row: filler positions only
    W[2, :2] = 0  # a group with a single nonzero (when cols allow)
    v, m = sparse24_compress(W)
    assert v.shape == (5, sparse24_slots(cols)) and v.dtype == dtype
    assert m.dtype == torch.int32 and m.shape == (5, packed_cols(sparse24_slots(cols), 2))
    assert torch.equal(sparse24_decompress(v, m, cols), W)
    # the other direction: from the stored positions, the same bytes come back
    v2, m2 = sparse24_compress(sparse24_decompress(v, m, cols), sparse24_mask(m, cols))
    assert torch.equal(v2, v) and torch.equal(m2, m)
    mask = sparse24_mask(m, cols)
    assert bool(mask[W != 0].all())  # every nonzero is stored
    check_nm(mask, 2, 4, exact=True)  # exactly 2 of every 4 stored (min(2, r) in a tail of r)


def test_bit_layout_by_hand():
    x = torch.zeros(1, 8)
    x[0, 0], x[0, 3] = 1.0, 2.0  # group 0: positions 0, 3
    x[0, 5] = 3.0  # group 1: position 1, completed with the lowest free position 0
    v, m = sparse24_compress(x)
    assert v.tolist() == [[1.0, 2.0, 0.0, 3.0]]
    # slots s at bits [2s, 2s+2): positions 0, 3, 0, 1 -> 0b01_00_11_00
    assert m.tolist() == [[0b01001100]]
    assert sparse24_positions(m, 8).tolist() == [[0, 3, 4, 5]]


def test_compress_refuses_three_of_four():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, columns 0..3 keep 3"):
        sparse24_compress(x)


def test_decompress_with_code_fill_is_exact():
    args = QuantArgs(bits=4, granularity="group", group_size=8, symmetric=False)
    W = _sparse(6, 21, seed=3)
    q, s, z = rtn_quantize(W, args)
    zfull = z.repeat_interleave(8, 1)[:, :21]  # (6, 21) zero-point code per element
    v, m = sparse24_compress(q.float(), W != 0)
    back = sparse24_decompress(v, m, 21, fill=zfull)
    assert torch.equal(back.to(torch.int8), torch.where(W != 0, q, zfull.to(torch.int8)))


# ============================================================ runtime module
def _pruned_sim(scheme, in_f, out_f, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
    sim = SimQuantLinear(lin, scheme)
    if scheme.weights is not None:
        sim.set_quantized(*rtn_quantize(lin.weight.detach(), scheme.weights))
    return sim


SCHEMES = [
    QuantScheme(sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=4, granularity="group", group_size=16, symmetric=False), sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=4), sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=8, granularity="group", group_size=12), sparsity="2:4"),
    # integer-factored (`int_linear`: the integer GEMM + scale epilogue), per-channel and per-tensor weights
    QuantScheme(weights=QuantArgs(bits=8), inputs=QuantArgs(bits=8, granularity="token", dynamic=True), sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=4, granularity="tensor"), inputs=QuantArgs(bits=4, granularity="token", dynamic=True),
                sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=4, granularity="group", group_size=16), inputs=QuantArgs(bits=8, granularity="token", dynamic=True),
                sparsity="2:4"),  # group-wise weights: fake-quant + F.linear
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("in_f", [37, 64])
def test_sparse24_linear_matches_sim_exactly(scheme, in_f):
    sim = _pruned_sim(scheme, in_f, 11)
    packed = Sparse24Linear.from_sim(sim)
    assert torch.equal(packed.dense_weight(), sim.weight)
    x = torch.randn(3, 4, in_f)
    held = packed.weight_nbytes()  # before a forward: values, metadata, qparams
    assert torch.equal(packed(x), sim(x))
    dense = packed.dense_packed()  # None: the reference (unquantized weights)
    # a small layer runs the reference, or the int8 GEMM where activations are quantized (cheaper there)
    assert packed.kernel_path.kind == ("cpu-int8mm" if dense is not None and dense.cpu_plan(x.dtype)[0] == "int8mm" else "ref")
    extra = 11 * in_f * 4 if packed.kernel_path.kind == "ref" else 0  # the reference's cached fp32 weight (or codes)
    if dense is not None:  # run as the PackedLinear of the dense codes: + those codes, + the int8 GEMM's copy
        assert torch.equal(dense.weight_packed, PackedLinear.from_sim(sim).weight_packed)
        extra += dense.weight_packed.numel() * 4 + (dense._fast[1].nbytes() if dense._fast is not None else 0)
    assert packed.weight_nbytes() == held + extra
    # the state dict round-trips through a meta-device skeleton
    fresh = Sparse24Linear(in_f, 11, scheme, bias=True, device="meta")
    fresh.load_state_dict(packed.state_dict(), assign=True)
    assert torch.equal(fresh(x), sim(x))


@pytest.mark.parametrize("scheme", [
    QuantScheme(weights=QuantArgs(bits=4, granularity="group", group_size=64, symmetric=False), sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=4), sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=8), inputs=QuantArgs(bits=8, granularity="token", dynamic=True), sparsity="2:4"),
    QuantScheme(weights=QuantArgs(bits=3, granularity="group", group_size=32, symmetric=False), sparsity="2:4"),
], ids=lambda s: s.name)
def test_sparse24_linear_runs_the_packed_cpu_paths(scheme):
    """A CPU-sized 2:4 layer with integer weights runs as `PackedLinear.from_sim` of its SimQuantLinear would, path
    for path and bit for bit (the pruned weights' codes are their zero points), and holds its dense codes (and the op's copies), not
    the dense fp32 weight."""
    sim = _pruned_sim(scheme, 576, 256)  # 147456 weights: above cpu.MIN_FAST_WEIGHTS
    sparse, dense = Sparse24Linear.from_sim(sim), PackedLinear.from_sim(sim)
    with torch.no_grad():
        for x in (torch.randn(1, 3, 576), torch.randn(2, 40, 576)):  # decode rows, and more than cpu.SMALL_M
            y = sparse(x)
            assert torch.equal(y, dense(x)) and sparse.kernel_path == dense.kernel_path
            assert sparse.kernel_path.kind.startswith("cpu-")
            if sparse.kernel_path.kind in ("cpu-dequant", "cpu-int8mm"):  # exact paths
                assert torch.equal(y, sim(x))
            else:  # torch's bf16 weight-only op
                assert ((y - sim(x)).norm() / sim(x).norm()).item() < 1e-2
    assert sparse.weight_nbytes() < 256 * 576 * 4  # W8A8: its codes and both int8 GEMMs' copies, 0.92x


def test_sparse24_siblings_run_as_one_gemm(monkeypatch):
    """`link_siblings` links 2:4 layers that read one input through their dense forms: one stacked GEMM on the
    CPU op path, each output bit-identical to its layer alone; 2:4 layers without a dense form stay unlinked."""
    from lmpress.kernels.linear import link_siblings

    monkeypatch.setenv("LMPRESS_KERNELS", "cpu")
    scheme = QuantScheme(weights=QuantArgs(bits=4, granularity="group", group_size=64, symmetric=False), sparsity="2:4")
    sims = [_pruned_sim(scheme, 192, n, seed=i) for i, n in enumerate((40, 24, 24))]
    alone = [Sparse24Linear.from_sim(s) for s in sims]
    parent = nn.ModuleDict({k: Sparse24Linear.from_sim(s) for k, s in zip("qkv", sims)})
    floats = nn.ModuleDict({k: Sparse24Linear.from_sim(_pruned_sim(QuantScheme(sparsity="2:4"), 192, 24, seed=i))
                            for i, k in enumerate("ab")})
    assert link_siblings(parent, [["q", "k", "v"]]) == 1 and link_siblings(floats, [["a", "b"]]) == 0
    x = torch.randn(3, 192)
    with torch.no_grad():
        for m, a in zip(parent.values(), alone):
            assert torch.equal(m(x), a(x)) and "one GEMM for the 3 linears" in m.kernel_path.reason


def test_sparse24_linear_refuses_three_of_four():
    sim = SimQuantLinear(nn.Linear(8, 2), QuantScheme(sparsity="2:4"))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        Sparse24Linear.from_sim(sim)


def test_size_of_2_4_int4_against_dense_int4():
    """Kept int4 codes (2 bits a weight) + 2-bit positions (1 bit a weight) = 3/4 of dense int4's
    codes; qparams are the same in both. (A lossless 2:4 code needs >= log2(6)/4 = 0.646 bits a
    weight of positions, so with int4 values no encoding gets below 0.66x of the dense codes.)"""
    scheme = QuantScheme(weights=QuantArgs(bits=4, granularity="group", group_size=64, symmetric=False), sparsity="2:4")
    sim = _pruned_sim(scheme, 576, 64, bias=False)
    sparse = Sparse24Linear.from_sim(sim)
    dense = PackedLinear.from_sim(sim)
    codes_s = sparse.weight_sparse24_values.numel() * 4 + sparse.weight_sparse24_meta.numel() * 4
    codes_d = dense.weight_packed.numel() * 4
    assert codes_s == 0.75 * codes_d
    q_bytes = sum(t.numel() * 4 for t in (dense.weight_scale, dense.weight_zero_point))
    assert sparse.weight_scale.shape == dense.weight_scale.shape
    ratio = (codes_s + q_bytes) / (codes_d + q_bytes)
    assert 0.75 < ratio < 0.81  # g64 asym fp32 qparams add 1 bit a weight to both


# ============================================================ kernel (interpreter)
def _kernel_case(N, K, scheme, seed):
    sim = _pruned_sim(scheme, K, N, seed=seed)
    p = Sparse24Linear.from_sim(sim)
    s, z = p._qparams()
    return p, sim, dict(values=p.weight_sparse24_values, meta=p.weight_sparse24_meta, scale=s, zero_point=z, **p._gemm_args())


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("M,N,K", [(1, 16, 64), (5, 19, 70), (17, 33, 131)])
def test_sparse24_gemm_matches_reference(scheme, M, N, K):
    from lmpress.kernels.sparse24_gemm import sparse24_gemm

    p, sim, kw = _kernel_case(N, K, scheme, seed=M + N + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    for bias in (None, p.bias):
        y = sparse24_gemm(x, kw["values"], kw["meta"], kw["scale"], kw["zero_point"], in_features=K, bits=kw["bits"],
                          group_size=kw["group_size"], bias=bias, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64))
        ref = sparse24_gemm_ref(x, kw["values"], kw["meta"], kw["scale"], kw["zero_point"], in_features=K, bits=kw["bits"],
                                group_size=kw["group_size"], bias=bias)
        assert y.shape == ref.shape == (M, N)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@in_interpreter
def test_sparse24_gemm_fp16_and_bigger_block_k():
    from lmpress.kernels.sparse24_gemm import sparse24_gemm

    p, sim, kw = _kernel_case(24, 200, SCHEMES[1], seed=7)
    x = torch.randn(2, 3, 200).half()
    y = sparse24_gemm(x, kw["values"], kw["meta"], kw["scale"], kw["zero_point"], in_features=200, bits=4,
                      group_size=16, bias=p.bias.half(), config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128))
    ref = x.float() @ sparse24_dense_weight(**kw, dtype=torch.float16).float().T + p.bias.half().float()
    assert y.dtype == torch.float16 and y.shape == (2, 3, 24)
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.triton
@in_interpreter
def test_sparse24_gemm_shape_errors_say_what_to_do():
    from lmpress.kernels.sparse24_gemm import sparse24_gemm

    p, sim, kw = _kernel_case(8, 64, SCHEMES[1], seed=1)
    with pytest.raises(ValueError, match="packed codes must be int32"):
        sparse24_gemm(torch.randn(2, 64), kw["values"][:, :-1], kw["meta"], kw["scale"], kw["zero_point"],
                      in_features=64, bits=4, group_size=16)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24_gemm(torch.randn(2, 64), kw["values"], kw["meta"], kw["scale"], kw["zero_point"],
                      in_features=64, bits=4, group_size=6)


@pytest.mark.triton
@pytest.mark.skipif(INTERP, reason="already running under TRITON_INTERPRET=1")
def test_sparse24_triton_in_interpreter():
    run_triton_tests_in_interpreter(__file__)


def test_pack_of_positions_is_the_2_bit_bitstream():
    """The metadata words are `pack` of the positions as 2-bit codes (u = position)."""
    W = _sparse(3, 40, seed=5)
    v, m = sparse24_compress(W)
    pos = sparse24_positions(m, 40) % 4  # (rows, slots)
    assert torch.equal(m, pack((pos - 2).to(torch.int8), 2))
    assert torch.equal(unpack(m, 2, sparse24_slots(40)).long() + 2, pos)
