"""Norm fusion and QuaRot rotations (R1-R4): invariance, online transforms, stage wiring,
packed checkpoints with online transforms, recipes."""
import json

import pytest
import torch
from torch import nn

from lmpress.compress import Recipe, RecipeError, compress, load, save
from lmpress.compress import checkpoint as ckpt
from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama
from lmpress.compress.report import Report
from lmpress.compress.stage import STAGES, Context, make_stage
from lmpress.kernels.linear import PackedLinear
from lmpress.kernels.online import OnlineHadamard, RotatedInput, transform_from_spec
from lmpress.quant.hadamard import random_hadamard
from lmpress.quant.rotate import fuse_norms, norms_fused, rotate_model, rotation_matrix
from lmpress.quant.scheme import W4A4
from lmpress.quant.sim import SimQuantLinear

QUAROT_RECIPES = ["w4a4-rtn", "w4a4kv4-quarot-rtn", "w4a4kv4-quarot-gptq"]


@pytest.fixture
def f64_rmsnorm(monkeypatch):
    """LlamaRMSNorm computes in float32 whatever the model's dtype; the float64 invariance
    checks need the norm in float64 too (the maths is the same)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def _apply(model, *stages):
    ctx = Context(arch=arch_for(model), plan={}, report=Report())
    with torch.no_grad():
        for name, opts in stages:
            make_stage(name, opts).apply(model, ctx)
    return ctx


def _quarot_rtn(mse_clip: bool = False) -> Recipe:
    """The built-in w4a4kv4-quarot-rtn, by default without its MSE clipping search (slow on a
    loaded CPU and beside the point of these tests)."""
    data = Recipe.load("w4a4kv4-quarot-rtn").to_dict()
    data["schemes"]["re:.*"]["weights"]["mse_clip"] = mse_clip
    return Recipe.from_dict(data)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# ----------------------------------------------------------------------------- invariance


def test_fuse_norms_keeps_logits_float64(f64_rmsnorm, tokens):
    model, _ = tiny_llama(seed=1, dtype=torch.float64)
    ref = _logits(model, tokens)
    embed_before = model.model.embed_tokens.weight.clone()
    ctx = _apply(model, ("fuse_norms", {}))
    assert norms_fused(model, ctx.arch)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    assert (_logits(model, tokens) - ref).abs().max().item() <= 1e-8
    assert fuse_norms(model, ctx.arch) == []  # idempotent: nothing left to fold


@pytest.mark.parametrize(
    "opts, overrides",
    [
        ({"kind": "hadamard", "online": ["down_proj", "qk"], "r2": True}, {}),
        ({"kind": "random", "online": ["down_proj", "qk"], "r2": True}, {}),
        ({"kind": "hadamard", "online": ["down_proj", "qk", "o_proj"], "r2": True}, {}),
        ({"kind": "hadamard", "online": [], "r2": False}, {}),
        ({"kind": "hadamard", "online": ["qk"], "r2": True, "seed": 7}, {"attention_bias": True, "mlp_bias": True}),
        ({"kind": "hadamard", "online": ["down_proj"], "r2": True}, {"num_key_value_heads": 3, "intermediate_size": 192}),
        ({"kind": "hadamard", "online": ["down_proj", "qk", "o_proj"], "r2": True, "block": 8}, {}),  # R2 in blocks too
        ({"kind": "hadamard", "online": ["down_proj"], "r2": True, "block": 32}, {}),
    ],
)
def test_rotations_keep_logits_float64(f64_rmsnorm, tokens, opts, overrides):
    """fuse_norms + R1..R4 in float64: max abs logit difference <= 1e-8 (GQA 6/2 heads,
    hidden 96 = 12·8, FFN 160 = 20·8; biased variants exercise the bias rotations)."""
    model, _ = tiny_llama(seed=2, dtype=torch.float64, **overrides)
    with torch.no_grad():  # random biases (zero-initialised by default) so their rotation matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ref = _logits(model, tokens)
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    _apply(model, ("fuse_norms", {}), ("rotate", opts))
    out = _logits(model, tokens)
    assert (out - ref).abs().max().item() <= 1e-8
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)  # it did rotate
    wrapped = isinstance(model.model.layers[0].mlp.down_proj, RotatedInput)
    assert wrapped == ("down_proj" in opts["online"])
    has_qk = getattr(model.model.layers[0].self_attn, "lmpress_attn", None) is not None
    assert has_qk == ("qk" in opts["online"])


def test_rotate_fuses_norms_itself_and_refuses_quantized_or_twice(f64_rmsnorm, tokens):
    model, _ = tiny_llama(seed=3, dtype=torch.float64)
    ref = _logits(model, tokens)
    _apply(model, ("rotate", {}))  # no fuse_norms stage: done automatically
    assert (_logits(model, tokens) - ref).abs().max().item() <= 1e-8
    with pytest.raises(TypeError, match="before any quantization"):
        _apply(model, ("rotate", {}))  # down_proj is wrapped now: a second rotation is refused
    model, _ = tiny_llama(seed=3)
    compress(model, "w4a4-rtn")
    with pytest.raises(ValueError, match="before quantization"):
        _apply(model, ("rotate", {}))


def test_r2_is_per_kv_head_and_v_outputs_rotate():
    """R2 rotates each KV head's value output by its own matrix; o_proj undoes it per query head."""
    model, _ = tiny_llama(seed=4, dtype=torch.float64)
    v0 = model.model.layers[0].self_attn.v_proj.weight.clone()
    _apply(model, ("fuse_norms", {}))
    v1 = model.model.layers[0].self_attn.v_proj.weight.clone()
    rotate_model(model, arch_for(model), online=(), r2=True, seed=0)
    v2 = model.model.layers[0].self_attn.v_proj.weight
    # undo R1 on the inputs: v2 = R2ᵀ v1 Q1 per head -> R2 = (v1 Q1)⁺ ... check orthogonality of the map
    Q1 = rotation_matrix(96, "hadamard", 0)
    a = (v1 @ Q1).view(2, 16, 96)
    b = v2.view(2, 16, 96)
    maps = [torch.linalg.lstsq(a[h].T, b[h].T).solution for h in range(2)]  # (16, 16) each: b_hᵀ = a_hᵀ M
    for M in maps:
        assert torch.allclose(M @ M.T, torch.eye(16, dtype=torch.float64), atol=1e-8)
    assert not torch.allclose(maps[0], maps[1])  # one rotation per KV head
    assert not torch.equal(v0, v2)


