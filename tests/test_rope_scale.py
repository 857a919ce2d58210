"""FireQ's Q/K scaling around RoPE: the maths (quant/rope_scale.py), the stage, the artifact."""
import json

import pytest
import torch

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.models import tiny_llama
from lmpress.quant.kv_cache import apply_rope
from lmpress.quant.rope_scale import balance, fold_pre_rope, pair_shared, per_kv_group, scale_qk


def _calib(seed=0):
    toks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=4, seqlen=32, seed=seed, fingerprint=fingerprint(toks))


def test_pre_rope_factors_fold_exactly_and_commute_with_rope():
    g = torch.Generator().manual_seed(0)
    hidden, heads, n_kv, d = 32, 6, 2, 16
    q_proj = torch.nn.Linear(hidden, heads * d, bias=True).double()
    k_proj = torch.nn.Linear(hidden, n_kv * d, bias=True).double()
    x = torch.randn(3, 5, hidden, generator=g, dtype=torch.float64)  # (B, T, hidden)
    ang = torch.randn(5, d // 2, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (T, D), transformers' halves

    def scores():
        q = apply_rope(q_proj(x).reshape(3, 5, heads, d).transpose(1, 2), cos, sin)  # (B, heads, T, D)
        k = apply_rope(k_proj(x).reshape(3, 5, n_kv, d).transpose(1, 2), cos, sin)
        return q @ k.repeat_interleave(heads // n_kv, dim=1).transpose(-1, -2)  # (B, heads, T, T)

    before = scores()
    s = pair_shared(torch.rand(n_kv, d, generator=g, dtype=torch.float64) * 4 + 0.1)
    assert torch.equal(s[:, : d // 2], s[:, d // 2:])  # one factor per RoPE pair
    fold_pre_rope(q_proj, k_proj, s, heads)
    assert torch.allclose(scores(), before, rtol=1e-12, atol=1e-12)
    q = torch.randn(2, heads, 4, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, n_kv, 4, d, generator=g, dtype=torch.float64)
    q2, k2 = scale_qk(q, k, s)
    assert torch.allclose(q2 @ k2.repeat_interleave(3, 1).transpose(-1, -2), q @ k.repeat_interleave(3, 1).transpose(-1, -2),
                          rtol=1e-12, atol=1e-12)
    assert torch.equal(k2, k / s[None, :, None, :])


def test_balance_meets_in_the_middle():
    amax_k = torch.tensor([[8.0, 0.5, 0.0, 2.0]])
    amax_q = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    s = balance(amax_k, amax_q, 0.5)
    assert torch.allclose(s[0, :2], torch.tensor([2.0, 0.5]))  # amax_k / s == amax_q * s
    assert torch.equal(s[0, 2:], torch.ones(2))  # an empty range keeps its channel as it is
    assert torch.equal(per_kv_group(torch.arange(12.0).reshape(6, 2), 2), torch.tensor([[4.0, 5.0], [10.0, 11.0]]))


def test_stage_is_exact_in_float_and_balances_the_rotated_ranges():
    model, _ = tiny_llama(seed=0, dtype=torch.float64)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x).logits
    compress(model, Recipe.from_yaml("version: 1\nname: r\nschemes: {}\nstages: [{rope_scale: {q_fp8: false}}]\n"), _calib())
    with torch.no_grad():
        assert torch.allclose(model(x).logits, base, rtol=0, atol=1e-10)
    from lmpress.kernels.attention import observe_qk

    attn = model.model.layers[1].self_attn
    s = attn.lmpress_attn.qk_post_scale  # (kv heads, D)
    assert s.shape == (2, 16)
    with torch.no_grad(), observe_qk(model) as seen:
        model(_calib().tokens)  # the calibration set again: the ranges the factors were set from
    r = seen[attn.lmpress_attn]
    assert torch.allclose(r["k"] / s, per_kv_group(r["q"], 2) * s, rtol=1e-4)  # after scaling, equal ranges (alpha 0.5)


def test_fireq_recipe_artifact_and_refusals(tmp_path):
    model, tok = tiny_llama(seed=0)
    recipe = Recipe.from_yaml("version: 1\nname: f\nschemes: {lm_head: null, 're:.*': {preset: W4AFP8, weights: {group_size: 32}}}\n"
                              "kv_cache: {bits: 4, group_size: 16, key_granularity: token}\n"
                              "stages: [smoothquant, rope_scale, kv_cache, gptq]\n")
    compress(model, recipe, _calib())
    path = save(model, tmp_path / "f", tokenizer=tok)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lmpress"  # online post-RoPE scaling has no compressed-tensors form
    assert qc["lmpress"]["attention"]["rope_scale"]["model.layers.0.self_attn"] == {"post": True, "q_fp8": True}
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(path)(x).logits, model(x).logits)
    kivi = Recipe.from_yaml("version: 1\nname: k\nschemes: {}\nkv_cache: KV4\nstages: [rope_scale, kv_cache]\n")
    with pytest.raises(ValueError, match="per-token KV cache"):
        compress(tiny_llama(seed=0)[0], kivi, _calib())
    with pytest.raises(ValueError, match="alpha"):
        Recipe.from_yaml("version: 1\nname: a\nschemes: {}\nstages: [{rope_scale: {alpha: 2}}]\n")
