"""PackedLinear: the runtime form reproduces SimQuantLinear exactly, also when loaded from a meta skeleton."""
import pytest
import torch
from torch import nn

from lmpress.kernels.formats import packed_cols
from lmpress.kernels.linear import PackedLinear
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import W4A4, W4A8, W4A16, W8A8, QuantArgs, QuantScheme
from lmpress.quant.sim import SimQuantLinear

A8 = QuantArgs(bits=8, granularity="token", dynamic=True)
SCHEMES = {
    "W4A16-g128-partial": W4A16,
    "W4A4": W4A4,
    "W4A8": W4A8,
    "W8A8": W8A8,
    "W4-asym-g32-A8": QuantScheme(weights=QuantArgs(bits=4, granularity="group", group_size=32, symmetric=False), inputs=A8),
    "W3-asym-g64": QuantScheme(weights=QuantArgs(bits=3, granularity="group", group_size=64, symmetric=False)),
    "W2-asym-g16": QuantScheme(weights=QuantArgs(bits=2, granularity="group", group_size=16, symmetric=False)),
    "W4-tensor-asym": QuantScheme(weights=QuantArgs(bits=4, granularity="tensor", symmetric=False)),
    "W8-tensor-sym-A4": QuantScheme(weights=QuantArgs(bits=8, granularity="tensor"), inputs=W4A4.inputs),
}


def _sim(scheme, in_f=200, out_f=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    sim = SimQuantLinear(lin, scheme)
    sim.set_quantized(*rtn_quantize(lin.weight.detach().float(), scheme.weights))
    return sim


def _x(in_f=200, dtype=torch.float32):
    return torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_from_sim_matches_sim_exactly(name, bias):
    sim = _sim(SCHEMES[name], bias=bias)
    packed = PackedLinear.from_sim(sim)
    args = sim.scheme.weights
    assert packed.weight_packed.dtype == torch.int32
    assert tuple(packed.weight_packed.shape) == (24, packed_cols(200, args.bits))
    assert packed.weight_shape.tolist() == [24, 200]
    assert torch.equal(packed.dequantized_weight(torch.float32), sim.weight)
    x = _x()
    assert (packed(x) - sim(x)).abs().max().item() == 0.0


def test_bfloat16_matches_sim_exactly():
    sim = _sim(W4A16, dtype=torch.bfloat16)
    packed = PackedLinear.from_sim(sim)
    assert packed.bias.dtype == torch.bfloat16
    x = _x(dtype=torch.bfloat16)
    assert torch.equal(packed(x), sim(x))


@pytest.mark.parametrize("name", ["W4A16-g128-partial", "W4-asym-g32-A8", "W3-asym-g64", "W4-tensor-asym"])
def test_meta_skeleton_load_state_dict_assign(name):
    scheme = SCHEMES[name]
    sim = _sim(scheme)
    state = PackedLinear.from_sim(sim).state_dict()
    expected = {"weight_packed", "weight_scale", "weight_shape", "bias"}
    if not scheme.weights.symmetric:
        expected.add("weight_zero_point")
    assert set(state) == expected

    skeleton = PackedLinear(200, 24, scheme, bias=True, device=torch.device("meta"))
    assert skeleton.weight_packed.is_meta
    skeleton.load_state_dict(state, assign=True)  # strict: the key sets must agree
    assert not skeleton.weight_packed.is_meta
    x = _x()
    assert (skeleton(x) - sim(x)).abs().max().item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match="quantizes weights"):
        PackedLinear(8, 4, QuantScheme(inputs=A8), bias=False)
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="set_quantized"):
        PackedLinear.from_sim(SimQuantLinear(lin, W4A4))
    skeleton = PackedLinear(200, 24, W4A16, bias=True, device="meta")
    state = PackedLinear.from_sim(_sim(W4A16, in_f=128)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        skeleton.load_state_dict(state, assign=True)
