"""Per-layer persistence of a lazy compression run, and `--resume`.

A run keeps its working state in a directory beside the output (`<out>.partial`, or under
`--offload-dir`):

```
<work>/state.json            {"fingerprint": {...}, "rest_done": bool, "done": k, "acts": "acts-00004",
                              "reports": {layer index: {fqn: figures}}, "modules": {...}, "weight_map": {...}}
<work>/artifact/             the tensor shards written so far (becomes the output directory at the end)
<work>/acts-0000k/b00000.safetensors ...   the inputs of layer k+1 (outputs of layer k), one file per batch
```
`state.json` is replaced atomically after everything it points to is on disk, so a run killed
at any instant leaves either the previous state or the new one. A resumed run starts at layer
`done` from the persisted activations (exact bits), so its artifact is bitwise identical to an
uninterrupted run with the same inputs, code and thread count.

The fingerprint names what must not change between the interrupted run and the resumed one:
the model (config and a content sample of every shard), the recipe, the calibration tokens,
the code (lmpress version and a hash of its Python sources, torch version) and the options that
change numbers (dtype, batch size, intra-op threads). `--resume` refuses, naming the part, when
one differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

STATE = "state.json"


class ResumeError(ValueError):
    """A resume that cannot continue; the message says what differs and what to do."""


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """lmpress version + sha256 of every lmpress Python source file + torch version."""
    from lmpress.compress.checkpoint import lmpress_version

    root = Path(__file__).resolve().parent.parent  # the repository (or install) root of the packages
    h = hashlib.sha256(f"{lmpress_version()}|torch {torch.__version__}".encode())
    for pkg in ("compress", "quant", "calibration", "kernels", "prune"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(model_fp: str, recipe, calib, options: dict[str, Any]) -> dict[str, str]:
    """{part: sha256}: model, recipe, calibration, code, options."""
    cal = None if calib is None else {"fingerprint": calib.fingerprint, "shape": list(calib.tokens.shape)}
    return {
        "model": model_fp,
        "recipe": _sha(recipe.to_dict()),
        "calibration": _sha(cal),
        "code": code_version(),
        "options": _sha({**options, "threads": torch.get_num_threads()}),
    }


class RunState:
    """The persisted progress of one run in `work` (see the module docstring)."""

    def __init__(self, work: Path, fp: dict[str, str]):
        self.work, self.fp = Path(work), fp
        self.data: dict[str, Any] = {"fingerprint": fp, "rest_done": False, "done": 0, "acts": None,
                                     "reports": {}, "modules": {}, "weight_map": {}, "files": {}}

    @property
    def artifact(self) -> Path:
        return self.work / "artifact"

    @classmethod
    def open(cls, work: Path, fp: dict[str, str], resume: bool, writer: bool = True) -> "RunState":
        """A fresh state (clearing any previous one) or, with `resume`, the persisted one after
        checking its fingerprint. `writer=False` (ranks other than 0) never clears or writes."""
        st = cls(work, fp)
        path = st.work / STATE
        if resume:
            if not path.is_file():
                raise ResumeError(f"--resume: no interrupted run to resume in {st.work} (no {STATE}); run without --resume")
            old = json.loads(path.read_text())
            differ = [k for k in fp if old.get("fingerprint", {}).get(k) != fp[k]]
            if differ:
                part = differ[0]
                raise ResumeError(
                    f"--resume refused: the {part} differs from the interrupted run's "
                    f"({str(old.get('fingerprint', {}).get(part))[:12]} then, {fp[part][:12]} now; differing: {', '.join(differ)}); "
                    f"resume with the same model, recipe, calibration, code and options, or run without --resume to start over")
            st.data = old
            return st
        if writer:
            if st.work.exists():
                shutil.rmtree(st.work)
            st.artifact.mkdir(parents=True)
            st.save()
        return st

    def save(self) -> None:
        tmp = self.work / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True, default=str))
        os.replace(tmp, self.work / STATE)

    @property
    def done(self) -> int:
        return int(self.data["done"])

    def acts_dir(self, layer: int) -> Path:
        return self.work / f"acts-{layer:05d}"

    def finish_layer(self, layer: int, shard: str, weight_keys: list[str], digest: str, modules: dict, report: dict,
                     acts: Path | None) -> None:
        """Record layer `layer` as finished (its shard, modules, report figures, the next inputs)."""
        d = self.data
        d["weight_map"].update({k: shard for k in weight_keys})
        d["files"][shard] = digest
        d["modules"].update(modules)
        d["reports"][str(layer)] = report
        previous = d.get("acts")
        d["acts"] = acts.name if acts is not None else None
        d["done"] = layer + 1
        self.save()
        if previous and previous != d["acts"]:
            shutil.rmtree(self.work / previous, ignore_errors=True)

    def finish_rest(self, shard: str, weight_keys: list[str], digest: str, modules: dict, report: dict) -> None:
        d = self.data
        d["weight_map"].update({k: shard for k in weight_keys})
        d["files"][shard] = digest
        d["modules"].update(modules)
        d["reports"]["rest"] = report
        d["rest_done"] = True
        self.save()
