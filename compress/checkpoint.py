"""Packed checkpoints: `save(model, out_dir)`, `load(out_dir)`, `inspect(out_dir)`.

```
out_dir/ model.safetensors  config.json  recipe.yaml  report.json  tokenizer files
```
Quantized linears are stored under compressed-tensors `pack-quantized` names
(`<m>.weight_packed`, `<m>.weight_scale`, `<m>.weight_zero_point`, `<m>.weight_shape`); the
manifest lives in `config.json` under `quantization_config` (`quant_method: lmpress`): format
version, scheme per module, recipe, calibration provenance, library version, tied tensors and
the sha256 of every tensor file. What compressed-tensors cannot express sits in the
namespaced `lmpress` block of the manifest (format version 2; version-1 manifests have none):

```
"lmpress": {"online_transforms": [{"where": "model.layers.0.mlp.down_proj", "apply": "input",
                                   "kind": "hadamard", "size": 1536, "seed": 123}, ...
                                  {"where": "model.layers.0.self_attn", "apply": "qk", ...}],
            "attention": {"implementation": "lmpress",
                          "kv_cache": {"model.layers.0.self_attn": {KVCacheArgs fields}, ...}}}
```
When compressed-tensors can describe the whole artifact (`ct_format.why_not` says when), the
`quantization_config` is written in that form instead (`quant_method: compressed-tensors`,
`format: pack-quantized | int-quantized`, `config_groups`, `ignore`, `version`) and the tensors
follow its layout (packed int8 zero points, int8 `weight` for W8A8), so stock transformers +
compressed-tensors and vLLM load it; the lmpress manifest keys ride along in the same dict
(`lmpress_format` marks it) and `load` converts the tensors back. Everything else stays
`quant_method: lmpress`, which `lmpress.compress.hf_quantizer` teaches `from_pretrained`.
Hadamard transforms are rebuilt from (kind, size, seed), never stored as matrices; learned
Kronecker transforms (FlatQuant, `kind: kron`, `factors: [m, p]`) keep their tensors in the
safetensors file under `<transform>.kron_left|kron_right|kron_scale` (listed in the spec's
`tensors`), and `apply: output` wraps a module (a norm) in `TransformedOutput` (it moves to
`<where>.module`). `load` wraps
the recorded linears in `RotatedInput` (the linear moves to `<where>.linear`), attaches the
attention settings and selects the "lmpress" attention function. A save is written to a temporary sibling directory and renamed
into place, so an interrupted save leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmpress.kernels.linear import LUTLinear, PackedLinear, Sparse24Linear, link_siblings
from lmpress.quant.scheme import QuantScheme
from lmpress.quant.sim import SimQuantLinear, follow_sequence_position, uses_sink_tokens

from . import ct_format
from .surgery import set_module

log = logging.getLogger(__name__)

FORMAT = "lmpress-packed"
FORMAT_VERSION = 1  # written when the model needs nothing beyond per-module schemes
FORMAT_VERSION_ONLINE = 2  # written when the manifest has an `lmpress` block (online transforms, attention)
READ_VERSION = FORMAT_VERSION_ONLINE  # the newest format this lmpress reads
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message says what is wrong and what to do."""


