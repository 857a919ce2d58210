"""Streaming save: a packed checkpoint written one shard at a time, renamed into place at the end.

```
<work>/artifact/model-00001-of-000NN.safetensors   embeddings, final norm, head (shard 1)
<work>/artifact/model-000KK-of-000NN.safetensors   decoder layer KK-2, packed
<work>/artifact/model.safetensors.index.json       {"metadata": {"total_size"}, "weight_map": {tensor: shard}}
<work>/artifact/config.json ...                    as `checkpoint.save` writes them
```
Each shard is written under a temporary name and renamed, so a shard file is either complete
or absent; the manifest (`config.json`) lists every shard with its sha256, and `load`/
`read_manifest` check them. The directory becomes the output with one rename (`replace_dir`),
so the output is never half-written. `transformers.from_pretrained` reads the index file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import replace_dir, sha256_file, write_metadata

INDEX = "model.safetensors.index.json"


def shard_name(k: int, total: int) -> str:
    """HF-style shard name, k counted from 1."""
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write `tensors` to folder/name atomically; returns the file's sha256."""
    tmp = folder / f".{name}.tmp"
    meta = [k for k, v in tensors.items() if v.is_meta]
    if meta:
        raise ValueError(f"cannot write {name}: tensors {meta[:3]} were never loaded (still on the meta device)")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / name)
    return sha256_file(folder / name)


def finalize(folder: Path, out: Path, model, modules: dict, aliases: dict, files: dict[str, str],
             weight_map: dict[str, str], block, ct, tokenizer=None, extra_report: dict | None = None) -> Path:
    """Write the index and the metadata into `folder`, then rename it to `out`."""
    total = sum((folder / n).stat().st_size for n in files)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    write_metadata(folder, model, modules, aliases, dict(sorted(files.items())), block, ct,
                   tokenizer=tokenizer, extra_report=extra_report)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(folder, out)
    return out
