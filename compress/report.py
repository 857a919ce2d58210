"""The `Report` a compression run returns: per-stage times, per-module quantization error."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    stages: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        entry = {"stage": name, "seconds": None}
        self.stages.append(entry)
        yield entry
        entry["seconds"] = round(time.perf_counter() - t0, 3)

    def record_module(self, fqn: str, **figures: Any) -> None:
        self.modules.setdefault(fqn, {}).update(figures)

    @property
    def total_seconds(self) -> float:
        return round(sum(s["seconds"] or 0.0 for s in self.stages), 3)

    def summary(self) -> dict[str, Any]:
        sq = [m["sqnr_db"] for m in self.modules.values() if "sqnr_db" in m]
        return {
            "stages": self.stages,
            "total_seconds": self.total_seconds,
            "quantized_modules": len(self.modules),
            "mean_sqnr_db": round(sum(sq) / len(sq), 3) if sq else None,
            "min_sqnr_db": round(min(sq), 3) if sq else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "modules": self.modules, **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        extra = {k: v for k, v in data.items() if k not in ("summary", "modules")}
        return cls(stages=list(data.get("summary", {}).get("stages", [])), modules=dict(data.get("modules", {})), extra=extra)
