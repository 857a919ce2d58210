"""The compressed-tensors form of a checkpoint: when it applies, its config, its tensors.

An artifact is written in compressed-tensors form when everything in it is expressible there,
so stock `transformers` + `compressed-tensors` (and vLLM) load it without lmpress:

- one quantization scheme for every quantized linear (mixed precision stays lmpress-only);
- integer weights of 2, 3, 4 or 8 bits, per channel or in groups that divide every layer's
  input width, symmetric or asymmetric (offline clipping and GPTQ leave nothing to describe);
- activations either kept in high precision (``pack-quantized``), or int8 per-token dynamic
  symmetric without clipping on int8 per-channel symmetric weights (W8A8, ``int-quantized``);
- floating-point weights: FP8 E4M3 per channel, per tensor or in square tiles whose edge divides
  every input width, alone or with FP8 per-token or per-group dynamic activations
  (``float-quantized``: FP8_DYNAMIC, FP8_BLOCK with ``block_structure``); NVFP4 weights alone
  (``nvfp4-pack-quantized``: NVFP4A16); MXFP4 weights, alone or with MXFP4 dynamic activations
  (``mxfp4-pack-quantized``: MXFP4A16, MXFP4); MXFP8 likewise (``mxfp8-quantized``: MXFP8A16, MXFP8); FP8 static per-tensor activations (FP8:
  ``input_scale`` [1]) and NVFP4 activations with a calibrated tensor scale (NVFP4:
  ``input_global_scale`` [1] = 1 / s_t, group scales computed at run time, ``dynamic: local``);
  packed integer weights with FP8 per-token dynamic activations (W4AFP8, ``pack-quantized``);
- no online transform, no attention settings (KV quantization) but the FP8 KV cache
  (`kv_cache_scheme`: FP8 E4M3, static, strategy tensor or attn_head; `k_scale` / `v_scale` on
  each attention module, as vLLM reads them), no N:M sparsity. Rotations and smoothing fused
  into the weights offline leave a plain model and are fine. Stock transformers 5.25 with
  compressed-tensors 0.20 does not apply a `kv_cache_scheme` (compressed-tensors hooks attention
  modules whose forward takes `past_key_values`; LlamaAttention's now takes `cache`), so there an
  FP8-KV artifact runs with a full-precision cache: its logits equal `load()`'s with the cache
  quantization off (`kernels.attention.cache_quant_off`).

Tensors, as compressed-tensors 0.20 reads them (``compressors/pack_quantized/base.py`` and
``compressors/naive_quantized/base.py`` of that package are the source of these facts):

- ``pack-quantized``: ``weight_packed`` int32 [out, ceil(in*b/32)] (our on-disk layout, the same
  dense little-endian bitstream for every b in 1..8), ``weight_scale`` [out, n_groups],
  ``weight_shape`` int64 [2]; an asymmetric ``weight_zero_point`` holds the signed int8 zero
  points packed the same way *along the output dimension*: int32 [ceil(out*b/32), n_groups];
- ``int-quantized``: ``weight`` int8 [out, in] (the signed codes), ``weight_scale`` [out, 1]; no
  ``weight_shape``;
- ``float-quantized``: ``weight`` float8_e4m3fn [out, in] (our FP8 codes are its bit patterns),
  ``weight_scale`` float32 [out, 1] (per tensor: [1]); no ``weight_shape``;
- ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` (``compressors/nvfp4``, ``compressors/mxfp4``):
  ``weight_packed`` uint8 [out, in/2], two E2M1 codes a byte, the even column in the low nibble,
  each code sign << 3 | magnitude index (our 4-bit codes' two's-complement nibbles: our int32
  words viewed as bytes, each nibble's top bit flipped, as `pack` stores code + 8); NVFP4 adds
  ``weight_scale`` float8_e4m3fn [out, in/16] and ``weight_global_scale`` float32 [1] = 1 / s_t
  (dequantized scale = weight_scale / weight_global_scale), MXFP4 ``weight_scale`` uint8
  [out, in/32], the E8M0 biased exponent (scale = 2^(e - 127)); no ``weight_shape``;
- ``mxfp8-quantized``: ``weight`` float8_e4m3fn [out, in], ``weight_scale`` uint8 [out, in/32] (E8M0).

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
from lmpress.quant.fp import split_nvfp4
from lmpress.quant.scheme import QuantArgs, QuantScheme

QUANT_METHOD = "compressed-tensors"
PACKED, INT, FLOAT = "pack-quantized", "int-quantized", "float-quantized"
NVFP4, MXFP4, MXFP8, DENSE = "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized", "dense"
TESTED_VERSION = "0.20.0"  # the compressed-tensors release these layouts were checked against


FP4_FLOAT32_NOTE = ("compressed-tensors 0.20 decompresses FP4 / MXFP8 weights to bfloat16 on the first forward: load with "
                    "dtype=torch.bfloat16, or for float32 run one forward, cast the Linear weights to float32 and run again")


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


def _args(a: QuantArgs, inputs: bool = False) -> dict[str, Any]:
    """Our QuantArgs -> compressed-tensors QuantizationArgs fields (as its presets dump them)."""
    strategy = {"group": "group", "channel": "channel", "token": "token", "tensor": "tensor", "block": "block"}[a.granularity]
    out = {"num_bits": a.bits, "type": a.type, "symmetric": a.symmetric, "group_size": a.group_size,
           "strategy": strategy, "dynamic": a.dynamic}
    if a.granularity == "block":  # square tiles: compressed-tensors' block_structure [rows, cols]
        out.update(group_size=None, block_structure=[a.group_size, a.group_size])
    if a.block_format == "nvfp4":
        out.update(strategy="tensor_group", scale_dtype="torch.float8_e4m3fn")
        if inputs and not a.dynamic:  # calibrated tensor scale, group scales at run time
            out["dynamic"] = "local"
    elif a.block_format is not None:
        out["scale_dtype"] = "torch.uint8"  # E8M0: the biased exponent
    return out


def _why_not_float(w: QuantArgs, a: QuantArgs | None) -> str | None:
    if w.type != "float":  # W4AFP8: packed integer weights, FP8 per-token activations
        if a.bits == 8 and a.granularity == "token" and a.clip_ratio == 1.0 and w.symmetric:
            return None
        return "integer weights take FP8 activations per token, dynamic, on symmetric weights (W4AFP8)"
    fmt = w.block_format
    if fmt is None:  # FP8 E4M3 per channel / tensor / tile
        if a is None or (a.type == "float" and a.bits == 8 and a.block_format is None and a.clip_ratio == 1.0
                         and (a.granularity in ("token", "group") or not a.dynamic)):
            return None
        return ("FP8 weights take FP8 activations per token or per group (dynamic) or per tensor (static), or none "
                "(FP8_DYNAMIC, FP8_BLOCK, FP8, FP8 W8A16)")
    if a is None:
        return None
    if fmt == "mxfp8":
        return None if a.block_format == "mxfp8" and a.clip_ratio == 1.0 else "MXFP8 weights take MXFP8 dynamic activations or none"
    if fmt == "nvfp4":
        if a.block_format == "nvfp4" and not a.dynamic and a.clip_ratio == 1.0:
            return None
        return ("NVFP4 activations need a calibrated tensor scale (compressed-tensors' input_global_scale): "
                "inputs dynamic: false, as the NVFP4 preset has")
    if a.block_format == "mxfp4" and a.clip_ratio == 1.0:
        return None
    return "MXFP4 weights take MXFP4 dynamic activations or none (MXFP4, MXFP4A16)"


def _kv_dict(kv: Any) -> dict | None:
    """The KV-cache settings as a dict (a manifest holds a dict, a compression context KVCacheArgs)."""
    return kv.to_dict() if hasattr(kv, "to_dict") else kv


def fp8_kv_scale(kv: Any) -> str | None:
    """"tensor" / "head" for an FP8 KV cache (compressed-tensors' `kv_cache_scheme`), else None."""
    d = _kv_dict(kv)
    return d.get("scale") if d is not None and d.get("type") == "float" else None


def why_not(schemes: Mapping[str, QuantScheme], in_features: Mapping[str, int], block: Any, kv: Any) -> str | None:
    """None when compressed-tensors can describe the artifact, else the first reason it cannot."""
    if (block or {}).get("codebooks"):
        return "codebook (SqueezeLLM dense-and-sparse) weights: compressed-tensors has no non-uniform format"
    if (block or {}).get("fused"):
        return "fused linears (qkv_proj, gate_up_proj) transformed part by part: the parts are quantized on their own"
    if (block or {}).get("experts"):
        return ("experts quantized one by one: transformers 5 stores a mixture-of-experts block's experts as fused "
                "3-D parameters, which compressed-tensors does not quantize")
    attention = dict((block or {}).get("attention") or {})
    kv_only = all(d.get("type") == "float" and "key_rotation" not in d for d in (attention.get("kv_cache") or {}).values())
    if block and (block.get("online_transforms") or (attention and not (set(attention) <= {"implementation", "kv_cache"} and kv_only))):
        return "online transforms / lmpress attention settings have no compressed-tensors form"  # (2:4 metadata: the scheme says)
    if any(s.inputs is not None and s.inputs.sink_tokens for s in schemes.values()):
        return "float inputs at each sequence's first positions (inputs.sink_tokens) have no compressed-tensors form"
    if any(s.inputs is not None and s.inputs.outliers for s in schemes.values()):
        return "COMET's 4/8-bit activation channel groups (inputs.outliers) have no compressed-tensors form"
    if kv is not None and fp8_kv_scale(kv) is None:
        return "KV-cache quantization has no compressed-tensors form here (only the FP8 cache: kv_cache_scheme)"
    if not schemes:
        return None if fp8_kv_scale(kv) is not None else "no quantized linears"  # an FP8 KV cache alone is expressible
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
        reason = _why_not_float(w, a)
        tiles = [x.group_size for x in (w, a) if x is not None and x.type == "float" and x.block_format is None
                 and x.granularity in ("block", "group")]  # FP8 tiles and activation groups must divide the widths
        bad = [n for n, k in in_features.items() for g in tiles if k % g]
        if reason is None and bad:
            reason = f"FP8 groups of {tiles[0]} do not divide the input width of {bad[0]} ({in_features[bad[0]]})"
        if reason is not None or w.type == "float":
            return reason
        a = None  # W4AFP8: its FP8 activations are fine; the integer weights' checks follow
    if w.granularity not in ("channel", "group"):
        return f"{w.granularity}-wise weight scales"
    if w.granularity == "group":
        bad = [n for n, k in in_features.items() if k % w.group_size]
        if bad:
            return f"group size {w.group_size} does not divide the input width of {bad[0]} ({in_features[bad[0]]})"
    if a is not None:
        w8a8 = (a.bits == 8 and a.granularity == "token" and a.dynamic and a.symmetric and a.clip_ratio == 1.0
                and w.bits == 8 and w.granularity == "channel" and w.symmetric)
        # any other width pair: integer codes in int8 (int-quantized), activations on compressed-tensors' rule
        pair = (a.granularity == "token" and a.dynamic and a.symmetric and a.clip_ratio == 1.0 and a.full_range
                and w.granularity == "channel" and w.symmetric)
        if not (w8a8 or pair):
            return (f"{s.name} activations (per-token dynamic symmetric activations on compressed-tensors' scale rule "
                    "(full_range) over symmetric per-channel weights, or W8A8)")
    return None


def _kv_scheme(kv: Any) -> dict | None:
    scale = fp8_kv_scale(kv)
    if scale is None:
        return None
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
            "strategy": "tensor" if scale == "tensor" else "attn_head", "dynamic": False}


