"""The architectures beyond LLaMA: the records (Qwen3, Gemma 3, Phi-3 with its fused linears split
when a stage needs the parts), the generic path (Mixtral and Qwen3-MoE with their experts split,
GPT-NeoX; Phi-3 for weight-only recipes), the per-layer arguments of mixed layer types, and the refusals.
Tiny seeded models of each family (`tiny_model`); `bench/architectures.py` prints the whole
family x recipe matrix."""
import json

import pytest
import torch
from torch import nn

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.compress import Recipe, arch_for, compress, load, save
from lmpress.compress.arch import discover
from lmpress.compress.models import float64_norms, load_model, tiny_model
from lmpress.compress.pipeline import prepare
from lmpress.compress.report import Report
from lmpress.compress.stage import Context, make_stage
from lmpress.eval.stock import stock_logits
from lmpress.quant.rotate import norms_fused

SHAPE = dict(hidden_size=128, intermediate_size=192, num_attention_heads=8)  # groups of 64 divide every input width
FAMILIES = ["llama", "qwen3", "gemma3", "phi3", "mixtral", "qwen3_moe", "gpt_neox"]


@pytest.fixture
def calib():
    toks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=8, seqlen=32, seed=0, fingerprint=fingerprint(toks))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# ----------------------------------------------------------------------------- layer types


def test_each_layer_gets_its_own_mask_and_rotary(tokens):
    """Gemma 3's sliding-window and global layers take different masks and RoPE: the runner's
    propagated hidden states equal the model's own, exactly (layer 0's arguments for every layer
    were off by several units here)."""
    model, _ = tiny_model("gemma3", **SHAPE)
    tokens = torch.randint(0, 256, (4, 20), generator=torch.Generator().manual_seed(0))  # longer than the window of 8
    runner = LayerwiseRunner(model, arch_for(model), tokens, batch_size=2)
    batches = runner.capture()
    assert batches[0].by_layer is not None
    masks = [kw["attention_mask"] for kw in batches[0].by_layer]
    assert masks[0] is masks[2] and masks[1] is not masks[0]  # sliding, global (None: sdpa's own causal mask), sliding
    for _ in runner:
        pass
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        _logits(model, tokens)
    finally:
        hook.remove()
    assert torch.equal(torch.cat(runner.outputs), seen[0])
    llama, _ = tiny_model("llama")
    assert LayerwiseRunner(llama, arch_for(llama), tokens, batch_size=2).capture()[0].by_layer is None  # one type: shared


# ----------------------------------------------------------------------------- records and discovery


def test_records_and_discovered_groups():
    names = {f: arch_for(tiny_model(f, **SHAPE)[0]) for f in FAMILIES}
    assert not names["qwen3"].generic and names["qwen3"].qk_norm
    g = names["gemma3"]
    assert g.norm_offset == 1.0 and g.norm_readers["pre_feedforward_layernorm"] == ("mlp.gate_proj", "mlp.up_proj")
    assert {"rotate", "learn_rotation", "rope_scale", "rotate_kv"} <= set(g.refuses)
    assert names["phi3"].generic and names["phi3"].sequential_groups == (  # unsplit: the fused linears, weight-only
        ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))
    assert names["mixtral"].sequential_groups == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
    # (before `split_experts`: the fused experts are 3-D parameters, not linears)
    assert names["gpt_neox"].layers == "gpt_neox.layers" and names["gpt_neox"].lm_head == "lm_head"
    assert names["gpt_neox"].sequential_groups[0] == ("attention.query_key_value",)

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"unsupported architecture NoLayers: no decoder layers found"):
        discover(NoLayers())


# ----------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("family, stages", [
    ("phi3", [("fuse_norms", {})]),
    ("phi3", [("smoothquant", {"alpha": 0.5})]),
    ("phi3", [("fuse_norms", {}), ("rotate", {"kind": "hadamard", "online": ["down_proj", "qk"], "r2": True})]),
    ("qwen3", [("fuse_norms", {})]),
    ("qwen3", [("smoothquant", {"alpha": 0.5})]),
    ("qwen3", [("fuse_norms", {}), ("rotate", {"kind": "hadamard", "online": ["down_proj", "qk"], "r2": True})]),
    ("gemma3", [("fuse_norms", {})]),
    ("gemma3", [("smoothquant", {"alpha": 0.5})]),
], ids=["phi3-fuse", "phi3-smooth", "phi3-rotate", "qwen3-fuse", "qwen3-smooth", "qwen3-rotate", "gemma3-fuse",
        "gemma3-smooth"])
