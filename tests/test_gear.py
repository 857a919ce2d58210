"""GEAR on the KIVI cache (`quant.kv_cache.gear_*`): the sparse part and the low-rank fit, the block flush
of values, decode-exactness of the simulation, and the runtime cache reproducing it."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama
from lmpress.kernels.attention import attach_attention
from lmpress.kernels.kv_cache import QuantizedKVCache, cache_kwargs
from lmpress.quant import kv_cache as kc
from lmpress.quant.kv_cache import KeyRotation
from lmpress.quant.scheme import KVCacheArgs

GEAR = KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1, gear_rank=2, gear_outliers=0.02)


def _x(B=2, H=3, n=32, D=16, seed=0):
    return torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(seed))


def test_args_validate_and_round_trip():
    assert KVCacheArgs.from_dict(GEAR.to_dict()) == GEAR and GEAR.gear
    assert "gear_rank" not in KVCacheArgs(bits=2).to_dict()  # manifests written before GEAR stay identical
    with pytest.raises(ValueError, match="gear_rank"):
        KVCacheArgs(bits=2, gear_rank=-1)
    with pytest.raises(ValueError, match="gear_outliers"):
        KVCacheArgs(bits=2, gear_outliers=0.7)
    with pytest.raises(ValueError, match="KIVI cache"):
        KVCacheArgs(bits=2, key_granularity="token", residual=8, group_size=8, gear_rank=2)


def test_values_flush_in_whole_blocks_under_gear():
    plain = KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1)
    for n in range(40):
        assert kc.quantized_values(n, GEAR) == kc.quantized_keys(n, GEAR) == kc.quantized_keys(n, plain)
        assert kc.quantized_values(n, GEAR) % 8 == 0
    assert kc.quantized_values(20, plain) == 11 != kc.quantized_values(20, GEAR) == 8


def test_lowrank_is_exact_on_a_matrix_of_that_rank():
    g = torch.Generator().manual_seed(1)
    R = torch.randn(4, 8, 2, generator=g, dtype=torch.float64) @ torch.randn(4, 2, 16, generator=g, dtype=torch.float64)
    A, Bt = kc.lowrank(R, 2)
    assert A.shape == (4, 8, 2) and Bt.shape == (4, 2, 16)
    assert (A @ Bt - R).abs().max().item() < 1e-10
    A1, B1 = kc.lowrank(R, 1)
    assert (A1 @ B1 - R).norm() < R.norm()  # a rank-1 fit explains part of it


def test_gear_keeps_outliers_exactly_and_shrinks_a_structured_error():
    x = _x(n=32)
    g = torch.Generator().manual_seed(2)
    x = x + 3 * torch.randn(2, 3, 32, 1, generator=g) * torch.randn(2, 3, 1, 16, generator=g)  # a rank-1 component
    x[0, 1, 5, 3] = 50.0
    plain = KVCacheArgs(bits=2, group_size=8, residual=8)
    base = kc.fake_quantize_tokens_kivi(x, plain)
    only_sparse = kc.gear_fake_quantize(x, KVCacheArgs(bits=2, group_size=8, residual=8, gear_outliers=0.02), kc.fake_quantize_tokens_kivi)
    full = kc.gear_fake_quantize(x, KVCacheArgs(bits=2, group_size=8, residual=8, gear_outliers=0.02, gear_rank=2),
                                 kc.fake_quantize_tokens_kivi)
    assert full[0, 1, 5, 3] == 50.0 and only_sparse[0, 1, 5, 3] == 50.0
    err = lambda y: ((y - x).norm() / x.norm()).item()  # noqa: E731
    assert err(full) < err(only_sparse) < err(base)
    assert kc.gear_bits(GEAR, 16) == pytest.approx((3 * 32 + 2 * (8 + 16) * 16) / 128)


def _model(mode="plain", kv=GEAR, dtype=torch.float32):
    model, _ = tiny_llama(seed=0, dtype=dtype)
    kr = {i: KeyRotation(model.config.num_key_value_heads, 16, 2, 16, 7 + i) for i in range(2)} if mode == "rot" else None
    attach_attention(model, arch_for(model), kv=kv, key_rotation=kr)
    return model


@pytest.mark.parametrize("mode", ["plain", "rot"])
def test_full_forward_is_decode_exact_and_the_runtime_cache_agrees(mode):
    model = _model(mode, dtype=torch.float64)
    tokens = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens).logits
        for make in (DynamicCache, lambda: QuantizedKVCache(model)):
            cache, steps = make(), []
            for t in range(tokens.shape[1]):
                steps.append(model(tokens[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits)
            assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-10
        layer = cache.layers[0]
        assert layer.kg is not None and layer.vg is not None and layer.nv == layer.nk == 16  # whole blocks of 8 after the sink, 8+ recent in fp
        ref, _ = tiny_llama(seed=0, dtype=torch.float64)
        plain = _model(mode, kv=KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1), dtype=torch.float64)
        r = ref(tokens).logits
        assert (full - r).abs().mean() < (plain(tokens).logits - r).abs().mean()  # GEAR's corrections help here


def test_runtime_generate_matches_the_simulation_and_counts_the_gear_bytes():
    model = _model()
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(1, 256, (3, 21), generator=g)
    mask = torch.ones_like(tok)
    mask[0, :6] = 0
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)
    sim = model.generate(tok, **kw)
    cache = QuantizedKVCache(model)
    rt = model.generate(tok, **cache_kwargs(cache), **kw)
    assert torch.equal(sim.sequences, rt.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(sim.logits, rt.logits)) < 1e-4
    plain_model = _model(kv=KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1))
    plain = QuantizedKVCache(plain_model)
    plain_model.generate(tok, **cache_kwargs(plain), **kw)
    layer = cache.layers[0]
    extra = sum(t.numel() * t.element_size() for t in (*layer.kg, *layer.vg))
    assert extra > 0 and cache.nbytes() > plain.nbytes()
