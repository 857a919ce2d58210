"""Lazy (larger-than-memory) compression: the streamed artifact equals the in-memory one,
one layer at a time, spilled activations, refusals."""
import pytest
import torch

from _lazy_util import calib, tensors, write_tiny
from lmpress.compress import compress, load, save
from lmpress.compress import lazy
from lmpress.compress.checkpoint import read_manifest
from lmpress.compress.lazy import LazyError, compress_lazy
from lmpress.compress.models import tiny_llama

SMOOTH_GPTQ = """
version: 1
name: w8a8-smoothquant-gptq
schemes: {lm_head: null, re:.*: W8A8}
stages: [{smoothquant: {alpha: 0.8}}, {gptq: {block_size: 8}}]
"""


def _quick(name: str) -> str:
    """A built-in flatquant recipe trained for one epoch on 4 sequences: the same code, the test's time."""
    from lmpress.compress import Recipe

    return Recipe.load(name).to_yaml().replace("epochs: 2", "epochs: 1").replace("samples: 32", "samples: 4")


STRUCTURED_GPTQ = """
version: 1
name: structured-w4a16-gptq
schemes: {lm_head: null, re:.*: W4A16}
stages: [{structured: {ffn_keep: 0.5, heads_keep: 0.5}}, {gptq: {block_size: 8}}]
"""
STRUCTURED_QUAROT = """
version: 1
name: structured-quarot-rtn
schemes: {lm_head: null, re:.*: W4A16}
stages: [{structured: {ffn_keep: 0.75}}, fuse_norms, {rotate: {online: []}}, rtn]
"""
SPARSEGPT_RTN = """
version: 1
name: sparsegpt-w4a16-rtn
schemes: {lm_head: null, re:.*: {preset: W4A16, sparsity: '2:4'}}
stages: [{sparsegpt: {structure: '2:4', block_size: 16}}, rtn]
"""
WANDA_GPTQ = """
version: 1
name: wanda-w4a16-gptq
schemes: {lm_head: null, re:.*: {preset: W4A16, sparsity: '2:4'}}
stages: [{wanda: {structure: '2:4'}}, {gptq: {block_size: 8}}]
"""
NVFP4_BLOCK_GPTQ = """
version: 1
name: nvfp4-block-rotation-gptq
schemes: {lm_head: null, re:.*: NVFP4}
stages: [fuse_norms, {rotate: {online: [down_proj], block: 16}}, {gptq: {block_size: 16}}]
"""
RECIPES = ["w4a16-rtn", "w4a16-gptq", "w4a4kv4-quarot-rtn", "w4a4kv4-quarot-gptq", "w8a8-smoothquant-rtn", SMOOTH_GPTQ, "kv2-rotatekv",
           _quick("w4a4kv4-flatquant"), _quick("w4a4kv4-flatquant-gptq"), STRUCTURED_GPTQ, STRUCTURED_QUAROT,
           SPARSEGPT_RTN, WANDA_GPTQ, NVFP4_BLOCK_GPTQ, "w8a8-fp8",
           "sparse24-wanda", "sparse24-sparsegpt", "sparse24-sparsegpt-w4a16"]  # every per-layer stage


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("src"), layers=3)


def _name(recipe: str) -> str:
    from lmpress.compress import Recipe

    return recipe if "\n" not in recipe else Recipe.from_yaml(recipe).name


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_lazy_artifact_equals_in_memory(src, tmp_path, recipe):
    """Bitwise: structured on its stream (captured before the embeddings are rotated), smoothquant
    and rotate_kv on their transform stream, flatquant on its float and quantized streams, the
    pruners on theirs (before quantization), gptq on the compressed stream (all kept that the
    recipe needs), as in memory."""
    from lmpress.compress import Recipe

    recipe = Recipe.from_yaml(recipe) if "\n" in recipe else recipe
    torch.manual_seed(0)
    cal = calib()
    model, _ = tiny_llama(seed=0, num_hidden_layers=3)
    compress(model, recipe, calib=cal, batch_size=4)
    ref = save(model, tmp_path / "mem")
    out = tmp_path / "lazy"
    compress_lazy(src, recipe, cal, out, batch_size=4)
    a, b = tensors(ref), tensors(out)
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bitwise
    assert read_manifest(ref)[1].get("lmpress") == read_manifest(out)[1].get("lmpress")  # e.g. RotateKV's channel orders
    assert len(list(out.glob("model-*-of-00004.safetensors"))) == 4  # head/embeddings + one shard per layer
    assert (out / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "lazy.partial").exists()  # the work directory is gone
    x = torch.randint(0, 256, (1, 16))
    assert torch.equal(load(ref)(x).logits, load(out)(x).logits)


