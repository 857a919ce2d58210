"""`AutoModelForCausalLM.from_pretrained(dir)` for lmpress-only artifacts (`quant_method: lmpress`).

transformers picks a quantizer from ``config.json``'s ``quantization_config.quant_method``
through two registries (``transformers.quantizers.auto``): ``AUTO_QUANTIZATION_CONFIG_MAPPING``
(method -> `QuantizationConfigMixin` subclass) and ``AUTO_QUANTIZER_MAPPING`` (method ->
`HfQuantizer` subclass). `register()` adds "lmpress" to both (idempotent; run when
`lmpress.compress` is imported). `from_pretrained` then

1. builds the model on meta and calls `_process_model_before_weight_loading`: the skeleton
   becomes the runtime form (`checkpoint.prepare_skeleton`: PackedLinear, RotatedInput, the
   "lmpress" attention settings), so the checkpoint's tensors land in the runtime buffers;
2. loads the tensors, then re-creates every non-persistent buffer with ``empty_like`` (and
   re-initializes only the ones the model class knows, e.g. RoPE's ``inv_freq``);
3. calls `_process_model_after_weight_loading`: online transforms are rebuilt from their specs
   (their Hadamard buffers are non-persistent, so step 2 left garbage in them), the attention
   function is selected, ``lmpress_meta`` is attached as `load()` does.

Artifacts in compressed-tensors form never reach this: transformers routes them to its own
compressed-tensors quantizer.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin


QUANT_METHOD = "lmpress"


def _rebuild_online(model: nn.Module) -> int:
    """Replace every online transform built from (kind, size, seed) by a fresh one (its matrices are
    not in the file); learned ones (`KronTransform`, FlatQuant) came with the weights and only
    move to their linear's device. Returns how many were rebuilt."""
    from lmpress.kernels.online import KronTransform, RotatedInput, transform_from_spec
    from lmpress.kernels.attention import LmpressAttention

    def device_of(module: nn.Module):  # where its weights were loaded (device_map may spread layers)
        t = next((t for t in list(module.parameters()) + list(module.buffers()) if t is not None and not t.is_meta), None)
        return t.device if t is not None else None

    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, RotatedInput) and isinstance(mod.transform, KronTransform):
            mod.transform = mod.transform.to(device_of(mod.linear))
        elif isinstance(mod, RotatedInput):
            mod.transform = transform_from_spec(mod.transform.spec()).to(device_of(mod.linear))
            n += 1
        elif isinstance(mod, LmpressAttention) and mod.qk is not None:
            owner = model.get_submodule(name.rpartition(".")[0])  # the attention module holding the settings
            mod.qk = transform_from_spec(mod.qk.spec()).to(device_of(owner))
            n += 1
    return n


class LmpressConfig(QuantizationConfigMixin):
    """The lmpress manifest (config.json's `quantization_config`), carried as is."""

    def __init__(self, **manifest: Any):
        self.__dict__.update(copy.deepcopy(manifest))
        self.quant_method = QUANT_METHOD

    def manifest(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}

    def to_dict(self) -> dict[str, Any]:
        return self.manifest()


class LmpressHfQuantizer(HfQuantizer):
    """Loads a pre-quantized lmpress artifact into its runtime form (it quantizes nothing)."""

    requires_calibration = True  # pre-quantized checkpoints only

    def validate_environment(self, *args, **kwargs):
        from . import checkpoint as ckpt

        version = getattr(self.quantization_config, "format_version", None)
        if not isinstance(version, int) or version > ckpt.READ_VERSION:
            raise ValueError(f"lmpress checkpoint format version {version!r}; this lmpress ({ckpt.lmpress_version()}) "
                             f"reads versions up to {ckpt.READ_VERSION}: upgrade lmpress")

    def _process_model_before_weight_loading(self, model, **kwargs):
        from . import checkpoint as ckpt

        with torch.device("cpu"):  # transforms build real (non-persistent) buffers; linears stay on meta
            ckpt.prepare_skeleton(model, self.quantization_config.manifest())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from lmpress.kernels.attention import use_lmpress_attention

        _rebuild_online(model)
        manifest = self.quantization_config.manifest()
        if (manifest.get("lmpress") or {}).get("attention"):
            use_lmpress_attention(model)
        model.lmpress_meta = {"manifest": manifest, "path": None}
        return model

    def is_serializable(self):  # lmpress.compress.save writes the manifest and the checksums
        return False

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Teach transformers `quant_method: lmpress` (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LmpressConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LmpressHfQuantizer)
