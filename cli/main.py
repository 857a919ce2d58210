"""The `lmpress` command line: every command is a thin call into the Python API."""
from __future__ import annotations

import json
import logging
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress, pack and evaluate causal language models.")
log = logging.getLogger("lmpress")

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_RECIPE = "w8a8-rtn"
_EVAL_TASKS = ("lmpress_wiki_ppl", "lmpress_wiki_cloze", "lmpress_wiki_mc")  # lmpress.eval.tasks.BUILTIN_TASKS
_EVAL_TASK_LIMIT = 40  # documents per task: keeps `make demo` within minutes on 2 CPU cores


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@contextmanager
def _user_errors():
    """Turn bad input into one line on stderr and a non-zero exit, not a traceback."""
    from lmpress.compress.checkpoint import CheckpointError
    from lmpress.compress.recipe import RecipeError

    try:
        yield
    except (RecipeError, CheckpointError, FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


class _Timer(dict):
    @contextmanager
    def __call__(self, name: str, label: str | None = None):
        if label:
            typer.echo(f"· {label}", err=True)
        t0 = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - t0, 2)


def _versions() -> dict:
    import torch
    import transformers

    from lmpress.compress.checkpoint import lmpress_version

    return {"lmpress": lmpress_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads()}


def _load(model_spec: str, timer: "_Timer"):
    from lmpress.compress.models import load_model

    with timer("load", f"loading {model_spec}"):
        return load_model(model_spec)


def _run_compress(model, tok, recipe_name, out, calib, n, seqlen, seed, overwrite, timer):
    """Compress an already loaded model in place and save it; returns (recipe, report)."""
    from lmpress.calibration.data import sample_calibration
    from lmpress.compress import Recipe, compress, save

    recipe = Recipe.load(recipe_name)
    cal = None
    if recipe.needs_calibration:
        with timer("calibration", f"sampling {n} calibration sequences of {seqlen} tokens from {calib}"):
            cal = sample_calibration(tok, calib, n=n, seqlen=seqlen, seed=seed)
    with timer("compress", f"compressing with {recipe.name or recipe_name}"):
        report = compress(model, recipe, calib=cal)
    with timer("save", f"saving to {out}"):
        save(model, out, tokenizer=tok, overwrite=overwrite)
    return recipe, report


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")


def _parse_export(export: str | None, model: str) -> str | None:
    """`gguf:TYPE` -> TYPE (checked, with a GGUF source for the metadata), None for no export."""
    if not export:
        return None
    kind, _, gtype = export.partition(":")
    if kind.lower() != "gguf" or not gtype:
        raise ValueError(f"--export {export!r}: use gguf:TYPE, e.g. gguf:Q4_K")
    from lmpress.compress.gguf import check_type
    from lmpress.compress.models import gguf_source

    gtype = check_type(gtype)
    if gguf_source(model) is None:
        raise ValueError(f"--export gguf needs the model's GGUF for its metadata and tokenizer; {model} has none: "
                         "pass a .gguf model (or a directory holding exactly one)")
    return gtype


def _gguf_export_and_score(model_spec, gtype, out, calib, n, seqlen, seed, text, windows, base_ppl) -> dict:
    """The base model GPTQ'd on llama.cpp's grids, written into `out`, scored by lmpress's simulation
    and (when llama-cpp-python is installed) by llama.cpp on the same windows."""
    import torch

    from lmpress.calibration.data import sample_calibration
    from lmpress.compress.gguf import bits_per_weight, export_gguf, llamacpp_activations
    from lmpress.compress.models import gguf_source, load_model
    from lmpress.eval import llamacpp
    from lmpress.eval.ppl import perplexity_from_ids

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


