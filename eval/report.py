"""The report of a compress-and-eval run: report.json (every figure), report.md, PNG plots;
and `compare()`, one table and one plot over several artifacts.

A report is a plain dict (the JSON written next to the checkpoint). The keys read here:
``model``, ``recipe``, ``eval``, ``base``/``compressed`` (``ppl``, ``tasks``, ``latency``),
``metrics`` (``base``, ``compressed``, ``higher_is_better``: flat ``{key: value}``),
``recovery``, ``thresholds``, ``bits_per_weight``, ``base_bits``, ``checkpoint_bytes``,
``compression`` (``summary``, ``modules``), ``calibration``, ``recipe_spec``, ``versions``,
``machine``. Missing parts are left out of the Markdown, never invented.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
_LAYER = re.compile(r"layers\.(\d+)\.")


# --------------------------------------------------------------------------- provenance


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("lmpress", "torch", "transformers", "lm_eval", "datasets", "triton", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "arch": platform.machine(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_error(modules: dict[str, dict], path: Path) -> Path | None:
    """SQNR (dB) of every quantized linear as the stage recorded it, by layer, one line per projection."""
    series: dict[str, list[tuple[int, float]]] = {}
    for fqn, m in modules.items():
        hit = _LAYER.search(fqn)
        if hit and isinstance(m.get("sqnr_db"), (int, float)):
            series.setdefault(fqn.rsplit(".", 1)[-1], []).append((int(hit.group(1)), float(m["sqnr_db"])))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=kind)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("SQNR (dB, higher = less error)")
    ax.set_title("per-layer quantization error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bit_map(plan: dict[str, dict], path: Path) -> Path | None:
    """A mixed-precision plan as a grid: decoder layer × projection, colour = weight bits, the
    cell text = weight/input bits (`plan`: {fqn: {"weights": bits, "inputs": bits}}, 16 = unquantized)."""
    cells: dict[tuple[int, str], dict] = {}
    for fqn, p in plan.items():
        hit = _LAYER.search(fqn)
        if hit:
            parts = fqn.split(".")
            cells[(int(hit.group(1)), parts[-2] if parts[-1] == "linear" else parts[-1])] = p
    if not cells:
        return None
    import numpy as np

    layers = sorted({k[0] for k in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))  # module order of the plan
    grid = np.full((len(kinds), len(layers)), np.nan)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(layers) + 2), 0.45 * len(kinds) + 1.6))
    for (layer, kind), p in cells.items():
        r, c = kinds.index(kind), layers.index(layer)
        grid[r, c] = p.get("weights", 16)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    mid = (np.nanmin(grid) + np.nanmax(grid)) / 2
    a_min = min(p.get("inputs", 16) for p in cells.values())
    for (layer, kind), p in cells.items():  # bold: inputs above the plan's lowest input bits (e.g. the A8 ones)
        r, c = kinds.index(kind), layers.index(layer)
        ax.text(c, r, f"{p.get('weights', 16)}/{p.get('inputs', 16)}", ha="center", va="center", fontsize=5.5,
                color="white" if grid[r, c] <= mid else "black", fontweight="bold" if p.get("inputs", 16) > a_min else "normal")
    ax.set_xticks(range(len(layers)), [str(v) for v in layers], fontsize=6)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_title("mixed-precision plan (cell: weight bits / input bits)")
    fig.colorbar(im, ax=ax, label="weight bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppl_vs_bits(points: Sequence[tuple[str, float, float]], path: Path, title: str = "perplexity vs bits") -> Path | None:
    """`points`: (label, bits per weight, perplexity)."""
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, bits, ppl in points:
        ax.scatter([bits], [ppl], s=30)
        ax.annotate(label, (bits, ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("bits per weight (quantized linears; base = its dtype)")
    ax.set_ylabel("perplexity (token, lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_LAT_PANELS = (("prefill (tokens/s)", ("prefill_tok_s",)), ("decode (tokens/s)", ("decode_tok_s@1", "decode_tok_s@8")),
               ("time to first token (ms)", ("ttft_s",)), ("memory (MiB)", ("peak_bytes", "weight_bytes")))


def _lat_flat(lat: dict) -> dict[str, float]:
    flat = {k: v for k, v in lat.items() if isinstance(v, (int, float))}
    flat.update({f"decode_tok_s@{b}": v for b, v in (lat.get("decode_tok_s") or {}).items()})
    return flat


def plot_latency(base: dict, comp: dict, path: Path) -> Path | None:
    if not base or not comp:
        return None
    plt = _plt()
    b, c = _lat_flat(base), _lat_flat(comp)
    fig, axes = plt.subplots(1, len(_LAT_PANELS), figsize=(13, 3.8))
    for ax, (title, keys) in zip(axes, _LAT_PANELS):
        keys = [k for k in keys if k in b and k in c]
        scale = 1e3 if "ms" in title else (1 / 2**20 if "MiB" in title else 1)
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [b[k] * scale for k in keys], width=0.4, label="base")
        ax.bar([x + 0.2 for x in xs], [c[k] * scale for k in keys], width=0.4, label="compressed")
        ax.set_xticks(list(xs), [k.replace("decode_tok_s@", "batch ").replace("_tok_s", "").replace("_bytes", "").replace("_s", "")
                                 for k in keys], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(base.get("device", ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _stderr(report: dict, side: str, key: str) -> float | None:
    task, _, metric = key.partition("/")
    return (((report.get(side) or {}).get("tasks") or {}).get("stderr") or {}).get(task, {}).get(metric)


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    ev, metrics = report.get("eval") or {}, report.get("metrics") or {}
    base, comp, hib = metrics.get("base", {}), metrics.get("compressed", {}), metrics.get("higher_is_better", {})
    rec = report.get("recovery") or {}
    out = [f"# lmpress report: {report.get('model')} · {report.get('recipe')}", ""]
    thr = report.get("thresholds")
    if thr:
        out += [f"**Thresholds: {'PASSED' if thr['passed'] else 'FAILED'}**", ""]
    quality = [k for k in base if not k.startswith("latency/")]
    if quality:
        out += ["## Quality", "",
                f"`ppl`: token perplexity, {ev.get('data')} eval split, {ev.get('windows')} windows × {ev.get('seqlen')} "
                f"tokens (the papers' protocol). `lmpress_*`: lm-eval tasks on local files, "
                f"{ev.get('task_limit') or 'all'} documents each; ± is lm-eval's standard error. "
                "Recovery: compressed/base where higher is better, base/compressed where lower is better.", ""]
        rows = []
        for k in quality:
            eb, ec = _stderr(report, "base", k), _stderr(report, "compressed", k)
            rows.append((k, "↑" if hib.get(k, True) else "↓",
                         _fmt(base.get(k)) + (f" ± {_fmt(eb, 2)}" if eb else ""),
                         _fmt(comp.get(k)) + (f" ± {_fmt(ec, 2)}" if ec else ""), rec.get(k)))
        out += [_table(("metric", "better", "base", "compressed", "recovery"), rows), ""]
    lat = [k for k in base if k.startswith("latency/")]
    if lat:
        bl = (report.get("base") or {}).get("latency") or {}
        out += ["## Latency and memory", "", f"Medians over {ev.get('latency', {}).get('repeats', '?')} alternating repeats; "
                f"{bl.get('device', '')}. Settings: {json.dumps(ev.get('latency', {}))}.", ""]
        rows = [(k[len('latency/'):], "↑" if hib.get(k, True) else "↓", base.get(k), comp.get(k), rec.get(k)) for k in lat]
        out += [_table(("figure", "better", "base", "compressed", "recovery"), rows), ""]
        cl = (report.get("compressed") or {}).get("latency") or {}
        if cl.get("kernel_paths"):
            out += ["Runtime path of the compressed model's modules (how many took each; `lmpress inspect` names them): "
                    + ", ".join(f"`{k}` × {v}" for k, v in cl["kernel_paths"].items())
                    + f"; torch threads: {cl.get('threads', '?')}.", ""]
        slow = report.get("slower_than_base") or {}
        if slow:
            out += ["**The compressed model is slower than its base** on this machine: "
                    + ", ".join(f"{k} recovery {v:.2f}" for k, v in slow.items())
                    + " (below 1.00 = slower).", ""]
    if thr:
        rows = [(c["metric"], c["min"], c["recovery"], "pass" if c["passed"] else "FAIL", c.get("note", "")) for c in thr["checks"]]
        out += ["## Thresholds", "", _table(("metric", "min recovery", "recovery", "verdict", "note"), rows), ""]
    g = report.get("gguf")
    if g:
        out += ["## GGUF (llama.cpp)", "",
                f"`{g['file']}`: the base model on llama.cpp's {g['type']} grids ({g['method']}, the run's calibration set), "
                "metadata and tokenizer from its source GGUF. Perplexity on the same windows, through llama.cpp's own "
                "logits and through lmpress's simulation of the same grid.", "",
                _table(("", "value"), [
                    ("file (MiB)", g.get("mib")), ("bits per weight", g.get("bits_per_weight")),
                    ("perplexity in llama.cpp", g.get("ppl_llamacpp")), ("perplexity, lmpress simulation", g.get("ppl_sim")),
                    ("llama.cpp vs simulation", g.get("llamacpp_vs_sim")), ("ratio to the base (llama.cpp)", g.get("ppl_ratio")),
                    ("decode tok/s in llama.cpp (batch 1)", g.get("decode_tps")), ("note", g.get("note"))]), ""]
    s = (report.get("compression") or {}).get("summary") or {}
    out += ["## Compression", "", _table(("", "value"), [
        ("recipe", report.get("recipe")), ("bits per weight (quantized linears)", report.get("bits_per_weight")),
        ("checkpoint size (MiB)", (report.get("checkpoint_bytes") or 0) / 2**20 or None),
        ("quantized modules", s.get("quantized_modules")), ("mean SQNR (dB)", s.get("mean_sqnr_db")),
        ("min SQNR (dB)", s.get("min_sqnr_db")), ("compression time (s)", s.get("total_seconds"))]), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({rel})" for name, rel in plots.items()] + [""]
    out += ["## Provenance", "", "Calibration: `" + json.dumps(report.get("calibration")) + "`", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items()), "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in (report.get("machine") or {}).items()), ""]
    if report.get("times_s"):
        out += ["Times (s): " + ", ".join(f"{k} {v}" for k, v in report["times_s"].items()), ""]
    if report.get("recipe_spec"):
        import yaml

        out += ["Recipe:", "", "```yaml", yaml.safe_dump(report["recipe_spec"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(out)


def write_report(out_dir: str | Path, report: dict) -> Path:
    """Write report.json, plots/*.png and report.md into `out_dir`; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLOTS_DIR).mkdir(exist_ok=True)
    plots: dict[str, str] = {}
    made = plot_layer_error((report.get("compression") or {}).get("modules") or {}, out / PLOTS_DIR / "layer_error.png")
    if made:
        plots["per-layer quantization error"] = f"{PLOTS_DIR}/{made.name}"
    mixed = ((report.get("compression") or {}).get("mixed_precision") or {}).get("plan")
    made = plot_bit_map(mixed, out / PLOTS_DIR / "bit_map.png") if mixed else None
    if made:
        plots["mixed-precision bit map"] = f"{PLOTS_DIR}/{made.name}"
    pts = []
    if (report.get("base") or {}).get("ppl") is not None:
        pts.append((f"base ({report.get('base_bits', 16)}-bit)", report.get("base_bits", 16), report["base"]["ppl"]))
    if (report.get("compressed") or {}).get("ppl") is not None:
        pts.append((str(report.get("recipe")), report.get("bits_per_weight"), report["compressed"]["ppl"]))
    made = plot_ppl_vs_bits(pts, out / PLOTS_DIR / "ppl_vs_bits.png", title=f"{report.get('model')}: perplexity vs bits")
    if made:
        plots["perplexity vs bits"] = f"{PLOTS_DIR}/{made.name}"
    made = plot_latency((report.get("base") or {}).get("latency"), (report.get("compressed") or {}).get("latency"),
                        out / PLOTS_DIR / "latency.png")
    if made:
        plots["latency"] = f"{PLOTS_DIR}/{made.name}"
    report = {**report, "plots": plots}
    write_json(out / "report.json", report)
    md = out / "report.md"
    md.write_text(render_markdown(report, plots))
    return md


# --------------------------------------------------------------------------- comparison


COMPARE_COLUMNS = ("artifact", "model", "recipe", "bits/w", "MiB", "ppl base", "ppl", "min recovery", "thresholds")


def load_report(path: str | Path) -> dict:
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no report.json in {p}: run `lmpress compress-and-eval ... --out {p}` first")
    return json.loads(f.read_text())


def compare(paths: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, list[str], list[list[Any]]]:
    """One table (every shared metric, compressed value, plus recovery) and one perplexity-vs-bits
    plot over several artifacts; writes comparison.md/.json and ppl_vs_bits.png into `out_dir`."""
    reports = [(str(p), load_report(p)) for p in paths]
    if not reports:
        raise ValueError("compare needs at least one artifact directory")
    keys: list[str] = []
    for _, r in reports:
        for k in (r.get("metrics") or {}).get("compressed", {}):
            if k != "ppl" and k not in keys:
                keys.append(k)
    header = [*COMPARE_COLUMNS[:7], *keys, *COMPARE_COLUMNS[7:]]
    rows = []
    for name, r in reports:
        comp = (r.get("metrics") or {}).get("compressed", {})
        rec = [v for k, v in (r.get("recovery") or {}).items() if isinstance(v, (int, float)) and not k.startswith("latency/")]
        thr = r.get("thresholds")
        rows.append([name, r.get("model"), r.get("recipe"), r.get("bits_per_weight"),
                     round((r.get("checkpoint_bytes") or 0) / 2**20, 1) or None, (r.get("base") or {}).get("ppl"),
                     (r.get("compressed") or {}).get("ppl"), *(comp.get(k) for k in keys),
                     min(rec) if rec else None, None if not thr else ("pass" if thr["passed"] else "FAIL")])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pts, bases = [], set()
    for name, r in reports:
        b = (r.get("base") or {}).get("ppl")
        if b is not None and (r.get("model"), b) not in bases:
            bases.add((r.get("model"), b))
            pts.append((f"{r.get('model')} base", r.get("base_bits", 16), b))
        pts.append((f"{r.get('recipe')} ({Path(name).name})", r.get("bits_per_weight"), (r.get("compressed") or {}).get("ppl")))
    plot = plot_ppl_vs_bits(pts, out / "ppl_vs_bits.png", title="perplexity vs bits, per recipe run")
    md = out / "comparison.md"
    md.write_text("\n".join(["# lmpress comparison", "", "Compressed values; `min recovery` is the worst quality metric's "
                             "recovery (1.0 = as good as the base; latency not included).", "", _table(header, rows), "",
                             *([f"![perplexity vs bits]({plot.name})", ""] if plot else [])]))
    write_json(out / "comparison.json", {"columns": header, "rows": rows, "artifacts": [n for n, _ in reports]})
    return md, header, rows
