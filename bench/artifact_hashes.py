"""sha256 of every file of four tiny-model artifacts: the refactor check of issue 20 (the engine
must write the same bytes before and after a change that claims to keep behaviour).

    python -P bench/artifact_hashes.py [--out hashes.json] [--against hashes.json]

Artifacts (seeded tiny LLaMA, 3 decoder layers, 6 x 24 random calibration tokens, one thread):
`w4a16-gptq`, `w4a4kv4-quarot-rtn` and `kv2-rotatekv` in memory (`compress` then `save`), and
`w4a16-gptq` and `w4a4kv4-quarot-rtn` through `compress_lazy` (`--lazy`). `--against` compares with an earlier run and
exits 1 on any difference. Files that record wall-clock time (report.json) are left out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress import compress, save
from lmpress.compress.lazy import compress_lazy
from lmpress.compress.models import tiny_llama

RECIPES = ("w4a16-gptq", "w4a4kv4-quarot-rtn", "kv2-rotatekv")
LAZY = ("w4a16-gptq", "w4a4kv4-quarot-rtn")
TIMED = {"report.json"}  # carries seconds


def calibration(n: int = 6, seqlen: int = 24, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 256, (n, seqlen), generator=g)
    return CalibrationSet(tokens=toks, source="random", split="calib", n=n, seqlen=seqlen, seed=seed,
                          fingerprint=fingerprint(toks))


def digest_dir(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and p.name not in TIMED}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the digests as JSON")
    p.add_argument("--against", default=None, help="compare with an earlier --out; exit 1 on a difference")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    calib = calibration()
    result: dict[str, dict[str, str]] = {}
    tmp = Path(tempfile.gettempdir()) / "lmpress-artifact-hashes"  # fixed: config.json records the source's path
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in RECIPES:
            model, tok = tiny_llama(seed=0, num_hidden_layers=3)
            compress(model, name, calib=calib)
            save(model, tmp / name, tokenizer=tok)
            result[name] = digest_dir(tmp / name)
        model, tok = tiny_llama(seed=0, num_hidden_layers=3)
        model.save_pretrained(tmp / "src")
        tok.save_pretrained(tmp / "src")
        for name in LAZY:
            compress_lazy(tmp / "src", name, calib, tmp / f"{name}-lazy", tokenizer=tok)
            result[f"{name} --lazy"] = digest_dir(tmp / f"{name}-lazy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for art, files in result.items():
        combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        print(f"{art:26s} {len(files)} files  sha256 of the file digests {combined[:16]}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    if a.against:
        before = json.loads(Path(a.against).read_text())
        diff = [(art, f) for art in sorted(set(before) | set(result))
                for f in sorted(set(before.get(art, {})) | set(result.get(art, {})))
                if before.get(art, {}).get(f) != result.get(art, {}).get(f)]
        for art, f in diff:
            print(f"DIFFERS: {art}: {f}")
        print("identical" if not diff else f"{len(diff)} files differ")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