@app.command("compress-and-eval")
def compress_and_eval(
    model: str = typer.Argument(DEFAULT_MODEL, help="built-in name, Hugging Face directory or .gguf file"),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="built-in recipe name or YAML file"),
    out: Path = typer.Option(Path("out/compressed"), "--out", "-o", help="checkpoint directory to write"),
    calib: str = typer.Option("wiki", help="calibration text: wiki, a .txt/.jsonl file, or a local HF dataset"),
    eval_data: str = typer.Option("wiki", "--eval-data", help="evaluation text (its eval split)"),
    n: int = typer.Option(128, "--n", help="calibration sequences"),
    seqlen: int = typer.Option(512, help="tokens per calibration sequence and per perplexity window"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    windows: Optional[int] = typer.Option(64, help="perplexity windows (default 64; 0 = all)"),
    ppl: bool = typer.Option(True, "--ppl/--no-ppl", help="token perplexity (the papers' protocol) of base and compressed"),
    tasks: str = typer.Option(",".join(_EVAL_TASKS), "--tasks", help="comma-separated lm-eval tasks (bundled, from --task-dir, or cached lm-eval tasks); 'none' to skip"),
    task_limit: int = typer.Option(_EVAL_TASK_LIMIT, "--task-limit", help="documents per lm-eval task (0 = all)"),
    task_dir: list[Path] = typer.Option([], "--task-dir", help="extra folder of lm-eval task YAMLs (repeatable)"),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="prefill/decode tokens/s, time to first token, peak memory"),
    latency_repeats: int = typer.Option(3, "--latency-repeats", help="alternating repeats per model (medians reported)"),
    prompt_len: int = typer.Option(128, "--prompt-len", help="latency prompt length (tokens)"),
    min_recovery: Optional[float] = typer.Option(None, "--min-recovery", help="fail (exit 1, after writing the report) if any quality metric recovers less, e.g. 0.95"),
    thresholds: Optional[Path] = typer.Option(None, "--thresholds", help="YAML of per-metric/per-task minimum recoveries (see lmpress.eval.recovery)"),
    export: Optional[str] = typer.Option(None, "--export", help="also write gguf:TYPE (e.g. gguf:Q4_K): the base model GPTQ'd on llama.cpp's TYPE grids with the same calibration, scored in llama.cpp (with the llamacpp extra)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out directory"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Load, calibrate, compress, save, reload the packed artifact; evaluate base vs compressed
    (perplexity, lm-eval tasks, latency); write report.json, report.md and plots; gate on thresholds."""
    _setup_logging(verbose)
    with _user_errors():
        from lmpress.calibration.data import load_text
        from lmpress.compress import Recipe, inspect, load
        from lmpress.eval import report as rpt
        from lmpress.eval.latency import LatencyConfig, measure_latency
        from lmpress.eval.recovery import Thresholds
        from lmpress.eval.suite import EvalPlan, compare, evaluate

        recipe_obj = Recipe.load(recipe)  # fail on a bad recipe before any long work
        _check_out(out, overwrite)
        gguf_type = _parse_export(export, model)
        gate = Thresholds.load(thresholds, min_recovery) if thresholds else Thresholds(min_recovery=min_recovery)
        task_list = () if tasks.strip().lower() in ("", "none") else tuple(t.strip() for t in tasks.split(",") if t.strip())
        plan = EvalPlan(ppl=ppl, data=eval_data, seqlen=seqlen, windows=windows or None, tasks=task_list,
                        task_limit=task_limit or None, task_dirs=tuple(str(d) for d in task_dir),
                        latency=LatencyConfig(prompt_len=prompt_len, repeats=latency_repeats) if latency else None)
        if task_list:
            from lmpress.eval.harness import task_manager

            task_manager(task_list, plan.task_dirs)  # unknown task names fail here, not after compressing
        timer = _Timer()
        text = load_text(eval_data, split="eval") if ppl else None
        mdl, tok = _load(model, timer)
        base_bits = next(mdl.parameters()).element_size() * 8
        with timer("eval_base", "evaluating the base model"):
            base_res = evaluate(mdl, tok, plan, text=text, progress=True)
        # compression changes the model in place: the base was measured first
        rec, report = _run_compress(mdl, tok, recipe, out, calib, n, seqlen, seed, overwrite, timer)
        del mdl
        with timer("reload", f"reloading the packed checkpoint from {out}"):
            packed = load(out)
        with timer("eval_compressed", "evaluating the packed model"):
            comp_res = evaluate(packed, tok, plan, text=text, progress=True)
        lat = None
        if plan.latency is not None:
            from lmpress.compress.models import load_model

            with timer("reload_base", "reloading the base model for latency"):  # beside the packed one, alternating
                base_mdl, _ = load_model(model)
            with timer("latency", "latency and memory: base and compressed, alternating"):
                lat = measure_latency({"base": base_mdl, "compressed": packed}, plan.latency)
            del base_mdl
        gguf_res = None
        if gguf_type:
            with timer("gguf", f"GGUF {gguf_type}: GPTQ on llama.cpp's grids, scored in llama.cpp"):
                gguf_res = _gguf_export_and_score(model, gguf_type, out, calib, n, seqlen, seed, text,
                                                  plan.windows, base_res.get("ppl"))
        info = inspect(out)
        part = compare(base_res, comp_res, lat, gate)
        bp, cp = base_res.get("ppl"), comp_res.get("ppl")
        result = {
            "model": model,
            "recipe": rec.name or recipe,
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
            "versions": {**_versions(), **rpt.versions()},
            "machine": rpt.machine(),
            **({"gguf": gguf_res} if gguf_res else {}),
        }
        md = rpt.write_report(out, result)
    m, hib, recov = result["metrics"], result["metrics"]["higher_is_better"], result["recovery"]
    rows = [(k + (" ↑" if hib.get(k) else " ↓"), f"{m['base'][k]:.4g}", f"{m['compressed'][k]:.4g}",
             "–" if recov.get(k) is None else f"{recov[k]:.4f}") for k in m["base"] if k in m["compressed"]]
    summary = [
        *((("perplexity (base)", f"{bp:.3f}"), ("perplexity (compressed)", f"{cp:.3f}"),
           ("ratio", f"{result['ppl_ratio']:.4f}")) if bp and cp else ()),
        ("bits per weight (quantized linears)", f"{info['quantized_bits_per_weight']}"),
        ("checkpoint size", f"{info['file_bytes'] / 2**20:.1f} MiB"),
        *((f"time: {k}", f"{v:.1f} s") for k, v in timer.items()),
    ]
    typer.echo(f"\n{model} · {result['recipe']} · {eval_data} eval split"
               + (f", {result['eval']['windows']} windows × {seqlen} tokens" if ppl else "")
               + (f" · lm-eval {task_limit or 'all'} docs/task" if task_list else ""))
    _print_table(("", "value"), summary)
    if rows:
        typer.echo("")
        _print_table(("metric (↑/↓ = higher/lower is better)", "base", "compressed", "recovery"), rows)
    slow = result.get("slower_than_base") or {}
    if slow:
        typer.echo("warning: the compressed model is SLOWER than its base here: "
                   + ", ".join(f"{k} recovery {v:.2f}" for k, v in slow.items())
                   + f" (runtime paths: {((result['compressed'] or {}).get('latency') or {}).get('kernel_paths')})", err=True)
    if gguf_res:
        g = gguf_res
        typer.echo(f"GGUF {g['type']}: {Path(out) / g['file']} ({g['mib']:.1f} MiB, {g['bits_per_weight']:.3f} bpw); "
                   + (f"perplexity in llama.cpp {g['ppl_llamacpp']:.3f} (lmpress simulation {g['ppl_sim']:.3f}), "
                      f"decode {g['decode_tps']:.1f} tok/s in llama.cpp" if g.get("ppl_llamacpp") else g.get("note") or ""))
    typer.echo(f"report: {Path(out) / 'report.json'}, {md}")
    verdict = result["thresholds"]
    if verdict is not None:
        failed = [c for c in verdict["checks"] if not c["passed"]]
        if failed:
            typer.echo("thresholds FAILED: " + "; ".join(
                f"{c['metric']} recovery {'–' if c['recovery'] is None else format(c['recovery'], '.4f')} < {c['min']}"
                + (f" ({c['note']})" if c["note"] else "") for c in failed), err=True)
            raise typer.Exit(1)
        typer.echo(f"thresholds passed ({len(verdict['checks'])} checks)")


@app.command("compress")
def compress_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="built-in name, Hugging Face directory or .gguf file"),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", "-r"),
    out: Path = typer.Option(Path("out/compressed"), "--out", "-o"),
    calib: str = typer.Option("wiki"),
    n: int = typer.Option(128, "--n"),
    seqlen: int = typer.Option(512),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (cuda when available)"),
    lazy: bool = typer.Option(False, "--lazy", help="larger than memory: read, quantize, write and free one decoder layer at a time"),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="--lazy: folder for the per-layer progress and spilled activations (implies --lazy; default <out>.partial)"),
    resume: bool = typer.Option(False, "--resume", help="--lazy: continue an interrupted run from its last finished layer"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Compress a model with a recipe and write the packed checkpoint."""
    _setup_logging(verbose)
    if device not in ("cpu", "cuda", "auto"):
        _fail(f"--device {device!r}: use cpu, cuda or auto")
    if lazy or offload_dir is not None or resume:
        with _user_errors():
            _compress_lazy_cmd(model, recipe, out, calib, n, seqlen, seed, overwrite, device, offload_dir, resume)
        return
    with _user_errors():
        from lmpress.compress import Recipe

        Recipe.load(recipe)
        _check_out(out, overwrite)
        timer = _Timer()
        mdl, tok = _load(model, timer)
        if device != "cpu":
            mdl = mdl.to(_resolve_device(device))
        _, report = _run_compress(mdl, tok, recipe, out, calib, n, seqlen, seed, overwrite, timer)
    s = report.summary()
    typer.echo(f"wrote {out}: {s['quantized_modules']} quantized modules, mean SQNR {s['mean_sqnr_db']} dB, {s['total_seconds']} s")


def _resolve_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)


