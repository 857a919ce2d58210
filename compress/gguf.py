"""GGUF export: a model written as a file that llama.cpp loads with no other input, its weights
quantized on llama.cpp's own block grids by lmpress's calibrated methods.

- Types per tensor (`plan_types`): one llama.cpp type for the linears, with llama.cpp's rules for
  what it cannot take: a row length that is not a multiple of 256 gets the 32-block fallback of
  a K-type (`quant.gguf.LLAMA_FALLBACK`), the output head (the tied embedding when there is no
  `output.weight`) is Q6_K, or Q8_0 when its rows are not a multiple of 256, norms stay F32.
  Any map {gguf tensor name: type} can be given instead (a mixed plan, or the types of a file
  llama.cpp wrote, for a comparison at the same size).
- Quantization (`quantize_model`): `rtn` (fields fitted with the calibration importances when
  there is calibration data, llama.cpp's importance matrix) or `gptq` (GPTQ on the block grid,
  layer by layer, true-sequential, each layer seeing the quantized layers before it; v_proj's
  Hessian weighted by how much attention reads each token, so the attention sink is protected). The model's
  weights are replaced by the exact dequantized values, so the model *is* lmpress's simulation
  of the file; the codes and fields are kept for the writer, which packs them bit-exactly.
- Writing (`write_gguf`): the metadata (architecture, tokenizer, chat template) is copied from
  the GGUF the model came from; tensor names from `gguf`'s own name map; LLaMA's q/k rows
  permuted to llama.cpp's rotary layout as its converter does (a row permutation: the packed
  rows move, the blocks do not change). A model with no GGUF source, or one that needs an online
  transform (rotations kept online, activation or KV quantization), is refused with the reason.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.calibration.stats import capture_input_stats
from lmpress.quant import gguf as G

from .arch import arch_for
from .stages.gptq import stubbed

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16")
MIX_CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
FISHER_SAMPLES = 16  # calibration sequences whose gradients score a mixed plan
_FILE_TYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "IQ4_NL": "MOSTLY_IQ4_NL",
              "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
              "Q6_K": "MOSTLY_Q6_K"}


CHECKED_ARCHS = ("llama",)  # GGUF architectures whose export is compared with llama.cpp (tests/test_gguf.py)


class GGUFExportError(ValueError):
    """The model or the request cannot be written as a GGUF llama.cpp runs."""


def check_type(name: str) -> str:
    n = str(name).upper()
    if n not in FLOAT_TYPES and n not in G.TYPES:
        raise GGUFExportError(f"GGUF type {name!r} is not one lmpress writes; use one of {[*FLOAT_TYPES, *G.TYPES]}")
    return n


# ------------------------------------------------------------------------------------ tensors

def _name_map(model: nn.Module, arch_name: str):
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in archs:
        raise GGUFExportError(f"GGUF architecture {arch_name!r} is not known to the gguf package")
    return gguf.get_tensor_name_map(archs[arch_name], model.config.num_hidden_layers)


def _tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is None or head.weight is emb.weight or (
        head.weight.shape == emb.weight.shape and torch.equal(head.weight, emb.weight))


def model_tensors(model: nn.Module, arch_name: str) -> dict[str, tuple[str, torch.Tensor]]:
    """{gguf name: (module path, tensor in the model's layout)}, in the model's order; a tied head
    is written once, as token_embd."""
    for path, m in model.named_modules():
        if type(m).__module__.startswith("lmpress."):  # SimQuantLinear, PackedLinear, online transforms
            raise GGUFExportError(
                f"{path or 'the model'} is an lmpress {type(m).__name__}: a GGUF holds a plain model (llama.cpp has no "
                "online transform or lmpress quantizer); export the float model, with rotations fused offline if any")
    tmap = _name_map(model, arch_name)
    tied = _tied(model)
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        mod, _, kind = name.rpartition(".")
        g = tmap.get_name(mod)
        if g is None:
            raise GGUFExportError(f"no GGUF name for parameter {name}; the exporter knows the "
                                  f"{arch_name} tensors only (was a module added by an online transform?)")
        if g == "output" and tied:
            continue
        out[f"{g}.{kind}"] = (mod, p.detach())
    return out


def permute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k (convert_hf_to_gguf.py's LlamaModel.permute): per head, the
    rotary halves [0..h/2) and [h/2..h) interleaved. Returns idx with gguf_rows = hf_rows[idx]."""
    hd = n_rows // n_head
    idx = torch.arange(n_rows).reshape(n_head, 2, hd // 2)  # (heads, half, pair)
    return idx.transpose(1, 2).reshape(-1)


def _row_order(gname: str, model: nn.Module, arch_name: str) -> torch.Tensor | None:
    if arch_name != "llama":
        return None
    cfg = model.config
    if gname.endswith("attn_q.weight"):
        return permute_rows(cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads), cfg.num_attention_heads)
    if gname.endswith("attn_k.weight"):
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return permute_rows(heads * hd, heads)
    return None


def plan_types(model: nn.Module, ftype: str, arch_name: str = "llama") -> dict[str, str]:
    """{gguf tensor name: type} for a llama.cpp-style single-type file (see the module docstring)."""
    ftype = check_type(ftype)
    types = {}
    for gname, (_, t) in model_tensors(model, arch_name).items():
        if t.dim() < 2:
            types[gname] = "F32"
            continue
        cols = t.shape[-1]
        head = gname.startswith("output.") or (gname.startswith("token_embd.") and _tied(model))
        if ftype in FLOAT_TYPES or ftype == "Q8_0":
            types[gname] = ftype
        elif head:
            types[gname] = "Q6_K" if cols % G.QK_K == 0 else "Q8_0"
        else:
            bt = G.TYPES[ftype]
            types[gname] = G.LLAMA_FALLBACK[ftype] if cols % bt.block and ftype in G.LLAMA_FALLBACK else ftype
    return types


def bits_per_weight(model: nn.Module, types: dict[str, str], arch_name: str = "llama") -> float:
    """Bits per weight of the 2-D tensors of the file (what llama.cpp's BPW counts)."""
    bits = n = 0
    for gname, (_, t) in model_tensors(model, arch_name).items():
        if t.dim() < 2:
            continue
        ty = types[gname]
        bits += t.numel() * (32 if ty == "F32" else 16 if ty == "F16" else G.TYPES[ty].bits_per_weight)
        n += t.numel()
    return bits / n


# ------------------------------------------------------------------------------------ quantization

def _solve(rels, modules, H, types_of, method, damp, payload, fqn_of):
    """Quantize modules reading one input (Hessian H): those of one type are solved together."""
    by_type: dict[str, list[str]] = {}
    for rel in rels:
        by_type.setdefault(types_of[rel], []).append(rel)
    figures = []
    for ty, same in by_type.items():
        if ty in FLOAT_TYPES:
            continue
        bt = G.TYPES[ty]
        W = torch.cat([modules[r].weight.detach().float() for r in same])  # (sum of out, in)
        if method == "gptq":
            u, f, st = G.gptq(bt, W, H, damp=damp)
            figures.append((st["loss"], st["rtn_loss"]))
        else:
            u, f = G.rtn(bt, W, H.diagonal() if H is not None else None)
        Wq = G.dequantize(bt, u, f)
        o = 0
        for r in same:
            n = modules[r].weight.shape[0]
            rows = slice(o, o + n)
            sub = G.Fields(f.d[rows], None if f.m is None else f.m[rows], None if f.sc is None else f.sc[rows],
                           None if f.mn is None else f.mn[rows])
            modules[r].weight.data.copy_(Wq[rows].to(modules[r].weight.dtype))
            payload[fqn_of[r]] = (ty, u[rows].contiguous(), sub)
            o += n
    return figures


class _Acc:
    def __init__(self):
        self.H, self.n = None, 0

    def value(self) -> torch.Tensor:
        return (self.H / max(self.n, 1)).float()


@contextmanager
def _no_hessian():
    yield None


@contextmanager
def read_weighted_hessian(attn: nn.Module, v_proj: nn.Module):
    """The Hessian of v_proj's output error as the attention output reads it: token t's value
    reaches query t' with weight A[t', t], so (errors independent across tokens) its squared error
    counts Σ_t' A[t', t]² times (mean over heads, normalized to mean 1 over tokens), not once.
    The attention sink (the first token, which most queries read most) weighs most: uniform
    weights under-protect it, and GPTQ trades its error away. A (causal softmax of the rotary
    q·k / sqrt(d), LLaMA-style) is recomputed from the layer's own q_proj / k_proj in a hook."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    acc = _Acc()
    cfg_heads = attn.config.num_attention_heads
    kv_heads = attn.config.num_key_value_heads or cfg_heads
    hd = getattr(attn, "head_dim", None) or attn.config.hidden_size // cfg_heads

    def hook(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, hidden): v_proj's input
        cos, sin = kwargs["position_embeddings"]
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, cfg_heads, hd).transpose(1, 2)  # (B, heads, T, hd)
        k = attn.k_proj(x).view(B, T, kv_heads, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(cfg_heads // kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / hd ** 0.5  # (B, heads, T, T)
        scores.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        w = scores.softmax(-1).square_().sum(-2).mean(1)  # (B, T): Σ_t' A[t', t]², mean over heads
        w = w / w.mean(1, keepdim=True)
        xd = x.double()
        H = torch.einsum("bti,bt,btj->ij", xd, w.double(), xd)
        acc.H = H if acc.H is None else acc.H + H
        acc.n += B * T

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield acc
    finally:
        handle.remove()


@torch.no_grad()
def quantize_model(model: nn.Module, types: dict[str, str], calib=None, method: str = "gptq",
                   damp: float = 0.01, batch_size: int = 8, arch_name: str = "llama",
                   calib_reads: bool = True) -> dict:
    """Quantize every 2-D tensor of `model` to its type in place (weights := exact dequantized
    values); returns the payload {module path: (type, codes, fields)} for `write_gguf`.
    `calib_reads` (default): v_proj's Hessian weighs each token by how much the attention reads it
    (`read_weighted_hessian`); on SmolLM2 Q4_0 that is the difference between losing and winning
    against llama.cpp's imatrix (v_proj GPTQ'd on the plain Hessian: +7% perplexity)."""
    if method not in ("gptq", "rtn"):
        raise GGUFExportError(f"GGUF method {method!r}: use gptq or rtn")
    if method == "gptq" and calib is None:
        raise GGUFExportError("GGUF method gptq needs calibration data; pass calib=... or use method rtn")
    tensors = model_tensors(model, arch_name)
    for g in tensors:
        if g not in types:
            raise GGUFExportError(f"the type map has no entry for tensor {g}")
        check_type(types[g])
    path_type = {path: types[g] for g, (path, t) in tensors.items() if t.dim() == 2}
    payload: dict = {}
    arch = arch_for(model)
    done = set()
    t0 = time.perf_counter()
    if calib is not None:
        runner = LayerwiseRunner(model, arch, calib.tokens, batch_size=batch_size)
        losses = []
        for step in runner:
            prefix = f"{arch.layers}.{step.index}."
            groups = arch.sequential_groups
            for gi, group in enumerate(groups):
                modules = {rel: step.layer.get_submodule(rel) for rel in group}
                types_of = {rel: path_type.get(prefix + rel, "F32") for rel in group}
                later = [rel for g in groups[gi + 1:] for rel in g]  # cannot reach this input: zero stubs
                fqn = {r: prefix + r for r in group}
                reads = arch.v_proj in group and calib_reads
                attn = step.layer.get_submodule(arch.attention) if reads else None
                with stubbed(step.layer, later), capture_input_stats({group[0]: modules[group[0]]}, norms=False) as stats, \
                        (read_weighted_hessian(attn, modules[arch.v_proj]) if reads else _no_hessian()) as Hv:
                    step.forward()
                H = stats[group[0]].hessian
                rest = [r for r in group if not (reads and r == arch.v_proj)]
                losses += _solve(rest, modules, H, types_of, method, damp, payload, fqn)
                if reads:  # v: its error reaches the output as often as its token is attended to
                    losses += _solve([arch.v_proj], modules, Hv.value(), types_of, method, damp, payload, fqn)
                stats[group[0]].release()
                done.update(prefix + r for r in group)
            log.info("gguf: layer %d done (%.0fs)", step.index, time.perf_counter() - t0)
        if losses:
            g, r = sum(x for x, _ in losses), sum(y for _, y in losses)
            log.info("gguf: %s layer objective %.4g vs rtn %.4g (ratio %.3f)", method, g, r, g / r if r else float("nan"))
    for path, ty in path_type.items():  # embeddings, head, and everything without calibration
        if path not in done and ty not in FLOAT_TYPES:
            _solve(["w"], {"w": model.get_submodule(path)}, None, {"w": ty}, "rtn", damp, payload, {"w": path})
    log.info("gguf: quantized %d tensors in %.1fs", len(payload), time.perf_counter() - t0)
    return payload


@contextmanager
def llamacpp_activations(model: nn.Module, types: dict[str, str], arch_name: str = "llama"):
    """Within the block, the model's linears (and the head) see their inputs as llama.cpp's CPU
    matmul does next to each tensor's type (`quant.gguf.vec_dot_activations`): with the
    dequantized weights of `quantize_model`, the model is then lmpress's simulation of the file."""
    handles = []
    tensors = model_tensors(model, arch_name)
    head = model.get_output_embeddings()
    try:
        for g, (path, t) in tensors.items():
            if t.dim() != 2:
                continue
            ty = types.get(g, "F32")
            hook = lambda _m, args, ty=ty: (G.vec_dot_activations(args[0], ty), *args[1:])  # noqa: E731
            if g.startswith("token_embd.") and _tied(model) and head is not None:
                handles.append(head.register_forward_pre_hook(hook))  # the tied head multiplies, the lookup does not
            elif not g.startswith("token_embd."):
                handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ writing

def _copy_metadata(reader, writer, skip: set[str]) -> None:
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), vtype, sub)


