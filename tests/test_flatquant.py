"""FlatQuant-style learnable Kronecker transforms: the maths, the invariance of the folded model,
the learned clipping, the stage, the checkpoint round trip."""
import json

import pytest
import torch
from safetensors import safe_open

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.models import tiny_llama
from lmpress.compress.stage import make_stage
from lmpress.kernels.linear import PackedLinear
from lmpress.kernels.online import KronTransform, RotatedInput, TransformedOutput, transform_from_spec
from lmpress.kernels.transform_act_quant import kron_transform_ref
from lmpress.quant.flatquant import (
    LearnableTransform, act_quant_ste, closest_factors, kron_matmul, smooth_scale, weight_quant_ste,
)
from lmpress.quant.primitives import dequantize, fake_quantize
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.scheme import QuantArgs
from lmpress.quant.sim import SimQuantLinear

from test_rotate import f64_rmsnorm  # noqa: F401  (fixture)

KV4 = {"bits": 4, "group_size": 64, "symmetric": False, "residual": 0, "key_granularity": "token"}


def _calib(n=4, seqlen=32, seed=1):
    ids = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, "test", "calib", n, seqlen, seed, fingerprint(ids))


def _recipe(stages, **fq):
    opts = {"epochs": 2, "samples": 4, "batch_size": 2, **fq}
    return Recipe.from_dict({
        "version": 1, "name": "fq-test",
        "schemes": {"lm_head": None, "re:.*": {"preset": "W4A4", "inputs": {"clip_ratio": 0.9}}},
        "kv_cache": KV4,
        "stages": [{"flatquant": opts}] + stages,
    })


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- maths


def test_closest_factors():
    assert closest_factors(576) == (24, 24)
    assert closest_factors(1536) == (32, 48)
    assert closest_factors(4096) == (64, 64)
    assert closest_factors(96) == (8, 12) and closest_factors(160) == (10, 16)
    assert closest_factors(7) == (1, 7)
    with pytest.raises(ValueError):
        closest_factors(0)


def test_kron_matmul_equals_dense_torch_kron():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    B = torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, 96, generator=g, dtype=torch.float64)
    dense = x @ torch.kron(A, B)
    assert torch.allclose(kron_matmul(x, A, B), dense, rtol=1e-12, atol=1e-12)
    # the runtime module: (x ∘ c)(A ⊗ B), its dense matrix, and the fused kernel's reference
    c = torch.rand(96, generator=g, dtype=torch.float64) + 0.5
    T = KronTransform.from_factors(A, B, c, dtype=torch.float64)
    assert torch.allclose(T(x), (x * c) @ torch.kron(A, B), rtol=1e-12, atol=1e-12)
    assert torch.allclose(T.matrix(), torch.diag(c) @ torch.kron(A, B), rtol=1e-12, atol=1e-12)
    A32, B32, c32, norm = T.kron_factors()
    assert torch.allclose(kron_transform_ref(x.float(), A32, B32, c32, norm), T(x).float(), rtol=1e-4, atol=1e-4)
    T2 = transform_from_spec(T.spec())
    assert isinstance(T2, KronTransform) and (T2.m, T2.p) == (8, 12)


def test_learnable_transform_fold_is_exact():
    """(x T)(W T⁻ᵀ)ᵀ = x Wᵀ for a perturbed (non-orthogonal) T with a non-trivial scale."""
    g = torch.Generator().manual_seed(1)
    T = LearnableTransform(96, seed=3)
    with torch.no_grad():
        T.P1.add_(0.2 * torch.randn(T.P1.shape, generator=g))
        T.P2.add_(0.2 * torch.randn(T.P2.shape, generator=g))
        T.log_s.copy_(0.5 * torch.randn(96, generator=g))
    W = torch.randn(40, 96, generator=g, dtype=torch.float64)
    x = torch.randn(7, 96, generator=g, dtype=torch.float64)
    M = T.runtime(torch.float64).matrix()
    assert (M @ M.T - torch.eye(96, dtype=torch.float64)).abs().max() > 0.1  # not orthogonal
    assert torch.allclose(T(x) @ T.fold(W).T, x @ W.T, rtol=1e-10, atol=1e-10)
    assert torch.allclose(T.runtime(torch.float64)(x), T(x), rtol=1e-12, atol=1e-12)


def test_smooth_scale_is_smoothquant_normalised():
    a, w = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([1.0, 1.0, 4.0])
    s = smooth_scale(a, w, 0.5)
    raw = a.double().sqrt() / w.double().sqrt()
    assert torch.allclose(s, raw / torch.exp(torch.log(raw).mean()))
    assert abs(torch.log(s).mean().item()) < 1e-12


