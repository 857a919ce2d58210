"""The simulated KV quantizer and the "lmpress" attention function (R3 + KV fake-quant)."""
import json

import pytest
import torch

from lmpress.compress import Recipe, RecipeError, compress, load, save
from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama
from lmpress.kernels.online import OnlineHadamard
from lmpress.kernels.attention import LmpressAttention, attach_attention, attention_specs
from lmpress.quant.kv_cache import check_kv_args, fake_quantize_kv
from lmpress.quant.scheme import KV4, KVCacheArgs

KV_RTN = """
version: 1
name: w4a4kv4-rtn-test
schemes: {lm_head: null, "re:.*": W4A4}
kv_cache: {bits: 4, group_size: 8, key_granularity: token}
stages: [kv_cache, rtn]
"""


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# ----------------------------------------------------------------------------- fake_quantize_kv


@pytest.mark.parametrize("bits, group, head_dim", [(4, 64, 64), (4, 16, 64), (2, 8, 16), (8, 64, 16), (4, 8, 20)])
def test_kv_fake_quant_groups_per_head_per_token(bits, group, head_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, head_dim, generator=g) * torch.linspace(0.5, 4, head_dim)
    y = fake_quantize_kv(x, bits, group)
    assert y.shape == x.shape and y.dtype == x.dtype
    gs = min(group, head_dim)
    for start in range(0, head_dim, gs):
        blk, qblk = x[..., start:start + gs], y[..., start:start + gs]  # (B, H, T, <=gs)
        lo = blk.amin(-1, keepdim=True).clamp(max=0)
        hi = blk.amax(-1, keepdim=True).clamp(min=0)
        step = (hi - lo) / (2**bits - 1)
        assert ((blk - qblk).abs() <= step / 2 + 1e-5).all()  # each group on its own grid
        levels = torch.round((qblk - qblk.amin(-1, keepdim=True)) / step)
        assert torch.allclose(levels * step + qblk.amin(-1, keepdim=True), qblk, atol=1e-4)
        assert int(levels.max()) <= 2**bits - 1


def test_kv_fake_quant_groups_and_tokens_are_independent():
    x = torch.randn(1, 2, 5, 32)
    y = fake_quantize_kv(x, 4, 16)
    x2 = x.clone()
    x2[0, 1, 3, 16:] *= 100  # one group of one token of one head
    y2 = fake_quantize_kv(x2, 4, 16)
    changed = (y2 != y)
    assert changed[0, 1, 3, 16:].any()
    changed[0, 1, 3, 16:] = False
    assert not changed.any()