# ----------------------------------------------------------------------------- online transforms


@pytest.mark.parametrize("size, seed", [(16, 3), (160, None), (576, 0), (1536, 5), (10, 2)])
def test_online_hadamard_is_orthogonal_and_rebuilt_from_its_spec(size, seed):
    h = OnlineHadamard(size, seed)
    Q = h.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, size, dtype=torch.float64)
    assert torch.allclose(h(x), x @ Q, atol=1e-12)
    if seed is not None and h.fast:
        assert torch.allclose(Q, random_hadamard(size, seed), atol=1e-15)
    assert h.spec() == {"kind": "hadamard", "size": size, "seed": seed}
    again = transform_from_spec(json.loads(json.dumps(h.spec())))
    assert torch.equal(again(x), h(x))
    assert h.state_dict() == {}  # never stored as a matrix
    assert h.fast == (size != 10)  # 10 has no Hadamard: seeded random orthogonal fallback
    x32 = x.float()
    assert h(x32).dtype == torch.float32


@pytest.mark.parametrize("size, block", [(1536, 32), (576, 16), (96, 8)])
def test_block_hadamard_is_block_diagonal_orthogonal_and_rebuilt_from_its_spec(size, block):
    from lmpress.quant.hadamard import random_block_hadamard

    h = OnlineHadamard(size, 3, block)
    Q = h.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, random_block_hadamard(size, 3, block))
    mask = torch.kron(torch.eye(size // block), torch.ones(block, block)).bool()
    assert bool((Q[~mask] == 0).all())  # no two blocks mix
    x = torch.randn(2, 3, size, dtype=torch.float64)
    assert torch.allclose(h(x), x @ Q, atol=1e-12)
    assert h.spec() == {"kind": "hadamard", "size": size, "seed": 3, "block": block}
    assert torch.equal(transform_from_spec(json.loads(json.dumps(h.spec())))(x), h(x))
    A, B, signs, norm = h.kron_factors("cpu")  # the fused kernel's factors: ((x ∘ s)(A ⊗ B)) / norm
    y = ((x.float() * signs).reshape(2, 3, A.shape[0], B.shape[0]) @ B).transpose(-1, -2) @ A
    assert torch.allclose(y.transpose(-1, -2).reshape(2, 3, size).double() / norm, x @ Q, atol=1e-5)
    with pytest.raises(ValueError, match="divides 100"):
        OnlineHadamard(100, 0, 32)


def test_online_hadamard_validates():
    with pytest.raises(ValueError, match="positive integer"):
        OnlineHadamard(0)
    with pytest.raises(ValueError, match="last dim"):
        OnlineHadamard(16)(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="unknown online transform kind"):
        transform_from_spec({"kind": "kronecker", "size": 4, "seed": 0})


def test_rotated_input_quantizes_the_rotated_activation():
    """RotatedInput(T, SimQuantLinear W4A4): the activation fake-quant sees x H, not x."""
    from lmpress.quant.primitives import fake_quantize

    torch.manual_seed(0)
    lin = nn.Linear(160, 24, bias=False)
    T = OnlineHadamard(160, 1)
    sim = SimQuantLinear(lin, W4A4)
    mod = RotatedInput(T, sim)
    x = torch.randn(4, 160)
    x[:, 3] = 40.0  # an outlier channel: rotation spreads it
    expected = fake_quantize(T(x), W4A4.inputs) @ lin.weight.T
    assert torch.allclose(mod(x), expected, atol=1e-5)
    err_rot = (mod(x) - T(x) @ lin.weight.T).pow(2).mean()
    err_plain = (sim(x) - x @ lin.weight.T).pow(2).mean()
    assert err_rot < err_plain
    assert mod.in_features == 160 and mod.out_features == 24


# ----------------------------------------------------------------------------- stage options


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"kind": "givens"}, "rotate.kind"),
        ({"online": ["down_proj", "v_proj"]}, "unknown entr"),
        ({"online": "qk"}, "must be a list"),
        ({"online": ["qk", "qk"]}, "twice"),
        ({"r2": "yes"}, "rotate.r2"),
        ({"seed": -1}, "rotate.seed"),
        ({"angle": 3}, "unknown option"),
        ({"block": 24}, "a power of two"),
        ({"block": 32, "kind": "random"}, "kind: hadamard"),
    ],
)
def test_rotate_stage_options_are_validated(opts, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"schemes": {"re:.*": "W4A4"}, "stages": [{"rotate": opts}]})


