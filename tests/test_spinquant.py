"""Learned rotations (SpinQuant-style): Cayley SGD, the rotated training forward against the
fused model, the stage, the recipe."""
import pytest
import torch

from lmpress.compress import Recipe, RecipeError, compress
from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama
from lmpress.compress.pipeline import build_plan
from lmpress.compress.report import Report
from lmpress.compress.stage import Context, make_stage
from lmpress.quant.rotate import fuse_norms, rotate_model, rotation_matrix
from lmpress.quant.scheme import W4A4, QuantScheme
from lmpress.quant.spinquant import CayleySGD, LearnArgs, RotatedForward, cayley_retract, learn_rotations, orthogonality_error
from lmpress.compress.surgery import untie_embeddings

from test_rotate import f64_rmsnorm  # noqa: F401  (fixture)

W4A4_ALL = {"schemes": {"lm_head": None, "re:.*": "W4A4"}, "stages": ["rtn"]}


def test_cayley_retraction_stays_orthogonal_and_descends():
    """Orthogonal Procrustes: min ‖X A − B‖² over orthogonal X, with B = T A for an orthogonal T.
    Cayley SGD keeps X orthogonal to rounding and drives the loss to ~0."""
    g = torch.Generator().manual_seed(0)
    n = 24
    A = torch.randn(n, 64, generator=g, dtype=torch.float64)
    T = rotation_matrix(n, "random", 3)
    B = T @ A
    X = rotation_matrix(n, "hadamard", 1).clone().requires_grad_(True)
    opt = CayleySGD([X], lr=0.5, momentum=0.5)

    def loss():
        return (X @ A - B).pow(2).sum() / B.pow(2).sum()

    first = loss().item()
    for _ in range(300):
        value = loss()
        value.backward()
        opt.step()
        assert orthogonality_error(X) < 1e-12
    assert first > 0.5 and loss().item() < 1e-3
    # one huge step is still orthogonal (the step is capped and the retraction is exact)
    Y = cayley_retract(X.detach(), torch.randn(n, n, generator=g, dtype=torch.float64) * 1e6, lr=100.0)
    assert orthogonality_error(Y) < 1e-12


def _fused_tiny(**overrides):
    model, _ = tiny_llama(seed=5, dtype=torch.float64, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    arch = arch_for(model)
    untie_embeddings(model, arch)
    fuse_norms(model, arch)
    return model, arch


def _random_rotations(model, arch, seed=0):
    hidden, d = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    R1 = rotation_matrix(hidden, "random", seed)
    R2 = [rotation_matrix(d, "random", seed + 1 + i) for i in range(len(arch.decoder_layers(model)))]
    return R1, R2


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 3}])
def test_training_forward_equals_the_fused_model(f64_rmsnorm, tokens, overrides, monkeypatch):
    """The learning loop's forward (rotations applied to the weights on the fly, hooks on the
    embedding and head) is the model `rotate_model` fuses: float (no quantization) equals the
    original model's logits; with W4A4 fake-quant it equals the fused model quantized by RTN."""
    import lmpress.quant.sim as sim_module

    model, arch = _fused_tiny(**overrides)
    with torch.no_grad():
        ref = model(tokens).logits
    plan = build_plan(model, Recipe.from_dict(W4A4_ALL))
    R1, R2 = _random_rotations(model, arch)
    rf = RotatedForward(model, arch, plan, online_down=True, seed=0)
    rf.R1, rf.R2 = R1, R2
    with rf, torch.no_grad():
        rf.quantize = False
        float_out = rf.logits(tokens)
        rf.quantize = True
        quant_out = rf.logits(tokens)
    assert (float_out - ref).abs().max().item() <= 1e-8
    assert (quant_out - ref).abs().max().item() > 1e-3  # it did quantize
    rotate_model(model, arch, online=("down_proj",), r2=True, seed=0, r1_matrix=R1, r2_matrices=R2)
    with torch.no_grad():
        assert (model(tokens).logits - ref).abs().max().item() <= 1e-8
    compress(model, Recipe.from_dict({**W4A4_ALL, "schemes": {"lm_head": None, "re:.*": W4A4.to_dict()}}))
    with torch.no_grad():
        sim = model(tokens).logits
        # the learning loop fake-quantizes (dequantized operands rounded to fp32); the simulation scales the
        # exact integer sum (`int_linear`): apart by that rounding, and equal when it fake-quantizes too
        assert (sim - quant_out).abs().max().item() <= 1e-6
        monkeypatch.setattr(sim_module, "int_factored", lambda weights, inputs: False)
        assert (model(tokens).logits - quant_out).abs().max().item() <= 1e-8


