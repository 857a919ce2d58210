"""KV2: KIVI quantizer, flush rule, decode-exact simulation, RotateKV, runtime QuantizedKVCache, Triton kernels."""
from __future__ import annotations


import warnings

import pytest
import torch
from transformers import DynamicCache

from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama
from lmpress.kernels.dispatch import interpreter_ready
from lmpress.kernels.formats import pack_unsigned, unpack_unsigned
from lmpress.kernels.attention import DECODE_STATE_ATTR
from lmpress.kernels.kv_cache import QuantizedKVCache, cache_kwargs, rope_columns, stored_rotated_key_scores
from lmpress.kernels.kv_quant import kv_dequant_ref, kv_quant_ref
from lmpress.kernels.online import OnlineHadamard
from lmpress.kernels.attention import attach_attention, attention_specs, settings_of, attention_modules
from lmpress.quant.kv_cache import (
    KeyRotation, apply_rope, decode_masks, invert_rope, minmax_dequantize, minmax_quantize, quantized_keys,
    quantized_values, rows_to_keys, zigzag_order,
)
from lmpress.quant.scheme import KV2, KVCacheArgs
from _interpreter import run_triton_tests_in_interpreter

INTERP = interpreter_ready()
in_interpreter = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 at start-up; run by test_kv_triton_in_interpreter")

KIVI = KVCacheArgs(bits=2, group_size=8, residual=8, sink_tokens=1)


def _model(mode: str = "plain", kv: KVCacheArgs = KIVI, dtype=torch.float32):
    model, _ = tiny_llama(seed=0, dtype=dtype)
    cfg = model.config
    kr = {i: KeyRotation(cfg.num_key_value_heads, 16, 2, 16, 7 + i) for i in range(2)} if mode == "rot" else None
    qk = {i: OnlineHadamard(16, i) for i in range(2)} if mode == "qk" else None
    attach_attention(model, arch_for(model), kv=kv, qk=qk, key_rotation=kr)
    return model


def _padded_batch():
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(1, 256, (3, 21), generator=g)
    mask = torch.ones_like(tok)
    mask[0, :6], mask[1, :2] = 0, 0
    return tok, mask


# ----------------------------------------------------------------------------- settings and layout


def test_kv_args_new_fields_validate_and_round_trip():
    a = KVCacheArgs.from_dict({"preset": "KV2", "sink_tokens": 4, "clip_search": True})
    assert a.residual == 128 and a.sink_tokens == 4 and KVCacheArgs.from_dict(a.to_dict()) == a
    assert not KV2.per_token_only and KVCacheArgs(key_granularity="token").per_token_only
    with pytest.raises(ValueError, match="sink_tokens"):
        KVCacheArgs(sink_tokens=-1)
    with pytest.raises(ValueError, match="clip_ratio"):
        KVCacheArgs(clip_ratio=0.2)
    with pytest.raises(ValueError, match="leave clip_ratio"):
        KVCacheArgs(clip_ratio=0.9, clip_search=True)
    with pytest.raises(ValueError, match="symmetric"):
        KVCacheArgs(symmetric=True)  # KIVI is asymmetric
    for name in ("kv2-kivi", "kv2-rotatekv", "w4a4kv2-quarot-gptq"):
        r = Recipe.load(name)
        assert r.kv_args.bits == 2 and r.kv_args.residual == 128 and Recipe.from_yaml(r.to_yaml()) == r


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unsigned_pack_round_trips_and_matches_the_weight_layout(bits):
    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 2**bits, (2, 3, 5, 64), generator=g, dtype=torch.uint8)
    w = pack_unsigned(u, bits)
    assert w.dtype == torch.int32 and w.shape == (2, 3, 5, 64 * bits // 32)
    assert torch.equal(unpack_unsigned(w, bits, 64), u)
    # element i of a row sits at bits [i*b, (i+1)*b) of the row's words
    row = w.reshape(-1, w.shape[-1])[0].tolist()
    for i in (0, 1, 31, 63):
        word, shift = divmod(i * bits, 32)
        assert (row[word] & 0xFFFFFFFF) >> shift & (2**bits - 1) == int(u.reshape(-1, 64)[0, i])


def test_minmax_quantizer_grid_params_and_clip_search():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 64, generator=g) * torch.rand(50, 1, generator=g) * 4 + 1.0
    for bits in (2, 4):
        u, s, m = minmax_quantize(x, bits)
        assert u.dtype == torch.uint8 and int(u.max()) <= 2**bits - 1 and s.dtype == torch.float16
        y = minmax_dequantize(u, s, m, torch.float32)
        assert ((y - x).abs() <= s.float()[:, None] * 0.5 + 1e-3 * x.abs().amax()).all()
        assert torch.allclose(m.float(), x.amin(-1), rtol=1e-3, atol=1e-3)  # asymmetric: the range starts at the min
    base = (minmax_dequantize(*minmax_quantize(x, 2), torch.float32) - x).square().sum(-1)
    srch = (minmax_dequantize(*minmax_quantize(x, 2, clip_search=True), torch.float32) - x).square().sum(-1)
    assert (srch <= base + 1e-5).all() and (srch < base - 1e-4).any()
    w, s, m = kv_quant_ref(x, 2)
    assert torch.equal(kv_dequant_ref(w, s, m, 2, 64), minmax_dequantize(*minmax_quantize(x, 2), torch.float32))