def test_act_quant_ste_forward_is_fake_quantize_and_clip_gets_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 9, 96, generator=g) * torch.linspace(0.1, 5, 96)
    clip = torch.tensor(0.8, requires_grad=True)
    y = act_quant_ste(x, clip, 4)
    ref = fake_quantize(x, QuantArgs(bits=4, granularity="token", dynamic=True, clip_ratio=float(clip.detach())))
    assert torch.equal(y.detach(), ref)
    (act_quant_ste(x, clip, 4) - x).pow(2).sum().backward()
    assert clip.grad is not None and clip.grad.abs().item() > 0
    # straight-through in x: gradient 1 inside the clipped range; the token's absmax (clipped, so
    # no direct gradient) gets the scale's: Σ_j ∂(q_j s)/∂s · ∂s/∂|x|max with ∂(q_j s)/∂s = q_j for
    # clamped entries and round(x_j/s) - x_j/s for the others
    xg = x.clone().requires_grad_(True)
    act_quant_ste(xg, clip.detach(), 4).sum().backward()
    top = x.abs() == x.abs().amax(-1, keepdim=True)
    inside = x.abs() < 0.5 * x.abs().amax(-1, keepdim=True)
    assert bool((xg.grad[inside] == 1).all())
    s = x.abs().amax(-1, keepdim=True) * 0.8 / 7
    r = torch.round(x / s)
    dq_ds = torch.where((r > 7) | (r < -8), torch.clamp(r, -8, 7), r - x / s)
    expect = (dq_ds.sum(-1, keepdim=True) * 0.8 / 7 * torch.sign(x)).expand_as(x)
    assert torch.allclose(xg.grad[top], expect[top], rtol=1e-4, atol=1e-5)


def test_weight_quant_ste_equals_rtn_of_the_clamped_weight():
    """The learned clip folded as a clamp: min-max RTN of the clamped weight is the training forward."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 96, generator=g)
    clip = torch.rand(32, generator=g) * 0.4 + 0.6
    args = QuantArgs(bits=4)
    bound = W.abs().amax(1, keepdim=True) * clip[:, None]
    q, s, z = rtn_quantize(torch.maximum(torch.minimum(W, bound), -bound), args)
    y = weight_quant_ste(W, clip, args)
    assert torch.allclose(y, dequantize(q, s, z, args), rtol=1e-6, atol=1e-7)
    c = clip.clone().requires_grad_(True)
    (weight_quant_ste(W, c, args) - W).pow(2).sum().backward()
    assert c.grad.abs().sum() > 0


# --------------------------------------------------------------------------- the stage


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 3}])
def test_quantization_off_folded_model_equals_original_float64(f64_rmsnorm, tokens, overrides):
    """Trained, non-orthogonal transforms folded into the weights and kept online: with no
    quantization stage the logits are the original model's, to float64 rounding."""
    model, _ = tiny_llama(seed=4, dtype=torch.float64, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
        ref = model(tokens).logits
    report = compress(model, _recipe([], fold_weight_clip=False), _calib())  # a folded clip clamps the weights
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, TransformedOutput) and isinstance(layer.mlp.down_proj, RotatedInput)
    M = layer.self_attn.o_proj.transform.matrix()
    assert (M @ M.T - torch.eye(M.shape[0], dtype=M.dtype)).abs().max() > 1e-3  # learned: not a rotation
    with torch.no_grad():
        out = model(tokens).logits
    assert _rel(out, ref) < 1e-10
    assert [r["steps"] for r in report.extra["flatquant"]["layers"]] == [4, 4]


def test_quantization_off_float32_within_1e5(tiny, tokens):
    model, _ = tiny
    with torch.no_grad():
        ref = model(tokens).logits
    compress(model, _recipe([], fold_weight_clip=False), _calib())
    with torch.no_grad():
        assert _rel(model(tokens).logits, ref) < 1e-5


def test_training_lowers_the_layer_loss_and_learns_clips(tiny):
    model, _ = tiny
    report = compress(model, _recipe(["kv_cache", "rtn"], epochs=8, samples=8), _calib(n=8, seqlen=48))
    layers = report.extra["flatquant"]["layers"]
    # the first-batch loss before training against the mean over the last epoch (the tiny random
    # model's first-batch probe alone is noisy)
    assert all(r["last_epoch_loss"] < r["init_loss"] for r in layers), layers
    clips = report.extra["flatquant"]["act_clip"]
    assert len(clips) == 2 * 7 and all(0 < c < 1 for c in clips.values())
    assert any(abs(c - 0.9) > 1e-3 for c in clips.values())
    sim = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(sim, SimQuantLinear) and sim.scheme.inputs.clip_ratio == pytest.approx(clips["model.layers.0.self_attn.q_proj"], abs=1e-4)
    down = model.get_submodule("model.layers.1.mlp.down_proj.linear")
    assert isinstance(down, SimQuantLinear) and down.quantized