def write_gguf(model: nn.Module, out: str | os.PathLike, source: str | os.PathLike, types: dict[str, str],
               payload: dict | None = None) -> Path:
    """Write `model` as a GGUF at `out`, metadata from the GGUF `source`; quantized tensors from
    `payload` (`quantize_model`) where present, else RTN on the type's grid. Atomic (temp + rename)."""
    import gguf

    out, source = Path(out), Path(source)
    reader = gguf.GGUFReader(source)
    arch_name = str(reader.fields["general.architecture"].contents())
    tensors = model_tensors(model, arch_name)
    payload = payload or {}
    ftype = _majority(types, tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch_name)
        _copy_metadata(reader, writer, {"general.architecture", "general.file_type", "general.quantization_version"})
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPE[ftype])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, (path, t) in tensors.items():
            ty = check_type(types.get(gname, "F32"))
            order = _row_order(gname, model, arch_name)
            if ty in FLOAT_TYPES:
                arr = t.float() if order is None else t.float()[order]
                writer.add_tensor(gname, arr.numpy().astype(np.float32 if ty == "F32" or arr.dim() < 2 else np.float16))
                continue
            if t.dim() != 2:
                raise GGUFExportError(f"{gname}: a {t.dim()}-D tensor cannot take the block type {ty}; keep it F32")
            if path in payload and payload[path][0] == ty:
                _, u, f = payload[path]
            else:
                u, f = G.rtn(ty, t.float())
            data = G.pack(ty, u, f)  # (rows, row bytes)
            if order is not None:
                data = data[order.numpy()]
            writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType[ty])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("gguf: wrote %s (%.1f MiB, %s)", out, out.stat().st_size / 2**20, ftype)
    return out


