"""Recovery (compressed vs base, per metric) and the thresholds CI gates on.

Recovery is direction-aware so that 1.0 means "as good as the base" and < 1 means worse, for
every metric: ``compressed / base`` where higher is better (accuracy, tokens/s), ``base /
compressed`` where lower is better (perplexity, bits per byte, time to first token, memory).

Metric keys: ``ppl`` (token perplexity, `lmpress.eval.ppl`), ``<task>/<metric>`` (lm-eval, e.g.
``lmpress_wiki_mc/acc``), ``latency/<figure>`` (e.g. ``latency/decode_tok_s@1``).

Thresholds YAML (every key optional)::

    min_recovery: 0.95          # every quality metric (ppl and task metrics; not latency)
    metrics:
      ppl: 0.98                 # one metric
      lmpress_wiki_mc: 0.90     # every metric of a task
      lmpress_wiki_cloze/acc: 0.85
      latency/decode_tok_s@1: 0.5

The most specific entry wins (metric, then task, then ``min_recovery``). A threshold on a
metric that was not measured fails: a gate must not pass because its metric was skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

LATENCY_PREFIX = "latency/"


def recovery(base: float | None, compressed: float | None, higher_is_better: bool) -> float | None:
    """1.0 = as good as the base; None where undefined (a missing value, or a zero base)."""
    if base is None or compressed is None or not (math.isfinite(base) and math.isfinite(compressed)):
        return None
    if base == compressed:
        return 1.0
    num, den = (compressed, base) if higher_is_better else (base, compressed)
    return num / den if den != 0 else None


def recoveries(base: Mapping[str, float], compressed: Mapping[str, float],
               higher_is_better: Mapping[str, bool]) -> dict[str, float | None]:
    return {k: recovery(base.get(k), compressed.get(k), higher_is_better.get(k, True))
            for k in base if k in compressed}


@dataclass(frozen=True)
class Thresholds:
    min_recovery: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, val in [("min_recovery", self.min_recovery), *((f"metrics.{k}", v) for k, v in self.metrics.items())]:
            if val is not None and (not isinstance(val, (int, float)) or isinstance(val, bool) or not 0 < val < 100):
                raise ValueError(f"threshold {key} must be a positive number (a minimum recovery, e.g. 0.95), got {val!r}")

    @classmethod
    def load(cls, path: str | Path, min_recovery: float | None = None) -> "Thresholds":
        """Read a thresholds YAML; `min_recovery` (e.g. from the command line) overrides its default."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"thresholds file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with keys min_recovery and metrics")
        unknown = set(data) - {"min_recovery", "metrics"}
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: min_recovery, metrics")
        metrics = data.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ValueError(f"{path}: metrics must map a metric or task name to a minimum recovery")
        return cls(min_recovery=min_recovery if min_recovery is not None else data.get("min_recovery"),
                   metrics={str(k): v for k, v in metrics.items()})

    @property
    def empty(self) -> bool:
        return self.min_recovery is None and not self.metrics

    def minimum_for(self, key: str) -> float | None:
        if key in self.metrics:
            return self.metrics[key]
        task = key.partition("/")[0]
        if "/" in key and task in self.metrics and not key.startswith(LATENCY_PREFIX):
            return self.metrics[task]
        return None if key.startswith(LATENCY_PREFIX) else self.min_recovery

    def to_dict(self) -> dict[str, Any]:
        return {"min_recovery": self.min_recovery, "metrics": dict(self.metrics)}


def check(rec: Mapping[str, float | None], thresholds: Thresholds) -> dict[str, Any]:
    """Every applicable check and the verdict: ``{"passed", "checks": [{metric, recovery, min, passed, note}]}``."""
    checks = []
    for key, r in rec.items():
        need = thresholds.minimum_for(key)
        if need is None:
            continue
        if r is None:  # undefined (zero base): pass only if nothing got worse, which we cannot tell
            checks.append({"metric": key, "recovery": None, "min": need, "passed": True, "note": "undefined (base is 0)"})
        else:
            checks.append({"metric": key, "recovery": r, "min": need, "passed": r >= need, "note": ""})
    measured_tasks = {k.partition("/")[0] for k in rec}
    for key, need in thresholds.metrics.items():
        if key not in rec and key not in measured_tasks:
            checks.append({"metric": key, "recovery": None, "min": need, "passed": False, "note": "not measured"})
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "spec": thresholds.to_dict()}
