"""Export a packed checkpoint as a GPTQ checkpoint, and read GPTQ checkpoints back.

The GPTQ layout (AutoGPTQ's `QuantLinear.pack`, GPTQModel's v2 ``checkpoint_format``), per
quantized linear of `out` x `in` weights, b bits, `n_groups` groups along the input:

- ``qweight`` int32 [in*b/32, out]: packed along the *input* dimension; word [w, n] holds the
  unsigned codes u = q + 2^(b-1) of inputs k = w*(32/b) + j at shift j*b. That is our on-disk
  ``weight_packed`` [out, words] transposed word for word (`formats.to_kn_layout`), for b in
  {2, 4, 8}; GPTQ's 3-bit layout is its own and is not written here;
- ``qzeros`` int32 [n_groups, out*b/32]: the unsigned zero points z_u = z + 2^(b-1) packed along
  the *output* dimension the same way. ``gptq_v2`` stores z_u; the original ``gptq`` (v1) layout
  stores z_u - 1 and readers add 1 back, so z_u = 0 has no v1 encoding (the export refuses it);
- ``scales`` [n_groups, out] (float16 by default, as GPTQ kernels expect), ``g_idx`` int32 [in]
  = k // group_size (our groups are contiguous: no act-order permutation to record), ``bias``;
- ``quantize_config.json`` and config.json's ``quantization_config`` (``quant_method: gptq``,
  bits, group_size (-1 per channel), sym, desc_act false, checkpoint_format / format).

Dequantization, ours and GPTQ's: w = (u - z_u) * s = (q - z) * s: the same numbers.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmpress.kernels.formats import from_kn_layout, pack, to_kn_layout, unpack
from lmpress.quant.scheme import QuantArgs, QuantScheme

from .checkpoint import WEIGHTS_FILE, CheckpointError, read_manifest
from . import ct_format

log = logging.getLogger(__name__)

GPTQ_FORMATS = ("gptq_v2", "gptq")  # GPTQModel's checkpoint_format names; v2 first: it encodes every zero point
GPTQ_BITS = (2, 4, 8)
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def gptq_why_not(manifest: dict) -> str | None:
    """None when the artifact has a GPTQ form, else why not."""
    block = manifest.get("lmpress") or {}
    if block.get("online_transforms") or block.get("attention"):
        return "online transforms / lmpress attention settings have no GPTQ form"
    if manifest.get("kv_cache"):
        return "KV-cache quantization has no GPTQ form"
    schemes = {QuantScheme.from_dict(d) for d in manifest["modules"].values()}
    if len(schemes) != 1:
        return f"GPTQ describes one scheme for every layer; this artifact has {len(schemes)}"
    s = next(iter(schemes))
    if s.inputs is not None or s.sparsity is not None or s.weights is None:
        return f"GPTQ is weight-only; {s.name} quantizes activations or is sparse"
    if s.weights.type == "float":
        return f"GPTQ's format holds integer codes; {s.name} has floating-point weights (compressed-tensors form instead)"
    if s.weights.bits not in GPTQ_BITS:
        return f"{s.weights.bits}-bit weights: GPTQ's layout is written here for {list(GPTQ_BITS)} bits"
    if s.weights.granularity not in ("channel", "group"):
        return f"{s.weights.granularity}-wise scales have no GPTQ form"
    return None


# ---- one linear ---------------------------------------------------------------------------
def _zeros_u(zero: torch.Tensor | None, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned zero points (rows, n_groups) int64: z + 2^(b-1) (2^(b-1) for symmetric)."""
    z = torch.zeros_like(scale) if zero is None else zero
    if not torch.equal(z, z.round()):
        raise ValueError("non-integer zero points have no GPTQ form")
    return z.round().to(torch.int64) + (1 << (bits - 1))


