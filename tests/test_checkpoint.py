import json

import pytest
import torch

from lmpress.compress import CheckpointError, Recipe, compress, inspect, load, save
from lmpress.compress import checkpoint as ckpt
from lmpress.kernels.linear import PackedLinear

MIXED = """
version: 1
name: mixed-test
schemes:
  lm_head: W8A8
  down_proj: {weights: null, inputs: {bits: 8, granularity: token, dynamic: true}}
  "re:.*layers\\\\.0\\\\..*": {preset: W4A16, weights: {group_size: 40, symmetric: false}}
  "re:.*": W4A4
stages: [rtn]
"""


@pytest.mark.parametrize("recipe", ["w8a8-rtn", "w4a16-rtn", MIXED])
def test_load_save_reproduces_simulated_logits(tiny, tokens, tmp_path, recipe):
    model, tok = tiny
    r = Recipe.from_yaml(recipe) if "\n" in recipe else Recipe.load(recipe)
    compress(model, r)
    sim_logits = model(tokens).logits
    out = save(model, tmp_path / "ckpt", tokenizer=tok)
    loaded = load(out)
    assert any(isinstance(m, PackedLinear) for m in loaded.modules())
    diff = (loaded(tokens).logits - sim_logits).abs().max().item()
    assert diff <= 1e-4, diff
    for f in ("model.safetensors", "config.json", "recipe.yaml", "report.json", "tokenizer.json"):
        assert (out / f).is_file(), f
    assert Recipe.load(out / "recipe.yaml") == r
    # tied embeddings stay tied unless the head itself was quantized
    tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight if hasattr(loaded.lm_head, "weight") else False
    assert tied == (r.scheme_for("lm_head") is None)


def test_manifest_and_inspect(tiny, tmp_path):
    model, tok = tiny
    compress(model, "w4a16-rtn")
    out = save(model, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    m = cfg["quantization_config"]
    assert m["quant_method"] == "lmpress" and m["format_version"] == ckpt.FORMAT_VERSION
    assert len(m["modules"]) == 14 and m["recipe"]["name"] == "w4a16-rtn"
    assert m["files"]["model.safetensors"] == ckpt.sha256_file(out / "model.safetensors")
    info = inspect(out)
    row = info["modules"]["model.layers.0.mlp.down_proj"]
    assert row["shape"] == [96, 160]
    # 4 bits + (fp32 scale + fp32 zero) / 64 per weight, with 160 = 2 full groups + a partial one
    assert row["bytes"] == 96 * 160 // 2 + 2 * 96 * 3 * 4 + 16
    assert 4.0 < info["quantized_bits_per_weight"] < 5.5


def test_corrupted_or_truncated_checkpoint_errors(tiny, tmp_path):
    model, _ = tiny
    compress(model, "w8a8-rtn")
    out = save(model, tmp_path / "c")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(out)
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load(tmp_path / "nope")


def test_newer_format_version_is_refused(tiny, tmp_path):
    model, _ = tiny
    compress(model, "w8a8-rtn")
    out = save(model, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version 99.*upgrade lmpress"):
        load(out)


def test_interrupted_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    compress(model, "w8a8-rtn")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "sha256_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    compress(model, "w8a8-rtn")
    out = save(model, tmp_path / "c")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save(model, out)
    # an overwrite that fails midway keeps the previous checkpoint intact
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        save(model, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    monkeypatch.undo()
    save(model, out, overwrite=True)
    load(out)


def test_unquantized_simulated_module_cannot_be_saved(tiny, tmp_path):
    from lmpress.compress.surgery import to_sim
    from lmpress.quant.scheme import W4A16

    model, _ = tiny
    to_sim(model, "model.layers.0.mlp.up_proj", W4A16)
    with pytest.raises(ValueError, match="never quantized"):
        save(model, tmp_path / "c")
    assert not (tmp_path / "c").exists()