def _compress_lazy_cmd(model, recipe, out, calib, n, seqlen, seed, overwrite, device, offload_dir, resume) -> None:
    """`compress --lazy`: the model directory's shards are read one layer at a time; several
    processes (torchrun) share the work."""
    from transformers import AutoTokenizer

    from lmpress.calibration.data import sample_calibration
    from lmpress.compress import Recipe
    from lmpress.compress.distributed import from_env
    from lmpress.compress.lazy import check_recipe, compress_lazy
    from lmpress.compress.models import resolve_model

    rec = Recipe.load(recipe)
    check_recipe(rec)  # refuse whole-model stages before any long work
    src = resolve_model(model)
    if src.suffix.lower() == ".gguf":
        raise ValueError(f"--lazy reads safetensors shards; {src} is a GGUF file: convert it to a Hugging Face directory first")
    if not resume:
        _check_out(out, overwrite)
    dist = from_env(device)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    cal = sample_calibration(tok, calib, n=n, seqlen=seqlen, seed=seed) if rec.needs_calibration else None
    report = compress_lazy(src, rec, cal, out, tokenizer=tok, device=_resolve_device(device), work_dir=offload_dir,
                           resume=resume, overwrite=overwrite or resume, dist=dist)
    if dist is None or dist.is_writer:
        s = report.summary()
        typer.echo(f"wrote {out} layer by layer: {s['quantized_modules']} quantized modules, mean SQNR {s['mean_sqnr_db']} dB")


