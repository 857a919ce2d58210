"""ZipCache (`quant.zipcache`): settings, channel-separable token-wise codes, salient tokens by normalized
attention, the decode-exact simulation, and the runtime cache reproducing it with exact bytes."""
from __future__ import annotations

import pytest
import torch

from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama
from lmpress.kernels.attention import attach_attention
from lmpress.kernels.kv_cache import QuantizedKVCache, cache_kwargs
from lmpress.quant import kv_cache as kc
from lmpress.quant import zipcache as zc
from lmpress.quant.kv_cache import KeyRotation
from lmpress.quant.scheme import KVCacheArgs

ZIP = KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1, key_granularity="token", salient=0.25)
ZIPK = KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1, salient=0.25)  # KIVI's layout: per-channel keys


def _x(B=2, H=3, n=8, D=16, seed=0, dtype=torch.float32):
    return torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_args_validate_and_round_trip():
    assert KVCacheArgs.from_dict(ZIP.to_dict()) == ZIP and ZIP.zipcache and ZIP.blockwise and not ZIP.per_token_only
    assert "salient" not in KVCacheArgs(bits=2).to_dict()  # manifests written before ZipCache stay identical
    with pytest.raises(ValueError, match="no GEAR options"):
        KVCacheArgs(bits=2, group_size=8, residual=8, salient=0.25, gear_rank=2)
    with pytest.raises(ValueError, match="salient_bits"):
        KVCacheArgs(bits=4, group_size=8, key_granularity="token", salient=0.25, salient_bits=2)
    with pytest.raises(ValueError, match="share"):
        KVCacheArgs(bits=2, group_size=8, key_granularity="token", salient=1.5)
    # keys and values flush in whole blocks, even with no residual window
    z0 = KVCacheArgs(bits=2, group_size=8, key_granularity="token", salient=0.5)
    assert not z0.per_token_only and [kc.quantized_keys(n, z0) for n in (7, 8, 15, 16)] == [0, 8, 8, 16]
    assert kc.quantized_values(20, ZIP) == kc.quantized_keys(20, ZIP) == 8


def test_codes_round_trip_and_salient_tokens_get_the_finer_grid():
    x = _x()
    x[..., 3] *= 20  # an outlier channel: the channel scale flattens it
    hi = torch.zeros(2, 8, dtype=torch.bool)
    hi[:, [1, 6]] = True
    u, (s, m, c) = zc.zip_codes(x, hi, ZIP, keys=True)
    assert u.shape == (2, 8, 48) and s.shape == m.shape == (2, 8) and c.shape == (2, 3, 16) and c.dtype == torch.float16
    assert u[hi].max() <= 15 and u[~hi].max() <= 3 and u[hi].max() > 3
    y = zc.zip_dequantize(u, (s, m, c), hi, ZIP, True, x.dtype)
    assert torch.equal(y, zc.zip_fake_quantize(x, hi, ZIP, keys=True))
    err = (y - x).square().sum(dim=(1, 3))  # (B, G): per token
    assert err[hi].max() < err[~hi].min()
    # channel-separable beats plain token-wise rows over the outlier channel, at the same bits
    plain = kc.minmax_dequantize(*kc.minmax_quantize(x.permute(0, 2, 1, 3).reshape(2, 8, 48), 2), torch.float32)
    assert (y - x)[:, :, ~hi[0]].norm() < (plain.reshape(2, 8, 3, 16).permute(0, 2, 1, 3) - x)[:, :, ~hi[0]].norm()
    assert zc.zip_bits(ZIP, 3, 64) == pytest.approx((2 * 4 + 6 * 2) / 8 + 16 / 8 + 32 / 192)


