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

Supported stages: fuse_norms, rotate, kv_cache, rtn, gptq (in an order where the transforms
come before the quantizers). Stages that need the whole model at once (learn_rotation,
smoothquant's statistics pass, rotate_kv, sparsity, mixed precision, flatquant) are refused
with a message that says to run without `--lazy`.
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
from safetensors.torch import load_file, save_file
from torch import nn

from lmpress.calibration.layerwise import Batch, LayerStep, LayerwiseRunner
from lmpress.kernels.online import OnlineHadamard, RotatedInput
from lmpress.quant.gptq import gptq_quantize_shared
from lmpress.quant.primitives import quant_error
from lmpress.quant.rotate import Rotation, _Fused, fuse_input_transform, rotation_matrix, sub_seed
from lmpress.quant.rtn import rtn_quantize

from . import ct_format
from .arch import arch_for
from .checkpoint import _lmpress_block, _packed_state, _with_sparsity
from .pipeline import build_plan
from .recipe import Recipe
from .report import Report
from .resume import RunState, fingerprint
from .stage import Context
from .stages.gptq import GPTQ, collect_hessians
from .stages.kv_cache import KVCache
from .stages.rotate import record_rotation
from .stream_save import finalize, shard_name, write_shard
from .surgery import set_module, to_sim, untie_embeddings

log = logging.getLogger(__name__)

SUPPORTED = ("fuse_norms", "rotate", "kv_cache", "rtn", "gptq")
TRANSFORMS = ("fuse_norms", "rotate")
QUANTIZERS = ("rtn", "gptq")
DEFAULT_SPILL_BYTES = 2 << 30  # calibration activations above this size are read back from disk
CHUNK_ROWS = 8192  # rows of the embeddings/head rotated at a time (bounds the float64 working copy)


class LazyError(ValueError):
    """A recipe or model the lazy path cannot handle; the message says what to do instead."""


def check_recipe(recipe: Recipe) -> None:
    names = [s.name for s in recipe.stages]
    bad = [n for n in names if n not in SUPPORTED]
    if bad:
        raise LazyError(
            f"stage {bad[0]!r} needs the whole model at once, so it cannot run layer by layer (--lazy); "
            f"lazy mode runs the stages {list(SUPPORTED)}: compress without --lazy (the model must fit in memory)")
    for n in ("rotate", "gptq", "fuse_norms"):
        if names.count(n) > 1:
            raise LazyError(f"stage {n!r} appears {names.count(n)} times; lazy mode runs each stage once")
    last_t = max((k for k, n in enumerate(names) if n in TRANSFORMS), default=-1)
    first_q = min((k for k, n in enumerate(names) if n in QUANTIZERS), default=len(names))
    if last_t > first_q:
        raise LazyError(f"stage {names[last_t]!r} comes after {names[first_q]!r}; put fuse_norms/rotate before rtn/gptq")


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
    arch_for(config)  # a clear error for an unsupported architecture
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
    _trim()


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# --------------------------------------------------------------------------- activations


class Activations:
    """The calibration hidden states entering one layer: in memory, or on disk (one
    safetensors file per batch in `folder`) when `keep` is false."""

    def __init__(self, n: int, folder: Path | None, mem: list[torch.Tensor] | None):
        self.n, self.folder, self.mem = n, folder, mem

    def get(self, j: int) -> torch.Tensor:
        if self.mem is not None:
            return self.mem[j]
        return load_file(str(self.folder / f"b{j:05d}.safetensors"))["h"]

    @staticmethod
    def write(folder: Path, j: int, t: torch.Tensor) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"h": t.contiguous()}, str(folder / f"b{j:05d}.safetensors"))


# --------------------------------------------------------------------------- per-layer transforms


