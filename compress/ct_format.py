"""The compressed-tensors form of a checkpoint: when it applies, its config, its tensors.

An artifact is written in compressed-tensors form when everything in it is expressible there,
so stock `transformers` + `compressed-tensors` (and vLLM) load it without lmpress:

- one quantization scheme for every quantized linear (mixed precision stays lmpress-only);
- integer weights of 2, 3, 4 or 8 bits, per channel or in groups that divide every layer's
  input width, symmetric or asymmetric (offline clipping and GPTQ leave nothing to describe);
- activations either kept in high precision (``pack-quantized``), or int8 per-token dynamic
  symmetric without clipping on int8 per-channel symmetric weights (W8A8, ``int-quantized``);
- no online transform, no attention settings (KV quantization), no N:M sparsity. Rotations and
  smoothing fused into the weights offline leave a plain model and are fine.

Tensors, as compressed-tensors 0.20 reads them (``compressors/pack_quantized/base.py`` and
``compressors/naive_quantized/base.py`` of that package are the source of these facts):

- ``pack-quantized``: ``weight_packed`` int32 [out, ceil(in*b/32)] (our on-disk layout, the same
  dense little-endian bitstream for every b in 1..8), ``weight_scale`` [out, n_groups],
  ``weight_shape`` int64 [2]; an asymmetric ``weight_zero_point`` holds the signed int8 zero
  points packed the same way *along the output dimension*: int32 [ceil(out*b/32), n_groups];
- ``int-quantized``: ``weight`` int8 [out, in] (the signed codes), ``weight_scale`` [out, 1]; no
  ``weight_shape``.

Activation quantization at run time is the reader's own: compressed-tensors' reference forward
in transformers takes scale = absmax/127.5 per token (``calculate_qparams``: (q_max - q_min)/2),
vLLM's dynamic int8 kernel absmax/127 (``csrc/quantization/compressed_tensors/
int8_quant_kernels.cu``). lmpress's W8A8 preset sets ``full_range`` (absmax/127.5), so its
artifacts give the same logits in stock transformers as in `load()`; a scheme without it
(absmax/127) matches vLLM's rule instead. On SmolLM2-135M the two rules move logits by up to 5.9
(session 3, bench/export_check.py), so the rule is part of the scheme, not a detail.

lmpress's own runtime form keeps float zero points and always ``weight_packed``; `to_disk` and
`from_disk` convert between the two, exactly (codes and zero points are integers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from lmpress.kernels.formats import pack, unpack
from lmpress.quant.scheme import QuantScheme

QUANT_METHOD = "compressed-tensors"
PACKED, INT = "pack-quantized", "int-quantized"
TESTED_VERSION = "0.20.0"  # the compressed-tensors release these layouts were checked against


@dataclass(frozen=True)
class CTForm:
    """The compressed-tensors description of an artifact: its format and config dict."""

    format: str
    config: dict[str, Any]


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # not installed: not needed to write the format
        return TESTED_VERSION


def _args(a) -> dict[str, Any]:
    """Our QuantArgs -> compressed-tensors QuantizationArgs fields (the set every release knows)."""
    strategy = {"group": "group", "channel": "channel", "token": "token"}[a.granularity]
    return {"num_bits": a.bits, "type": "int", "symmetric": a.symmetric, "group_size": a.group_size,
            "strategy": strategy, "dynamic": a.dynamic}


def why_not(schemes: Mapping[str, QuantScheme], in_features: Mapping[str, int], block: Any, kv: Any) -> str | None:
    """None when compressed-tensors can describe the artifact, else the first reason it cannot."""
    if block and (block.get("online_transforms") or block.get("attention")):  # (2:4 metadata: the scheme says)
        return "online transforms / lmpress attention settings have no compressed-tensors form"
    if kv is not None:
        return "KV-cache quantization has no compressed-tensors form here"
    if not schemes:
        return "no quantized linears"
    distinct = {s for s in schemes.values()}
    if len(distinct) > 1:
        return f"mixed precision ({len(distinct)} schemes)"
    s = next(iter(distinct))
    w, a = s.weights, s.inputs
    if s.sparsity is not None:
        return f"{s.sparsity} sparsity"
    if w is None:
        return "activation-only quantized linears"
    if w.type == "float" or (a is not None and a.type == "float"):
        return "floating-point formats (FP8, NVFP4, MXFP4) are not written in compressed-tensors form yet"
    if w.granularity not in ("channel", "group"):
        return f"{w.granularity}-wise weight scales"
    if w.granularity == "group":
        bad = [n for n, k in in_features.items() if k % w.group_size]
        if bad:
            return f"group size {w.group_size} does not divide the input width of {bad[0]} ({in_features[bad[0]]})"
    if a is not None:
        w8a8 = (a.bits == 8 and a.granularity == "token" and a.dynamic and a.symmetric and a.clip_ratio == 1.0
                and w.bits == 8 and w.granularity == "channel" and w.symmetric)
        if not w8a8:
            return f"{s.name} activations (only int8 per-token dynamic symmetric on int8 channel weights, W8A8)"
    return None


def ct_form(model: nn.Module, schemes: Mapping[str, QuantScheme], block: Any, kv: Any) -> tuple[CTForm | None, str | None]:
    """(form, None) when the model's quantized linears `schemes` are expressible, else (None, reason)."""
    in_features = {n: model.get_submodule(n).in_features for n in schemes}
    reason = why_not(schemes, in_features, block, kv)
    if reason is not None:
        return None, reason
    s = next(iter(schemes.values()))
    fmt = INT if s.inputs is not None else PACKED
    group = {"targets": ["Linear"], "weights": _args(s.weights),
             "input_activations": _args(s.inputs) if s.inputs is not None else None, "output_activations": None}
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in schemes)
    config = {"quant_method": QUANT_METHOD, "format": fmt, "config_groups": {"group_0": group}, "ignore": ignore,
              "kv_cache_scheme": None, "quantization_status": "compressed", "global_compression_ratio": None,
              "version": _ct_version()}
    if not s.weights.symmetric and s.inputs is None:
        # transformers 5.x builds the asymmetric zero point's placeholder unpacked, so the packed
        # tensor vLLM and compressed-tensors write is refused as a size mismatch (known:
        # vllm-project/llm-compressor#1618); its dequantize-at-load route unpacks it correctly, and
        # for weight-only schemes it gives the same dense weights the default route would. vLLM
        # ignores the key.
        config["dequantize"] = True
    return CTForm(fmt, config), None