def test_fuse_norms_has_no_options():
    with pytest.raises(RecipeError, match="unknown option"):
        Recipe.from_dict({"schemes": {"re:.*": "W4A4"}, "stages": [{"fuse_norms": {"eps": 1}}]})


@pytest.mark.parametrize("name", QUAROT_RECIPES)
def test_builtin_recipes_round_trip(name):
    if "gptq" in name and "gptq" not in STAGES and not _gptq_registered():
        pytest.skip("the gptq stage is not registered yet")
    r = Recipe.load(name)
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert r.name == name
    assert r.scheme_for("lm_head") is None
    s = r.scheme_for("model.layers.0.mlp.down_proj")
    assert (s.weights.bits, s.weights.granularity, s.weights.symmetric) == (4, "channel", True)
    assert (s.inputs.bits, s.inputs.granularity, s.inputs.dynamic) == (4, "token", True)
    if "kv4" in name:
        assert s.weights.mse_clip and s.inputs.clip_ratio == 0.9  # QuaRot's weight and activation clipping
    else:
        assert s == W4A4
    if "kv4" in name:
        kv = r.kv_args
        assert kv.bits == 4 and kv.key_granularity == "token" and kv.residual == 0
        assert [s.name for s in r.stages][:3] == ["fuse_norms", "rotate", "kv_cache"]
        rot = r.stages[1]
        assert rot.kind == "hadamard" and rot.online == ("down_proj", "qk") and rot.r2
    else:
        assert r.kv_args is None and [s.name for s in r.stages] == ["rtn"]


