"""What stock `transformers` (+ `compressed-tensors`) computes from an artifact, in a process that
never imports lmpress: the check that an artifact loads in the ecosystem without us.

    logits = stock_logits([path_a, path_b], tokens)   # {str(path): (B, T, vocab) float32}

Each artifact is loaded with `AutoModelForCausalLM.from_pretrained(path, dtype=float32)` and run on
`tokens`. compressed-tensors 0.20 decompresses FP4 / MXFP8 weights to bfloat16 whatever dtype is
asked; where the forward then fails on the dtype mismatch, the Linear weights are cast to float32
(exact: E2M1 / E4M3 times a power of two) and the logits are stored under `str(path) + ":cast"`.
The child asserts that no `lmpress` module was imported.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    tokens = torch.load(sys.argv[1])
    out = {}
    for path in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            try:
                out[path] = model(tokens).logits
            except RuntimeError as e:
                if "same dtype" not in str(e):
                    raise
                for m in model.modules():
                    if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16:
                        m.weight.data = m.weight.data.float()
                out[path + ":cast"] = model(tokens).logits
    leaked = sorted(m for m in sys.modules if m == "lmpress" or m.startswith("lmpress."))
    assert not leaked, leaked
    torch.save(out, sys.argv[2])
""")


class StockLoadError(RuntimeError):
    """Stock transformers could not load or run an artifact; the message ends with its stderr."""


def stock_logits(paths, tokens: torch.Tensor, timeout: float = 600) -> dict[str, torch.Tensor]:
    """{str(path) (or str(path) + ":cast"): logits} of stock transformers on `tokens` (B, T) for
    every artifact directory of `paths`, all in one child process."""
    paths = [str(p) for p in paths]
    with tempfile.TemporaryDirectory(prefix="lmpress-stock-") as d:
        torch.save(tokens, Path(d) / "tokens.pt")
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(d) / "tokens.pt"), str(Path(d) / "logits.pt"), *paths],
                             capture_output=True, text=True, timeout=timeout, cwd=d)
        if res.returncode != 0:
            raise StockLoadError("stock transformers failed on " + ", ".join(paths) + ": " + res.stderr[-3000:])
        return torch.load(Path(d) / "logits.pt")


__all__ = ["SCRIPT", "StockLoadError", "stock_logits"]
