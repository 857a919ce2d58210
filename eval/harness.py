"""lm-eval on any causal LM `nn.Module`, offline, on task YAMLs that read local files.

    from lmpress.eval.harness import run_tasks
    res = run_tasks(model, tokenizer, limit=50)          # the three bundled wiki tasks
    res.scores["lmpress_wiki_mc"]["acc"]

The model is handed to lm-eval as an object (`HFLM(pretrained=model, tokenizer=tok)`), so
a simulated (fake-quant) model, a packed checkpoint loaded with `lmpress.compress.load` and an
unquantized base all go through the same code. Tasks are looked up first in the bundled folder
(`lmpress.eval.tasks`) and in the caller's `task_dirs` (folders of lm-eval YAMLs: use
``custom_dataset: !function module.fn`` or ``dataset_path: json`` with local ``data_files``);
only a name found in neither makes lm-eval index its own ~15k built-in tasks (slow, and those
need their datasets in the local Hugging Face cache, as nothing is downloaded).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from lmpress.eval.tasks import BUILTIN_TASKS, TASKS_DIR

log = logging.getLogger(__name__)

DEFAULT_TASKS = BUILTIN_TASKS


@dataclass(frozen=True)
class HarnessResult:
    """Scores per task: ``scores[task][metric]`` (filter suffix dropped when it is ``none``)."""

    scores: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float | None]]
    higher_is_better: dict[str, dict[str, bool]]
    samples: dict[str, int]  # documents scored per task
    limit: int | None
    seconds: float
    lm_eval_version: str
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat ``{"task/metric": value}``."""
        return {f"{t}/{m}": v for t, ms in self.scores.items() for m, v in ms.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "stderr": self.stderr, "higher_is_better": self.higher_is_better,
                "samples": self.samples, "limit": self.limit, "seconds": self.seconds,
                "lm_eval": self.lm_eval_version, "configs": self.configs}


def _split_metric(key: str) -> tuple[str, str | None]:
    """lm-eval keys are ``metric,filter``; drop the filter when it is ``none``."""
    name, _, flt = key.partition(",")
    return (name if flt in ("", "none") else f"{name},{flt}"), flt


def task_manager(tasks: Sequence[str], task_dirs: Sequence[str | Path] = ()):
    """A `TaskManager` over the bundled folder and `task_dirs`; lm-eval's own tasks are indexed
    only if one of `tasks` is not found there."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(Path(d).expanduser()) for d in task_dirs)]
    for d in paths[1:]:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"task directory not found: {d}")
    tm = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        log.info("tasks %s are not in %s; indexing lm-eval's built-in tasks", missing, paths)
        tm = TaskManager(include_path=paths, include_defaults=True)
        still = [t for t in tasks if t not in tm.all_tasks]
        if still:
            local = sorted(TaskManager(include_path=paths, include_defaults=False).all_tasks)
            raise ValueError(f"unknown lm-eval task(s) {still}; local tasks: {local}; "
                             "or any lm-eval task whose dataset is in the local Hugging Face cache")
    return tm


def run_tasks(model: nn.Module, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = None,
              task_dirs: Sequence[str | Path] = (), batch_size: int = 8, max_length: int | None = None,
              num_fewshot: int | None = None, bootstrap_iters: int = 1000, quiet: bool = True) -> HarnessResult:
    """Run lm-eval `tasks` on `model` with `tokenizer`; `limit` = documents per task (None = all).

    Log-likelihood scoring is deterministic; `bootstrap_iters` only sets how the standard errors
    of the perplexity aggregations are estimated. The caller's torch/numpy RNG is not reseeded.
    """
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty: name at least one task")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents or None, got {limit}")
    tm = task_manager(tasks, task_dirs)
    levels = {}
    if quiet:  # lm-eval logs every request batch at INFO and warns about passing a model object
        for name in ("lm_eval", "lm-eval"):
            levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=tm,
                              bootstrap_iters=bootstrap_iters, log_samples=False, use_cache=None,
                              numpy_random_seed=None, torch_random_seed=None)
    finally:
        model.train(was_training)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
    seconds = round(time.perf_counter() - t0, 2)

    hib = {t: {m: bool(v) for m, v in ms.items()} for t, ms in out.get("higher_is_better", {}).items()}
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    for task, res in out["results"].items():
        sc, se = {}, {}
        for key, val in res.items():
            if key == "alias" or not isinstance(val, (int, float)) or "_stderr" in key:
                continue
            name, flt = _split_metric(key)
            if task in hib and name.partition(",")[0] not in hib[task]:
                continue  # bookkeeping such as sample_len
            sc[name] = float(val)
            err = res.get(f"{key.partition(',')[0]}_stderr,{flt}" if flt else f"{key}_stderr")
            se[name] = float(err) if isinstance(err, (int, float)) else None
        scores[task], stderr[task] = sc, se
    samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in out.get("n-samples", {}).items()}
    configs = {t: {k: c.get(k) for k in ("task", "output_type", "metadata") if k in c}
               for t, c in out.get("configs", {}).items()}
    version = getattr(lm_eval, "__version__", None) or _dist_version("lm_eval")
    return HarnessResult(scores=scores, stderr=stderr, higher_is_better=hib, samples=samples, limit=limit,
                         seconds=seconds, lm_eval_version=version, configs=configs)


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