def format_for(s: QuantScheme) -> str:
    """The compressed-tensors format of an expressible scheme (`why_not` is None)."""
    if s.weights.type == "float":
        return {"nvfp4": NVFP4, "mxfp4": MXFP4, "mxfp8": MXFP8}.get(s.weights.block_format, FLOAT)
    return INT if s.inputs is not None and s.inputs.type == "int" else PACKED


def ct_form(model: nn.Module, schemes: Mapping[str, QuantScheme], block: Any, kv: Any) -> tuple[CTForm | None, str | None]:
    """(form, None) when the model's quantized linears `schemes` are expressible, else (None, reason)."""
    in_features = {n: model.get_submodule(n).in_features for n in schemes}
    reason = why_not(schemes, in_features, block, kv)
    if reason is not None:
        return None, reason
    if not schemes:  # the FP8 KV cache alone: dense weights, no config group
        return CTForm(DENSE, {"quant_method": QUANT_METHOD, "format": DENSE, "config_groups": {}, "ignore": [],
                              "kv_cache_scheme": _kv_scheme(kv), "quantization_status": "compressed",
                              "global_compression_ratio": None, "version": _ct_version()}), None
    s = next(iter(schemes.values()))
    fmt = format_for(s)
    group = {"targets": ["Linear"], "weights": _args(s.weights),
             "input_activations": _args(s.inputs, inputs=True) if s.inputs is not None else None, "output_activations": None}
    if s.weights.type == "int" and s.inputs is not None and s.inputs.type == "float":
        # W4AFP8: compressed-tensors 0.20 infers a group's format from its scheme when the group
        # names none, and takes FP8 activations for float-quantized (a dense `weight`)
        group["format"] = fmt
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in schemes)
    config = {"quant_method": QUANT_METHOD, "format": fmt, "config_groups": {"group_0": group}, "ignore": ignore,
              "kv_cache_scheme": _kv_scheme(kv), "quantization_status": "compressed", "global_compression_ratio": None,
              "version": _ct_version()}
    if not s.weights.symmetric and s.inputs is None:
        # transformers 5.x builds the asymmetric zero point's placeholder unpacked, so the packed
        # tensor vLLM and compressed-tensors write is refused as a size mismatch (known:
        # vllm-project/llm-compressor#1618); its dequantize-at-load route unpacks it correctly, and
        # for weight-only schemes it gives the same dense weights the default route would. vLLM
        # ignores the key.
        config["dequantize"] = True
    if fmt in (NVFP4, MXFP4, MXFP8) and s.inputs is None:
        # compressed-tensors 0.20 decompresses FP4 weights on the first forward into bfloat16 whatever
        # dtype the model was loaded in (`unpack_fp4_from_uint8`'s default), so a float32 model fails
        # with a dtype mismatch; its dequantize-at-load route builds them in the model's dtype. That
        # route also drops activation quantization, so W4A4 (MXFP4) keeps the default: it runs in
        # bfloat16, or in float32 once the decompressed weights are cast (`FP4_FLOAT32_NOTE`)
        config["dequantize"] = True
    return CTForm(fmt, config), None


