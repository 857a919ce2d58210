"""bench/_peers.py's mending of llm-compressor's AutoRound output (no peer install needed: the venv's compressed-tensors)."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _peers():
    spec = importlib.util.spec_from_file_location("_peers_under_test", os.path.join(ROOT, "bench", "_peers.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _autoround_layer(n: int = 6, k: int = 40, g: int = 8, bits: int = 4):
    """A Linear as llm-compressor 0.13 leaves it after AutoRound: `weight` on AutoRound's grid (unsigned codes,
    unsigned zero points `zp`), its `weight_scale`, and the observer's min-max zero points instead of `zp`."""
    qz = pytest.importorskip("compressed_tensors.quantization")
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    scale = torch.rand(n, k // g) * 0.02 + 0.01  # (N, K / G)
    zp = torch.randint(0, 2 ** bits, (n, k // g)).float()  # AutoRound: unsigned, in [0, 2^b)
    codes = torch.randint(0, 2 ** bits, (n, k // g, g)).float()  # (N, K / G, G)
    lin.weight.data = ((codes - zp.unsqueeze(-1)) * scale.unsqueeze(-1)).view(n, k)  # (N, K)
    lin.quantization_scheme = qz.QuantizationScheme(targets=["Linear"], weights=qz.QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="group", group_size=g))
    lin.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
    lin.weight_zero_point = torch.nn.Parameter(torch.zeros(n, k // g, dtype=torch.int8), requires_grad=False)
    lin.zp = zp
    return lin


def test_autoround_zero_points_restore_autoround_weights():
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    lin = _autoround_layer()
    w = lin.weight.detach().clone()
    before = fake_quantize(w, lin.weight_scale, lin.weight_zero_point, lin.quantization_scheme.weights)
    assert (before - w).abs().max() > lin.weight_scale.min()  # the dropped zero points clamp whole groups
    model = torch.nn.Sequential(lin, torch.nn.Linear(4, 4))  # a module without AutoRound's attributes is skipped
    mended = _peers().autoround_zero_points(model)
    assert 0.5 < mended["changed"] <= 1.0 and mended["max_steps"] < 1e-4
    assert torch.equal(lin.weight_zero_point, (lin.zp - 8).to(torch.int8))
    after = fake_quantize(w, lin.weight_scale, lin.weight_zero_point, lin.quantization_scheme.weights)
    torch.testing.assert_close(after, w, rtol=0, atol=1e-6)


def test_autoround_zero_points_refuses_other_conventions():
    lin = _autoround_layer()
    lin.zp = lin.zp - 8  # already signed: not what auto-round 0.14 stores
    with pytest.raises(ValueError, match="unsigned convention"):
        _peers().autoround_zero_points(lin)
    assert _peers().autoround_zero_points(torch.nn.Linear(3, 3)) == {}