def test_transforms_keep_logits_float64(family, stages, calib, tokens):
    """Float64, max |logit diff| <= 1e-8 (Phi-3's qkv_proj / gate_up_proj split into parts first:
    exact too); Gemma's norms fold their (1 + w) gain, not w."""
    with float64_norms():
        model, _ = tiny_model(family, seed=1, dtype=torch.float64, **SHAPE)
        ref = _logits(model, tokens)
        arch = prepare(model, Recipe.from_dict({"version": 1, "name": "t", "schemes": {}, "stages": [{n: o} for n, o in stages]}))
        assert (_logits(model, tokens) - ref).abs().max().item() <= 1e-8  # the split alone
        q = model.model.layers[0].get_submodule(arch.q_proj).weight.clone()
        ctx = Context(arch=arch, plan={}, report=Report(), calib=calib)
        with torch.no_grad():
            for name, opts in stages:
                make_stage(name, opts).apply(model, ctx)
        assert (_logits(model, tokens) - ref).abs().max().item() <= 1e-8
    assert not torch.equal(model.model.layers[0].get_submodule(arch.q_proj).weight, q)  # it did change the model
    if stages[0][0] == "fuse_norms":
        assert norms_fused(model, ctx.arch)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("family, recipe, message", [
    ("gemma3", "w4a4kv4-quarot-rtn", r"stage 'rotate' cannot run on Gemma3ForCausalLM: R1 rotates the residual stream, but "
                                     r"post_attention_layernorm, post_feedforward_layernorm normalize"),
    ("gemma3", "kv2-rotatekv", r"stage 'rotate_kv' cannot run on Gemma3ForCausalLM: its sliding-window and global layers"),
    ("qwen3", "w4afp8-fireq", r"stage 'rope_scale' cannot run on Qwen3ForCausalLM: q_norm / k_norm renormalize"),
    ("gpt_neox", "w8a8-smoothquant-rtn", r"stage 'smoothquant' cannot run on GPTNeoXForCausalLM \(discovered, no record\): it "
                                         r"needs an architecture record .* weight-only stages rtn, gptq"),
    ("mixtral", "w4a4kv4-quarot-rtn", r"stage 'fuse_norms' cannot run on MixtralForCausalLM: the MLP is a mixture of experts: "
                                      r"its input norm feeds the router and every expert"),
    ("qwen3_moe", "w4a16-awq", r"stage 'awq' cannot run on Qwen3MoeForCausalLM: the MLP is a mixture of experts"),
], ids=["gemma3-rotate", "gemma3-rotatekv", "qwen3-fireq", "gpt_neox-smoothquant", "mixtral-quarot", "qwen3_moe-awq"])
def test_refusals_name_the_stage_and_change_nothing(family, recipe, message, calib):
    model, _ = tiny_model(family, **SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        compress(model, recipe, calib)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- artifacts per family

def test_every_family_takes_w4a16_gptq_and_w8a8_and_loads_in_stock_transformers(tmp_path, calib, tokens, monkeypatch):
    """w4a16-gptq and w8a8-rtn on every family (records and discovered): `load()` gives the
    simulated logits exactly; stock transformers + compressed-tensors within 1e-4 relative, but for
    the mixture-of-experts families, whose experts are quantized one by one (lmpress-packed). W8A8 is
    compared run the fake-quant way, as compressed-tensors' forward runs it (ours sums the integer codes,
    `int_linear`: rounding apart per layer)."""
    import lmpress.quant.sim as sim_module

    pytest.importorskip("compressed_tensors")
    ours = {}
    for family in FAMILIES:
        for recipe in ("w4a16-gptq", "w8a8-rtn"):
            model, tok = tiny_model(family, **SHAPE)
            compress(model, recipe, calib)
            path = save(model, tmp_path / f"{family}-{recipe}", tokenizer=tok)
            qc = json.loads((path / "config.json").read_text())["quantization_config"]
            logits = _logits(load(path), tokens)
            assert torch.equal(logits, _logits(model, tokens)), (family, recipe)
            if family in ("mixtral", "qwen3_moe"):
                assert qc["format"] == "lmpress-packed" and qc["lmpress"]["experts"] == ["model.layers.0.mlp.experts",
                                                                                          "model.layers.1.mlp.experts"]
                continue
            assert qc["quant_method"] == "compressed-tensors"
            if recipe == "w8a8-rtn":
                with monkeypatch.context() as m:
                    m.setattr(sim_module, "int_factored", lambda weights, inputs: False)
                    logits = _logits(model, tokens)
            ours[str(path)] = logits
    stock = stock_logits(ours, tokens)
    for path, logits in ours.items():
        assert ((stock[path] - logits).abs().max() / logits.abs().max()).item() <= 1e-4, path


@pytest.mark.parametrize("family, recipe", [
    ("qwen3", "w4a4kv4-quarot-gptq"), ("qwen3", "w4a4kv4-flatquant"), ("qwen3", "kv2-rotatekv"), ("qwen3", "sparse24-wanda"),
    ("gemma3", "w4a4kv4-flatquant"), ("gemma3", "kv2-kivi"), ("gemma3", "kv-fp8"), ("gemma3", "sparse24-wanda"),
    ("phi3", "sparse24-wanda"), ("phi3", "w4a4kv4-quarot-gptq"), ("phi3", "w8a8-smoothquant-rtn"), ("phi3", "kv2-rotatekv"),
    ("mixtral", "kv2-kivi"), ("qwen3_moe", "kv2-rotatekv"), ("mixtral", "sparse24-wanda"),
])
def test_recorded_families_take_w4a4_kv_and_sparsity(family, recipe, calib, tokens, tmp_path):
    """The W4A4KV4, KV, smoothing and 2:4 recipes on the records (Phi-3's fused linears split into
    parts; 2:4 on it through the generic path): the
    reloaded artifact gives the simulated logits, which differ from the base model's but not
    beyond recognition (random tiny models: 2:4 pruning alone moves their logits by ~0.6-1.0)."""
    model, tok = tiny_model(family, **SHAPE)
    if recipe.startswith("kv"):  # past KIVI's 128 full-precision tokens
        tokens = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(2))
    base = _logits(model, tokens)
    compress(model, recipe, calib)
    sim = _logits(model, tokens)
    assert torch.equal(_logits(load(save(model, tmp_path / "a", tokenizer=tok)), tokens), sim)
    rel = ((sim - base).norm() / base.norm()).item()
    assert 0 < rel < 1.2, rel
    if recipe.startswith("sparse24"):
        arch = arch_for(model)
        w = arch.decoder_layers(model)[0].get_submodule(arch.sequential_groups[-1][0]).weight.detach()
        assert ((w.reshape(-1, 4) != 0).sum(-1) <= 2).all()