KV_SCALES = (".lmpress_attn.k_scale", ".lmpress_attn.v_scale")  # the FP8 cache's scales, on lmpress's attention settings


def to_disk(tensors: dict[str, torch.Tensor], schemes: Mapping[str, QuantScheme], fmt: str) -> dict[str, torch.Tensor]:
    """lmpress runtime tensors (PackedLinear state, attention settings) -> compressed-tensors
    tensors, in a new dict. The FP8 cache's scales move to the attention module (`k_scale`,
    `v_scale`; (1,) per tensor, (kv heads, 1, 1) per head, as both keep them)."""
    out = dict(tensors)
    for key in [k for k in out if k.endswith(KV_SCALES)]:
        out[key.replace(".lmpress_attn.", ".")] = out.pop(key)
    for fqn, s in schemes.items():
        w = s.weights
        if fmt in (INT, FLOAT, MXFP8):
            shape = out.pop(f"{fqn}.weight_shape")
            codes = unpack(out.pop(f"{fqn}.weight_packed"), w.bits, int(shape[1]))  # (out, in) int8
            out[f"{fqn}.weight"] = codes.contiguous() if fmt == INT else codes.view(torch.float8_e4m3fn)
            if fmt == FLOAT and w.granularity == "tensor":
                out[f"{fqn}.weight_scale"] = out[f"{fqn}.weight_scale"].reshape(1)  # (1, 1) -> (1,)
            if fmt == MXFP8:
                out[f"{fqn}.weight_scale"] = (torch.log2(out[f"{fqn}.weight_scale"]) + 127).to(torch.uint8)  # 2^(e - 127) -> e
        elif fmt in (NVFP4, MXFP4):
            del out[f"{fqn}.weight_shape"]
            # (out, in/8) int32 -> (out, in/2) bytes; `pack` stores code + 8 (offset binary): flipping
            # each nibble's top bit gives the two's-complement nibble, compressed-tensors' sign bit
            out[f"{fqn}.weight_packed"] = out[f"{fqn}.weight_packed"].view(torch.uint8) ^ 0x88
            scale = out[f"{fqn}.weight_scale"]  # (out, groups) float32
            if fmt == NVFP4:
                s_g, s_t = split_nvfp4(scale)
                out[f"{fqn}.weight_scale"] = s_g.to(torch.float8_e4m3fn)  # exact: E4M3 values
                out[f"{fqn}.weight_global_scale"] = (1.0 / s_t).reshape(1)  # a power of two: exact
            else:
                out[f"{fqn}.weight_scale"] = (torch.log2(scale) + 127).to(torch.uint8)  # 2^(e - 127) -> e
        ikey = f"{fqn}.input_scale"
        if ikey in out:  # static activations: FP8's scale, or NVFP4's tensor scale as its reciprocal
            if fmt == NVFP4:
                out[f"{fqn}.input_global_scale"] = (1.0 / out.pop(ikey)).reshape(1)  # a power of two: exact
            else:
                out[ikey] = out[ikey].reshape(1)
        zkey = f"{fqn}.weight_zero_point"
        if zkey in out:
            z = out[zkey]  # (out, n_groups) float, integer-valued
            out[zkey] = pack(z.round().to(torch.int8).t().contiguous(), w.bits).t().contiguous()  # (words, n_groups)
    return out