def _inner(m: nn.Module) -> nn.Module:
    return m.linear if isinstance(m, RotatedInput) else m


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module, arch) -> int:
    """`quant.rotate.fuse_norms` for one decoder layer: W ← W diag(w), w ← 1 (float64)."""
    folded = 0
    for norm_path, readers in arch.norm_readers.items():
        w = layer.get_submodule(norm_path).weight
        if bool((w == 1).all()):
            continue
        w64 = w.detach().to(torch.float64)
        for r in readers:
            lin = _inner(layer.get_submodule(r))
            lin.weight.copy_((lin.weight.detach().to(torch.float64) * w64[None, :]).to(lin.weight.dtype))
        w.fill_(1.0)
        folded += 1
    return folded


@torch.no_grad()
def rotate_layer(layer: nn.Module, i: int, arch, config, rot, R1: Rotation, device) -> list[int]:
    """The body of `quant.rotate.rotate_model` for decoder layer `i` (R1, R2, fusing the online
    input transforms whose `RotatedInput` wrappers are already in place). Returns the R2 seeds."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    lin = {p: _inner(layer.get_submodule(getattr(arch, p))) for p in
           ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj")}
    work = _Fused()
    for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        work.set(lin[p].weight, R1.right(work.get(lin[p].weight)))
    for p in ("o_proj", "down_proj"):
        w = lin[p]
        work.set(w.weight, R1.left_t(work.get(w.weight)))
        if w.bias is not None:
            work.set(w.bias, R1.right(work.get(w.bias)))
    attn = layer.get_submodule(arch.q_proj.rpartition(".")[0])
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // n_heads
    seeds: list[int] = []
    v, o = lin["v_proj"], lin["o_proj"]
    if rot.r2:
        seeds = [sub_seed(rot.seed, "r2", i, h) for h in range(n_kv)]
        R2s = torch.stack([rotation_matrix(head_dim, rot.kind, s2) for s2 in seeds]).to(device)  # (kv heads, d, d)
        Wv = work.get(v.weight).reshape(n_kv, head_dim, -1)  # (kv heads, d, hidden)
        work.set(v.weight, torch.matmul(R2s.transpose(1, 2), Wv).reshape(n_kv * head_dim, -1))
        if v.bias is not None:
            bv = work.get(v.bias).reshape(n_kv, 1, head_dim)
            work.set(v.bias, torch.matmul(bv, R2s).reshape(-1))
        R2q = R2s.repeat_interleave(n_heads // n_kv, dim=0)  # (heads, d, d)
        Wo = work.get(o.weight).reshape(-1, n_heads, head_dim).transpose(0, 1)  # (heads, hidden, d)
        work.set(o.weight, torch.matmul(Wo, R2q).transpose(0, 1).reshape(-1, n_heads * head_dim))
    for path in (arch.down_proj, arch.o_proj):
        wrapper = layer.get_submodule(path)
        if isinstance(wrapper, RotatedInput):  # W ← W H: the input arrives as x H
            mod = wrapper.linear
            work.set(mod.weight, fuse_input_transform(work.get(mod.weight), wrapper.transform))
    work.commit()
    return seeds


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


# --------------------------------------------------------------------------- per-layer quantizers


def _rtn_layer(model: nn.Module, ctx, fqns: list[str]) -> None:
    """Stage `rtn` restricted to `fqns` (same maths and report entries)."""
    for fqn in fqns:
        sim = model.get_submodule(fqn)
        scheme = sim.scheme
        if scheme.weights is None or sim.quantized:
            continue
        W = sim.weight.detach().clone()
        q, scale, zero = rtn_quantize(W.float(), scheme.weights)
        sim.set_quantized(q, scale, zero)
        ctx.report.record_module(fqn, scheme=scheme.name, method="rtn", **quant_error(W, sim.weight))


def _gptq_layer(stage: GPTQ, step: LayerStep, ctx, mine: dict, dist) -> None:
    """Stage `gptq` for one layer (its `_walk` body), with the solves shared out when `dist`."""
    groups = ctx.arch.sequential_groups
    if stage.true_sequential:
        for gi, group in enumerate(groups):
            targets = [rel for rel in group if rel in mine]
            if targets:
                later = [rel for g in groups[gi + 1:] for rel in g]
                _collect_and_quantize(stage, step, ctx, mine, targets, later, dist)
    else:
        targets = [rel for group in groups for rel in group if rel in mine]
        _collect_and_quantize(stage, step, ctx, mine, targets, [], dist)


def _collect_and_quantize(stage: GPTQ, step: LayerStep, ctx, mine: dict, targets: list[str], later: list[str], dist) -> None:
    """`GPTQ._collect_and_quantize`: one Hessian per distinct input, one solve per (input,
    weight scheme); solve u runs on rank `u % world` and is broadcast from there."""
    sims, by_input, stats = collect_hessians(step, ctx, targets, later)
    units = []  # (H, args, rels solved together)
    for rels in by_input.values():
        H = stats[rels[0]].hessian
        by_args: dict[object, list[str]] = {}
        for rel in rels:
            by_args.setdefault(sims[rel].scheme.weights, []).append(rel)
        units += [(H, args, same) for args, same in by_args.items()]
    results, seconds = {}, {}
    for u, (H, args, same) in enumerate(units):
        if dist is None or dist.owns(u):
            t1 = time.perf_counter()
            Ws = [sims[rel].weight.detach().float() for rel in same]
            results[u] = gptq_quantize_shared(Ws, H, args, block_size=stage.block_size, damp=stage.damp,
                                              act_order=stage.act_order, static_groups=stage.act_order)
            seconds[u] = (time.perf_counter() - t1) / len(same)
    if dist is not None:
        for u in range(len(units)):
            results[u], seconds[u] = dist.broadcast_object((results.get(u), seconds.get(u)), src=dist.owner(u))
    for u, (H, args, same) in enumerate(units):
        for rel, (q, scale, zero, st) in zip(same, results[u]):
            W = sims[rel].weight.detach().float()
            stage._install(ctx, sims[rel], mine[rel][0], W, H, q, scale, zero, st, seconds[u])


# --------------------------------------------------------------------------- the driver


def _calibrating(recipe: Recipe) -> GPTQ | None:
    return next((s for s in recipe.stages if s.name == "gptq"), None)


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
    gptq = _calibrating(recipe)
    if gptq is not None and calib is None:
        raise ValueError("stage 'gptq' needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    writer = dist is None or dist.is_writer
    device = torch.device(dist.device if dist is not None else device)
    t_start = time.perf_counter()

    reader = ShardReader(model_dir)
    model = skeleton(model_dir, dtype)
    arch0 = arch_for(model)
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

    # ---- structure, on the meta skeleton: online wrappers, attention settings, simulated linears
    R1 = None
    if rot is not None:
        R1 = Rotation(cfg.hidden_size, rot.kind, rot.seed, device=device)
        summary: dict[str, Any] = {"r1": R1.spec(), "r2": None, "online": [], "wrapped": []}
        qk = {}
        for i, layer in enumerate(layers):
            prefix = f"{arch0.layers}.{i}"
            for key, path, tag in (("down_proj", arch0.down_proj, "r4"), ("o_proj", arch0.o_proj, "ro")):
                if key in rot.online:
                    lin = layer.get_submodule(path)
                    T = OnlineHadamard(lin.in_features, sub_seed(rot.seed, tag, i))
                    set_module(layer, path, RotatedInput(T, lin))
                    summary["online"].append({"where": f"{prefix}.{path}", "apply": "input", **T.spec()})
                    summary["wrapped"].append(f"{prefix}.{path}")
            if "qk" in rot.online:
                attn = layer.get_submodule(arch0.q_proj.rpartition(".")[0])
                head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
                qk[i] = OnlineHadamard(head_dim, sub_seed(rot.seed, "r3", i))
                summary["online"].append({"where": f"{prefix}.{arch0.q_proj.rpartition('.')[0]}", "apply": "qk", **qk[i].spec()})
        if rot.r2:
            n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            attn = layers[0].get_submodule(arch0.q_proj.rpartition(".")[0])
            summary["r2"] = {"kind": rot.kind, "size": getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                             "seeds": [[sub_seed(rot.seed, "r2", i, h) for h in range(n_kv)] for i in range(n)]}
        if qk:
            from lmpress.quant.attention import attach_attention

            attach_attention(model, arch0, qk=qk)
        record_rotation(ctx, summary, rot.online)  # renames plan entries / ctx.arch for the wrapped linears
    if "kv_cache" in names:
        KVCache().apply(model, ctx)
    for fqn, scheme in ctx.plan.items():
        to_sim(model, fqn, scheme)
    block = _lmpress_block(model)
    ct, _ = ct_format.ct_form(model, ctx.plan, block, ctx.kv_cache)
    arch = ctx.arch

    # ---- persisted progress
    options = {"dtype": str(dtype), "batch_size": batch_size, "gptq_batch": gptq.batch_size if gptq else None}
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
    head, embed = _inner(model.get_submodule(arch0.lm_head)), model.get_submodule(arch0.embed)
    tied = head.weight is embed.weight
    for nm, _ in rest:
        key = nm if nm in reader or nm != f"{arch0.lm_head}.weight" else embed_key  # tied checkpoints store the head once
        set_module_tensor_to_device(model, nm, "cpu", value=reader.load([key])[key], dtype=dtype)
    if tied:  # materializing replaced the shared parameter: share it again
        head.weight = embed.weight
    if fuse:
        norm_w = model.get_submodule(arch0.final_norm).weight
        if not bool((norm_w == 1).all()):
            _rotate_rows(head.weight.data, None, norm_w.detach())
            norm_w.data.fill_(1.0)
    if R1 is not None:
        R1cpu = Rotation(cfg.hidden_size, rot.kind, rot.seed)
        _rotate_rows(model.get_submodule(arch0.embed).weight.data, R1cpu, None)
        _rotate_rows(head.weight.data, R1cpu, None)
    outside = [f for f in ctx.plan if not f.startswith(layers_prefix)]
    first_q = next((s.name for s in recipe.stages if s.name in QUANTIZERS), None)
    for fqn in outside:  # no layer inputs to calibrate on: RTN (stage gptq's own fallback note when it is first)
        sim = model.get_submodule(fqn)
        if first_q == "gptq" and sim.scheme.weights is not None and not sim.quantized:
            GPTQ._rtn(model, ctx, fqn, sim.scheme)
        elif first_q is not None:
            _rtn_layer(model, ctx, [fqn])
    batches = None
    runner = None
    if gptq is not None:
        runner = LayerwiseRunner(model, arch, calib.tokens, batch_size=gptq.batch_size or batch_size, device=device)
        batches = runner.capture()
    saved_layers = layers
    set_module(model, arch0.layers, nn.ModuleList())  # _packed_state over everything but the layers
    try:
        tensors, rest_modules, aliases = _packed_state(model)
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
    nb = len(batches) if batches is not None else 0
    act_bytes = sum(b.hidden.numel() * b.hidden.element_size() for b in batches) if batches else 0
    keep = act_bytes <= spill_bytes
    acts = None
    if batches is not None:
        if 0 < state.done < n:
            folder = state.work / state.data["acts"]
            acts = Activations(nb, folder, None)
            acts = Activations(nb, folder, [acts.get(j) for j in range(nb)] if keep else None)
        else:
            acts = Activations(nb, None, [b.hidden for b in batches])
        kwargs = [b.kwargs for b in batches]
        log.info("lazy: %d calibration batches, %.1f MiB of activations (%s)", nb, act_bytes / 2**20,
                 "in memory" if keep else f"spilled to {state.work}")
    known = set(arch.linears)
    start = state.done
    for i in range(start, n):
        t0 = time.perf_counter()
        layer = layers[i]
        prefix = f"{arch0.layers}.{i}."
        rename = {f"{p}.linear.": f"{p}." for p in (arch0.down_proj, arch0.o_proj)
                  if isinstance(layer.get_submodule(p), RotatedInput)}
        materialize(layer, prefix, reader, device, dtype, rename)
        layer.to(device)  # the online transforms' small buffers follow the weights
        if fuse:
            fuse_layer_norms(layer, arch0)
        if rot is not None:
            rotate_layer(layer, i, arch0, cfg, rot, R1, device)
        mine_fqns = [f for f in ctx.plan if f.startswith(prefix)]
        step = None
        if batches is not None:
            def run_all(layer=layer, keep_out=keep):
                outs = []
                for j in range(nb):
                    o = runner.run_layer(layer, [Batch(acts.get(j), kwargs[j])])[0]
                    if keep_out:
                        outs.append(o)
                return outs
            step = LayerStep(index=i, name=f"{arch0.layers}.{i}", layer=layer, inputs=acts.mem or [], _run=run_all)
        for s in recipe.stages:
            if s.name == "rtn":
                _rtn_layer(model, ctx, mine_fqns)
            elif s.name == "gptq":
                mine = {}
                for fqn in mine_fqns:
                    sim = model.get_submodule(fqn)
                    rel = fqn[len(prefix):]
                    if sim.scheme.weights is not None and not sim.quantized and rel in known:
                        mine[rel] = (fqn, sim.scheme)
                if mine:
                    _gptq_layer(s, step, ctx, mine, dist)
                _rtn_fallback = [f for f in mine_fqns if f[len(prefix):] not in known]
                for fqn in _rtn_fallback:
                    sim = model.get_submodule(fqn)
                    if sim.scheme.weights is not None and not sim.quantized:
                        GPTQ._rtn(model, ctx, fqn, sim.scheme)
        tensors, modules, _ = _packed_state(layer)
        tensors = {prefix + k: v for k, v in tensors.items()}
        modules = {prefix + k: v for k, v in modules.items()}
        if ct is not None:
            tensors = ct_format.to_disk(tensors, {f: ctx.plan[f] for f in modules}, ct.format)
        next_acts = None
        if batches is not None and i < n - 1:
            folder = state.acts_dir(i)
            outs: list[torch.Tensor | None] = []
            for j in range(nb):
                o = None
                if dist is None or dist.owns(j):
                    o = runner.run_layer(layer, [Batch(acts.get(j), kwargs[j])])[0]
                if dist is not None:
                    h = acts.get(j)
                    o = dist.broadcast_tensor(o, tuple(h.shape), h.dtype, src=dist.owner(j))
                if writer:
                    Activations.write(folder, j, o)
                outs.append(o if keep else None)
            next_acts = Activations(nb, folder, outs if keep else None)
        if writer:
            name = shard_name(i + 2, total_shards)
            digest = write_shard(state.artifact, name, tensors)
            state.finish_layer(i, name, list(tensors), digest, modules,
                               {f: report.modules[f] for f in mine_fqns if f in report.modules},
                               next_acts.folder if next_acts is not None else None)
        if dist is not None:
            dist.barrier()
        del tensors
        free(layer)
        acts = next_acts
        log.info("lazy: layer %d/%d done in %.1fs", i + 1, n, time.perf_counter() - t0)

    # ---- finish: metadata, rename into place
    for part in state.data["reports"].values():
        for fqn, figs in part.items():
            report.modules.setdefault(fqn, figs)
    report.extra["lazy"] = {"layers": n, "resumed_at": start, "activation_bytes": act_bytes,
                            "spilled": not keep, "world": dist.world if dist is not None else 1}
    report.stages.append({"stage": "lazy", "seconds": round(time.perf_counter() - t_start, 3)})
    model.lmpress_meta = {"recipe": recipe, "plan": ctx.plan, "kv_cache": ctx.kv_cache,
                          "calibration": calib.provenance() if calib is not None else None, "report": report}
    if writer:
        modules = state.data["modules"]
        finalize(state.artifact, out, model, modules, state.data.get("aliases", {}), state.data["files"],
                 state.data["weight_map"], _with_sparsity(block, modules), ct, tokenizer=tokenizer)
        shutil.rmtree(work, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    log.info("lazy: wrote %s in %.1fs", out, time.perf_counter() - t_start)
    return report