def lmpress_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmpress")
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """(tensors to write, {module: scheme dict}, {alias tensor: tensor it shares storage with})."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    quantized: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SimQuantLinear) and mod.scheme.sparsity == "2:4":
            quantized[name] = Sparse24Linear.from_sim(mod)  # kept values + 2-bit positions
        elif isinstance(mod, SimQuantLinear) and mod.scheme.weights is None:
            quantized[name] = mod  # activation-only: float weight, the scheme says what to quantize at run time
        elif isinstance(mod, SimQuantLinear):
            if not mod.quantized:
                raise ValueError(f"{name} has weight scheme {mod.scheme.name} but was never quantized; run a quantization stage (rtn, gptq) first")
            quantized[name] = PackedLinear.from_sim(mod)
        elif isinstance(mod, (PackedLinear, Sparse24Linear)):
            quantized[name] = mod
    for name, mod in quantized.items():
        modules[name] = mod.scheme.to_dict()
        for key, t in mod.state_dict().items():
            tensors[f"{name}.{key}"] = t
    seen: dict[tuple[int, int, tuple], str] = {}
    aliases: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key.rpartition(".")[0] in quantized:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and t.numel():  # empty tensors (a CSR part with no entries) share no storage  # tied weights (e.g. lm_head = embeddings): store once
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t
    return {k: v.detach().contiguous() for k, v in tensors.items()}, modules, aliases


def lmpress_block(model: nn.Module) -> dict[str, Any] | None:
    """What compressed-tensors cannot express, rebuilt at load: online transforms by
    (kind, size, seed, where, apply) and the per-attention-module settings (Q/K transform, KV
    fake-quant args) of the "lmpress" attention function. None when the model has neither."""
    from lmpress.kernels.attention import ATTN_IMPLEMENTATION, attention_specs
    from lmpress.kernels.online import online_specs, output_transform_specs

    from lmpress.kernels.experts import expert_modules
    from lmpress.kernels.fused import SplitLinear

    online = online_specs(model) + output_transform_specs(model)  # "output": FlatQuant's transform of a norm's output
    attention = attention_specs(model)
    experts = sorted(expert_modules(model))
    fused = sorted({n for n, m in model.named_modules() if isinstance(m, SplitLinear)})
    codebooks = {n: {"bits": m.bits, "nnz": m.nnz} for n, m in model.named_modules() if isinstance(m, LUTLinear)}
    parts = {**({"experts": experts} if experts else {}), **({"fused": fused} if fused else {}),
             **({"codebooks": {"format": "squeezellm", "layout_version": 1, "modules": codebooks}} if codebooks else {})}
    if not online and not attention:
        return parts or None
    for where, spec in attention.items():
        if spec.get("qk") is not None:
            online.append({"where": where, "apply": "qk", **spec["qk"]})
    return {
        **parts,
        "online_transforms": online,
        "attention": {
            "implementation": ATTN_IMPLEMENTATION,
            "kv_cache": {where: spec["kv_cache"] for where, spec in attention.items() if spec.get("kv_cache") is not None},
            **({"rope_scale": rope} if (rope := {where: spec["rope_scale"] for where, spec in attention.items()
                                                 if spec.get("rope_scale") is not None}) else {}),
        },
    }


def with_sparsity(block: dict[str, Any] | None, modules: dict[str, Any]) -> dict[str, Any] | None:
    """Record the 2:4-packed modules in the `lmpress` block: tensors `<m>.weight_sparse24_values`
    (kept entries, 2 of every 4 input columns; packed codes when quantized) and
    `<m>.weight_sparse24_meta` (2-bit positions), layout `kernels.formats.sparse24_compress`."""
    sparse = sorted(n for n, d in modules.items() if d.get("sparsity") == "2:4")
    if not sparse:
        return block
    return {**(block or {}), "sparsity": {"format": "sparse24", "layout_version": 1, "modules": sparse}}


def _with_mixed(block: dict[str, Any] | None, meta: dict) -> dict[str, Any] | None:
    """Record the mixed-precision plan (budget, totals, per-module scheme, how it was found; no
    scores) in the `lmpress` block, from the report of this run or the manifest it was loaded
    from; the per-module schemes themselves are the manifest's `modules`."""
    mixed = (getattr(meta.get("report"), "extra", None) or {}).get("mixed_precision")
    if mixed is None:
        mixed = ((meta.get("manifest") or {}).get("lmpress") or {}).get("mixed_precision")
    if mixed is None:
        return block
    return {**(block or {}), "mixed_precision": {k: v for k, v in mixed.items() if k != "scores"}}