def test_kivi_layout_codes_share_a_channel_range_at_two_resolutions():
    x = _x()
    hi = torch.zeros(2, 8, dtype=torch.bool)
    hi[:, [0, 5]] = True
    u, (scale, mn) = zc.zip_codes(x, hi, ZIPK, keys=True)  # u (B, H, D, G): a channel's tokens
    assert u.shape == (2, 3, 16, 8) and scale.shape == mn.shape == (2, 3, 16)
    assert u.permute(0, 3, 1, 2)[hi].max() == 15 and u.permute(0, 3, 1, 2)[~hi].max() == 3
    y = zc.zip_fake_quantize(x, hi, ZIPK, keys=True)
    err = (y - x).square().sum(dim=(1, 3))  # (B, G)
    assert err[hi].max() < err[~hi].min()
    assert torch.equal(y.amin(2), mn.float())  # each channel's block minimum is code 0: kept, to fp16
    uv, (s, m) = zc.zip_codes(x, hi, ZIPK, keys=False)  # values per token, groups of min(G, D) = 8 channels
    assert uv.shape == (2, 3, 8, 2, 8) and s.shape == (2, 3, 8, 2)
    assert torch.equal(zc.zip_dequantize(uv, (s, m), hi, ZIPK, False, x.dtype), zc.zip_fake_quantize(x, hi, ZIPK, keys=False))
    assert zc.zip_bits(ZIPK, 3, 64) == pytest.approx((2 * 4 + 6 * 2) / 8 + (32 / 8 + 32 / 8) / 2)


def test_salient_tokens_take_the_highest_scores_the_earlier_on_ties():
    a = KVCacheArgs(bits=2, group_size=4, key_granularity="token", salient=0.5)
    hi = zc.salient_tokens(torch.tensor([[0.1, 0.5, 0.5, 0.2], [3.0, 1.0, 2.0, 0.0]]), a)
    assert hi.tolist() == [[False, True, True, False], [True, False, True, False]]
    hi = zc.salient_tokens(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), a)
    assert hi.tolist() == [[True, True, False, False]]


def _step_by_step(q, k, v, args):
    """Decode one query at a time as the runtime cache would: the dequantized prefix, the scores carried over."""
    T = k.shape[2]
    kd, vd = k.clone(), v.clone()
    prefix, tail, outs, his = 0, None, [], []
    for t in range(T):
        out, hs, tail = zc.zip_attention(q[:, :, t:t + 1], kd[:, :, :t + 1], vd[:, :, :t + 1], args, prefix=prefix, tail=tail)
        for hi in hs:
            a = args.sink_tokens + prefix
            kd[:, :, a:a + args.group_size] = zc.zip_fake_quantize(k[:, :, a:a + args.group_size], hi, args, keys=True)
            vd[:, :, a:a + args.group_size] = zc.zip_fake_quantize(v[:, :, a:a + args.group_size], hi, args, keys=False)
            prefix += args.group_size
        outs.append(out)
        his += hs
    return torch.cat(outs, 1), his


@pytest.mark.parametrize("args", [ZIP, ZIPK], ids=["cst", "kivi"])
def test_the_one_forward_simulation_is_decode_exact(args):
    B, Hq, Hkv, T, D = 2, 6, 3, 37, 16
    q, k, v = _x(B, Hq, T, D, 1, torch.float64), _x(B, Hkv, T, D, 2, torch.float64), _x(B, Hkv, T, D, 3, torch.float64)
    full, his, tail = zc.zip_attention(q, k, v, args)
    assert len(his) == kc.quantized_keys(T, args) // 8 == 3 and all(h.sum(1).tolist() == [2, 2] for h in his)
    assert tail[0].shape == (B, T - 1 - 24) and tail[1].shape == (T - 1 - 24,)
    steps, step_his = _step_by_step(q, k, v, args)
    assert (steps - full).abs().max().item() < 1e-12
    assert all(torch.equal(a, b) for a, b in zip(his, step_his))
    # the decision follows attention: the token every query attends to is salient
    k2 = k.clone()
    k2[:, :, 12] = 0
    q2 = q.clone()
    q2[..., 0] = 40.0
    k2[:, :, 12, 0] = 5.0
    _, his2, _ = zc.zip_attention(q2, k2, v, args)
    assert his2[1][:, 12 - 9].all()


