"""The main job as one call: load, calibrate, compress, save, reload the packed artifact, evaluate
base and compressed (perplexity, lm-eval tasks, latency), optionally export a GGUF and score it in
llama.cpp, and write report.json / report.md. The CLI's `compress-and-eval`, the notebook and the
benches call `compress_and_eval`; the CLI adds only its printing and exit code.

    from lmpress.compress.workflow import compress_and_eval
    result = compress_and_eval("smollm2-135m", "w8a8-rtn", "out/w8a8", windows=16, tasks=())
    result["ppl_ratio"], result["recovery"], result["thresholds"]
"""
from __future__ import annotations

import logging
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

from .checkpoint import inspect, lmpress_version, load, save
from .pipeline import compress
from .recipe import Recipe
from .report import Report

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_RECIPE = "w8a8-rtn"
EVAL_TASKS = ("lmpress_wiki_ppl", "lmpress_wiki_cloze", "lmpress_wiki_mc")  # lmpress.eval.tasks.BUILTIN_TASKS
EVAL_TASK_LIMIT = 40  # documents per task: keeps `make demo` within minutes on 2 CPU cores


class Timer(dict):
    """Seconds per named step; `announce(label)` (the CLI prints it) is called as each starts."""

    def __init__(self, announce: Callable[[str], None] | None = None):
        super().__init__()
        self.announce = announce

    @contextmanager
    def __call__(self, name: str, label: str | None = None):
        if label:
            log.info("%s", label)
            if self.announce is not None:
                self.announce(label)
        t0 = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - t0, 2)


def versions() -> dict:
    import torch
    import transformers

    return {"lmpress": lmpress_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads()}


def load_timed(model_spec: str, timer: Timer):
    from .models import load_model

    with timer("load", f"loading {model_spec}"):
        return load_model(model_spec)


def compress_and_save(model, tok, recipe: Recipe, out, calib, n, seqlen, seed, overwrite, timer: Timer) -> Report:
    """Compress an already loaded model in place and save it; returns the compression report."""
    from lmpress.calibration.data import sample_calibration

    cal = None
    if recipe.needs_calibration:
        with timer("calibration", f"sampling {n} calibration sequences of {seqlen} tokens from {calib}"):
            cal = sample_calibration(tok, calib, n=n, seqlen=seqlen, seed=seed)
    with timer("compress", f"compressing with {recipe.name or 'the recipe'}"):
        report = compress(model, recipe, calib=cal)
    with timer("save", f"saving to {out}"):
        save(model, out, tokenizer=tok, overwrite=overwrite)
    return report


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")


def parse_export(export: str | None, model: str) -> str | None:
    """`gguf:TYPE` -> TYPE (checked, with a GGUF source for the metadata), None for no export."""
    if not export:
        return None
    kind, _, gtype = export.partition(":")
    if kind.lower() != "gguf" or not gtype:
        raise ValueError(f"--export {export!r}: use gguf:TYPE, e.g. gguf:Q4_K")
    from .gguf import check_type
    from .models import gguf_source

    gtype = check_type(gtype)
    if gguf_source(model) is None:
        raise ValueError(f"--export gguf needs the model's GGUF for its metadata and tokenizer; {model} has none: "
                         "pass a .gguf model (or a directory holding exactly one)")
    return gtype


def gguf_export_and_score(model_spec, gtype, out, calib, n, seqlen, seed, text, windows, base_ppl) -> dict:
    """The base model GPTQ'd on llama.cpp's grids, written into `out`, scored by lmpress's simulation
    and (when llama-cpp-python is installed) by llama.cpp on the same windows."""
    import torch

    from lmpress.calibration.data import sample_calibration
    from lmpress.eval import llamacpp
    from lmpress.eval.ppl import perplexity_from_ids

    from .gguf import bits_per_weight, export_gguf, llamacpp_activations
    from .models import gguf_source, load_model

    mdl, tok = load_model(model_spec)
    cal = sample_calibration(tok, calib, n=n, seqlen=seqlen, seed=seed)  # the recipe's calibration set again
    path, types = export_gguf(mdl, Path(out) / f"model-{gtype}.gguf", gguf_source(model_spec), ftype=gtype, calib=cal)
    res = {"file": path.name, "type": gtype, "method": "gptq", "mib": path.stat().st_size / 2**20,
           "bits_per_weight": bits_per_weight(mdl, types)}
    if text is None:
        return res
    ids = tok(text, add_special_tokens=False)["input_ids"]
    k = len(ids) // seqlen if windows is None else min(windows, len(ids) // seqlen)
    with llamacpp_activations(mdl, types):  # the activations as llama.cpp's matmul quantizes them
        res["ppl_sim"] = perplexity_from_ids(mdl, torch.tensor(ids[:k * seqlen]), seqlen, k).ppl
    if not llamacpp.available():
        res["note"] = "llama-cpp-python is not installed (pip install 'lmpress[llamacpp]'): no llama.cpp figures"
        return res
    res["ppl_llamacpp"] = llamacpp.perplexity(path, [ids[i * seqlen:(i + 1) * seqlen] for i in range(k)],
                                              threads=torch.get_num_threads())
    res["llamacpp_vs_sim"] = res["ppl_llamacpp"] / res["ppl_sim"]
    res["ppl_ratio"] = res["ppl_llamacpp"] / base_ppl if base_ppl else None
    res["decode_tps"] = llamacpp.decode_tps(path, ids[:128], new_tokens=64, threads=1)
    return res


