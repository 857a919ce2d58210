"""MergeQuant (stage `mergequant`): static per-channel activation steps, migrated into the producers and
readers exactly, leaving the inputs quantized by rounding alone (no dynamic quantization op)."""
from __future__ import annotations

import pytest
import torch

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama
from lmpress.compress.stages.mergequant import MergeQuant
from lmpress.quant import primitives
from lmpress.quant.scheme import QuantArgs
from lmpress.quant.smooth import static_channel_steps, static_tensor_ratio

W4A4S = ('{weights: {bits: 4, granularity: channel, symmetric: true}, '
         'inputs: {bits: 4, granularity: tensor, symmetric: true, dynamic: false}}')


def _calib(n=8, T=32, seed=5):
    toks = torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=n, seqlen=T, seed=seed, fingerprint=fingerprint(toks))


def test_channel_steps_clip_a_heavy_tail_and_lose_less():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g)
    x[:, 2] = x[:, 2] ** 3  # a heavy-tailed channel
    args = QuantArgs(bits=4, granularity="tensor", symmetric=True, dynamic=False)
    plain, clipped = static_channel_steps(x, args, clip_search=False), static_channel_steps(x, args)
    assert torch.allclose(plain, x.abs().amax(0) / 7)
    assert clipped[2] < plain[2] * 0.9 and (clipped <= plain).all()

    def err(step):
        return ((x / step).round().clamp(-8, 7) * step - x).square().sum(0)
    assert (err(clipped) <= err(plain)).all() and (err(clipped) < err(plain) * 0.95).all()  # 8% on the tail, ~40% elsewhere


def test_migration_is_exact_in_float64():
    model, _ = tiny_llama(seed=0, dtype=torch.float64)
    arch = arch_for(model)
    toks = _calib().tokens
    with torch.no_grad():
        ref = model(toks).logits
    recipe = Recipe.from_yaml(f'version: 1\nname: t\nschemes: {{lm_head: null, "re:.*": {W4A4S}}}\nstages: [mergequant]\n')
    stage = MergeQuant()
    plan = {n: recipe.scheme_for(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for step in LayerwiseRunner(model, arch, toks[:4]):
        prefix = f"{arch.layers}.{step.index}."
        schemes = {rel: plan[prefix + rel] for _, readers in stage.groups(arch) for rel in readers}
        stage.merge_layer(step, arch, schemes, model.config)
    with torch.no_grad():
        out = model(toks).logits
        # the o_proj input now has unit steps: the attention output of layer 0 lies within the 4-bit grid's range mostly
    assert (out - ref).abs().max().item() < 1e-9
    v = model.model.layers[0].self_attn.v_proj.weight
    assert not torch.allclose(v, tiny_llama(seed=0, dtype=torch.float64)[0].model.layers[0].self_attn.v_proj.weight)


def test_no_dynamic_quantization_op_is_left_and_it_beats_a_per_tensor_step(tmp_path, monkeypatch):
    calib = _calib()
    toks = calib.tokens[:2]
    ref_model, _ = tiny_llama(seed=0)
    with torch.no_grad():
        ref = ref_model(toks).logits
    errs = {}
    builtin = Recipe.load("w4a4-static-mergequant").to_dict()
    names = [next(iter(s)) for s in builtin["stages"]]
    assert names == ["fuse_norms", "rotate", "mergequant", "gptq"]
    for merged in (True, False):
        model, tok = tiny_llama(seed=0)
        kept = [s for s in builtin["stages"] if merged or "mergequant" not in s]  # without: one static scale per linear
        compress(model, Recipe.from_dict({**builtin, "stages": kept}), calib)
        sims = {n: m for n, m in model.named_modules() if hasattr(m, "static_inputs")}
        with torch.no_grad():
            errs[merged] = (model(toks).logits - ref).square().mean().item()
        if merged:
            assert len(sims) == 14
            # the migrated readers round their inputs alone; down_proj, rotated online, keeps its clipped scale
            assert all(torch.equal(m.input_scale, torch.ones(1, 1)) == ("down_proj" not in n) for n, m in sims.items())
            path = save(model, tmp_path / "mq", tokenizer=tok)
            packed = load(path)
            calls = []
            real = primitives.compute_qparams
            monkeypatch.setattr(primitives, "compute_qparams", lambda *a, **k: calls.append(1) or real(*a, **k))
            with torch.no_grad():
                sim_out, packed_out = model(toks).logits, packed(toks).logits
            monkeypatch.undo()
            assert calls == []  # no scale computed from an activation at run time, in the simulation or packed
            assert (packed_out - sim_out).abs().max().item() < 1e-3 * sim_out.abs().max().item()
    assert errs[True] < errs[False]


def test_it_refuses_dynamic_inputs_and_quantized_readers():
    model, _ = tiny_llama(seed=0)
    dyn = Recipe.from_yaml('version: 1\nname: t\nschemes: {lm_head: null, "re:.*": W4A4}\nstages: [mergequant, rtn]\n')
    with pytest.raises(ValueError, match="must quantize inputs statically"):
        compress(model, dyn, _calib())
    model, _ = tiny_llama(seed=0)
    late = Recipe.from_yaml(f'version: 1\nname: t\nschemes: {{lm_head: null, "re:.*": {W4A4S}}}\nstages: [gptq, mergequant]\n')
    with pytest.raises(ValueError, match="before quantization stages"):
        compress(model, late, _calib())
    with pytest.raises(ValueError, match="samples"):
        MergeQuant(samples=0)


def test_a_static_scale_clip_search_loses_less_on_heavy_tails():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=g)
    x[::64] *= 8  # a few tokens far larger than the rest, as down_proj's inputs
    args = QuantArgs(bits=4, granularity="tensor", symmetric=True, dynamic=False, mse_clip=True)
    r = static_tensor_ratio(x, args)

    def err(ratio):
        step = ratio * x.abs().amax() / 7
        return ((x / step).round().clamp(-8, 7) * step - x).square().sum()
    assert r < 1 and err(r) < 0.9 * err(1.0)
    assert all(err(r) <= err(other) for other in (0.25, 0.5, 0.75, 1.0))


def test_static_inputs_with_mse_clip_get_a_clipped_scale():
    calib = _calib()
    scales = {}
    for clip in (False, True):
        model, _ = tiny_llama(seed=0)
        inputs = f"{{bits: 4, granularity: tensor, symmetric: true, dynamic: false, mse_clip: {str(clip).lower()}}}"
        compress(model, Recipe.from_yaml(f'version: 1\nname: t\nschemes: {{lm_head: null, "re:.*": {{weights: {{bits: 4}}, '
                                         f'inputs: {inputs}}}}}\nstages: [gptq]\n'), calib)
        scales[clip] = {n: m.input_scale.item() for n, m in model.named_modules() if getattr(m, "input_scale", None) is not None}
    assert scales[True].keys() == scales[False].keys() and len(scales[True]) == 14
    assert all(scales[True][n] <= scales[False][n] * (1 + 1e-6) for n in scales[True])
    assert sum(scales[True][n] < scales[False][n] * 0.99 for n in scales[True]) >= 7