def _majority(types: dict[str, str], tensors) -> str:
    count: dict[str, int] = {}
    for g, (_, t) in tensors.items():
        if t.dim() == 2:
            count[types.get(g, "F32")] = count.get(types.get(g, "F32"), 0) + t.numel()
    return max(count, key=count.get) if count else "F32"


def export_gguf(model: nn.Module, out: str | os.PathLike, source: str | os.PathLike, ftype: str | None = None,
                types: dict[str, str] | None = None, calib=None, method: str = "gptq", damp: float = 0.01,
                batch_size: int = 8, bpw: float | None = None,
                candidates: tuple[str, ...] = MIX_CANDIDATES) -> tuple[Path, dict[str, str]]:
    """Quantize (in place) and write: `types`, a single llama.cpp `ftype`, or (with `bpw`) a mixed
    plan at that many bits per weight over the 2-D tensors, the decoder linears chosen among
    `candidates` (`allocate_types`, on `fisher_samples` calibration sequences) and the rest as
    `ftype` places them. Returns (path, types)."""
    import gguf

    arch_name = str(gguf.GGUFReader(source).fields["general.architecture"].contents())
    if arch_name not in CHECKED_ARCHS:
        raise GGUFExportError(f"GGUF export is checked against llama.cpp for {', '.join(CHECKED_ARCHS)} only, and the source is "
                              f"{arch_name!r} (its converter rewrites tensors its own way, e.g. Gemma's norms are stored as 1 + w); "
                              "export compressed-tensors instead (`lmpress compress`)")
    if types is None:
        if ftype is None:
            raise GGUFExportError("export_gguf needs a type (ftype='Q4_K', ...) or a type map")
        types = plan_types(model, ftype, arch_name)
        if bpw is not None:
            if calib is None:
                raise GGUFExportError("a mixed GGUF plan (bpw) scores the types on calibration data; pass calib=...")
            options = type_options(model, candidates, arch_name)
            tensors = model_tensors(model, arch_name)
            n2d = sum(t.numel() for _, t in tensors.values() if t.dim() == 2)
            fixed = {g: ty for g, ty in types.items() if g not in options}
            budget = int(bpw * n2d / 8) + sum(tensor_bytes(t, "F32") for _, t in tensors.values() if t.dim() < 2)
            types = allocate_types(model, fixed, options, budget, calib.tokens[:FISHER_SAMPLES], arch_name)
    if method == "gptq" and calib is None:
        method = "rtn"
        log.info("gguf: no calibration data; fitting the blocks with RTN")
    payload = quantize_model(model, types, calib=calib, method=method, damp=damp, batch_size=batch_size,
                             arch_name=arch_name)
    return write_gguf(model, out, source, types, payload), types