def _gptq_registered() -> bool:
    from lmpress.compress.stage import load_builtin_stages

    load_builtin_stages()
    return "gptq" in STAGES


# ----------------------------------------------------------------------------- compress + checkpoint


def test_quarot_rtn_quantizes_every_linear_with_rotated_inputs(tiny, tokens):
    model, _ = tiny
    report = compress(model, _quarot_rtn())
    plan = model.lmpress_meta["plan"]
    assert len(plan) == 14 and all(k.endswith("down_proj.linear") for k in plan if "down_proj" in k)
    for i in range(2):
        down = model.model.layers[i].mlp.down_proj
        assert isinstance(down, RotatedInput) and isinstance(down.linear, SimQuantLinear) and down.linear.quantized
    assert "rotation" in report.extra and report.extra["kv_cache"]["bits"] == 4
    assert model.config._attn_implementation == "lmpress"
    assert torch.isfinite(_logits(model, tokens)).all()


def test_save_load_with_online_transforms_reproduces_logits(tiny, tokens, tmp_path):
    model, tok = tiny
    compress(model, _quarot_rtn())
    sim = _logits(model, tokens)
    out = save(model, tmp_path / "q", tokenizer=tok)
    manifest = json.loads((out / "config.json").read_text())["quantization_config"]
    assert manifest["format_version"] == ckpt.FORMAT_VERSION_ONLINE
    block = manifest["lmpress"]
    online = block["online_transforms"]
    assert {(o["apply"], o["size"]) for o in online} == {("input", 160), ("qk", 16)} and len(online) == 4
    assert all(set(o) == {"where", "apply", "kind", "size", "seed"} and o["kind"] == "hadamard" for o in online)
    assert sorted(block["attention"]["kv_cache"]) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert block["attention"]["implementation"] == "lmpress"
    assert "model.layers.0.mlp.down_proj.linear" in manifest["modules"]
    loaded = load(out)
    assert loaded.config._attn_implementation == "lmpress"
    down = loaded.model.layers[0].mlp.down_proj
    assert isinstance(down, RotatedInput) and isinstance(down.linear, PackedLinear)
    assert (_logits(loaded, tokens) - sim).abs().max().item() <= 1e-4
    # an online transform on o_proj's input too, and a float (unquantized) wrapped o_proj
    model2, _ = tiny_llama(seed=0)
    recipe = {"schemes": {"lm_head": None, "o_proj": None, "re:.*": "W4A4"},
              "stages": [{"rotate": {"online": ["down_proj", "o_proj"]}}, "rtn"]}
    compress(model2, Recipe.from_dict(recipe))
    assert isinstance(model2.model.layers[1].self_attn.o_proj, RotatedInput)
    assert isinstance(model2.model.layers[1].self_attn.o_proj.linear, nn.Linear)
    out2 = save(model2, tmp_path / "r")
    loaded2 = load(out2)
    assert isinstance(loaded2.model.layers[1].self_attn.o_proj, RotatedInput)
    assert (_logits(loaded2, tokens) - _logits(model2, tokens)).abs().max().item() <= 1e-4


