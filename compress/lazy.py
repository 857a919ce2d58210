"""Lazy compression: models larger than memory, one decoder layer at a time.

`compress_lazy(model_dir, recipe, calib, out)` never holds the model. The skeleton is built on
the meta device (accelerate's `init_empty_weights`); the structural changes of the recipe
(online-transform wrappers, attention settings, simulated linears) are made on it up front, so
the manifest is known before any weight is read. Then:

1. the embeddings, final norm and head are read from the safetensors shards, fused/rotated,
   (head) quantized, written as shard 1 and freed; with a calibrating stage, the layer-0 inputs
   of the calibration set are captured first (only the embeddings and rotary run);
2. for each decoder layer: its tensors are read from the shards onto `device`
   (accelerate's `set_module_tensor_to_device`), norms fused and R1/R2 fused exactly as
   `quant.rotate.rotate_model` does for that layer (same seeds, same float64 operations), its
   linears quantized (GPTQ on the calibration activations, or RTN), packed and written as the
   next shard, the calibration activations propagated through the quantized layer, the
   progress persisted (`compress.resume`), and the layer returned to the meta device.

Peak memory is one layer (plus its GPTQ Hessians) and the calibration activations; the
activations stay in memory below `spill_bytes` and are read back from disk, one batch at a
time, above it. They are written to disk after every layer anyway: that is what `--resume`
continues from. Several processes can share the work (`compress.distributed`).

Supported stages: structured (first; not with rotate's online transforms or flatquant, whose
wrappers are placed at their pruned sizes before any layer is read); the transforms fuse_norms,
rotate, smoothquant and rotate_kv, or flatquant alone; kv_cache; the pruners magnitude, wanda
and sparsegpt (N:M or unstructured; not OWL); the quantizers rtn and gptq; in that order. Each
runs through the same per-layer method as in memory (`Structured.shrink_layer`,
`quant.rotate.fuse_layer_norms` / `rotate_layer`, `SmoothQuant.smooth_layer`, RotateKV's
`layer_key_absmax` / `key_rotation` / `fold_values`, `FlatQuant.train_layer` / `finish_layer`,
`plan` / `prune_layer` of the pruners, `rtn_modules`, `GPTQ.quantize_layer`), and the artifact
is bitwise the in-memory one. Each calibrating stage sees the stream it sees in memory, captured
as it captures it (sequences, batch size): structured its own (from the embeddings before R1),
smoothquant and rotate_kv a "transform stream" (through the transformed layers, linears plain
(`surgery.plain_linears`), no KV-cache fake-quant (`kernels.attention.cache_quant_off`):
kv_cache must follow them), flatquant its float targets and its quantized training inputs, the
pruners their stream (through the pruned layers, before quantization), gptq the "compressed
stream" (through the finished layers); a run keeps the streams its recipe needs, all persisted
for `--resume`. The structure a stage leaves is placed on the skeleton up front (structured's
smaller linears and config, read at the shards' shapes and cut per layer; rotate's and
flatquant's wrappers, from their shapes: `quant.flatquant.runtime_specs`); what is learned per
layer (RotateKV's channel orders, FlatQuant's activation clips) is recorded per layer and
written at the end. Stages that need the whole model at once (learn_rotation: R1 trained through
every layer; OWL: every layer's outlier ratio before the first is pruned; mixed precision:
scores and a search over the whole model) are refused with a message that says to run without
`--lazy`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lmpress.calibration.heap import trim_heap
from lmpress.kernels.attention import attach_attention, cache_quant_off, settings_of, use_lmpress_attention
from lmpress.kernels.online import RotatedInput, TransformedOutput, restore_transforms
from lmpress.quant.flatquant import runtime_specs
from lmpress.quant.rotate import Rotation, fusable, fuse_layer_norms, place_online, rotate_layer, sub_seed

from . import ct_format
from .arch import arch_for, record_for, supported_architectures
from .checkpoint import lmpress_block, packed_state, with_sparsity
from .pipeline import build_plan
from .recipe import Recipe
from .report import Report
from .resume import RunState, fingerprint
from .stage import Context
from .stages.gptq import RTN_FALLBACK
from .stages.rotate import check_block_sizes, record_rotation
from .stages.rtn import rtn_modules
from .stream_save import finalize, shard_name, write_shard
from .streams import Streams
from .surgery import get_module, plain_linears, set_module, to_sim, untie_embeddings

log = logging.getLogger(__name__)

PRUNERS = ("magnitude", "wanda", "sparsegpt")
TRANSFORMS = ("fuse_norms", "rotate", "smoothquant", "rotate_kv", "flatquant")  # in this order
ON_TRANSFORM_STREAM = ("smoothquant", "rotate_kv")  # stages calibrating on the transformed, uncompressed layers
SUPPORTED = ("structured", *TRANSFORMS, "kv_cache", *PRUNERS, "rtn", "gptq")
QUANTIZERS = ("rtn", "gptq")
DEFAULT_SPILL_BYTES = 2 << 30  # calibration activations above this size are read back from disk
CHUNK_ROWS = 8192  # rows of the embeddings/head rotated at a time (bounds the float64 working copy)


class LazyError(ValueError):
    """A recipe or model the lazy path cannot handle; the message says what to do instead."""


def check_recipe(recipe: Recipe) -> None:
    names = [s.name for s in recipe.stages]
    bad = [n for n in names if n not in SUPPORTED]
    if "act_scales" in bad:
        raise LazyError("stage 'act_scales' does not run layer by layer (--lazy) yet; use stage gptq, which calibrates "
                        "the static activation scales of the modules it quantizes, or compress without --lazy")
    for name in ("rope_scale", "awq", "signround"):
        if name in bad:
            raise LazyError(f"stage {name!r} does not run layer by layer (--lazy) yet; compress without --lazy")
    if bad:
        raise LazyError(
            f"stage {bad[0]!r} needs the whole model at once, so it cannot run layer by layer (--lazy); "
            f"lazy mode runs the stages {list(SUPPORTED)}: compress without --lazy (the model must fit in memory)")
    for n in ("structured", *TRANSFORMS, "gptq", *PRUNERS):
        if names.count(n) > 1:
            raise LazyError(f"stage {n!r} appears {names.count(n)} times; lazy mode runs each stage once")
    order = [("structured",), TRANSFORMS, PRUNERS, QUANTIZERS]  # each kind of stage after the ones before it
    kind = [next(k for k, group in enumerate(order) if n in group) for n in names if n != "kv_cache"]
    transforms = [n for n in names if n in TRANSFORMS]
    rot = next((s for s in recipe.stages if s.name == "rotate"), None)
    if "structured" in names and ("flatquant" in names or (rot is not None and rot.online)):
        raise LazyError("structured changes the shapes that rotate's online transforms and flatquant's are sized for, and "
                        "lazy mode places those before reading any layer: compress without --lazy, or use rotate with "
                        "online: []")
    if "flatquant" in names and len(transforms) > 1:
        raise LazyError(f"flatquant takes the place of {[t for t in TRANSFORMS if t != 'flatquant']}: the recipe has "
                        f"{transforms} (as in memory, give flatquant alone)")
    plain = ("structured", *ON_TRANSFORM_STREAM)
    if "kv_cache" in names and any(names.index(n) > names.index("kv_cache") for n in plain if n in names):
        raise LazyError(f"lazy mode calibrates {list(plain)} without the KV-cache fake-quant: put kv_cache "
                        f"after them (the recipe has {names})")
    if kind != sorted(kind) or transforms != sorted(transforms, key=TRANSFORMS.index):
        raise LazyError(f"lazy mode runs the stages in the order transforms {list(TRANSFORMS)}, pruners {list(PRUNERS)}, "
                        f"quantizers {list(QUANTIZERS)}; the recipe has {names}")
    for s in recipe.stages:
        if s.name in PRUNERS and s.owl_lambda is not None:
            raise LazyError(f"stage {s.name!r} with owl_lambda needs a dense pass over every layer before pruning any: "
                            "compress without --lazy")


# --------------------------------------------------------------------------- reading shards


class ShardReader:
    """Tensors of a Hugging Face model directory's safetensors shards, read on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        self.where: dict[str, str] = {}
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise LazyError(f"{self.dir} has no .safetensors files; lazy mode reads safetensors shards "
                                "(convert the model with save_pretrained first)")
            for name in files:
                with safe_open(str(self.dir / name), framework="pt") as f:
                    self.where.update({k: name for k in f.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def load(self, keys: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors `keys`, each shard opened once and closed after (its pages unmapped)."""
        missing = [k for k in keys if k not in self.where]
        if missing:
            raise LazyError(f"{self.dir}: no tensor {missing[0]!r} in the shards")
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with safe_open(str(self.dir / name), framework="pt", device=str(device)) as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return out

    def fingerprint(self) -> str:
        """sha256 of config.json and, per shard, its size, header and three 1 MiB content samples
        (start, middle, end): cheap for a 100 GB model, and any re-save or edit changes it."""
        h = hashlib.sha256((self.dir / "config.json").read_bytes() if (self.dir / "config.json").is_file() else b"")
        for name in sorted(set(self.where.values())):
            path = self.dir / name
            size = path.stat().st_size
            h.update(f"{name}:{size}".encode())
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(n))
                for pos in (0, size // 2, max(0, size - (1 << 20))):
                    f.seek(pos)
                    h.update(f.read(1 << 20))
        return h.hexdigest()


def skeleton(model_dir: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as RoPE's stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    record = record_for(config)
    if record is None:
        raise ValueError(f"{model_dir}: the larger-than-memory path (--lazy) needs an architecture record, and "
                         f"{', '.join(config.architectures or [config.model_type])} has none (records: "
                         f"{', '.join(supported_architectures())}); compress it in memory")
    if record.fused or getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise ValueError(f"{model_dir}: the larger-than-memory path (--lazy) does not split fused linears or mixture-of-experts "
                         f"experts yet ({record.name}); compress it in memory")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # from_config on meta leaves the head untied; the checkpoint stores it once
    return model.eval()


def materialize(module: nn.Module, prefix: str, reader: ShardReader, device, dtype: torch.dtype,
                rename: dict[str, str] | None = None) -> None:
    """Read the parameters of `module` (named `prefix + name` in the shards, after `rename` of
    path fragments) onto `device` in `dtype`."""
    from accelerate.utils import set_module_tensor_to_device

    names = [n for n, p in module.named_parameters() if p.is_meta]
    keys = {}
    for n in names:
        key = n
        for a, b in (rename or {}).items():
            key = key.replace(a, b)
        keys[n] = prefix + key
    tensors = reader.load(list(keys.values()))
    for n in names:
        value = tensors.pop(keys[n])
        set_module_tensor_to_device(module, n, device, value=value, dtype=dtype if value.is_floating_point() else None)


def free(module: nn.Module) -> None:
    """Back to the meta device (the memory is released; the structure stays), and hand the
    allocator's free heap pages back to the OS so the next layer starts from the same RSS."""
    module.to("meta")
    trim_heap()


# --------------------------------------------------------------------------- embeddings and head


@torch.no_grad()
def _rotate_rows(W: torch.Tensor, R1: Rotation | None, gain: torch.Tensor | None) -> None:
    """W ← (W diag(gain)) then W ← W Q1 in place, in row chunks (each step cast back to W's
    dtype, as `fuse_norms` then `rotate_model` do)."""
    for s in range(0, W.shape[0], CHUNK_ROWS):
        rows = W[s:s + CHUNK_ROWS]
        if gain is not None:
            rows.copy_((rows.to(torch.float64) * gain.to(torch.float64)[None, :]).to(W.dtype))
        if R1 is not None:
            rows.copy_(R1.right(rows.to(torch.float64)).to(W.dtype))


# --------------------------------------------------------------------------- flatquant, one layer


def _flatquant_layer(fq, layer, i: int, prefix: str, arch0, cfg, ctx, streams: Streams) -> dict:
    """FlatQuant on decoder layer i as in memory (`FlatQuant.train_layer` / `finish_layer`): the
    skeleton's runtime wrappers are taken off (and the linears made plain) for the training,
    which puts its own back; the quantized stream is propagated through the trained layer before
    the fold, the float targets are the next float stream. Returns the layer's figures."""
    for p in layer.parameters():
        p.requires_grad_(False)
    with plain_linears(layer):
        for path, m in [(p, m) for p, m in layer.named_modules() if isinstance(m, (RotatedInput, TransformedOutput))]:
            layer.set_submodule(path, m.linear if isinstance(m, RotatedInput) else m.module)
        inside = {f[: -len(".linear")]: f for f in ctx.plan if f.startswith(prefix) and f.endswith(".linear")}
        plain = {f[: -len(".linear")] if f in inside.values() else f: s  # names as FlatLayer sees them
                 for f, s in ctx.plan.items() if f.startswith(prefix)}
        flat, targets, row = fq.train_layer(layer, i, prefix[:-1], arch0, plain, cfg, ctx.kv_cache, streams.inputs("flat_float"),
                                            streams.inputs("flat_quant"), streams.layer_kwargs("flat_float", i))
        streams.propagate("flat_quant", layer)
        streams.put("flat_float", targets)
        summary = {"act_clip": {}, "wrapped": []}
        fq.finish_layer(flat, plain, summary)
    for f, s in plain.items():  # the learned activation clips, in the plan and on the simulated linears
        ctx.plan[inside.get(f, f)] = s
        get_module(layer, inside.get(f, f)[len(prefix):]).scheme = s
    return {"row": row, "act_clip": summary["act_clip"]}


# --------------------------------------------------------------------------- the driver


def _calibrating(recipe: Recipe):
    """The first stage that needs calibration inputs (None: the recipe needs no calibration set)."""
    return next((s for s in recipe.stages if s.needs_calibration), None)


def compress_lazy(
    model_dir: str | Path,
    recipe: Recipe | str,
    calib: Any = None,
    out: str | Path = "out/compressed",
    *,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    work_dir: str | Path | None = None,
    spill_bytes: int = DEFAULT_SPILL_BYTES,
    resume: bool = False,
    overwrite: bool = False,
    dist=None,
) -> Report:
    """Compress the model in `model_dir` (safetensors shards) with `recipe`, layer by layer,
    streaming the packed artifact to `out`. `work_dir` (default `<out>.partial` beside `out`)
    holds the per-layer progress and spilled activations; `resume=True` continues an
    interrupted run from it. `dist` (`compress.distributed.from_env()`) shares the work
    between processes. Returns the Report (also written to `out/report.json`)."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    check_recipe(recipe)
    calibrating = _calibrating(recipe)
    smooth = next((s for s in recipe.stages if s.name == "smoothquant"), None)
    rkv = next((s for s in recipe.stages if s.name == "rotate_kv"), None)
    fq = next((s for s in recipe.stages if s.name == "flatquant"), None)
    st = next((s for s in recipe.stages if s.name == "structured"), None)
    pruner = next((s for s in recipe.stages if s.name in PRUNERS and s.needs_calibration), None)
    gptq = next((s for s in recipe.stages if s.name == "gptq"), None)
    if calibrating is not None and calib is None:
        raise ValueError(f"stage {calibrating.name!r} needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    writer = dist is None or dist.is_writer
    device = torch.device(dist.device if dist is not None else device)
    t_start = time.perf_counter()

    reader = ShardReader(model_dir)
    model = skeleton(model_dir, dtype)
    arch0 = arch_for(model)
    arch0.check_recipe(recipe)
    cfg = model.config
    plan = build_plan(model, recipe)
    names = [s.name for s in recipe.stages]
    rot = next((s for s in recipe.stages if s.name == "rotate"), None)
    fuse = "fuse_norms" in names or rot is not None
    untied = (arch0.lm_head in plan or fuse) and untie_embeddings(model, arch0)
    report = Report()
    if fuse:
        report.extra["fuse_norms"] = {"untied_lm_head": bool(untied)}
    ctx = Context(arch=arch0, plan=plan, calib=calib, kv_cache=recipe.kv_args, device=device, report=report,
                  batch_size=batch_size)
    layers = arch0.decoder_layers(model)
    n = len(layers)

    # ---- structure, on the meta skeleton: pruned shapes, online wrappers, attention settings, simulated linears
    sz = st.sizes(cfg) if st is not None else None
    cut, before = {}, {}  # structured: {path: new (out, in)}, {path: (out, in, bias) in the shards}
    if sz is not None:
        cut = st.shrinks(arch0, sz)
        for rel, (o, i_) in cut.items():
            m = layers[0].get_submodule(rel)
            before[rel] = (m.out_features, m.in_features, m.bias is not None)
            for layer in layers:
                layer.set_submodule(rel, nn.Linear(i_ or m.in_features, o or m.out_features, bias=m.bias is not None,
                                                   device="meta", dtype=dtype))
        st.finish(cfg, sz, ctx)  # the config the later stages (and the artifact) see
    R1 = None
    if rot is not None:
        check_block_sizes(model, arch0, rot.block)
        R1 = Rotation(cfg.hidden_size, rot.kind, rot.seed, device=device, block=rot.block)
        summary: dict[str, Any] = {"r1": R1.spec(), "r2": None, **place_online(model, arch0, rot.seed, rot.online, block=rot.block)}
        if rot.r2:
            n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = arch0.head_dim(layers[0], cfg)
            summary["r2"] = {"kind": rot.kind, "size": head_dim,
                             "seeds": [[sub_seed(rot.seed, "r2", i, h) for h in range(n_kv)] for i in range(n)],
                             **({"block": rot.block} if rot.block is not None and rot.block < head_dim else {})}
        record_rotation(ctx, summary, rot.online)  # renames plan entries / ctx.arch for the wrapped linears
    pruning = {}  # stage -> (todo {layer: {path: (fqn, spec)}}, outside [(fqn, spec)])
    for s in recipe.stages:
        if s.name == "kv_cache":
            s.apply(model, ctx)
        elif s is rkv:  # identity channel orders for now: each layer's comes from its statistics
            geo = rkv.geometry(cfg, arch0, layers[0])
            attach_attention(model, arch0, key_rotation={i: rkv.key_rotation(i, geo) for i in range(n)})
            rkv.record(ctx, geo)
        elif s is fq:  # the runtime structure its training leaves (shapes only; the tensors come per layer)
            fq.attach_qk(model, arch0, device)
            if not fq.qk_hadamard and ctx.kv_cache is not None:
                use_lmpress_attention(model)
            specs = [sp for i in range(n) for sp in runtime_specs(layers[i], arch0, f"{arch0.layers}.{i}.")]
            restore_transforms(model, [sp for sp in specs if sp["apply"] == "output"], "output")
            fq.wrap_names(ctx, restore_transforms(model, [sp for sp in specs if sp["apply"] == "input"], "input"))
        elif s.name in PRUNERS:
            pruning[s] = s.plan(model, ctx)
    for fqn, scheme in ctx.plan.items():
        to_sim(model, fqn, scheme)
    block = lmpress_block(model)
    ct, _ = ct_format.ct_form(model, ctx.plan, block, ctx.kv_cache)
    arch = ctx.arch

    # ---- persisted progress
    options = {"dtype": str(dtype), "batch_size": batch_size,
               "gptq_batch": getattr(calibrating, "batch_size", None)}
    fp = fingerprint(reader.fingerprint(), recipe, calib, options)
    work = Path(work_dir) if work_dir is not None else out.with_name(f"{out.name}.partial")
    state = RunState.open(work, fp, resume, writer=writer) if writer else None
    if dist is not None:
        dist.barrier()
        if not writer:
            state = RunState.open(work, fp, True) if resume else RunState(work, fp)
    if resume and writer:
        log.info("resuming %s: %d of %d layers done", work, state.done, n)
    total_shards = n + 1

    # ---- embeddings, final norm, head (shard 1)
    layers_prefix = arch0.layers + "."
    rest = [(nm, p) for nm, p in model.named_parameters() if not nm.startswith(layers_prefix)]
    from accelerate.utils import set_module_tensor_to_device

    embed_key = f"{arch0.embed}.weight"
    head, embed = fusable(model.get_submodule(arch0.lm_head), arch0.lm_head), model.get_submodule(arch0.embed)
    tied = head.weight is embed.weight
    for nm, _ in rest:
        key = nm if nm in reader or nm != f"{arch0.lm_head}.weight" else embed_key  # tied checkpoints store the head once
        set_module_tensor_to_device(model, nm, "cpu", value=reader.load([key])[key], dtype=dtype)
    if tied:  # materializing replaced the shared parameter: share it again
        head.weight = embed.weight
    # the calibration streams (compress.streams), each captured as its stage captures it in memory
    wanted: dict[str, tuple[str, torch.Tensor, int]] = {}
    if calib is not None:
        if sz is not None:
            wanted["structured"] = ("all", calib.tokens, st.batch_size or batch_size)
        if smooth is not None or (rkv is not None and rkv.reorder):
            wanted["transform"] = ("all", calib.tokens, batch_size)
        if fq is not None:
            fq_tokens = fq.calib_tokens(calib)
            wanted["flat_float"] = wanted["flat_quant"] = ("flat", fq_tokens, fq.batch_size)
        if pruner is not None:
            wanted["pruned"] = ("all", calib.tokens, getattr(pruner, "batch_size", None) or batch_size)
        if gptq is not None:
            wanted["compressed"] = ("all", calib.tokens, gptq.batch_size or batch_size)
    streams = Streams(wanted, device, writer, dist)
    streams.capture(model, arch, [k for k in wanted if k == "structured"])  # as in memory: before the embeddings are rotated
    if fuse:
        norm_w = model.get_submodule(arch0.final_norm).weight
        if not bool((norm_w + arch0.norm_offset == 1).all()):  # the gain is offset + w (Gemma: 1 + w)
            _rotate_rows(head.weight.data, None, norm_w.detach() + arch0.norm_offset)
            norm_w.data.fill_(1.0 - arch0.norm_offset)
    if R1 is not None:
        R1cpu = Rotation(cfg.hidden_size, rot.kind, rot.seed, block=rot.block)
        _rotate_rows(model.get_submodule(arch0.embed).weight.data, R1cpu, None)
        _rotate_rows(head.weight.data, R1cpu, None)
    outside = [f for f in ctx.plan if not f.startswith(layers_prefix)]
    for s in recipe.stages:  # no layer inputs to calibrate on: magnitude pruning, RTN (stage gptq's fallback note)
        if s in pruning:
            s.prune_outside(model, ctx, pruning[s][1])
        elif s.name in QUANTIZERS:
            rtn_modules(model, ctx, outside, note=RTN_FALLBACK if s.name == "gptq" else None)
            break
    streams.capture(model, arch, [k for k in wanted if k != "structured"])
    saved_layers = layers
    set_module(model, arch0.layers, nn.ModuleList())  # packed_state over everything but the layers
    try:
        tensors, rest_modules, aliases = packed_state(model)
    finally:
        set_module(model, arch0.layers, saved_layers)
    if ct is not None:
        tensors = ct_format.to_disk(tensors, {f: ctx.plan[f] for f in rest_modules}, ct.format)
    if writer and not state.data["rest_done"]:
        name = shard_name(1, total_shards)
        digest = write_shard(state.artifact, name, tensors)
        state.data["aliases"] = aliases
        state.finish_rest(name, list(tensors), digest, rest_modules, {f: report.modules[f] for f in outside if f in report.modules})
    del tensors
    for owner in {nm.rpartition(".")[0] for nm, _ in rest}:  # embeddings, norm, head: done
        free(model.get_submodule(owner))

    # ---- decoder layers
    streams.start(state, n, spill_bytes)
    flat_rows: dict[str, dict] = state.data.setdefault("flatquant", {})  # per layer: figures and learned clips

    start = state.done
    for i in range(start, n):
        t0 = time.perf_counter()
        layer = layers[i]
        prefix = f"{arch0.layers}.{i}."
        rename = {f"{p}.{inner}.": f"{p}." for p, m in layer.named_modules()
                  for cls, inner in ((RotatedInput, "linear"), (TransformedOutput, "module")) if isinstance(m, cls)}
        for rel, (o, i_, bias) in before.items():  # structured: read at the shards' shapes, cut below
            layer.set_submodule(rel, nn.Linear(i_, o, bias=bias, device="meta", dtype=dtype))
        materialize(layer, prefix, reader, device, dtype, rename)
        layer.to(device)  # the online transforms' small buffers follow the weights
        streams.begin_layer(state.acts_dir(i) if streams.wanted and i < n - 1 else None)
        name_i = f"{arch0.layers}.{i}"
        if sz is not None:
            with plain_linears(layer), cache_quant_off(layer):  # as in memory: the first stage, on the plain layer
                st.shrink_layer(streams.step("structured", i, layer, name_i), arch0, sz)
                streams.propagate("structured", layer)
            for rel in cut:
                if prefix + rel in ctx.plan:
                    to_sim(model, prefix + rel, ctx.plan[prefix + rel])
        if fuse:
            fuse_layer_norms(layer, arch0, prefix)
        if rot is not None:
            rotate_layer(layer, i, arch0, cfg, R1, rot.kind, rot.seed, rot.r2, block=rot.block)
        if smooth is not None or rkv is not None:
            with plain_linears(layer), cache_quant_off(layer):  # the layer as these stages see it in memory
                if smooth is not None:
                    smooth.smooth_layer(streams.step("transform", i, layer, name_i), arch)
                key_absmax = None
                if rkv is not None and "transform" in streams:
                    key_absmax = rkv.layer_key_absmax(streams.step("transform", i, layer, name_i), arch)
                if "transform" in streams:
                    streams.propagate("transform", layer)
                if rkv is not None and rkv.values:  # after the propagation: in memory all statistics come first
                    rkv.fold_values(layer, i, arch, geo)
            if rkv is not None:
                kr = rkv.key_rotation(i, geo, key_absmax).to(device)
                settings_of(layer.get_submodule(arch0.attention)).key_rotation = kr
                state.data.setdefault("key_rotation", {})[str(i)] = kr.spec()
        if fq is not None:
            flat_rows[str(i)] = _flatquant_layer(fq, layer, i, prefix, arch0, cfg, ctx, streams)
        mine_fqns = [f for f in ctx.plan if f.startswith(prefix)]
        step = streams.step("pruned", i, layer, name_i) if "pruned" in streams else None
        for s in recipe.stages:
            if s in pruning and pruning[s][0].get(i):
                s.prune_layer(ctx, layer, pruning[s][0][i], step)
        if step is not None:
            step.restore()  # modules a stage replayed go back before the layer is propagated
            streams.propagate("pruned", layer)  # as in memory: through the pruned, not yet quantized layer
        step = streams.step("compressed", i, layer, name_i) if "compressed" in streams else None
        for s in recipe.stages:
            if s.name == "rtn":
                rtn_modules(model, ctx, mine_fqns)
            elif s.name == "gptq":
                todo, fallback = s.targets(model, ctx, n, mine_fqns)
                if todo:
                    s.quantize_layer(step, ctx, todo[i], dist)
                rtn_modules(model, ctx, fallback, note=RTN_FALLBACK)
        if step is not None:
            step.restore()  # modules a stage replayed go back before the layer is packed and propagated
        tensors, modules, _ = packed_state(layer)
        tensors = {prefix + k: v for k, v in tensors.items()}
        modules = {prefix + k: v for k, v in modules.items()}
        if ct is not None:
            tensors = ct_format.to_disk(tensors, {f: ctx.plan[f] for f in modules}, ct.format)
        if "compressed" in streams:
            streams.propagate("compressed", layer)
        if writer:
            name = shard_name(i + 2, total_shards)
            digest = write_shard(state.artifact, name, tensors)
            state.finish_layer(i, name, list(tensors), digest, modules,
                               {f: report.modules[f] for f in mine_fqns if f in report.modules}, streams.folder)
        if dist is not None:
            dist.barrier()
        del tensors
        free(layer)
        streams.end_layer()
        log.info("lazy: layer %d/%d done in %.1fs", i + 1, n, time.perf_counter() - t0)

    # ---- finish: metadata, rename into place
    for part in state.data["reports"].values():
        for fqn, figs in part.items():
            report.modules.setdefault(fqn, figs)
    if fq is not None:
        done = [flat_rows[str(i)] for i in range(n)]
        fq.record(ctx, fq_tokens, [d["row"] for d in done],
                  {"act_clip": {f: c for d in done for f, c in d["act_clip"].items()}, "wrapped": []},
                  sum(d["row"]["seconds"] for d in done))
    report.extra["lazy"] = {"layers": n, "resumed_at": start, "activation_bytes": streams.bytes,
                            "spilled": not streams.keep, "world": dist.world if dist is not None else 1}
    report.stages.append({"stage": "lazy", "seconds": round(time.perf_counter() - t_start, 3)})
    model.lmpress_meta = {"recipe": recipe, "plan": ctx.plan, "kv_cache": ctx.kv_cache,
                          "calibration": calib.provenance() if calib is not None else None, "report": report}
    if writer:
        modules = state.data["modules"]
        for i, spec in state.data.get("key_rotation", {}).items():  # the channel orders found layer by layer
            kv = block["attention"]["kv_cache"].get(f"{arch0.layers}.{i}.{arch0.attention}")
            if kv is not None:
                kv["key_rotation"] = spec
        finalize(state.artifact, out, model, modules, state.data.get("aliases", {}), state.data["files"],
                 state.data["weight_map"], with_sparsity(block, modules), ct, tokenizer=tokenizer)
        shutil.rmtree(work, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    log.info("lazy: wrote %s in %.1fs", out, time.perf_counter() - t_start)
    return report