def test_relative_layer_loss_weighs_every_token_by_its_own_scale():
    """A massive-activation token (its output x1000) dominates plain MSE; the relative loss, each
    token's squared error over its float target's, sees every token the way the next RMSNorm does."""
    from lmpress.quant.flatquant import layer_loss

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 16, 24, generator=g, dtype=torch.float64)  # (B, T, hidden) float targets
    out = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    rel = ((out - y).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()
    assert torch.allclose(layer_loss(out, y), rel.float())
    assert torch.allclose(layer_loss(out, y, "mse"), (out - y).pow(2).mean().float())
    big = torch.ones(1, 16, 1, dtype=torch.float64)
    big[0, 0] = 1000.0
    y2, out2 = y * big, out * big  # token 0 of both sequences: massive
    assert torch.allclose(layer_loss(out2, y2), layer_loss(out, y))
    assert layer_loss(out2, y2, "mse") > 1000 * layer_loss(out, y, "mse")


def test_options_are_validated():
    with pytest.raises(ValueError, match="flatquant.epochs"):
        make_stage("flatquant", {"epochs": -1})
    with pytest.raises(ValueError, match="flatquant.smooth_alpha"):
        make_stage("flatquant", {"smooth_alpha": 2})
    with pytest.raises(ValueError, match="unknown option"):
        make_stage("flatquant", {"steps": 3})
    with pytest.raises(ValueError, match="flatquant.loss='l1'.*relative"):
        make_stage("flatquant", {"loss": "l1"})
    for name in ("w4a4kv4-flatquant", "w4a4kv4-flatquant-gptq", "w4a4kv4-flatquant-comet-gptq",
                 "w4a4kv4-flatquant-comet-g64-gptq"):
        r = Recipe.load(name)
        assert r.needs_calibration and r.kv_args.bits == 4 and r.scheme_for("lm_head") is None


def test_stage_refuses_a_rotated_or_quantized_model(tiny):
    model, _ = tiny
    compress(model, "w4a4-rtn")
    with pytest.raises(ValueError, match="before quantization"):
        compress(model, _recipe([]), _calib())


@pytest.mark.parametrize("stages", [["kv_cache", "rtn"], ["kv_cache", "gptq"]])
def test_packed_checkpoint_reproduces_simulated_logits(tiny, tokens, tmp_path, stages):
    model, tok = tiny
    compress(model, _recipe(stages, epochs=1, fold_weight_clip=stages[-1] == "rtn"), _calib())
    with torch.no_grad():
        sim = model(tokens).logits
    out = save(model, tmp_path / "ckpt", tokenizer=tok)
    manifest = json.loads((out / "config.json").read_text())["quantization_config"]
    online = manifest["lmpress"]["online_transforms"]
    kinds = sorted((o["apply"], o["kind"]) for o in online)
    assert kinds.count(("output", "kron")) == 4 and kinds.count(("input", "kron")) == 4 and kinds.count(("qk", "hadamard")) == 2
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.input_layernorm.transform.kron_left" in keys
    assert "model.layers.1.mlp.down_proj.transform.kron_scale" in keys
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["inputs"]["clip_ratio"] != 0.9
    loaded = load(out)
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.down_proj.linear"), PackedLinear)
    T0 = model.get_submodule("model.layers.1.post_attention_layernorm.transform")
    T1 = loaded.get_submodule("model.layers.1.post_attention_layernorm.transform")
    assert torch.equal(T0.kron_right, T1.kron_right) and torch.equal(T0.kron_scale, T1.kron_scale)
    with torch.no_grad():
        got = loaded(tokens).logits
    assert (got - sim).abs().max().item() <= 1e-4


@pytest.mark.parametrize("weights", [{}, {"granularity": "group", "group_size": 16}], ids=["channel", "g16"])
def test_comet_inputs_after_flatquant_calibrate_an_order_and_reload_packed(tiny, tokens, tmp_path, weights):
    """Recipes w4a4kv4-flatquant-comet-gptq (per-channel weights) and -g64-gptq (weights in groups)'s form: FlatQuant
    trained against group-wise int4 inputs, then GPTQ gives each linear COMET's channel order over its *transformed*
    inputs; the packed checkpoint reproduces the logits."""
    model, tok = tiny
    r = _recipe(["kv_cache", "gptq"], epochs=1, fold_weight_clip=False).to_dict()
    r["schemes"]["re:.*"]["inputs"] = {"granularity": "group", "group_size": 16, "outliers": 0.25}
    r["schemes"]["re:.*"]["weights"] = {"mse_clip": True, **weights}
    compress(model, Recipe.from_dict(r), _calib())
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, SimQuantLinear) and q.scheme.inputs.outliers == 0.25
    assert q.scheme.weights.granularity == weights.get("granularity", "channel")
    assert torch.equal(torch.sort(q.input_perm).values, torch.arange(q.in_features))
    assert not torch.equal(q.input_perm, torch.arange(q.in_features))  # ordered by the calibration absmax
    with torch.no_grad():
        sim = model(tokens).logits
    loaded = load(save(model, tmp_path / "ckpt", tokenizer=tok))
    with torch.no_grad():
        got = loaded(tokens).logits
    assert (got - sim).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_smollm2_quantization_off_fp32_within_1e4():
    """The folded SmolLM2 (no quantization stage, the first 6 layers) reproduces the original
    logits (fp32, rel <= 1e-4)."""
    from lmpress.calibration.data import sample_calibration
    from lmpress.compress.models import load_model

    model, tok = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:6]  # the first 6 of 30 decoder layers: the check, in seconds
    model.config.num_hidden_layers = 6
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    calib = sample_calibration(tok, "wiki", n=2, seqlen=64, seed=0)
    compress(model, _recipe([], epochs=1, samples=2, batch_size=2, fold_weight_clip=False), calib)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) <= 1e-4
