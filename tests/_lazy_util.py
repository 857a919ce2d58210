"""Helpers shared by the lazy-path tests (test_offload, test_resume, test_distributed)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress.checkpoint import read_manifest, sha256_file, weight_files
from lmpress.compress.models import tiny_llama


def write_tiny(d: Path, layers: int = 3) -> Path:
    """A seeded tiny LLaMA (`layers` decoder layers) saved as safetensors in `d`."""
    model, tok = tiny_llama(seed=0, num_hidden_layers=layers)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def calib(n: int = 6, seqlen: int = 24, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 256, (n, seqlen), generator=g)
    return CalibrationSet(tokens=toks, source="random", split="calib", n=n, seqlen=seqlen, seed=seed, fingerprint=fingerprint(toks))


def tensors(out: Path) -> dict[str, torch.Tensor]:
    _, manifest = read_manifest(out)
    state = {}
    for f in weight_files(manifest):
        state.update(load_file(str(out / f)))
    return state


def digests(out: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(out.glob("*.safetensors"))}