def test_one_layer_at_a_time_and_atomic_output(src, tmp_path, monkeypatch):
    seen = {}
    real_skeleton, real_materialize = lazy.skeleton, lazy.materialize
    out = tmp_path / "out"

    def skeleton(*a, **k):
        seen["model"] = real_skeleton(*a, **k)
        return seen["model"]

    def materialize(module, prefix, *a, **k):
        if prefix.startswith("model.layers."):
            layers = seen["model"].model.layers
            real = [i for i, layer in enumerate(layers) if any(not p.is_meta for p in layer.parameters())]
            assert real == [], f"layers {real} still in memory when {prefix} is read"
            assert seen["model"].model.embed_tokens.weight.is_meta  # embeddings freed after the capture
            assert not out.exists()  # nothing at the output path before the final rename
        return real_materialize(module, prefix, *a, **k)

    monkeypatch.setattr(lazy, "skeleton", skeleton)
    monkeypatch.setattr(lazy, "materialize", materialize)
    compress_lazy(src, "w4a16-gptq", calib(), out, batch_size=4)
    assert all(p.is_meta for p in seen["model"].model.layers.parameters())
    assert out.is_dir()


def test_spilled_activations_give_the_same_artifact(src, tmp_path):
    cal = calib()
    compress_lazy(src, "w4a16-gptq", cal, tmp_path / "mem", batch_size=2)
    rep = compress_lazy(src, "w4a16-gptq", cal, tmp_path / "disk", batch_size=2, spill_bytes=0,
                        work_dir=tmp_path / "offload")
    assert rep.extra["lazy"]["spilled"] is True
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "disk")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "offload").exists()


def test_spilled_streams_give_the_same_artifact(src, tmp_path):
    """Every stream read back from disk (flatquant's float targets written by the stage itself)."""
    from lmpress.compress import Recipe

    recipe = Recipe.from_yaml(_quick("w4a4kv4-flatquant-gptq"))
    cal = calib()
    compress_lazy(src, recipe, cal, tmp_path / "mem", batch_size=2)
    rep = compress_lazy(src, recipe, cal, tmp_path / "disk", batch_size=2, spill_bytes=0)
    assert rep.extra["lazy"]["spilled"] is True
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "disk")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_whole_model_stage_is_refused(src, tmp_path):
    with pytest.raises(LazyError, match="learn_rotation.*needs the whole model.*without --lazy"):
        compress_lazy(src, "w4a4kv4-spinquant-rtn", calib(), tmp_path / "out")
    with pytest.raises(LazyError, match="mixed_precision.*needs the whole model"):
        compress_lazy(src, "mixed-w3.5-gptq", calib(), tmp_path / "out")


MAGNITUDE_HEAD = """
version: 1
schemes: {re:.*: {preset: W4A16, sparsity: '2:4'}}
stages: [{magnitude: {structure: '2:4'}}, {rtn: {}}]
"""


def test_lazy_magnitude_prunes_the_head_too_and_equals_in_memory(src, tmp_path):
    """No calibration: magnitude 2:4 on every linear, lm_head included (pruned with the embeddings'
    shard, before its RTN), then RTN; bitwise the in-memory artifact."""
    from lmpress.compress import Recipe

    recipe = Recipe.from_yaml(MAGNITUDE_HEAD)
    model, _ = tiny_llama(seed=0, num_hidden_layers=3)
    compress(model, recipe)
    ref = save(model, tmp_path / "mem")
    rep = compress_lazy(src, recipe, None, tmp_path / "lazy")
    a, b = tensors(ref), tensors(tmp_path / "lazy")
    assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert rep.modules["lm_head"]["structure"] == "2:4" and rep.modules["lm_head"]["sparsity"] >= 0.5


def test_lazy_refuses_owl_and_a_pruner_after_a_quantizer(src, tmp_path):
    from lmpress.compress import Recipe

    owl = Recipe.from_yaml("version: 1\nschemes: {re:.*: {preset: W4A16}}\n"
                           "stages: [{wanda: {structure: unstructured, sparsity: 0.5, owl_lambda: 0.08}}]\n")
    with pytest.raises(LazyError, match="owl_lambda needs a dense pass"):
        compress_lazy(src, owl, calib(), tmp_path / "out")
    online = Recipe.from_yaml("version: 1\nschemes: {re:.*: W4A16}\nstages: [{structured: {ffn_keep: 0.5}}, rotate, rtn]\n")
    with pytest.raises(LazyError, match="structured changes the shapes"):
        compress_lazy(src, online, calib(), tmp_path / "out")
    both = Recipe.from_yaml("version: 1\nschemes: {re:.*: W4A4}\nstages: [fuse_norms, flatquant, rtn]\n")
    with pytest.raises(LazyError, match="flatquant takes the place of"):
        compress_lazy(src, both, calib(), tmp_path / "out")
    late = Recipe.from_yaml("version: 1\nschemes: {re:.*: {preset: W4A16, sparsity: '2:4'}}\n"
                            "stages: [{rtn: {}}, {magnitude: {structure: '2:4'}}]\n")
    with pytest.raises(LazyError, match="in the order transforms"):
        compress_lazy(src, late, None, tmp_path / "out")


def test_gptq_needs_calibration(src, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        compress_lazy(src, "w4a16-gptq", None, tmp_path / "out")