def compress_and_eval(
    model: str = DEFAULT_MODEL,
    recipe: str | Recipe = DEFAULT_RECIPE,
    out: str | Path = "out/compressed",
    *,
    calib: str = "wiki",
    eval_data: str = "wiki",
    n: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    windows: int | None = 64,
    ppl: bool = True,
    tasks: Sequence[str] = EVAL_TASKS,
    task_limit: int | None = EVAL_TASK_LIMIT,
    task_dirs: Sequence[str | Path] = (),
    latency: bool = True,
    latency_repeats: int = 3,
    prompt_len: int = 128,
    min_recovery: float | None = None,
    thresholds: str | Path | None = None,
    export: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    announce: Callable[[str], None] | None = None,
) -> dict:
    """Compress `model` (built-in name, Hugging Face directory or .gguf) with `recipe` into `out`
    and evaluate base against the reloaded packed artifact; returns the report (as written to
    `out/report.json`, plus "report_md"). `tasks`: lm-eval task names, a sequence or one
    comma-separated string (() or "" to skip); `windows`:
    perplexity windows (None or 0 = all); `export`: "gguf:TYPE"; `thresholds` / `min_recovery`:
    the quality gate, whose verdict is in result["thresholds"]; `announce(label)` is called as
    each step starts; `progress` shows progress bars."""
    from lmpress.calibration.data import load_text
    from lmpress.eval import report as rpt
    from lmpress.eval.latency import LatencyConfig, measure_latency
    from lmpress.eval.recovery import Thresholds
    from lmpress.eval.suite import EvalPlan, compare, evaluate

    recipe_obj = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)  # a bad recipe fails before any long work
    out = Path(out)
    check_out(out, overwrite)
    gguf_type = parse_export(export, model)
    gate = Thresholds.load(thresholds, min_recovery) if thresholds else Thresholds(min_recovery=min_recovery)
    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip()) if isinstance(tasks, str) else tuple(tasks)
    plan = EvalPlan(ppl=ppl, data=eval_data, seqlen=seqlen, windows=windows or None, tasks=task_list,
                    task_limit=task_limit or None, task_dirs=tuple(str(d) for d in task_dirs),
                    latency=LatencyConfig(prompt_len=prompt_len, repeats=latency_repeats) if latency else None)
    if task_list:
        from lmpress.eval.harness import task_manager

        task_manager(task_list, plan.task_dirs)  # unknown task names fail here, not after compressing
    timer = Timer(announce)
    text = load_text(eval_data, split="eval") if ppl else None
    mdl, tok = load_timed(model, timer)
    base_bits = next(mdl.parameters()).element_size() * 8
    with timer("eval_base", "evaluating the base model"):
        base_res = evaluate(mdl, tok, plan, text=text, progress=progress)
    # compression changes the model in place: the base was measured first
    report = compress_and_save(mdl, tok, recipe_obj, out, calib, n, seqlen, seed, overwrite, timer)
    del mdl
    with timer("reload", f"reloading the packed checkpoint from {out}"):
        packed = load(out)
    with timer("eval_compressed", "evaluating the packed model"):
        comp_res = evaluate(packed, tok, plan, text=text, progress=progress)
    lat = None
    if plan.latency is not None:
        from .models import load_model

        with timer("reload_base", "reloading the base model for latency"):  # beside the packed one, alternating
            base_mdl, _ = load_model(model)
        with timer("latency", "latency and memory: base and compressed, alternating"):
            lat = measure_latency({"base": base_mdl, "compressed": packed}, plan.latency)
        del base_mdl
    gguf_res = None
    if gguf_type:
        with timer("gguf", f"GGUF {gguf_type}: GPTQ on llama.cpp's grids, scored in llama.cpp"):
            gguf_res = gguf_export_and_score(model, gguf_type, out, calib, n, seqlen, seed, text,
                                              plan.windows, base_res.get("ppl"))
    info = inspect(out)
    part = compare(base_res, comp_res, lat, gate)
    bp, cp = base_res.get("ppl"), comp_res.get("ppl")
    result = {
        "model": model,
        "recipe": recipe_obj.name or str(recipe),
        "recipe_spec": recipe_obj.to_dict(),
        "eval": {**plan.describe(), "windows": (base_res.get("ppl_detail") or {}).get("windows")},
        **part,
        "ppl_ratio": cp / bp if bp and cp else None,
        "bits_per_weight": info["quantized_bits_per_weight"],
        "base_bits": base_bits,
        "checkpoint_bytes": info["file_bytes"],
        "times_s": dict(timer),
        "compression": report.to_dict(),
        "calibration": getattr(packed, "lmpress_meta", {}).get("manifest", {}).get("calibration"),
        "versions": {**versions(), **rpt.versions()},
        "machine": rpt.machine(),
        **({"gguf": gguf_res} if gguf_res else {}),
    }
    result["report_md"] = str(rpt.write_report(out, result))
    return result
