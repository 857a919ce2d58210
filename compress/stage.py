"""The `Stage` protocol, the stage registry and the context stages share.

A stage is a frozen dataclass whose fields are its recipe options (validated in
`__post_init__`) with one method, `apply(model, ctx)`. Stages register by the name the YAML
recipe uses; unknown names and unknown options are errors that list what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from lmpress.quant.scheme import KVCacheArgs, QuantScheme

from .arch import ArchMap


@runtime_checkable
class Stage(Protocol):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool]

    def apply(self, model: nn.Module, ctx: "Context") -> None: ...


STAGES: dict[str, type] = {}


def register_stage(name: str, needs_calibration: bool = False):
    def deco(cls):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"stage {name!r} must be a dataclass")
        cls.name = name
        cls.needs_calibration = needs_calibration
        STAGES[name] = cls
        return cls

    return deco


def _known() -> str:
    load_builtin_stages()
    return ", ".join(sorted(STAGES))


def load_builtin_stages() -> None:
    from . import stages  # noqa: F401  (registers the built-in stages)


def make_stage(name: str, options: Mapping[str, Any] | None) -> Stage:
    load_builtin_stages()
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {_known()}")
    cls = STAGES[name]
    options = dict(options or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"stage {name!r}: unknown option(s) {unknown}; allowed: {allowed or 'none'}")
    try:
        return cls(**options)
    except TypeError as e:  # wrong types reported by the dataclass
        raise ValueError(f"stage {name!r}: {e}") from None


OPTIONAL = {"optional": True}  # field metadata: an option added later, written only when set


def stage_options(stage: Stage) -> dict[str, Any]:
    """The stage's options as a recipe writes them: every field, except an `OPTIONAL` one at its
    default (so recipes and artifacts written before the option existed stay byte-identical)."""
    return {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)
            if not (f.metadata.get("optional") and getattr(stage, f.name) == f.default)}


@dataclass
class Context:
    """What stages share: the architecture, the per-module plan, calibration, KV settings."""

    arch: ArchMap
    plan: dict[str, QuantScheme]
    calib: Any = None  # lmpress.calibration.data.CalibrationSet
    kv_cache: KVCacheArgs | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Any = None  # lmpress.compress.report.Report
    batch_size: int = 8