def test_any_causal_lm_loads_from_a_directory(tmp_path):
    """A family without a record loads (the weight-only stages discover it); the larger-than-memory
    path, which needs a record, refuses it with the reason, and refuses fused linears (Phi-3)."""
    from lmpress.compress.lazy import compress_lazy

    for family, message in (("gpt_neox", r"needs an architecture record, and GPTNeoXForCausalLM has none"),
                            ("phi3", r"does not split fused linears or mixture-of-experts experts yet")):
        ref, tok = tiny_model(family, **SHAPE)
        ref.save_pretrained(tmp_path / family)
        tok.save_pretrained(tmp_path / family)
        model, _ = load_model(str(tmp_path / family))
        assert type(model).__name__ == type(ref).__name__
        with pytest.raises(ValueError, match=message):
            compress_lazy(tmp_path / family, Recipe.load("w4a16-rtn"), out=tmp_path / f"{family}-out")


# ----------------------------------------------------------------------------- mixture of experts


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_are_split_calibrated_on_every_token_and_packed(family, calib, tokens, tmp_path):
    """transformers 5's fused experts become one linear pair per expert computing the same logits
    exactly; GPTQ then quantizes every expert from all calibration tokens (an expert is reached by
    its routed share only, reported); the router stays in high precision; the packed artifact
    reloads to the same logits."""
    from lmpress.kernels.experts import ExpertLinears, split_experts

    model, tok = tiny_model(family, **SHAPE)
    ref = _logits(model, tokens)
    assert split_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert torch.equal(_logits(model, tokens), ref)
    arch = arch_for(model)
    assert arch.sequential_groups[2:] == tuple((f"mlp.experts.gate_up.{e}",) for e in range(4)) + tuple(
        (f"mlp.experts.down.{e}",) for e in range(4))
    assert isinstance(model.model.layers[0].mlp.experts, ExpertLinears)
    report = compress(model, "w4a16-gptq", calib)
    for k in ("gate_up", "down"):  # every expert's Hessian from every calibration token
        assert {report.modules[f"model.layers.0.mlp.experts.{k}.{e}"]["tokens"] for e in range(4)} == {calib.tokens.numel()}
    shares = report.extra["experts"]["model.layers.0.mlp.experts"]
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-3 and min(shares) > 0
    assert not any("gate" in f and "gate_up" not in f for f in report.modules)  # the router is not quantized
    assert all(f"model.layers.1.mlp.experts.{k}.{e}" in report.modules for k in ("gate_up", "down") for e in range(4))
    sim = _logits(model, tokens)
    assert torch.equal(_logits(load(save(model, tmp_path / "a", tokenizer=tok)), tokens), sim)
    assert 0 < ((sim - ref).norm() / ref.norm()).item() < 0.5


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3", "mixtral"])
def test_lm_eval_runs_per_family(family, calib, tmp_path):
    """lm-eval (offline, a bundled task) on the simulated model and on its reloaded packed
    checkpoint: the same scores up to float rounding, for a record, a discovered family and split
    experts."""
    from lmpress.eval.harness import run_tasks

    model, tok = tiny_model(family, **SHAPE)
    compress(model, "w4a16-rtn", calib)
    packed = load(save(model, tmp_path / "a", tokenizer=tok))
    sim, pk = (run_tasks(m, tok, tasks=["lmpress_wiki_ppl"], limit=2, batch_size=2).metrics() for m in (model, packed))
    assert sim["lmpress_wiki_ppl/bits_per_byte"] > 0
    for k in sim:
        assert pk[k] == pytest.approx(sim[k], rel=1e-3, abs=1e-6), (family, k)


