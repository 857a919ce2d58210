"""Peers for the benches: other quantization toolkits, installed on first use into isolated folders.

    _peers.ensure("llmcompressor")   # -> the folder its packages were installed into, or raises Unavailable
    _peers.env("llmcompressor")      # -> {"PYTHONPATH": ..., "PATH": ...} for a child process that runs it

Each peer is a set of pinned distributions installed with `pip install --no-deps --target
<root>/<folder>` (root: `$LMPRESS_PEERS`, else `peers/` in lmpress's cache, `$LMPRESS_CACHE` or
~/.cache/lmpress), then checked by importing it in a fresh interpreter with that folder first on
PYTHONPATH. The folder only ever goes on a bench child's PYTHONPATH: peers are never lmpress
dependencies and never enter the venv. --no-deps because the venv already holds what they need
(torch, transformers, accelerate, datasets, loguru...): the pins are what it lacks or holds at
another version (compressed-tensors 0.18.0 for llm-compressor 0.13.0, shadowing the venv's newer
one in that child only). When an install or the import fails, `Unavailable` says why in one line
(the last line pip or Python printed), and the bench row says it.

`llmcompressor_oneshot(model, tok, calib, recipe)` runs llm-compressor on our calibration token
tensor (`CalibrationSet.tokens`, (n, seqlen)), so a peer row calibrates on exactly our tokens.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKER = ".lmpress-peer.json"  # written last: its pins say what the folder holds


class Unavailable(RuntimeError):
    """A peer that cannot be installed or imported; the message is one line saying why."""


@dataclass(frozen=True)
class Peer:
    folder: str  # peers that install together share a folder
    pins: tuple[str, ...]
    imports: str  # the module whose import proves it works


LLMC_PINS = ("llmcompressor==0.13.0", "compressed-tensors==0.18.0", "auto-round==0.14.2", "nvidia-ml-py", "py-cpuinfo")
KV_PINS = ("optimum-quanto==0.2.7", "hqq==0.2.8.post1", "einops", "termcolor", "ninja")
PEERS = {
    "llmcompressor": Peer("llmcompressor", LLMC_PINS, "llmcompressor.modifiers.quantization"),
    "autoround": Peer("llmcompressor", LLMC_PINS, "llmcompressor.modifiers.autoround"),
    "quanto": Peer("kv", KV_PINS, "optimum.quanto"),
    "hqq": Peer("kv", KV_PINS, "hqq.core.quantize"),
}
_checked: dict[str, Path | Unavailable] = {}  # per process: each peer is installed and import-checked once


def root() -> Path:
    if os.environ.get("LMPRESS_PEERS"):
        return Path(os.environ["LMPRESS_PEERS"]).expanduser()
    from lmpress.compress.models import cache_dir

    return cache_dir() / "peers"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _installed(folder: Path, pins: tuple[str, ...]) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["pins"] == list(pins)
    except (OSError, ValueError, KeyError):
        return False


def _install(folder: Path, pins: tuple[str, ...]) -> None:
    """pip install the pins into `folder`, atomically (a temporary folder renamed at the end), under a lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benches installing at once: the second waits, then finds it done
        if _installed(folder, pins):
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
               "--target", str(tmp), *pins]
        print(f"installing peer {folder.name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Unavailable(f"pip install {' '.join(pins)}: {e}") from None
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Unavailable(f"pip install {' '.join(pins)} failed: {_last_line(proc.stderr or proc.stdout)}")
        (tmp / MARKER).write_text(json.dumps({"pins": list(pins), "python": sys.version.split()[0]}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)


def _env(folders: list[Path]) -> dict[str, str]:
    paths = [str(f) for f in folders]
    bins = [str(f / "bin") for f in folders if (f / "bin").is_dir()]  # console scripts, e.g. ninja for quanto's extension
    return {
        "PYTHONPATH": os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "PATH": os.pathsep.join(bins + [os.environ.get("PATH", os.defpath)]),
    }


def ensure(name: str) -> Path:
    """The folder holding peer `name` (see PEERS), installed if needed and import-checked; raises Unavailable."""
    if name not in PEERS:
        raise Unavailable(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    if name not in _checked:
        peer = PEERS[name]
        folder = root() / peer.folder
        try:
            if not _installed(folder, peer.pins):
                _install(folder, peer.pins)
            proc = subprocess.run([sys.executable, "-c", f"import {peer.imports}"], capture_output=True, text=True,
                                  env={**os.environ, **_env([folder])}, timeout=600)
            if proc.returncode != 0:
                raise Unavailable(f"import {peer.imports} (from {folder}) failed: {_last_line(proc.stderr)}")
            _checked[name] = folder
        except Unavailable as e:
            _checked[name] = e
    found = _checked[name]
    if isinstance(found, Unavailable):
        raise found
    return found


def env(*names: str) -> dict[str, str]:
    """Environment entries that put the peers `names` (installed on first use) before everything else."""
    return _env([ensure(n) for n in names])


# --------------------------------------------------------------------------- running llm-compressor


def _cpu_only_pinning() -> None:
    """llm-compressor 0.13's AWQ pins its cached activations (`IntermediatesCache.pin_memory`, for
    non-blocking host-to-device copies), and `Tensor.pin_memory` raises "Cannot access accelerator
    device when none is available" on a CPU-only torch. With no accelerator there is nothing to copy
    to, so the pinning is skipped; nothing else changes."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def llmcompressor_oneshot(model, tok, calib, recipe) -> dict:
    """llm-compressor's `oneshot` with `recipe` (a modifier or a list of them) on our calibration tokens
    (`calib.tokens`, (n, seqlen), no padding), in place: the model is left in llm-compressor's
    fake-quantized (or pruned) form, evaluable like ours. Returns what was mended after it for the
    row to record (`autoround_zero_points`), else {}."""
    from datasets import Dataset
    from llmcompressor import oneshot

    _cpu_only_pinning()
    ids = calib.tokens  # (n, seqlen)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], processor=tok)
    mended = autoround_zero_points(model)
    return {"peer_zero_points": mended} if mended else {}


def autoround_zero_points(model) -> dict:
    """Give AutoRound's own zero points to the compressed-tensors forward; {} when no module holds them.

    llm-compressor 0.13.0's AutoRoundModifier (`_postprocess_qparams`) copies AutoRound's `scale` into
    `weight_scale` but not its `zp` into `weight_zero_point`. Its `weight` holds AutoRound's dequantized grid,
    and the frozen compressed-tensors forward quantizes it again with the zero points of llm-compressor's
    min-max observer, clamping any group whose tuned zero point moved. AutoRound's zero points are unsigned
    (codes in [0, 2^b)), compressed-tensors' signed (codes in [-2^(b-1), 2^(b-1))), so they are shifted by
    2^(b-1), as auto-round's own compressed-tensors export does since intel/auto-round#2273 (2026-09).
    Returns the share of zero points that changed and the largest distance, in quantization steps, between
    the compressed-tensors fake quantization and AutoRound's weights afterwards (0.049 on SmolLM2, far under the
    half step that would flip a code: AutoRound tunes under bf16 autocast and stores its grid in bf16)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    changed = total = 0
    worst = 0.0
    for m in model.modules():
        zp, scheme = getattr(m, "zp", None), getattr(m, "quantization_scheme", None)
        if not isinstance(zp, torch.Tensor) or scheme is None or getattr(m, "weight_zero_point", None) is None:
            continue
        args, half = scheme.weights, 2 ** (scheme.weights.num_bits - 1)
        if zp.min() < 0 or zp.max() > 2 * half - 1:
            raise ValueError(f"AutoRound zero points outside [0, {2 * half - 1}]: not the unsigned convention this "
                             "mapping assumes; check the auto-round version")
        signed = (zp.float() - half).reshape(m.weight_zero_point.shape)  # (N, K / G)
        changed += int((signed != m.weight_zero_point.float()).sum())
        total += signed.numel()
        m.weight_zero_point.data.copy_(signed.to(m.weight_zero_point.dtype))
        w, scale = m.weight.detach().float(), m.weight_scale.detach().float()  # (N, K), (N, K / G)
        fq = fake_quantize(w, scale, m.weight_zero_point, args)
        steps = (fq - w).view(*scale.shape, -1).abs() / scale.unsqueeze(-1)  # (N, K / G, G)
        worst = max(worst, float(steps.max()))
    return {"changed": changed / total, "max_steps": worst} if total else {}
