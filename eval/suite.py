"""One evaluation plan for a base and a compressed model: perplexity, lm-eval tasks, latency,
recovery and thresholds, in the shape `lmpress.eval.report` writes. Any `nn.Module` works
(simulated, packed, unquantized); nothing here knows about `lmpress.compress`.

    plan = EvalPlan(windows=8, task_limit=20)
    base = evaluate(base_model, tok, plan)                 # before compressing in place
    comp = evaluate(packed_model, tok, plan)
    lat = measure_latency({"base": b, "compressed": c}, plan.latency) if plan.latency else None
    part = compare(base, comp, lat, Thresholds(min_recovery=0.95))
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .harness import DEFAULT_TASKS, run_tasks
from .latency import LatencyConfig, LatencyResult, slower_than_base
from .recovery import LATENCY_PREFIX, Thresholds, check, recoveries

log = logging.getLogger(__name__)

_LAT_LOWER = ("ttft_s", "peak_bytes", "weight_bytes")


@dataclass(frozen=True)
class EvalPlan:
    ppl: bool = True
    data: str = "wiki"
    seqlen: int = 512
    windows: int | None = 64  # None = every window
    tasks: tuple[str, ...] = DEFAULT_TASKS  # () = no lm-eval
    task_limit: int | None = 50  # documents per task; None = all
    task_dirs: tuple[str, ...] = ()
    batch_size: int = 8
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)  # None = no latency

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "task_dirs", tuple(str(d) for d in self.task_dirs))
        if self.task_limit is not None and self.task_limit < 1:
            raise ValueError(f"task_limit must be a positive number of documents or None (all), got {self.task_limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        for d in self.task_dirs:
            if not Path(d).expanduser().is_dir():
                raise FileNotFoundError(f"task directory not found: {d}")

    def describe(self) -> dict[str, Any]:
        return {"data": self.data, "split": "eval", "seqlen": self.seqlen, "windows": self.windows, "ppl": self.ppl,
                "tasks": list(self.tasks), "task_limit": self.task_limit, "task_dirs": list(self.task_dirs),
                "latency": None if self.latency is None else {**self.latency.__dict__, "decode_batches": list(self.latency.decode_batches)}}


def evaluate(model: nn.Module, tokenizer, plan: EvalPlan, text: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Perplexity and lm-eval tasks of one model: ``{"ppl": float|None, "ppl_detail": {...}, "tasks": {...}|None}``."""
    out: dict[str, Any] = {"ppl": None, "tasks": None}
    if plan.ppl:
        from lmpress.calibration.data import load_text

        from .ppl import perplexity

        res = perplexity(model, tokenizer, text if text is not None else load_text(plan.data, split="eval"),
                         seqlen=plan.seqlen, windows=plan.windows, progress=progress)
        out["ppl"], out["ppl_detail"] = res.ppl, {"nll": res.nll, "windows": res.windows, "seqlen": res.seqlen, "tokens": res.tokens}
    if plan.tasks:
        out["tasks"] = run_tasks(model, tokenizer, plan.tasks, limit=plan.task_limit, task_dirs=plan.task_dirs,
                                 batch_size=plan.batch_size).to_dict()
    return out


def flat_metrics(result: Mapping[str, Any], latency: LatencyResult | None = None) -> tuple[dict[str, float], dict[str, bool]]:
    """``({"ppl": .., "task/metric": .., "latency/..": ..}, higher_is_better)`` of one model."""
    vals: dict[str, float] = {}
    hib: dict[str, bool] = {}
    if result.get("ppl") is not None:
        vals["ppl"], hib["ppl"] = float(result["ppl"]), False
    tasks = result.get("tasks") or {}
    for task, scores in (tasks.get("scores") or {}).items():
        for metric, v in scores.items():
            key = f"{task}/{metric}"
            vals[key] = v
            hib[key] = bool((tasks.get("higher_is_better") or {}).get(task, {}).get(metric.partition(",")[0], True))
    if latency is not None:
        lat = {"prefill_tok_s": latency.prefill_tok_s, "ttft_s": latency.ttft_s,
               **{f"decode_tok_s@{b}": v for b, v in latency.decode_tok_s.items()},
               "peak_bytes": float(latency.peak_bytes), "weight_bytes": float(latency.weight_bytes)}
        for k, v in lat.items():
            vals[LATENCY_PREFIX + k], hib[LATENCY_PREFIX + k] = v, k not in _LAT_LOWER
    return vals, hib


def compare(base: Mapping[str, Any], comp: Mapping[str, Any], latency: Mapping[str, LatencyResult] | None = None,
            thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The report's comparison part: per-side results, flat metrics, recovery and the threshold verdict."""
    latency = latency or {}
    bv, hib = flat_metrics(base, latency.get("base"))
    cv, _ = flat_metrics(comp, latency.get("compressed"))
    rec = recoveries(bv, cv, hib)
    out = {
        "base": {**base, "latency": latency["base"].to_dict() if "base" in latency else None},
        "compressed": {**comp, "latency": latency["compressed"].to_dict() if "compressed" in latency else None},
        "metrics": {"base": bv, "compressed": cv, "higher_is_better": hib},
        "recovery": rec,
        "slower_than_base": slower_than_base(rec),  # {speed figure: recovery < 1}: the report flags these
        "thresholds": check(rec, thresholds) if thresholds is not None and not thresholds.empty else None,
    }
    return out