@app.command("eval")
def eval_cmd(
    path: str = typer.Argument(..., help="a packed checkpoint directory, or a model (built-in name, HF dir, .gguf)"),
    data: str = typer.Option("wiki", help="evaluation text (its eval split)"),
    seqlen: int = typer.Option(512),
    windows: Optional[int] = typer.Option(64, help="perplexity windows (0 = all)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Perplexity of a checkpoint or a model on the eval split."""
    _setup_logging(verbose)
    with _user_errors():
        from lmpress.calibration.data import load_text
        from lmpress.compress import load
        from lmpress.compress.models import load_model
        from lmpress.eval.ppl import perplexity

        p = Path(path)
        if (p / "config.json").is_file() and "lmpress" in (p / "config.json").read_text():
            from transformers import AutoTokenizer

            model, tok = load(p), AutoTokenizer.from_pretrained(p)
        else:
            model, tok = load_model(path)
        res = perplexity(model, tok, load_text(data, split="eval"), seqlen=seqlen, windows=windows or None, progress=True)
    typer.echo(f"perplexity {res.ppl:.4f} ({data} eval split, {res.windows} windows × {seqlen} tokens)")


@app.command("inspect")
def inspect_cmd(path: Path = typer.Argument(..., help="a packed checkpoint directory"), as_json: bool = typer.Option(False, "--json")):
    """Modules, schemes, bytes and compression ratio of a packed checkpoint."""
    with _user_errors():
        from lmpress.compress import inspect

        info = inspect(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    rows = [(name, r["scheme"], "×".join(map(str, r["shape"])), f"{r['bytes']:,}", f"{r['bits_per_weight']}", f"{r['ratio_vs_fp16']}×")
            for name, r in info["modules"].items()]
    _print_table(("module", "scheme", "shape", "bytes", "bits/w", "vs fp16"), rows)
    typer.echo(f"recipe {info['recipe']} · format v{info['format_version']} · {len(rows)} quantized modules · "
               f"{info['quantized_bits_per_weight']} bits/weight · file {info['file_bytes'] / 2**20:.1f} MiB"
               + (f" · KV cache {info['kv_cache']}" if info["kv_cache"] else ""))
    for runtime, how in (info.get("runtimes") or {}).items():
        typer.echo(f"{runtime}: {how}")
    mp = info.get("mixed_precision")
    if mp:  # the plan per decoder layer: one scheme label per linear
        import re

        typer.echo(f"mixed precision ({mp.get('sensitivity')} sensitivities, budget {mp.get('budget')}): "
                   f"avg {mp['avg_weight_bits']:.4f} weight bits, avg {mp['avg_act_bits']:.3f} input bits")
        layers: dict[str, list[str]] = {}
        for fqn, p in mp["plan"].items():
            hit = re.search(r"layers\.(\d+)\.", fqn)
            layers.setdefault(hit.group(1) if hit else fqn, []).append(f"{fqn.split('.')[-2 if fqn.endswith('.linear') else -1]}={p['scheme']}")
        order = sorted(layers, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        _print_table(("layer", "plan"), [(k, " ".join(sorted(layers[k]))) for k in order])


@app.command("export")
def export_cmd(
    path: str = typer.Argument(..., help="gptq: a packed checkpoint directory; gguf: a model (built-in name, .gguf, or a directory holding one)"),
    out: Path = typer.Option(..., "--out", "-o", help="gptq: directory to write; gguf: the .gguf file to write"),
    fmt: str = typer.Option("gptq", "--format", help="gptq (GPTQ v2 layout), gptq-v1 (zero points stored minus one) or gguf (llama.cpp)"),
    dtype: str = typer.Option("float16", help="gptq: dtype of scales and unquantized tensors: float16, bfloat16 or float32"),
    gtype: str = typer.Option("Q4_K", "--type", help="gguf: llama.cpp type of the linears (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, F16, F32)"),
    method: str = typer.Option("gptq", "--method", help="gguf: gptq (calibrated, on the exact grid) or rtn"),
    bpw: Optional[float] = typer.Option(None, "--bpw", help="gguf: a mixed plan at this many bits per weight (2-D tensors): a block type per linear, chosen on the calibration data"),
    calib: str = typer.Option("wiki", help="gguf: calibration text: wiki, a .txt/.jsonl file, or a local HF dataset"),
    n: int = typer.Option(128, "--n", help="gguf: calibration sequences"),
    seqlen: int = typer.Option(512, help="gguf: tokens per calibration sequence"),
    seed: int = typer.Option(0, help="gguf: calibration sampling seed"),
    overwrite: bool = typer.Option(False),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Write a checkpoint in another tool's layout: GPTQ (qweight, qzeros, scales, g_idx) from a packed
    checkpoint, or a GGUF that llama.cpp runs, quantized by lmpress on llama.cpp's own block grids."""
    _setup_logging(verbose)
    if fmt == "gguf":
        with _user_errors():
            _export_gguf_cmd(path, out, gtype, method, calib, n, seqlen, seed, overwrite, bpw)
        return
    with _user_errors():
        import torch

        from lmpress.compress.export import export_gptq

        path = Path(path)

        formats = {"gptq": "gptq_v2", "gptq-v2": "gptq_v2", "gptq-v1": "gptq"}
        if fmt not in formats:
            raise ValueError(f"--format {fmt!r}: use one of {list(formats)}")
        if dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"--dtype {dtype!r}: use float16, bfloat16 or float32")
        done = export_gptq(path, out, checkpoint_format=formats[fmt], dtype=getattr(torch, dtype), overwrite=overwrite)
    typer.echo(f"wrote {done} ({formats[fmt]}, {dtype})")


def _export_gguf_cmd(spec, out, gtype, method, calib, n, seqlen, seed, overwrite, bpw) -> None:
    from lmpress.calibration.data import sample_calibration
    from lmpress.compress.gguf import bits_per_weight, check_type, export_gguf
    from lmpress.compress.models import gguf_source

    gtype = check_type(gtype)
    if method not in ("gptq", "rtn"):
        raise ValueError(f"--method {method!r}: use gptq or rtn")
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"--out {out}: a GGUF export writes one file; give a path ending in .gguf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    cfg = Path(spec, "config.json")
    if cfg.is_file() and "quantization_config" in cfg.read_text():
        raise ValueError(f"{spec} is a quantized checkpoint; a GGUF export starts from the float model: "
                         "pass the model itself (built-in name, .gguf, or a directory holding one)")
    source = gguf_source(spec)
    if source is None:
        raise ValueError(f"{spec} has no GGUF to take the metadata and tokenizer from: pass a .gguf model "
                         "(or a directory holding exactly one), e.g. one written by llama.cpp's convert_hf_to_gguf.py")
    timer = _Timer()
    mdl, tok = _load(spec, timer)
    cal = None
    if method == "gptq" or bpw is not None:
        with timer("calibration", f"sampling {n} calibration sequences of {seqlen} tokens from {calib}"):
            cal = sample_calibration(tok, calib, n=n, seqlen=seqlen, seed=seed)
    what = f"a mixed plan at {bpw} bits per weight" if bpw is not None else gtype
    with timer("export", f"quantizing to {what} ({method}) and writing {out}"):
        done, types = export_gguf(mdl, out, source, ftype=gtype, calib=cal, method=method, bpw=bpw)
    typer.echo(f"wrote {done} ({gtype}, {method}, {done.stat().st_size / 2**20:.1f} MiB, "
               f"{bits_per_weight(mdl, types):.3f} bits per weight)")


@app.command("report")
def report_cmd(
    paths: list[Path] = typer.Argument(..., help="artifact directories written by compress-and-eval (each holds report.json)"),
    out: Path = typer.Option(Path("out/comparison"), "--out", "-o", help="folder for comparison.md/.json and ppl_vs_bits.png"),
):
    """Compare several compress-and-eval artifacts: one table, one perplexity-vs-bits plot."""
    with _user_errors():
        from lmpress.eval.report import compare

        md, header, rows = compare(paths, out)
    _print_table(tuple(header), [tuple("–" if c is None else (f"{c:.4g}" if isinstance(c, float) else c) for c in r) for r in rows])
    typer.echo(f"wrote {md}")


@app.command("recipes")
def recipes_cmd():
    """List the built-in recipes."""
    from lmpress.compress.recipe import builtin_recipes

    _print_table(("recipe", "description"), list(builtin_recipes().items()))


@app.command("models")
def models_cmd():
    """List the built-in model names."""
    from lmpress.compress.models import BUILTIN_MODELS

    _print_table(("model", "description"), list(BUILTIN_MODELS.items()))


def _print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    typer.echo("  ".join("-" * w for w in widths))
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    app()