# ----------------------------------------------------------------------------- flush rule


def test_flush_rule_keeps_the_recent_window_in_full_precision():
    a = KVCacheArgs(bits=2, group_size=4, residual=8, sink_tokens=2)
    assert [quantized_keys(n, a) for n in (0, 10, 13, 14, 17, 18)] == [0, 0, 0, 4, 4, 8]
    assert [quantized_values(n, a) for n in (10, 11, 14)] == [0, 1, 4]
    mk, mv = decode_masks(40, 40, a)
    for t in range(40):
        fp_k = (~mk[t, : t + 1]).sum().item() - min(t + 1, 2)
        assert not mk[t, :2].any() and not mv[t, :2].any()  # sinks
        assert not mk[t, max(0, t - 7): t + 1].any() and not mv[t, max(0, t - 7): t + 1].any()  # last R tokens
        if t + 1 >= 2 + 8:
            assert 8 <= fp_k < 8 + 4 and (~mv[t, 2: t + 1]).sum() == 8
    # per-token keys flush like values
    t = KVCacheArgs(bits=2, group_size=4, residual=8, key_granularity="token")
    assert quantized_keys(13, t) == quantized_values(13, t) == 5


# ----------------------------------------------------------------------------- simulation


def test_residual_longer_than_the_sequence_is_the_fp_model(tokens):
    ref, _ = tiny_llama(seed=0, dtype=torch.float64)
    model = _model(kv=KVCacheArgs(bits=2, group_size=8, residual=64), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref(tokens).logits)
        model2 = _model(dtype=torch.float64)
        assert (model2(tokens).logits - ref(tokens).logits).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["plain", "qk", "rot"])