def to_gptq(weight_packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs,
            in_features: int, checkpoint_format: str = "gptq_v2", dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One PackedLinear's buffers -> {qweight, qzeros, scales, g_idx}."""
    b = args.bits
    per = 32 // b
    out_features = weight_packed.shape[0]
    if in_features % per or out_features % per:
        raise ValueError(f"GPTQ packs {per} {b}-bit codes a word along both dimensions; {out_features}x{in_features} does not divide")
    gs = args.group_size if args.granularity == "group" else in_features
    z_u = _zeros_u(zero, scale, b).t()  # (n_groups, out)
    if checkpoint_format == "gptq":
        if bool((z_u == 0).any()):
            raise ValueError("a zero point of 0 (unsigned) has no encoding in the v1 'gptq' layout (stored as z-1); export as gptq_v2")
        z_u = z_u - 1
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: use one of {list(GPTQ_FORMATS)}")
    qzeros = pack((z_u - (1 << (b - 1))).to(torch.int8), b)  # (n_groups, out*b/32): signed codes, stored unsigned
    return {
        "qweight": to_kn_layout(weight_packed, b),  # (in*b/32, out)
        "qzeros": qzeros,
        "scales": scale.t().contiguous().to(dtype),  # (n_groups, out)
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // gs).to(torch.int32),
    }


def from_gptq(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str, sym: bool,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """{qweight, qzeros, scales, g_idx} -> (weight_packed (out, words), scale (out, n_groups), zero or None, group_size).

    group_size is -1 for one group; a g_idx that is not k // group_size (act-order without static
    groups) has no lmpress form and is refused."""
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"].to(torch.int64)
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    n_groups = scales.shape[0]
    gs = -1 if n_groups == 1 else int((g_idx == 0).sum())  # a partial last group is allowed
    expect = torch.zeros_like(g_idx) if gs == -1 else torch.arange(in_features) // gs
    if gs != -1 and -(-in_features // gs) != n_groups:
        raise CheckpointError(f"g_idx groups of {gs} do not match {n_groups} rows of scales")
    if g_idx.shape[0] != in_features or not torch.equal(g_idx, expect):
        raise CheckpointError("g_idx is not contiguous groups (act-order without static groups): no lmpress form")
    z_u = unpack(qzeros, bits, out_features).to(torch.int64) + (1 << (bits - 1))  # (n_groups, out)
    if checkpoint_format == "gptq":
        z_u = z_u + 1
    zero = (z_u - (1 << (bits - 1))).t().to(dtype).contiguous()  # (out, n_groups), signed
    if sym:
        if bool((zero != 0).any()):
            raise CheckpointError("sym: true but the zero points are not 2^(bits-1)")
        zero = None
    weight_packed = from_kn_layout(qweight, bits)
    return weight_packed, scales.t().to(dtype).contiguous(), zero, gs


# ---- whole checkpoints --------------------------------------------------------------------
def export_gptq(src: str | Path, out: str | Path, checkpoint_format: str = "gptq_v2",
                dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Write the weight-only lmpress artifact `src` as a GPTQ checkpoint in `out`."""
    src, out = Path(src), Path(out)
    config, manifest = read_manifest(src)
    reason = gptq_why_not(manifest)
    if reason:
        raise ValueError(f"{src} cannot be exported as GPTQ: {reason}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another directory or pass --overwrite")
    schemes = {fqn: QuantScheme.from_dict(d) for fqn, d in manifest["modules"].items()}
    state = load_file(str(src / WEIGHTS_FILE))
    if manifest.get("quant_method") == ct_format.QUANT_METHOD:
        state = ct_format.from_disk(state, schemes, manifest["format"])
    args = next(iter(schemes.values())).weights
    tensors: dict[str, torch.Tensor] = {}
    for fqn, s in schemes.items():
        in_features = int(state.pop(f"{fqn}.weight_shape")[1])
        g = to_gptq(state.pop(f"{fqn}.weight_packed"), state.pop(f"{fqn}.weight_scale"),
                    state.pop(f"{fqn}.weight_zero_point", None), s.weights, in_features, checkpoint_format, dtype)
        tensors.update({f"{fqn}.{k}": v for k, v in g.items()})
        if f"{fqn}.bias" in state:
            tensors[f"{fqn}.bias"] = state.pop(f"{fqn}.bias").to(dtype)
    tensors.update({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()})
    qc = {"quant_method": "gptq", "bits": args.bits,
          "group_size": args.group_size if args.granularity == "group" else -1,
          "desc_act": False, "sym": args.symmetric, "static_groups": False, "true_sequential": True,
          "damp_percent": 0.01, "lm_head": False, "checkpoint_format": checkpoint_format, "format": checkpoint_format,
          "meta": {"quantizer": ["lmpress"], "lmpress_recipe": (manifest.get("recipe") or {}).get("name")}}
    config = {**config, "quantization_config": qc, "torch_dtype": str(dtype).removeprefix("torch."),
              "dtype": str(dtype).removeprefix("torch.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}, indent=2))
        for f in src.iterdir():  # tokenizer, generation config, recipe
            if f.is_file() and f.name not in (WEIGHTS_FILE, "config.json", "report.json"):
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d quantized linears as %s to %s", len(schemes), checkpoint_format, out)
    return out


def read_gptq(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """A GPTQ checkpoint -> (config without quantization_config, {fqn: {"scheme", "weight_packed",
    "weight_scale", "weight_zero_point", "bias"}}, the other tensors)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.pop("quantization_config", None) or {}
    if (path / "quantize_config.json").is_file():
        qc = {**json.loads((path / "quantize_config.json").read_text()), **qc}
    if qc.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"{path}: quant_method {qc.get('quant_method')!r} is not gptq")
    bits, sym = int(qc["bits"]), bool(qc.get("sym", True))
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in GPTQ_FORMATS or bits not in GPTQ_BITS:
        raise CheckpointError(f"{path}: checkpoint_format {fmt!r} with {bits} bits is not read here ({list(GPTQ_FORMATS)}, {list(GPTQ_BITS)} bits)")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    modules: dict[str, dict[str, Any]] = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        fqn = key.removesuffix(".qweight")
        t = {s: state.pop(f"{fqn}.{s}") for s in _QUANT_SUFFIXES if f"{fqn}.{s}" in state}
        wp, scale, zero, gs = from_gptq(t, bits, fmt, sym)
        wargs = QuantArgs(bits=bits, granularity="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs, symmetric=sym)
        modules[fqn] = {"scheme": QuantScheme(weights=wargs), "weight_packed": wp, "weight_scale": scale,
                        "weight_zero_point": zero, "bias": t.get("bias")}
    return config, modules, state


def load_gptq(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A GPTQ checkpoint (ours or another tool's, contiguous groups) as an lmpress runtime model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmpress.kernels.linear import PackedLinear

    from .surgery import set_module

    config_dict, modules, rest = read_gptq(path)
    config = AutoConfig.for_model(**config_dict)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for fqn, m in modules.items():
        old = model.get_submodule(fqn)
        new = PackedLinear(old.in_features, old.out_features, m["scheme"], bias=m["bias"] is not None, dtype=dtype, device="meta")
        set_module(model, fqn, new)
        rest.update({f"{fqn}.{k}": m[k] for k in ("weight_packed", "weight_scale", "weight_zero_point", "bias") if m[k] is not None})
        rest[f"{fqn}.weight_shape"] = torch.tensor([old.out_features, old.in_features], dtype=torch.int64)
    rest = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith((".weight_scale", ".weight_zero_point")) else v)
            for k, v in rest.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in missing:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