def test_kv_fake_quant_error_shrinks_with_bits_and_symmetric_option():
    x = torch.randn(1, 2, 64, 64)
    errs = [(fake_quantize_kv(x, b, 64) - x).pow(2).mean().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    ys = fake_quantize_kv(x, 4, 64, symmetric=True)
    scale = x.abs().amax(-1, keepdim=True) / 7
    assert torch.allclose(torch.round(ys / scale), ys / scale, atol=1e-3)
    assert (fake_quantize_kv(x, 4, 64, clip_ratio=0.5).abs().amax() < x.abs().amax())


def test_kv_fake_quant_validates_and_unsupported_settings_say_so():
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        fake_quantize_kv(torch.zeros(3, 4, 8), 4, 8)
    with pytest.raises(ValueError, match="bits"):
        fake_quantize_kv(torch.zeros(1, 1, 2, 8), 3, 8)
    check_kv_args(KV4, head_dim=64)  # KIVI-style per-channel keys are simulated (tests/test_kv2.py)
    with pytest.raises(ValueError, match="tile it"):
        check_kv_args(KVCacheArgs(bits=2, group_size=48, residual=96), head_dim=64)


# ----------------------------------------------------------------------------- attention function


def test_lmpress_attention_is_registered_and_transparent_without_settings(tiny, tokens):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "lmpress" in ALL_ATTENTION_FUNCTIONS and "lmpress" in ALL_MASK_ATTENTION_FUNCTIONS
    model, _ = tiny
    ref = _logits(model, tokens)
    attach_attention(model, arch_for(model))
    assert model.config._attn_implementation == "lmpress"
    assert torch.equal(_logits(model, tokens), ref)


def test_settings_rotate_qk_then_quantize_kv():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    h = OnlineHadamard(16, 5)
    kv = KVCacheArgs(bits=4, group_size=16, key_granularity="token")
    q2, k2, v2 = LmpressAttention(qk=h, kv=kv)(q, k, v)
    assert torch.allclose(q2, q @ h.matrix(torch.float32), atol=1e-6)
    assert torch.allclose(k2, fake_quantize_kv(k @ h.matrix(torch.float32), 4, 16), atol=1e-5)
    assert torch.equal(v2, fake_quantize_kv(v, 4, 16))
    # the rotation leaves the attention scores unchanged
    k_rot = (k @ h.matrix(torch.float32)).repeat_interleave(3, dim=1)  # GQA: 6 query heads on 2 KV heads
    assert torch.allclose(q2 @ k_rot.transpose(-1, -2), q @ k.repeat_interleave(3, dim=1).transpose(-1, -2), atol=1e-5)


def test_qk_rotation_keeps_logits_and_kv_quant_changes_them(tokens):
    model, _ = tiny_llama(seed=0, dtype=torch.float64)
    ref = _logits(model, tokens)
    attach_attention(model, arch_for(model), qk={i: OnlineHadamard(16, i) for i in range(2)})
    assert (_logits(model, tokens) - ref).abs().max().item() <= 1e-10
    attach_attention(model, arch_for(model), kv=KVCacheArgs(bits=4, group_size=16, key_granularity="token"))
    d4 = (_logits(model, tokens) - ref).abs().max().item()
    attach_attention(model, arch_for(model), kv=KVCacheArgs(bits=8, group_size=16, key_granularity="token"))
    d8 = (_logits(model, tokens) - ref).abs().max().item()
    assert 0 < d8 < d4


def test_kv_cache_stage_without_rotation_round_trips(tiny, tokens, tmp_path):
    model, tok = tiny
    compress(model, Recipe.from_yaml(KV_RTN))
    assert model.config._attn_implementation == "lmpress"
    specs = attention_specs(model)
    assert len(specs) == 2 and all(s["qk"] is None and s["kv_cache"]["group_size"] == 8 for s in specs.values())
    sim = _logits(model, tokens)
    out = save(model, tmp_path / "kv", tokenizer=tok)
    block = json.loads((out / "config.json").read_text())["quantization_config"]["lmpress"]
    assert block["online_transforms"] == [] and len(block["attention"]["kv_cache"]) == 2
    loaded = load(out)
    assert loaded.config._attn_implementation == "lmpress"
    assert (_logits(loaded, tokens) - sim).abs().max().item() <= 1e-4
    # generation with a KV cache runs through the same function, and agrees with the simulated model
    prompt = tokens[:1, :8]
    a = model.generate(prompt, max_new_tokens=6, do_sample=False)
    b = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_kv_cache_stage_needs_kv_settings_and_refuses_per_channel_keys(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="top-level `kv_cache:`"):
        compress(model, Recipe.from_dict({"schemes": {"re:.*": "W8A8"}, "stages": ["kv_cache", "rtn"]}))
    model, _ = tiny_llama(seed=0)
    compress(model, Recipe.from_dict({"schemes": {"re:.*": "W8A8"}, "kv_cache": "KV4", "stages": ["kv_cache", "rtn"]}))
    assert all(s["kv_cache"]["key_granularity"] == "channel" for s in attention_specs(model).values())  # KIVI, simulated
    with pytest.raises(RecipeError, match="unknown option"):
        Recipe.from_dict({"schemes": {"re:.*": "W8A8"}, "stages": [{"kv_cache": {"bits": 4}}]})