def _learn(model, tokens, fuse=True, **opts):
    arch = arch_for(model)
    plan = build_plan(model, Recipe.from_dict(W4A4_ALL))

    class Calib:
        pass

    Calib.tokens = tokens
    ctx = Context(arch=arch, plan=plan, calib=Calib, report=Report())
    with torch.no_grad():
        if fuse:
            make_stage("fuse_norms", {}).apply(model, ctx)
        make_stage("learn_rotation", opts).apply(model, ctx)
    return ctx


def test_learn_rotation_reduces_the_quantized_loss_and_keeps_the_float_model(f64_rmsnorm):
    model, _ = tiny_llama(seed=0, dtype=torch.float64)
    toks = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(toks[:2]).logits
    ctx = _learn(model, toks, steps=30, lr=1.5, loss="kl", seed=0)
    info = ctx.report.extra["learn_rotation"]
    assert info["final_loss"] < 0.95 * info["init_loss"]  # KL to the float model, W4A4 fake-quant
    assert info["orthogonality_error"] < 1e-12 and len(info["losses"]) == 30
    with torch.no_grad():  # nothing is quantized yet: the fused, rotated float model is the original
        assert (model(toks[:2]).logits - ref).abs().max().item() <= 1e-8
    assert any(k.endswith("down_proj.linear") for k in ctx.plan)
    assert ctx.report.extra["rotation"]["r1"]["kind"] == "learned"


def test_activation_only_learning_reduces_the_a4_loss(f64_rmsnorm):
    """With the weights left to GPTQ, the only signal is the activations' quantization error, which
    reaches the rotation through the per-token scale (`fake_quantize_ste`); with the qparams
    detached, the STE gradient is the float model's and the rotation drifts instead."""
    model, _ = tiny_llama(seed=0, dtype=torch.float64)
    toks = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    ctx = _learn(model, toks, steps=30, lr=1.5, loss="kl", weights=False, seed=0)
    info = ctx.report.extra["learn_rotation"]
    assert info["final_loss"] < 0.95 * info["init_loss"], info


def test_keep_best_restores_the_initial_rotations_when_learning_hurts(f64_rmsnorm):
    """Steps far too large (max_step 20) scramble the rotations: the held-out loss rises, and
    `keep_best` hands back the initial Hadamards exactly; without it the scrambled ones come back."""
    model, arch = _fused_tiny()
    plan = build_plan(model, Recipe.from_dict(W4A4_ALL))
    toks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    bad = dict(steps=4, lr=100.0, max_step=20.0, momentum=0.0, loss="kl", seed=0)
    kept = learn_rotations(model, arch, plan, toks, LearnArgs(**bad))
    assert kept["kept"] == "initial" and kept["heldout_final"] >= kept["heldout_init"]
    assert torch.equal(kept["r1"], rotation_matrix(model.config.hidden_size, "hadamard", 0))
    free = learn_rotations(model, arch, plan, toks, LearnArgs(**bad, keep_best=False))
    assert free["kept"] == "learned" and not torch.equal(free["r1"], kept["r1"])


def test_learn_rotation_refuses_a_quantized_model(tiny, tokens):
    model, _ = tiny
    compress(model, "w4a4-rtn")
    with pytest.raises(ValueError, match="before quantization"):
        _learn(model, tokens, fuse=False, steps=1)


@pytest.mark.parametrize(
    "opts, match",
    [({"loss": "mse"}, "loss"), ({"lr": 0}, "lr"), ({"steps": 0}, "steps"), ({"online": ["o_proj"]}, "online"),
     ({"momentum": 1.0}, "momentum"), ({"init": "identity"}, "init"), ({"samples": 0}, "samples"), ({"seqlen": 1}, "seqlen")],
)
def test_learn_rotation_options_are_validated(opts, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"schemes": {"re:.*": "W4A4"}, "stages": [{"learn_rotation": opts}]})