def to_disk(tensors: dict[str, torch.Tensor], schemes: Mapping[str, QuantScheme], fmt: str) -> dict[str, torch.Tensor]:
    """lmpress runtime tensors (PackedLinear state) -> compressed-tensors tensors, in a new dict."""
    out = dict(tensors)
    for fqn, s in schemes.items():
        w = s.weights
        if fmt == INT:
            shape = out.pop(f"{fqn}.weight_shape")
            codes = unpack(out.pop(f"{fqn}.weight_packed"), w.bits, int(shape[1]))  # (out, in) int8
            out[f"{fqn}.weight"] = codes.contiguous()
        zkey = f"{fqn}.weight_zero_point"
        if zkey in out:
            z = out[zkey]  # (out, n_groups) float, integer-valued
            out[zkey] = pack(z.round().to(torch.int8).t().contiguous(), w.bits).t().contiguous()  # (words, n_groups)
    return out


def from_disk(state: dict[str, torch.Tensor], schemes: Mapping[str, QuantScheme], fmt: str) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors -> lmpress runtime tensors (exact inverse of `to_disk`), in place."""
    for fqn, s in schemes.items():
        w = s.weights
        if fmt == INT:
            codes = state.pop(f"{fqn}.weight")  # (out, in) int8
            state[f"{fqn}.weight_packed"] = pack(codes, w.bits)
            state[f"{fqn}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        zkey = f"{fqn}.weight_zero_point"
        if zkey in state:
            rows = int(state[f"{fqn}.weight_shape"][0])
            z = unpack(state[zkey].t().contiguous(), w.bits, rows)  # (n_groups, out) int8
            state[zkey] = z.t().float().contiguous()
    return state
