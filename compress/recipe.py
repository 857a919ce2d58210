"""Recipes: what to do to a model, as YAML that round-trips exactly.

```yaml
version: 1
name: w4a16-rtn
description: one line
schemes: {lm_head: null, "re:.*": W4A16}   # first match wins; null = keep in high precision
kv_cache: null                              # or a KV preset name / {bits, group_size, ...}
stages:
  - rtn: {}
```
Scheme-map keys are a module's full name, a name suffix (`down_proj` matches every
`....down_proj`), or `re:<regex>` matched against the full name with `re.fullmatch`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from lmpress.quant.scheme import KVCacheArgs, QuantScheme, parse_scheme

from .stage import Stage, make_stage, stage_options

FORMAT_VERSION = 1
TOP_KEYS = ("version", "name", "description", "schemes", "kv_cache", "stages")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the key and what is allowed."""


def _scheme_spec_to_yaml(spec: Any) -> Any:
    return spec.to_dict() if isinstance(spec, QuantScheme) else copy.deepcopy(spec)  # the caller's to change


def matches(pattern: str, fqn: str) -> bool:
    """The module-name patterns of recipes (scheme maps, pins, per-module options): "re:<regex>"
    matches the whole name; otherwise the name itself or any name ending in "." + pattern."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return fqn == pattern or fqn.endswith("." + pattern)


@dataclass(frozen=True)
class Recipe:
    schemes: tuple[tuple[str, Any], ...]  # (pattern, spec as written: null | preset | mapping)
    stages: tuple[Stage, ...]
    kv_cache: Any = None  # spec as written: null | preset name | mapping
    name: str = ""
    description: str = ""
    version: int = FORMAT_VERSION
    _resolved: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.version != FORMAT_VERSION:
            raise RecipeError(f"recipe version {self.version!r} is not supported; this lmpress reads version {FORMAT_VERSION}")
        resolved = []
        for pattern, spec in self.schemes:
            if not isinstance(pattern, str) or not pattern:
                raise RecipeError(f"schemes: key {pattern!r} must be a module name or 're:<regex>'")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise RecipeError(f"schemes: {pattern!r} is not a valid regex ({e})") from None
            try:
                resolved.append((pattern, parse_scheme(spec)))
            except ValueError as e:
                raise RecipeError(f"schemes[{pattern!r}]: {e}") from None
        object.__setattr__(self, "_resolved", tuple(resolved))
        try:
            self.kv_args  # validate
        except ValueError as e:
            raise RecipeError(f"kv_cache: {e}") from None
        if not self.stages:
            raise RecipeError("stages: a recipe needs at least one stage (e.g. `- rtn: {}`)")
        names = [st.name for st in self.stages]
        kv = self.kv_args
        if kv is not None and kv.is_float and not ("kv_cache" in names and "act_scales" in names[names.index("kv_cache"):]):
            raise RecipeError("kv_cache: an FP8 cache takes scales calibrated by stage act_scales after stage kv_cache; "
                              "add `- kv_cache: {}` and, after it, `- act_scales: {}`")
        static = [p for p, sch in resolved if sch is not None and sch.inputs is not None and not sch.inputs.dynamic]
        if static and not any(st.name in ("gptq", "act_scales", "mergequant") for st in self.stages):
            raise RecipeError(f"schemes[{static[0]!r}]: static activation scales (inputs dynamic: false) are calibrated by "
                              "stage gptq, act_scales or mergequant; add `- act_scales: {}` after the weight stage")

    # ---- the scheme map ---------------------------------------------------------------
    def scheme_for(self, fqn: str) -> QuantScheme | None:
        """First matching entry wins; unmatched modules stay in high precision."""
        return next((scheme for pattern, scheme in self._resolved if matches(pattern, fqn)), None)

    @property
    def kv_args(self) -> KVCacheArgs | None:
        return None if self.kv_cache is None else KVCacheArgs.from_dict(self.kv_cache)

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.stages)

    # ---- YAML -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "schemes": {k: _scheme_spec_to_yaml(v) for k, v in self.schemes},
            "kv_cache": copy.deepcopy(self.kv_cache),
            "stages": [{s.name: stage_options(s)} for s in self.stages],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe is a mapping with keys {list(TOP_KEYS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(TOP_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; allowed keys: {list(TOP_KEYS)}")
        schemes = data.get("schemes") or {}
        if not isinstance(schemes, Mapping):
            raise RecipeError("schemes: must be a mapping {module name | 're:<regex>': preset | mapping | null}")
        stages_raw = data.get("stages")
        if not isinstance(stages_raw, list):
            raise RecipeError("stages: must be a list of single-key mappings, e.g. `- rtn: {}`")
        stages = []
        for i, item in enumerate(stages_raw):
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, Mapping) or len(item) != 1:
                raise RecipeError(f"stages[{i}]: write each stage as a single-key mapping, e.g. `- rtn: {{}}`; got {item!r}")
            (sname, opts), = item.items()
            if opts is not None and not isinstance(opts, Mapping):
                raise RecipeError(f"stages[{i}] {sname!r}: options must be a mapping, got {opts!r}")
            try:
                stages.append(make_stage(sname, opts))
            except ValueError as e:
                raise RecipeError(f"stages[{i}]: {e}") from None
        return cls(
            schemes=tuple((k, copy.deepcopy(v)) for k, v in schemes.items()),  # a frozen recipe owns its specs
            stages=tuple(stages),
            kv_cache=copy.deepcopy(data.get("kv_cache")),
            name=str(data.get("name") or ""),
            description=str(data.get("description") or ""),
            version=data.get("version", FORMAT_VERSION),
        )

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe is not valid YAML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Recipe":
        """A built-in recipe name (see `builtin_recipes()`) or a path to a YAML file."""
        path = Path(name_or_path)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise RecipeError(f"recipe file {str(path)!r} does not exist; pass a YAML file or one of: {', '.join(builtin_recipes())}")
            return cls.from_yaml(path.read_text())
        builtins = builtin_recipes()
        if str(name_or_path) not in builtins:
            raise RecipeError(f"unknown recipe {str(name_or_path)!r}; built-in recipes: {', '.join(builtins)} (or pass a YAML file)")
        return cls.from_yaml(_recipe_dir().joinpath(f"{name_or_path}.yaml").read_text())


def _recipe_dir():
    return resources.files("lmpress.compress").joinpath("recipes")


def builtin_recipes() -> dict[str, str]:
    """name -> one-line description of every recipe shipped with lmpress."""
    out = {}
    for entry in sorted(_recipe_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text())
            out[entry.name[:-5]] = data.get("description", "")
    return out


def freeze_plan(recipe, plan: dict[str, QuantScheme]):
    """The recipe with the plan written out as exact per-module scheme entries (first in the map)
    and without the `mixed_precision` stage: compressing with it reproduces the plan. Modules
    wrapped by an online transform (`<fqn>.linear`) are written under their original name."""
    exact = {}
    for fqn, s in plan.items():
        key = fqn[: -len(".linear")] if fqn.endswith(".linear") else fqn
        exact[key] = s.to_dict() if s is not None else None
    schemes = tuple(exact.items()) + tuple((k, v) for k, v in recipe.schemes if k not in exact)
    stages = tuple(s for s in recipe.stages if s.name != "mixed_precision")
    return replace(recipe, schemes=schemes, stages=stages,
                   name=(recipe.name + "-frozen") if recipe.name else "", _resolved=())