def test_phi3_splits_its_fused_linears_only_when_a_stage_needs_the_parts(calib, tmp_path, tokens):
    """Weight-only: qkv_proj / gate_up_proj quantized as they are (compressed-tensors, stock-loadable).
    A transform: split into q/k/v and gate/up (exact), recorded in the lmpress block, and load()
    splits the skeleton again."""
    from lmpress.kernels.fused import SplitLinear

    model, tok = tiny_model("phi3", **SHAPE)
    compress(model, "w4a16-rtn", calib)
    assert not isinstance(model.model.layers[0].self_attn.qkv_proj, SplitLinear)
    model, tok = tiny_model("phi3", **SHAPE)
    compress(model, "w8a8-smoothquant-rtn", calib)
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, SplitLinear)
    path = save(model, tmp_path / "a", tokenizer=tok)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "lmpress-packed" and qc["lmpress"]["fused"][:2] == ["model.layers.0.mlp.gate_up_proj",
                                                                                 "model.layers.0.self_attn.qkv_proj"]
    assert torch.equal(_logits(load(path), tokens), _logits(model, tokens))


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_kv2_runtime_cache_decodes_what_the_simulation_computes(family):
    """KIVI-2 on each record, float64: token-by-token decoding through the runtime cache gives the
    full forward's logits (Gemma 3: 28 tokens past its sliding window of 8)."""
    from transformers import DynamicCache

    from lmpress.kernels.kv_cache import QuantizedKVCache, cache_kwargs

    model, _ = tiny_model(family, dtype=torch.float64, **SHAPE)
    compress(model, Recipe.from_dict({"version": 1, "name": "kv", "schemes": {},
                                      "kv_cache": {"bits": 2, "group_size": 8, "residual": 8}, "stages": [{"kv_cache": {}}]}))
    tokens = torch.randint(0, 256, (2, 28), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens).logits
        assert (full - tiny_model(family, dtype=torch.float64, **SHAPE)[0](tokens).logits).abs().max() > 1e-6  # quantized
        for cache in (DynamicCache(config=model.config), QuantizedKVCache(model)):
            steps = [model(tokens[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits for t in range(tokens.shape[1])]
            assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-10, type(cache).__name__