def _restore_lmpress_block(model: nn.Module, block: dict[str, Any] | None) -> None:
    """Rebuild online transforms and attention settings on a fresh skeleton (before the
    quantized modules are swapped in, since wrapping moves a linear to `<fqn>.linear`)."""
    if not block:
        return
    from lmpress.kernels.attention import restore_attention
    from lmpress.kernels.experts import split_experts
    from lmpress.kernels.online import restore_transforms

    if block.get("fused"):
        from .arch import record_for
        from lmpress.kernels.fused import split_fused

        record = record_for(model)
        if record is None or not record.fused:
            raise CheckpointError(f"the checkpoint splits fused linears {block['fused'][:2]}, but {type(model).__name__} has no "
                                  "fused-linear record in this lmpress: upgrade lmpress")
        split_fused(record.decoder_layers(model), record.fused_parts(model.config))
        have = sorted(n for n, m in model.named_modules() if type(m).__name__ == "SplitLinear")
        if have != sorted(block["fused"]):
            raise CheckpointError(f"the checkpoint's split linears {block['fused'][:2]} are not this model's {have[:2]}")
    if block.get("codebooks"):
        spec = block["codebooks"]
        if spec.get("format") != "squeezellm" or spec.get("layout_version") != 1:
            raise CheckpointError(f"codebook layout {spec.get('format')!r} version {spec.get('layout_version')!r} is not known "
                                  f"to this lmpress ({lmpress_version()}): upgrade lmpress")
        for fqn, m in spec["modules"].items():
            old = model.get_submodule(fqn)
            set_module(model, fqn, LUTLinear(old.in_features, old.out_features, int(m["bits"]), int(m["nnz"]),
                                             bias=old.bias is not None, dtype=old.weight.dtype, device="meta"))
    if block.get("experts"):
        split = split_experts(model)
        if sorted(split) != sorted(block["experts"]):
            raise CheckpointError(f"the checkpoint's per-expert linears are under {block['experts'][:3]}, but this model's fused "
                                  f"experts are {split[:3]}: the config does not match the weights")
    online = list(block.get("online_transforms") or [])
    unknown = sorted({o.get("apply") for o in online} - {"input", "output", "qk"}, key=str)
    if unknown:
        raise CheckpointError(f"online transforms applied as {unknown} are not known to this lmpress ({lmpress_version()}): upgrade lmpress")
    restore_transforms(model, [o for o in online if o.get("apply") == "input"], "input")
    restore_transforms(model, [o for o in online if o.get("apply") == "output"], "output")
    attention: dict[str, dict[str, Any]] = {}
    for o in online:
        if o.get("apply") == "qk":
            attention.setdefault(o["where"], {})["qk"] = {k: o[k] for k in ("kind", "size", "seed")}
    for key in ("kv_cache", "rope_scale"):
        for where, spec in ((block.get("attention") or {}).get(key) or {}).items():
            attention.setdefault(where, {})[key] = spec
    restore_attention(model, attention)