def from_disk(state: dict[str, torch.Tensor], schemes: Mapping[str, QuantScheme], fmt: str) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors -> lmpress runtime tensors (exact inverse of `to_disk`), in place."""
    for key in [k for k in state if k.endswith((".k_scale", ".v_scale")) and ".lmpress_attn." not in k]:
        stem, _, name = key.rpartition(".")
        state[f"{stem}.lmpress_attn.{name}"] = state.pop(key)
    for fqn, s in schemes.items():
        w = s.weights
        if fmt in (INT, FLOAT, MXFP8):
            codes = state.pop(f"{fqn}.weight")  # (out, in) int8 | float8_e4m3fn
            codes = codes if fmt == INT else codes.view(torch.int8)
            state[f"{fqn}.weight_packed"] = pack(codes, w.bits)
            state[f"{fqn}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
            if fmt == FLOAT and w.granularity == "tensor":
                state[f"{fqn}.weight_scale"] = state[f"{fqn}.weight_scale"].reshape(1, 1)
            if fmt == MXFP8:
                state[f"{fqn}.weight_scale"] = torch.exp2(state[f"{fqn}.weight_scale"].float() - 127)
        elif fmt in (NVFP4, MXFP4):
            packed = state[f"{fqn}.weight_packed"]  # (out, in/2) uint8
            state[f"{fqn}.weight_packed"] = (packed ^ 0x88).view(torch.int32)  # (out, in/8)
            state[f"{fqn}.weight_shape"] = torch.tensor([packed.shape[0], packed.shape[1] * 2], dtype=torch.int64)
            scale = state[f"{fqn}.weight_scale"]
            if fmt == NVFP4:
                state[f"{fqn}.weight_scale"] = scale.float() / state.pop(f"{fqn}.weight_global_scale").float()
            else:
                state[f"{fqn}.weight_scale"] = torch.exp2(scale.float() - 127)
        gkey = f"{fqn}.input_global_scale"
        if gkey in state:
            state[f"{fqn}.input_scale"] = (1.0 / state.pop(gkey).float()).reshape(1, 1)
        elif f"{fqn}.input_scale" in state:
            state[f"{fqn}.input_scale"] = state[f"{fqn}.input_scale"].float().reshape(1, 1)
        zkey = f"{fqn}.weight_zero_point"
        if zkey in state:
            rows = int(state[f"{fqn}.weight_shape"][0])
            z = unpack(state[zkey].t().contiguous(), w.bits, rows)  # (n_groups, out) int8
            state[zkey] = z.t().float().contiguous()
    return state