def test_scores_are_the_normalized_accumulated_attention(monkeypatch):
    seen = []
    pick = zc.salient_tokens
    monkeypatch.setattr(zc, "salient_tokens", lambda score, a: seen.append(score) or pick(score, a))
    B, Hq, Hkv, T, D = 2, 6, 3, 37, 16
    q, k, v = _x(B, Hq, T, D, 1, torch.float64), _x(B, Hkv, T, D, 2, torch.float64), _x(B, Hkv, T, D, 3, torch.float64)
    zc.zip_attention(q, k, v, ZIP)
    # block [1, 9) is decided before query 16 (= 9 + residual 8 - 1) is decoded: queries 0..15 saw every key in full precision
    kr = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, T, D): the KV head of each query head
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    P = torch.softmax((q @ kr.transpose(-1, -2) * D ** -0.5).masked_fill(~causal, float("-inf")), -1)  # (B, Hq, T, T)
    ref = P[:, :, :16, 1:9].sum(dim=(1, 2)) / (16 - torch.arange(1, 9))  # received / queries that saw it
    assert torch.allclose(seen[0].double(), ref, rtol=1e-5)
    assert not torch.equal(pick(ref, ZIP), pick(P[:, :, :16, 1:9].sum(dim=(1, 2)), ZIP))  # the normalization matters here


def _model(mode="plain", kv=ZIP, dtype=torch.float32):
    model, _ = tiny_llama(seed=0, dtype=dtype)
    with torch.no_grad():  # peakier attention than the random init's: salient tokens other than the first of a block
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(16)
    kr = {i: KeyRotation(model.config.num_key_value_heads, 16, 2, 16, 7 + i) for i in range(2)} if mode == "rot" else None
    attach_attention(model, arch_for(model), kv=kv, key_rotation=kr)
    return model


@pytest.mark.parametrize("mode,args", [("plain", ZIP), ("rot", ZIP), ("plain", ZIPK), ("rot", ZIPK)],
                         ids=["cst", "cst-rot", "kivi", "kivi-rot"])
def test_the_runtime_cache_decodes_as_the_simulation(mode, args):
    model = _model(mode, kv=args, dtype=torch.float64)
    tokens = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens).logits
        cache, steps = QuantizedKVCache(model), []
        for t in range(tokens.shape[1]):
            steps.append(model(tokens[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits)
        assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-10
        layer = cache.layers[0]
        assert layer.nk == layer.nv == 16 and layer.keys.shape[2] == 30 - 1 - 16  # two blocks of 8 after the sink
        # a prefill then steps: the blocks flushed inside the prefill are committed by the attention function
        cache = QuantizedKVCache(model)
        out = [model(tokens[:, :20], use_cache=True, **cache_kwargs(cache)).logits]
        out += [model(tokens[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits for t in range(20, 30)]
        assert (torch.cat(out, 1) - full).abs().max().item() < 1e-10


def test_runtime_generate_matches_the_simulation_and_counts_the_bytes():
    model = _model()
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(1, 256, (3, 21), generator=g)
    kw = dict(max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    cache = QuantizedKVCache(model)
    rt = model.generate(tok, **cache_kwargs(cache), **kw)
    with torch.no_grad():  # the simulation of the whole generated sequence, in one forward
        sim = model(rt.sequences[:, :-1]).logits[:, 20:]
    assert max((a - sim[:, i]).abs().max().item() for i, a in enumerate(rt.logits)) < 1e-4
    layer = cache.layers[0]
    B, H, D = 3, model.config.num_key_value_heads, 16
    n = layer.nk  # tokens held quantized
    assert n == 24
    k = zc.salient_count(ZIP)
    codes = B * (n // 8) * (k * 4 + (8 - k) * 2) * H * D // 8  # bytes of the packed codes, K or V
    meta = B * n * 2 * 2 + B * (n // 8) * H * D * 2 + B * n  # token scale and min, channel scales, salient flags
    assert sum(t.numel() * t.element_size() for t in layer.kz) == codes + meta
    plain_model = _model(kv=KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1, key_granularity="token"))
    plain = QuantizedKVCache(plain_model)
    plain_model.generate(tok, **cache_kwargs(plain), **kw)
    assert cache.nbytes() > plain.nbytes()
    fp_elems = sum(t.numel() for ly in cache.layers for t in (ly.sink_k, ly.sink_v, ly.keys, ly.values))
    assert cache.nbytes() - cache.nbytes(float_bytes=2) == fp_elems * 2  # fp32 tokens counted as an fp16 model holds them