# ------------------------------------------------------------------------------------ mixed plans


def fisher_diagonal(model: nn.Module, tokens: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal of the calibration loss for the weights at `paths`: Σ over
    sequences of the squared per-sequence gradient (SqueezeLLM's sensitivity weights)."""
    mods = {p: model.get_submodule(p) for p in paths}
    fisher = {p: torch.zeros_like(m.weight, dtype=torch.float32) for p, m in mods.items()}
    was = {p: m.weight.requires_grad for p, m in mods.items()}
    try:
        for m in mods.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            for seq in tokens.split(1):  # (1, T)
                logits = model(input_ids=seq, use_cache=False).logits
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                loss = -lp.gather(-1, seq[:, 1:, None]).mean()
                for p, g in zip(mods, torch.autograd.grad(loss, [m.weight for m in mods.values()])):
                    fisher[p] += g.float().pow(2)
    finally:
        for p, m in mods.items():
            m.weight.requires_grad_(was[p])
    return fisher


def allocate_types(model: nn.Module, fixed: dict[str, str], options: dict[str, list[str]], budget_bytes: int,
                   tokens: torch.Tensor, arch_name: str = "llama") -> dict[str, str]:
    """A block type per tensor under a file-size budget: the multiple-choice knapsack of
    `quant.mixed.allocate` over exact GGUF bytes, minimizing Σ ½ F ⊙ ΔW² (Fisher-weighted RTN
    error on each candidate grid). `fixed` {gguf name: type} are not chosen (norms, embedding);
    `options` {gguf name: [types]} are. Returns the full type map."""
    from lmpress.quant.mixed import allocate

    tensors = model_tensors(model, arch_name)
    names = list(options)
    fisher = fisher_diagonal(model, tokens, [tensors[g][0] for g in names])
    fixed_bytes = sum(tensor_bytes(t, fixed[g]) for g, (_, t) in tensors.items() if g in fixed)
    scores, costs = [], []
    for g in names:
        path, t = tensors[g]
        W = t.float()
        row_s, row_c = [], []
        for ty in options[g]:
            u, f = G.rtn(ty, W)
            dW = W - G.dequantize(G.TYPES[ty], u, f)
            row_s.append(0.5 * float((fisher[path] * dW.pow(2)).double().sum()))
            row_c.append(tensor_bytes(t, ty))
        scores.append(row_s)
        costs.append(row_c)
    limit = budget_bytes - fixed_bytes
    alloc = allocate(scores, {"bytes": costs}, {"bytes": limit})
    plan = dict(fixed)
    plan.update({g: options[g][j] for g, j in zip(names, alloc.choice)})
    log.info("gguf: mixed plan %s within %d bytes", {ty: sum(1 for g in names if plan[g] == ty) for ty in set(plan.values())}, budget_bytes)
    return plan


def tensor_bytes(t: torch.Tensor, ty: str) -> int:
    if ty in FLOAT_TYPES:
        return t.numel() * (4 if ty == "F32" else 2)
    return G.nbytes(ty, t.numel())


def type_options(model: nn.Module, candidates: tuple[str, ...], arch_name: str = "llama") -> dict[str, list[str]]:
    """For each linear of the decoder layers, the candidate types its row length allows."""
    out = {}
    for g, (path, t) in model_tensors(model, arch_name).items():
        if t.dim() == 2 and g.startswith("blk."):
            out[g] = [c for c in candidates if t.shape[1] % G.TYPES[c].block == 0]
    return out