def test_full_forward_is_decode_exact(mode, tokens):
    """Query t of one full-sequence forward sees what token-by-token decoding sees."""
    model = _model(mode, dtype=torch.float64)
    tokens = tokens[:2, :28]  # flushes: values from n = 10, a key group at n = 17 and n = 25
    with torch.no_grad():
        full = model(tokens).logits
        cache, steps = DynamicCache(), []
        for t in range(tokens.shape[1]):
            steps.append(model(tokens[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits)
        assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-10
        # and so does the runtime cache, fed one token at a time
        cache, steps = QuantizedKVCache(model), []
        for t in range(tokens.shape[1]):
            steps.append(model(tokens[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits)
        assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-10


def test_per_channel_keys_and_rotation_change_the_error(tokens):
    ref, _ = tiny_llama(seed=0, dtype=torch.float64)
    with torch.no_grad():
        r = ref(tokens).logits
        errs = {}
        for name, kv in (("channel", KVCacheArgs(bits=2, group_size=8, residual=8)),
                         ("token", KVCacheArgs(bits=2, group_size=8, residual=8, key_granularity="token"))):
            errs[name] = (_model(kv=kv, dtype=torch.float64)(tokens).logits - r).abs().mean().item()
        assert errs["channel"] != errs["token"] and min(errs.values()) > 0


# ----------------------------------------------------------------------------- runtime cache


@pytest.mark.parametrize("mode", ["plain", "qk", "rot"])
def test_runtime_cache_generate_matches_the_simulation_batched(mode):
    model = _model(mode)
    tok, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    sim = model.generate(tok, **kw)
    cache = QuantizedKVCache(model)
    rt = model.generate(tok, **cache_kwargs(cache), **kw)
    assert torch.equal(sim.sequences, rt.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(sim.logits, rt.logits)) < 1e-4
    layer = cache.layers[0]
    assert layer.nk > 0 and layer.nv > 0 and layer.kw.dtype == torch.int32 and layer.ks.dtype == torch.float16
    assert layer.keys.shape[2] + layer.sink_k.shape[2] + layer.nk == cache.get_seq_length() == 21 + 20 - 1
    # the quantized cache differs from a full-precision one
    ref, _ = tiny_llama(seed=0)
    fp = ref.generate(tok, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(fp.logits, rt.logits)) > 1e-3
    # a decode step hands the attention function the layer, not a dequantized prefix (`decode_attention`)
    k1 = torch.randn(3, layer.sink_k.shape[1], 1, layer.head_dim)
    keys, values = cache.update(k1, k1.clone(), 0)
    assert keys.shape[2] == values.shape[2] == 0 and getattr(keys, DECODE_STATE_ATTR) is layer


def test_runtime_cache_computes_the_rope_tables_once_a_step(monkeypatch):
    """RotateKV's runtime cache: at a decode step the first layer computes the RoPE tables, the other layers reuse
    them, and the attention function computes none; the next step (new positions) computes them again."""
    from lmpress.kernels.attention import LmpressAttention

    model, calls = _model("rot"), []
    real = LmpressAttention.rope_tables
    monkeypatch.setattr(LmpressAttention, "rope_tables", lambda self, *a: calls.append(1) or real(self, *a))
    tok, mask = _padded_batch()
    cache = QuantizedKVCache(model)
    with torch.no_grad():
        x = model(tok, attention_mask=mask, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        assert len(cache.layers) == 2
        for step in range(2):
            calls.clear()
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            x = model(x, attention_mask=mask, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            assert len(calls) == 1


def test_runtime_cache_holds_fewer_bytes_and_refuses_per_token_settings():
    from lmpress.kernels.kv_cache import dynamic_cache_nbytes

    model = _model(kv=KVCacheArgs(bits=2, group_size=16, residual=16))
    ids = torch.randint(0, 256, (1, 256))
    q, d = QuantizedKVCache(model), DynamicCache()
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(q))
        ref, _ = tiny_llama(seed=0)
        ref(ids, use_cache=True, **cache_kwargs(d))
    assert q.get_seq_length() == 256 and q.nbytes() < 0.35 * dynamic_cache_nbytes(d)
    fp8 = _model(kv=KVCacheArgs(bits=8, type="float", symmetric=True, scale="tensor", group_size=16, key_granularity="token"))
    with pytest.raises(ValueError, match="FP8 cache"):
        QuantizedKVCache(fp8)


# ----------------------------------------------------------------------------- the per-token form's runtime cache
PER_TOKEN = KVCacheArgs(bits=4, group_size=16, key_granularity="token")


@pytest.mark.parametrize("bits,sym,D,g", [(4, False, 16, 16), (2, False, 12, 8), (4, True, 16, 8), (8, True, 16, 16),
                                          (8, False, 20, 64)])
def test_per_token_codes_are_the_generic_quantizers(bits, sym, D, g):
    """`quantize_kv_tokens` (14 ops) gives `compute_qparams` + `quantize`'s codes and qparams bit for bit, zero
    rows and padded groups included, and `fake_quantize_kv` is their `dequantize`."""
    import torch.nn.functional as F

    from lmpress.quant.kv_cache import dequantize_kv_tokens, fake_quantize_kv, quantize_kv_tokens
    from lmpress.quant.primitives import compute_qparams, dequantize, quantize
    from lmpress.quant.scheme import QuantArgs

    x = torch.randn(2, 3, 7, D, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 1, 2] = 0.0  # an all-zero token
    x[1, 0, 3] = x[1, 0, 3].abs()  # one-sided
    q, sc, z = quantize_kv_tokens(x, bits, g, sym)
    gg = min(g, D)
    rows = F.pad(x, (0, (-D) % gg)).reshape(-1, gg)  # (rows, g)
    args = QuantArgs(bits=bits, granularity="channel", symmetric=sym)
    s_ref, z_ref = compute_qparams(rows, args)
    assert torch.equal(q.reshape(-1, gg), quantize(rows, s_ref, z_ref, args))
    assert torch.equal(sc.reshape(-1, 1), s_ref) and torch.equal(z.reshape(-1, 1), z_ref)
    ref = dequantize(quantize(rows, s_ref, z_ref, args), s_ref, z_ref, args).reshape(*x.shape[:-1], -1)[..., :D]
    assert torch.equal(fake_quantize_kv(x, bits, g, sym), ref)
    assert torch.equal(dequantize_kv_tokens(q, sc, z, bits, sym, 1.0, D, x.dtype), ref)
    u, sc_u, z_u = quantize_kv_tokens(x, bits, g, sym, unsigned=True)  # the runtime cache's form: both shifted
    half = 1 << (bits - 1)
    assert u.dtype == torch.uint8 and torch.equal(u.to(torch.int16), q.to(torch.int16) + half)
    assert torch.equal(sc_u, sc) and torch.equal(z_u, z + half)


@pytest.mark.parametrize("mode", ["plain", "qk"])
def test_per_token_runtime_cache_quantizes_each_token_once(mode, monkeypatch):
    """QuantizedKVCache holds the per-token form as codes (`PerTokenKVLayer`): the prefill and, without a Q/K
    transform, every decode step equal the simulation (which re-quantizes the whole prefix each step) bit for
    bit; with the transform, decode steps are fp32-rounding apart and pick the same tokens. Each token's keys
    and values are quantized once."""
    from lmpress.kernels import kv_cache as kvc
    from lmpress.kernels.kv_cache import PerTokenKVLayer, dynamic_cache_nbytes

    model = _model(mode, kv=PER_TOKEN)
    tok, mask = _padded_batch()
    seen = []
    real = kvc.quantize_kv_tokens
    monkeypatch.setattr(kvc, "quantize_kv_tokens", lambda x, *a, **k: seen.append(x.shape[3]) or real(x, *a, **k))
    with torch.no_grad():
        rt, sim = QuantizedKVCache(model), DynamicCache()
        assert all(isinstance(layer, PerTokenKVLayer) for layer in rt.layers)
        x_rt = x_sim = None
        for step in range(6):
            ids = tok if step == 0 else torch.cat([x_rt, x_sim])[:3]
            m = mask if step == 0 else torch.cat([mask, torch.ones(3, step, dtype=mask.dtype)], 1)
            a = model(ids, attention_mask=m, use_cache=True, **cache_kwargs(rt)).logits[:, -1]
            b = model(ids, attention_mask=m, use_cache=True, **cache_kwargs(sim)).logits[:, -1]
            if step == 0 or mode == "plain":
                assert torch.equal(a, b), step
            else:
                assert (a - b).abs().max().item() < 1e-5
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            x_rt = x_sim = a.argmax(-1, keepdim=True)
    assert seen == [21] * 2 + [1] * 10  # 2 layers: the prompt once, then one token a step
    layer = rt.layers[0]
    assert layer.get_seq_length() == 26 and layer.words.dtype == torch.int32
    # 4-bit codes (8 bytes per 16 elements) + fp32 scale and zero point per 16, against 2 bytes an element
    assert rt.nbytes() == dynamic_cache_nbytes(sim) // 4 * 2 * (8 + 8) // 16 // 2
    layer.crop(-2)
    assert layer.get_seq_length() == 24


def test_loaded_per_token_model_decodes_through_the_runtime_cache(tokens, tmp_path):
    """A reloaded checkpoint with a per-token KV cache takes QuantizedKVCache whenever a forward asks for a
    cache and brings none (or generate's empty DynamicCache); use_cache=False and a filled cache are left alone."""
    from lmpress.kernels.kv_cache import returned_cache, use_runtime_cache

    model, _ = tiny_llama(seed=0)
    compress(model, "w4a4kv4-quarot-rtn")
    save(model, tmp_path / "ckpt")
    rt = load(tmp_path / "ckpt")
    ids = tokens[:1, :12]
    with torch.no_grad():
        out = rt(ids, use_cache=True)
        assert isinstance(returned_cache(out), QuantizedKVCache)
        assert rt(ids, use_cache=False).logits.shape == out.logits.shape
        gen = rt.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert isinstance(gen.past_key_values, QuantizedKVCache)
        assert not use_runtime_cache(rt, enable=False)
        assert isinstance(returned_cache(rt(ids, use_cache=True)), DynamicCache)
        sim = rt.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        filled = returned_cache(rt(ids, use_cache=True))
        assert use_runtime_cache(rt)
        assert returned_cache(rt(ids[:, :1], use_cache=True, **cache_kwargs(filled))) is filled
        # under the deprecated name too: the caller's cache is the one the step reads and extends, not a new one
        pre = returned_cache(rt(ids[:, :11], use_cache=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = rt(ids[:, 11:], use_cache=True, past_key_values=pre)
        assert returned_cache(step) is pre and pre.get_seq_length() == 12
        assert torch.allclose(step.logits[:, -1], rt(ids).logits[:, -1], atol=1e-4)
    assert torch.equal(gen.sequences, sim)


# ----------------------------------------------------------------------------- RotateKV pieces


def test_rope_inverse_key_rotation_inverse_and_zigzag():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 16, generator=g, dtype=torch.float64)
    ang = torch.rand(2, 1, 7, 8, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1) * 1.3, torch.cat([ang.sin()] * 2, -1) * 1.3
    assert torch.allclose(invert_rope(apply_rope(x, cos, sin), cos, sin), x, atol=1e-12)
    perm = zigzag_order(torch.tensor([9.0, 1, 8, 2, 7, 3, 6, 4]), 4)
    assert sorted(perm.tolist()) == list(range(8)) and set(perm[:4].tolist()) == {0, 1, 6, 7}  # 9+1+6+4 vs 8+7+3+2
    kr = KeyRotation(4, 16, 2, 16, 3, [list(range(31, -1, -1))] * 2)
    y = kr(x.float())
    assert torch.allclose(kr.inverse(y), x.float(), atol=1e-5)
    assert not torch.allclose(y, x.float(), atol=1e-2)
    assert KeyRotation.from_spec(kr.spec()).spec() == kr.spec()


def test_rotate_kv_stage_keeps_fp_logits_and_round_trips(tokens, tmp_path, text_file):
    from lmpress.calibration.data import sample_calibration

    model, tok = tiny_llama(seed=0)
    with torch.no_grad():
        ref = model(tokens).logits
    recipe = Recipe.from_dict({
        "schemes": {}, "kv_cache": {"bits": 2, "group_size": 8, "residual": 8},
        "stages": [{"rotate_kv": {"block": 16, "samples": 2}}],
    })
    calib = sample_calibration(tok, str(text_file), 2, 32, 0)
    compress(model, recipe, calib)  # rotations only: the model is unchanged up to float error
    with torch.no_grad():
        assert (model(tokens).logits - ref).abs().max().item() < 1e-4
    s = settings_of(attention_modules(model, arch_for(model))[0][1])
    assert s.key_rotation is not None and s.key_rotation.perm.shape == (1, 32)
    assert not torch.equal(s.key_rotation.perm[0], torch.arange(32))  # reordered from calibration
    compress(model, Recipe.from_dict({"schemes": {}, "kv_cache": {"bits": 2, "group_size": 8, "residual": 8},
                                      "stages": ["kv_cache"]}))
    with torch.no_grad():
        sim = model(tokens).logits
    assert (sim - ref).abs().max().item() > 1e-3
    specs = attention_specs(model)
    assert all("key_rotation" in v["kv_cache"] for v in specs.values())
    out = save(model, tmp_path / "kv2", tokenizer=tok)
    loaded = load(out)
    with torch.no_grad():
        assert (loaded(tokens).logits - sim).abs().max().item() < 1e-4
    assert torch.equal(settings_of(attention_modules(loaded, arch_for(loaded))[0][1]).key_rotation.perm, s.key_rotation.perm)


# ----------------------------------------------------------------------------- Triton (interpreter)


@pytest.mark.triton
@in_interpreter
@pytest.mark.parametrize("bits, group", [(2, 16), (2, 64), (4, 8), (4, 64), (8, 16)])
@pytest.mark.parametrize("clip_search", [False, True])
def test_kv_triton_kernels_match_the_reference(bits, group, clip_search):
    from lmpress.kernels.kv_quant import kv_dequant, kv_quant

    g = torch.Generator().manual_seed(bits * group)
    x = torch.randn(45, group, generator=g) * torch.rand(45, 1, generator=g) * 5
    ref = kv_quant_ref(x, bits, clip_search=clip_search)
    got = kv_quant(x, bits, clip_search=clip_search)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(kv_dequant(*ref, bits, group, dtype), kv_dequant_ref(*ref, bits, group, dtype))


@pytest.mark.triton
@in_interpreter
def test_runtime_cache_on_triton_kernels_matches_reference(monkeypatch):
    model = _model("rot", kv=KVCacheArgs(bits=2, group_size=16, residual=16))
    ids = torch.randint(0, 256, (2, 40))
    outs = []
    for backend in ("ref", "triton"):
        monkeypatch.setenv("LMPRESS_KERNELS", backend)
        cache = QuantizedKVCache(model)
        with torch.no_grad():
            model(ids[:, :30], use_cache=True, **cache_kwargs(cache))
            outs.append(torch.cat([model(ids[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits
                                   for t in range(30, 40)], 1))
        assert cache.layers[0].nk == 16
    assert torch.equal(outs[0], outs[1])


@pytest.mark.triton
@pytest.mark.skipif(INTERP, reason="already running under TRITON_INTERPRET=1: the triton tests ran in-process")
def test_kv_triton_in_interpreter():
    run_triton_tests_in_interpreter(__file__)


def test_w4a4kv2_recipe_compresses_and_runtime_matches_simulation(text_file):
    """The W4A4KV2 recipe (QuaRot rotations + RotateKV + KIVI 2-bit + GPTQ), with groups and window
    shrunk to the tiny model's short sequences: the simulated and runtime caches generate alike."""
    from lmpress.calibration.data import sample_calibration

    data = Recipe.load("w4a4kv2-quarot-gptq").to_dict()
    data["kv_cache"] = {**data["kv_cache"], "group_size": 8, "residual": 8, "sink_tokens": 1}
    data["stages"] = [{"rotate_kv": {**s["rotate_kv"], "samples": 2}} if "rotate_kv" in s else s for s in data["stages"]]
    model, tok = tiny_llama(seed=0)
    compress(model, Recipe.from_dict(data), sample_calibration(tok, str(text_file), 4, 32, 0))
    s = settings_of(attention_modules(model, arch_for(model))[0][1])
    assert s.kivi and s.key_rotation is not None and s.qk is None
    tok_ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    sim = model.generate(tok_ids, **kw)
    rt = model.generate(tok_ids, **cache_kwargs(QuantizedKVCache(model)), **kw)
    assert torch.equal(sim.sequences, rt.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(sim.logits, rt.logits)) < 1e-4


def test_cache_bytes_follow_the_layout_formula():
    """What the cache holds, byte for byte: 2-bit codes, fp16 scale/min per group, full-precision sinks
    and window (fp32 here). The same formula gives SmolLM2's ratio at 4096 tokens in the report."""
    kv = KVCacheArgs(bits=2, group_size=16, residual=16, sink_tokens=2)
    model = _model(kv=kv)
    q = QuantizedKVCache(model)
    n, B, H, D, L = 77, 2, 2, 16, 2
    g = torch.Generator().manual_seed(0)
    for s in range(0, n, 20):
        m = min(20, n - s)
        for layer in range(L):
            q.update(torch.randn(B, H, m, D, generator=g), torch.randn(B, H, m, D, generator=g), layer)
    nk, nv = quantized_keys(n, kv), quantized_values(n, kv)
    assert (nk, nv) == (48, 59)
    fp = (n - nk) + (n - nv)  # tokens in full precision, keys + values (sinks included)
    # 16 codes of 2 bits fill one int32 word exactly; one fp16 scale + one fp16 min per group
    per_head = fp * D * 4 + (nk + nv) * D * 2 // 8 + (D * nk // 16) * 4 + nv * (D // 16) * 4
    assert q.nbytes() == L * B * H * per_head  # no positions hook ran: no offsets held


@pytest.mark.parametrize("n_kv,head_dim,group_heads,block", [(3, 64, 3, 192), (3, 64, 3, 64), (2, 16, 2, 32), (4, 16, 2, 8)])
def test_key_rotation_fast_transform_is_the_dense_rotation(n_kv, head_dim, group_heads, block):
    """The signs + (H_m ⊗ H_p) fast transform is x @ Q for RotateKV's randomized Hadamard Q (float64, exact
    integer Hadamard entries: the fast path is exact where the float32 dense Q is not)."""
    kr = KeyRotation(n_kv, head_dim, group_heads, block, 7).double()
    assert kr.fast
    x = torch.randn(2, n_kv, 5, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = kr(x)
    assert (kr.inverse(y) - x).abs().max().item() < 1e-13
    from lmpress.quant.hadamard import random_hadamard

    Q = random_hadamard(block, 7)  # float64
    grouped = x.transpose(1, 2).reshape(2, 5, n_kv // group_heads, group_heads * head_dim)
    grouped = torch.gather(grouped, -1, kr.perm.expand(2, 5, -1, -1))
    dense = (grouped.reshape(2, 5, n_kv // group_heads, -1, block) @ Q).reshape(2, 5, n_kv, head_dim).transpose(1, 2)
    assert (y - dense).abs().max().item() < 1e-13


@pytest.mark.parametrize("n_kv,head_dim,group_heads,block", [(3, 64, 3, 192), (4, 16, 2, 8), (6, 12, 2, 24), (2, 8, 1, 8),
                                                             (2, 6, 1, 6), (3, 64, 3, 64)])
def test_stored_rotated_key_scores_is_q_dot_rope_of_the_inverse_rotation(n_kv, head_dim, group_heads, block):
    """The RotateKV decode path, from the stored codes: dequantized channel-major, rotated back through the
    Hadamard's Kronecker factors (`inverse_columns`), RoPE as two products with q and its swapped halves; equal
    (float64) to q · apply_rope(inverse(k̂)) of the keys as `_unpack_key_groups` reads them back. Reordered channels,
    odd head dims, groups of heads, a block with no Hadamard (6: a dense random orthogonal one)."""
    g = torch.Generator().manual_seed(3)
    size = group_heads * head_dim
    kr = KeyRotation(n_kv, head_dim, group_heads, block, 5,
                     perm=[torch.randperm(size, generator=g).tolist() for _ in range(n_kv // group_heads)]).double()
    assert kr.fast == (block != 6)
    B, G, ng, gq, h, bits = 2, 8, 3, 3, head_dim // 2, 2
    n = ng * G
    rows = torch.randn(B * n_kv * head_dim * ng, G, dtype=torch.float64, generator=g)  # (rows, G): a channel's G tokens
    w, s, m = kv_quant_ref(rows, bits)
    kb = rows_to_keys(kv_dequant_ref(w, s, m, bits, G, torch.float64).reshape(B, n_kv, head_dim, ng, G))  # (B, H, n, D)
    q = torch.randn(B, n_kv, gq, head_dim, dtype=torch.float64, generator=g)
    ang = torch.rand(B, 1, n, h, dtype=torch.float64, generator=g) * 6
    cos, sin = ang.cos().repeat(1, 1, 1, 2), ang.sin().repeat(1, 1, 1, 2)  # (B, 1, n, D): halves repeated
    ref = q @ apply_rope(kr.inverse(kb), cos, sin).transpose(-1, -2)  # (B, H, gq, n)
    cs = torch.stack([cos, sin], dim=2).transpose(-1, -2)  # (B, 1, 2, D, n)
    got = stored_rotated_key_scores(q, w.reshape(B, n_kv, head_dim, -1), s.reshape(B, n_kv, head_dim, ng),
                                    m.reshape(B, n_kv, head_dim, ng), bits, G, kr, cs)
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-12
    grouped = kb.transpose(1, 2).reshape(B, n, n_kv // group_heads, size).permute(0, 2, 3, 1)  # (B, groups, size, n)
    back = kr.inverse_columns(grouped).permute(0, 3, 1, 2).reshape(B, n, n_kv, head_dim).transpose(1, 2)
    assert (back - kr.inverse(kb)).abs().max().item() < 1e-13


def test_decode_scratch_buffers_are_reused_and_change_nothing():
    """The float32 decode path writes its temporaries into `Scratch` buffers, reused from call to call: the same
    scores as fresh tensors, bit for bit, and no new buffer on the second call (a shorter cache reuses them too)."""
    from lmpress.kernels.kv_cache import Scratch, stored_key_scores, stored_value_mix

    g = torch.Generator().manual_seed(5)
    kr = KeyRotation(3, 64, 3, 192, 1, perm=[torch.randperm(192, generator=g).tolist()])
    B, H, D, G, ng, bits = 1, 3, 64, 64, 4, 2
    w, s, m = kv_quant_ref(torch.randn(B * H * D * ng, G, generator=g), bits)
    w, s, m = w.reshape(B, H, D, -1), s.reshape(B, H, D, ng), m.reshape(B, H, D, ng)
    q = torch.randn(B, H, 3, D, generator=g)
    ang = torch.rand(1, 1, ng * G, D // 2, generator=g) * 6
    cs = rope_columns(ang.cos().repeat(1, 1, 1, 2), ang.sin().repeat(1, 1, 1, 2))
    vw, vs, vm = kv_quant_ref(torch.randn(B * H * ng * G, D, generator=g), bits)  # values: a token's D channels a group
    vw, vs, vm = vw.reshape(B, H, ng * G, 1, -1), vs.reshape(B, H, ng * G, 1), vm.reshape(B, H, ng * G, 1)
    p = torch.softmax(torch.randn(B, H, 3, ng * G, generator=g), -1)
    sc = Scratch()
    fresh = (stored_rotated_key_scores(q, w, s, m, bits, G, kr, cs), stored_key_scores(q, w, s, m, bits, G),
             stored_value_mix(p, vw, vs, vm, bits, D))
    for _ in range(2):
        got = (stored_rotated_key_scores(q, w, s, m, bits, G, kr, cs, sc), stored_key_scores(q, w, s, m, bits, G, sc),
               stored_value_mix(p, vw, vs, vm, bits, D, sc))
        assert all(torch.equal(a, b) for a, b in zip(got, fresh))
        held = sc.nbytes()
    assert held == 4 * B * H * D * ng * G * (1 + 2 + 2)  # codes, two rotation steps, the RoPE'd pair
    short = stored_rotated_key_scores(q, w[..., :8], s[..., :2], m[..., :2], bits, G, kr, cs[..., :2 * G], sc)
    assert torch.equal(short, fresh[0][..., :2 * G]) and sc.nbytes() == held


def test_rope_columns_only_for_rotate_half_tables():
    ang = torch.rand(1, 1, 5, 4, dtype=torch.float64)
    cos, sin = ang.cos().repeat(1, 1, 1, 2), ang.sin().repeat(1, 1, 1, 2)  # (1, 1, n, D)
    cs = rope_columns(cos, sin)
    assert cs.shape == (1, 1, 2, 8, 5) and torch.equal(cs[0, 0, 0, :, 2], cos[0, 0, 2]) and torch.equal(cs[0, 0, 1, :, 2], sin[0, 0, 2])
    assert rope_columns(torch.rand(1, 1, 5, 8), sin) is None  # halves differ: not rotate-half RoPE