def save(
    model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False, extra_report: dict | None = None
) -> Path:
    """Write `model` (simulated or runtime form) as a packed checkpoint; returns the directory."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} already exists and is not empty; choose another directory or pass overwrite=True (--overwrite)")
    meta = getattr(model, "lmpress_meta", None) or {}
    tensors, modules, aliases = packed_state(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    kv = meta.get("kv_cache")
    block = lmpress_block(model)
    ct, _ = ct_format.ct_form(model, _schemes(modules), block, kv)  # None: lmpress-only artifact
    block = with_sparsity(block, modules)
    block = _with_mixed(block, meta)
    if ct is not None:
        tensors = ct_format.to_disk(tensors, _schemes(modules), ct.format)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_metadata(tmp, model, modules, aliases, {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}, block, ct,
                       tokenizer=tokenizer, extra_report=extra_report)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d tensors (%d quantized modules) to %s", len(tensors), len(modules), out)
    return out


def write_metadata(tmp: Path, model: nn.Module, modules: dict[str, Any], aliases: dict[str, str], files: dict[str, str],
                   block: dict[str, Any] | None, ct, tokenizer=None, extra_report: dict | None = None) -> None:
    """config.json (with the manifest), generation config, recipe.yaml, report.json and the
    tokenizer, written into `tmp` beside the tensor files `files` ({name: sha256}). Shared by
    `save` and the streaming writer of the lazy path (`lmpress.compress.lazy`)."""
    meta = getattr(model, "lmpress_meta", None) or {}
    kv = meta.get("kv_cache")
    recipe = meta.get("recipe")
    manifest = {
        "quant_method": "lmpress",
        "format": FORMAT,
        "format_version": FORMAT_VERSION if block is None else FORMAT_VERSION_ONLINE,
        "lmpress_version": lmpress_version(),
        "modules": modules,
        "kv_cache": kv.to_dict() if kv is not None else None,
        "tied": aliases,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "calibration": meta.get("calibration"),
        "files": files,
    }
    if block is not None:
        manifest["lmpress"] = block
    if ct is not None:  # compressed-tensors keys win; ours ride along (its readers ignore unknown keys)
        manifest.update(ct.config, lmpress_format=FORMAT)
    config = model.config.to_dict()
    config["quantization_config"] = manifest
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if recipe is not None:
        recipe.save(tmp / "recipe.yaml")
    report = meta.get("report")
    report_dict = report.to_dict() if report is not None else {}
    report_dict.update(extra_report or {})
    (tmp / "report.json").write_text(json.dumps(report_dict, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished directory `tmp` to `out`, replacing an existing `out` (moved aside first)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _schemes(modules: dict[str, Any]) -> dict[str, QuantScheme]:
    return {fqn: QuantScheme.from_dict(d) for fqn, d in modules.items()}


def is_lmpress_manifest(qc: Any) -> bool:
    """A config.json `quantization_config` lmpress wrote: its own form, or compressed-tensors with ours inside."""
    return isinstance(qc, dict) and (qc.get("quant_method") == "lmpress" or (
        qc.get("quant_method") == ct_format.QUANT_METHOD and qc.get("lmpress_format") == FORMAT))


def runtimes(manifest: dict, in_features: dict[str, int] | None = None) -> dict[str, str]:
    """Which runtimes load the artifact, and why (for `inspect`)."""
    out = {"lmpress": "yes: lmpress.compress.load(dir)"}
    if manifest.get("quant_method") == ct_format.QUANT_METHOD:
        fmt, bits = manifest["format"], {s.weights.bits for s in _schemes(manifest["modules"]).values()}
        out["transformers"] = f"yes, without lmpress (compressed-tensors {fmt}; needs `pip install compressed-tensors`)"
        if fmt in (ct_format.NVFP4, ct_format.MXFP4, ct_format.MXFP8) and not manifest.get("dequantize"):
            out["transformers"] += f"; {ct_format.FP4_FLOAT32_NOTE}"
        out["vLLM"] = (f"yes (compressed-tensors {fmt})" if bits <= {4, 8} else
                       f"no kernel for {sorted(bits)}-bit weights (vLLM's compressed-tensors WNA16 path takes 4 and 8 bits)")
        return out
    reason = ct_format.why_not(_schemes(manifest["modules"]), in_features or {}, manifest.get("lmpress"), manifest.get("kv_cache"))
    out["transformers"] = "with `import lmpress.compress` (quant_method lmpress: PackedLinear kernels, online transforms, lmpress attention)"
    out["vLLM"] = f"no: {reason or 'written before compressed-tensors export'}; not expressible in compressed-tensors"
    return out


def read_manifest(out_dir: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """(config dict without the manifest, manifest); checks format version and checksums."""
    out = Path(out_dir)
    if not out.is_dir():
        raise CheckpointError(f"{out} is not a directory; pass the directory that `lmpress compress` wrote")
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{out} has no config.json: it is not an lmpress checkpoint (or the save was interrupted); re-run the compression")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupted, re-run the compression") from None
    manifest = config.pop("quantization_config", None)
    if not isinstance(manifest, dict) or not is_lmpress_manifest(manifest):
        raise CheckpointError(f"{cfg_path} has no lmpress manifest (quantization_config written by another tool); load it with transformers instead")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > READ_VERSION:
        raise CheckpointError(
            f"{out} uses checkpoint format version {version!r}; this lmpress ({lmpress_version()}) reads versions up to {READ_VERSION}: upgrade lmpress"
        )
    for fname, digest in manifest.get("files", {}).items():
        path = out / fname
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, re-run the compression")
        if verify and sha256_file(path) != digest:
            raise CheckpointError(f"{path} does not match its recorded sha256: the file is corrupted, truncated or was modified; re-run the compression")
    return config, manifest


def prepare_skeleton(model: nn.Module, manifest: dict) -> None:
    """Turn a weightless model (parameters on meta) into the runtime form the manifest describes:
    online transforms and attention settings rebuilt, runtime modules on meta (to be assigned)
    in place of each quantized linear. Shared by `load` and the transformers quantizer."""
    _restore_lmpress_block(model, manifest.get("lmpress"))
    for fqn, scheme_dict in manifest["modules"].items():
        old = model.get_submodule(fqn)
        scheme = QuantScheme.from_dict(scheme_dict)
        if scheme.sparsity == "2:4":
            set_module(model, fqn, Sparse24Linear(old.in_features, old.out_features, scheme, bias=old.bias is not None,
                                                  dtype=old.weight.dtype, device="meta"))
            continue
        if scheme.weights is None:  # activation-only: float weight in a SimQuantLinear
            set_module(model, fqn, SimQuantLinear(old, scheme))
            continue
        new = PackedLinear(old.in_features, old.out_features, scheme, bias=old.bias is not None, dtype=old.weight.dtype, device="meta")
        set_module(model, fqn, new)


def load(out_dir: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the runtime model: skeleton without weights, PackedLinear swapped in, tensors assigned."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    config_dict, manifest = read_manifest(out, verify=verify)
    config = AutoConfig.for_model(**config_dict)
    with init_empty_weights():  # parameters on meta; buffers such as RoPE's inv_freq stay real
        model = AutoModelForCausalLM.from_config(config)
    prepare_skeleton(model, manifest)
    state = {}
    for fname in weight_files(manifest):
        try:
            state.update(load_file(str(out / fname), device=str(device)))
        except Exception as e:  # a header that does not parse
            raise CheckpointError(f"cannot read {out / fname} ({e}); the file is corrupted, re-run the compression") from None
    if manifest.get("quant_method") == ct_format.QUANT_METHOD:
        state = ct_format.from_disk(state, _schemes(manifest["modules"]), manifest["format"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    aliases = manifest.get("tied", {})
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise CheckpointError(f"{out}: tensors do not match the model skeleton (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for alias, source in aliases.items():
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(src_owner), src_attr))
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{out}: no tensors for {still_meta[:5]}; the checkpoint is incomplete")
    model.to(device).eval()
    link_sibling_linears(model)
    from lmpress.kernels.kv_cache import use_runtime_cache

    use_runtime_cache(model)  # a per-token quantized KV cache: forwards with use_cache=True get QuantizedKVCache
    if uses_sink_tokens(model):
        follow_sequence_position(model)  # static inputs keep each sequence's first positions in float
    model.lmpress_meta = {"manifest": manifest, "path": str(out)}
    return model


def link_sibling_linears(model: nn.Module) -> int:
    """Link each decoder layer's PackedLinears that read one input (q/k/v, gate/up: the architecture
    record's sequential groups) so that the CPU paths run them as one GEMM (`kernels.linear.SiblingGroup`,
    bit-identical to separate calls). Architectures without a record are left as they are."""
    from .arch import record_for

    arch = record_for(model)
    if arch is None:
        return 0
    try:
        n_layers = len(arch.decoder_layers(model))
    except AttributeError:
        return 0
    groups = [[f"{arch.layers}.{i}.{p}" for p in g] for i in range(n_layers) for g in arch.sequential_groups if len(g) > 1]
    n = link_siblings(model, groups)
    log.debug("linked %d groups of packed linears that read one input", n)
    return n


def inspect(out_dir: str | Path) -> dict[str, Any]:
    """Per-module storage without loading tensors: scheme, shape, bytes, ratio to fp16."""
    out = Path(out_dir)
    _, manifest = read_manifest(out, verify=False)
    rows: dict[str, dict[str, Any]] = {}
    total = 0
    codebooks = ((manifest.get("lmpress") or {}).get("codebooks") or {}).get("modules") or {}
    for key, f in _each_tensor(out, manifest):
        sl = f.get_slice(key)
        numel = 1
        for d in sl.get_shape():
            numel *= d
        nbytes = numel * _DTYPE_BYTES[sl.get_dtype()]
        total += nbytes
        owner = key.rpartition(".")[0]
        if owner in manifest["modules"]:
            row = rows.setdefault(owner, {"scheme": QuantScheme.from_dict(manifest["modules"][owner]).name, "bytes": 0})
            row["bytes"] += nbytes
            if key.endswith(".weight_shape"):
                row["shape"] = [int(v) for v in f.get_tensor(key).tolist()]
            elif key.endswith(".weight"):  # compressed-tensors int/float-quantized: 8-bit codes, no weight_shape
                row["shape"] = [int(v) for v in sl.get_shape()]
            elif key.endswith(".weight_packed") and sl.get_dtype() == "U8":  # compressed-tensors FP4: two codes a byte
                rows_, cols = sl.get_shape()
                row["shape"] = [int(rows_), 2 * int(cols)]
        elif owner in codebooks:  # SqueezeLLM: codes, codebooks and the CSR part
            row = rows.setdefault(owner, {"scheme": f"SqueezeLLM-{codebooks[owner]['bits']}bit", "bytes": 0})
            row["bytes"] += nbytes
            if key.endswith(".weight_shape"):
                row["shape"] = [int(v) for v in f.get_tensor(key).tolist()]
    q_params = q_bytes = 0
    for row in rows.values():
        n = row["shape"][0] * row["shape"][1]
        row["bits_per_weight"] = round(8 * row["bytes"] / n, 3)
        row["ratio_vs_fp16"] = round(2 * n / row["bytes"], 3)
        q_params += n
        q_bytes += row["bytes"]
    return {
        "path": str(out),
        "format_version": manifest["format_version"],
        "modules": rows,
        "quantized_params": q_params,
        "quantized_bits_per_weight": round(8 * q_bytes / q_params, 3) if q_params else None,
        "total_bytes": total,
        "file_bytes": sum((out / n).stat().st_size for n in weight_files(manifest)),
        "kv_cache": manifest.get("kv_cache"),
        "online_transforms": len((manifest.get("lmpress") or {}).get("online_transforms") or []),
        "recipe": (manifest.get("recipe") or {}).get("name"),
        "mixed_precision": (manifest.get("lmpress") or {}).get("mixed_precision"),
        "runtimes": runtimes(manifest, {n: r["shape"][1] for n, r in rows.items()}),
    }


def weight_files(manifest: dict) -> list[str]:
    """The tensor files of an artifact: `model.safetensors`, or the shards the lazy path streams
    (`model-00001-of-000NN.safetensors`, listed with their sha256 under the manifest's `files`)."""
    names = sorted(n for n in manifest.get("files", {}) if n.endswith(".safetensors"))
    return names or [WEIGHTS_FILE]


def _each_tensor(out: Path, manifest: dict):
    """(key, open safetensors handle) for every tensor of every tensor file, without loading it."""
    for fname in weight_files(manifest):
        with safe_open(str(out / fname), framework="pt") as f:
            for key in f.keys():
                yield key, f


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