@pytest.mark.parametrize("name, last", [("w4a4kv4-spinquant-gptq", "gptq"), ("w4a4kv4-spinquant-rtn", "rtn")])
def test_spinquant_recipes_round_trip(name, last):
    r = Recipe.load(name)
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert [s.name for s in r.stages] == ["fuse_norms", "learn_rotation", "kv_cache", last]
    assert r.needs_calibration and r.kv_args.bits == 4 and r.scheme_for("lm_head") is None


def test_activation_only_learning_leaves_the_weights_unquantized(f64_rmsnorm, tokens):
    """`weights: false` (SpinQuant's setting when GPTQ follows): the learning forward quantizes
    only the linear inputs, so it equals the rotated model with A4 fake-quant and float weights."""
    model, arch = _fused_tiny()
    plan = build_plan(model, Recipe.from_dict(W4A4_ALL))
    R1, R2 = _random_rotations(model, arch)
    outs = {}
    for weights in (True, False):
        rf = RotatedForward(model, arch, plan, online_down=True, seed=0, weights=weights)
        rf.R1, rf.R2 = R1, R2
        with rf, torch.no_grad():
            outs[weights] = rf.logits(tokens)
            q = rf.overrides()[f"{arch.layers}.0.{arch.q_proj}.weight"]
        W_R1 = model.get_submodule(f"{arch.layers}.0.{arch.q_proj}").weight @ R1  # float, rotated
        assert torch.equal(q, W_R1) == (not weights)
    a_only = {k: QuantScheme(weights=None, inputs=s.inputs) if s is not None else None for k, s in plan.items()}
    rf = RotatedForward(model, arch, a_only, online_down=True, seed=0)
    rf.R1, rf.R2 = R1, R2
    with rf, torch.no_grad():
        assert (rf.logits(tokens) - outs[False]).abs().max().item() <= 1e-8
    assert (outs[True] - outs[False]).abs().max().item() > 1e-4


@pytest.mark.parametrize("weights", [False, True])
def test_layer_loss_learning_lowers_the_site_error_and_keeps_the_float_model(f64_rmsnorm, weights):
    """`loss: layer`: the local objective falls, on held-out tokens too (keep_best keeps the
    learned rotations), the rotations stay orthogonal, and the fused float model is the original."""
    model, _ = tiny_llama(seed=0, dtype=torch.float64)
    toks = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(toks[:2]).logits
    ctx = _learn(model, toks, steps=60, lr=1.0, max_step=0.1, loss="layer", weights=weights, rows=256, row_batch=128)
    info = ctx.report.extra["learn_rotation"]
    assert info["final_loss"] < 0.9 * info["init_loss"], info
    assert info["kept"] == "learned" and info["heldout_final"] < info["heldout_init"]
    assert info["orthogonality_error"] < 1e-12
    with torch.no_grad():
        assert (model(toks[:2]).logits - ref).abs().max().item() <= 1e-8


def test_layer_site_loss_with_the_gram_matrix_is_the_output_error():
    """With float weights the site loss uses e G eᵀ (G = Wᵀ W): the same number as forming the
    readers' output error y = Q(x R)(W R)ᵀ − x Wᵀ directly, for R1 and per-head R2 sites."""
    from lmpress.quant.spinquant_local import Site, site_loss

    g = torch.Generator().manual_seed(0)
    n, d, out, rows = 48, 8, 20, 64
    X = torch.randn(rows, n, generator=g)
    X[:, 3] *= 30  # an outlier channel
    W = torch.randn(out, n, generator=g)
    act = W4A4.inputs
    for kind, R in (("r1", rotation_matrix(n, "random", 1)), ("r2", rotation_matrix(d, "random", 2))):
        site = Site(kind, 0, act, W, [(out, None)], G=W.T @ W, X=X)
        gram = site_loss(site, X, R.float(), weights=False)
        direct = site_loss(site, X, R.float(), weights=True)  # wargs None: float weights, formed directly
        assert torch.allclose(gram, direct, rtol=1e-4), (kind, gram, direct)
        assert gram > 0