def test_block_rotation_with_nvfp4_saves_loads_and_refuses_a_block_that_does_not_divide(tiny, tokens, tmp_path):
    """NVFP4 W4A4 after block-16 rotations (online R4 in blocks too): the packed model reproduces
    the simulated logits, and the manifest records the block; a block of 64 does not divide the
    tiny model's FFN width (160) and is refused before anything changes."""
    model, tok = tiny
    recipe = {"schemes": {"lm_head": None, "re:.*": {"preset": "NVFP4", "inputs": {"dynamic": True}}},  # RTN: no calibration
              "stages": ["fuse_norms", {"rotate": {"online": ["down_proj"], "block": 16}}, "rtn"]}
    compress(model, Recipe.from_dict(recipe))
    out = save(model, tmp_path / "b", tokenizer=tok)
    online = json.loads((out / "config.json").read_text())["quantization_config"]["lmpress"]["online_transforms"]
    assert {o["block"] for o in online} == {16}
    assert (_logits(load(out), tokens) - _logits(model, tokens)).abs().max().item() <= 1e-4
    assert Recipe.from_dict(recipe).to_dict()["stages"][1]["rotate"]["block"] == 16
    assert "block" not in Recipe.from_dict({"schemes": {}, "stages": ["rotate"]}).to_dict()["stages"][0]["rotate"]
    bad, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="rotate.block=64 does not divide"):
        compress(bad, Recipe.from_dict({**recipe, "stages": ["fuse_norms", {"rotate": {"block": 64}}, "rtn"]}))


def test_version_1_manifest_without_lmpress_block_still_loads(tiny, tokens, tmp_path):
    model, _ = tiny
    compress(model, "w4a4-rtn")
    out = save(model, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format_version"] == 1 and "lmpress" not in cfg["quantization_config"]
    loaded = load(out)
    assert (_logits(loaded, tokens) - _logits(model, tokens)).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_rotations_keep_logits_fp32():
    """SmolLM2-135M in fp32: fuse_norms + R1 (576 = 36·16) + R2 + R3 + R4 (1536 = 12·128):
    relative max logit difference <= 1e-4 on one short forward."""
    from lmpress.compress.models import load_model

    model, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is Paris. It has many museums, " * 4, return_tensors="pt").input_ids
    ref = _logits(model, ids)
    _apply(model, ("fuse_norms", {}), ("rotate", {"kind": "hadamard", "online": ["down_proj", "qk"]}))
    out = _logits(model, ids)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel


@pytest.mark.parametrize("recipe", ["w4a16-quarot-gptq", "w3a16-quarot-gptq", "w4a16-spinquant-gptq", "w4a16-quarot-gptaq",
                                    "w3a16-quarot-gptaq"])
def test_weight_only_rotations_leave_a_plain_model_that_stock_transformers_loads(recipe, tokens, tmp_path):
    """R1 and R2 all offline: no online module, a compressed-tensors artifact with no lmpress block,
    and stock transformers + compressed-tensors computing load()'s logits (<= 1e-4 relative)."""
    pytest.importorskip("compressed_tensors")
    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.eval.stock import stock_logits

    toks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(tokens=toks, source="random", split="calib", n=8, seqlen=32, seed=0, fingerprint=fingerprint(toks))
    model, tok = tiny_llama(seed=0, hidden_size=128, intermediate_size=192, num_attention_heads=8)
    compress(model, recipe, calib)
    assert not any(isinstance(m, RotatedInput) for m in model.modules())
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: rotated on its own
    path = save(model, tmp_path / recipe, tokenizer=tok)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "lmpress" not in qc
    ours = _logits(load(path), tokens)
    assert torch.equal(ours, _logits(model, tokens))
    stock = stock_logits([path], tokens)[str(path)]
    assert ((stock - ours).abs().max() / ours.abs().max()).item() <= 1e-4
