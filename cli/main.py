"""The `lmpress` command line: every command is a thin call into the Python API."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress, pack and evaluate causal language models.")
log = logging.getLogger("lmpress")

# the defaults of lmpress.compress.workflow.compress_and_eval, kept here so `lmpress --help` imports no torch
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_RECIPE = "w8a8-rtn"
EVAL_TASKS = ("lmpress_wiki_ppl", "lmpress_wiki_cloze", "lmpress_wiki_mc")
EVAL_TASK_LIMIT = 40

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


def _announce(label: str) -> None:
    typer.echo(f"· {label}", err=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("compress-and-eval")
def compress_and_eval_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="built-in name, Hugging Face directory or .gguf file"),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="built-in recipe name or YAML file"),
    out: Path = typer.Option(Path("out/compressed"), "--out", "-o", help="checkpoint directory to write"),
    calib: str = typer.Option("wiki", help="calibration text: wiki, canterbury, a .txt/.jsonl file, a local HF dataset, or a weighted mix such as wiki@3+notes.txt@1"),
    eval_data: str = typer.Option("wiki", "--eval-data", help="evaluation text (its eval split)"),
    n: int = typer.Option(128, "--n", help="calibration sequences"),
    seqlen: int = typer.Option(512, help="tokens per calibration sequence and per perplexity window"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    windows: Optional[int] = typer.Option(64, help="perplexity windows (default 64; 0 = all)"),
    ppl: bool = typer.Option(True, "--ppl/--no-ppl", help="token perplexity (the papers' protocol) of base and compressed"),
    tasks: str = typer.Option(",".join(EVAL_TASKS), "--tasks", help="comma-separated lm-eval tasks (bundled, from --task-dir, or cached lm-eval tasks); 'none' to skip"),
    task_limit: int = typer.Option(EVAL_TASK_LIMIT, "--task-limit", help="documents per lm-eval task (0 = all)"),
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
        from lmpress.compress.workflow import compress_and_eval

        result = compress_and_eval(
            model, recipe, out, calib=calib, eval_data=eval_data, n=n, seqlen=seqlen, seed=seed, windows=windows, ppl=ppl,
            tasks=() if tasks.strip().lower() in ("", "none") else tuple(t.strip() for t in tasks.split(",") if t.strip()),
            task_limit=task_limit, task_dirs=task_dir, latency=latency, latency_repeats=latency_repeats,
            prompt_len=prompt_len, min_recovery=min_recovery, thresholds=thresholds, export=export, overwrite=overwrite,
            progress=True, announce=_announce)
    bp, cp, gguf_res = result["base"].get("ppl"), result["compressed"].get("ppl"), result.get("gguf")
    m, hib, recov = result["metrics"], result["metrics"]["higher_is_better"], result["recovery"]
    rows = [(k + (" ↑" if hib.get(k) else " ↓"), f"{m['base'][k]:.4g}", f"{m['compressed'][k]:.4g}",
             "–" if recov.get(k) is None else f"{recov[k]:.4f}") for k in m["base"] if k in m["compressed"]]
    summary = [
        *((("perplexity (base)", f"{bp:.3f}"), ("perplexity (compressed)", f"{cp:.3f}"),
           ("ratio", f"{result['ppl_ratio']:.4f}")) if bp and cp else ()),
        ("bits per weight (quantized linears)", f"{result['bits_per_weight']}"),
        ("checkpoint size", f"{result['checkpoint_bytes'] / 2**20:.1f} MiB"),
        *((f"time: {k}", f"{v:.1f} s") for k, v in result["times_s"].items()),
    ]
    typer.echo(f"\n{model} · {result['recipe']} · {eval_data} eval split"
               + (f", {result['eval']['windows']} windows × {seqlen} tokens" if ppl else "")
               + (f" · lm-eval {task_limit or 'all'} docs/task" if result["eval"].get("tasks") else ""))
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
    typer.echo(f"report: {Path(out) / 'report.json'}, {result['report_md']}")
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
        from lmpress.compress.workflow import Timer, check_out, compress_and_save, load_timed

        rec = Recipe.load(recipe)
        check_out(out, overwrite)
        timer = Timer(_announce)
        mdl, tok = load_timed(model, timer)
        if device != "cpu":
            mdl = mdl.to(_resolve_device(device))
        report = compress_and_save(mdl, tok, rec, out, calib, n, seqlen, seed, overwrite, timer)
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
    from lmpress.compress.workflow import check_out

    rec = Recipe.load(recipe)
    check_recipe(rec)  # refuse whole-model stages before any long work
    src = resolve_model(model)
    if src.suffix.lower() == ".gguf":
        raise ValueError(f"--lazy reads safetensors shards; {src} is a GGUF file: convert it to a Hugging Face directory first")
    if not resume:
        check_out(out, overwrite)
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
    calib: str = typer.Option("wiki", help="gguf: calibration text: wiki, canterbury, a .txt/.jsonl file, a local HF dataset, or a mix such as wiki@3+notes.txt@1"),
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
    from lmpress.compress.workflow import Timer, load_timed

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
    timer = Timer(_announce)
    mdl, tok = load_timed(spec, timer)
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
