"""Foundation figures: SmolLM2-135M on the wiki eval split, base vs RTN recipes.

    python bench/foundation.py [--windows 64] [--n 32]

Prints a Markdown table: perplexity, ratio to the base, bits per weight, checkpoint size,
compress time and peak RSS. Each recipe is compressed, saved, reloaded and evaluated packed.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

from lmpress.calibration.data import load_text, sample_calibration
from lmpress.compress import Recipe, compress, inspect, load, save
from lmpress.compress.models import load_model
from lmpress.eval.ppl import perplexity

A16 = "schemes: {{lm_head: null, 're:.*': {scheme}}}\nstages: [rtn]\n"
RECIPES = {
    "W8A8 RTN": "w8a8-rtn",
    "W8A8 SmoothQuant+RTN": "w8a8-smoothquant-rtn",
    "W4A16 RTN g64 asym": "w4a16-rtn",
    "W4A16 RTN g64 sym": A16.format(scheme="{preset: W4A16, weights: {group_size: 64}}"),
    "W4A16 RTN per-channel sym": A16.format(scheme="{preset: W4A16, weights: {granularity: channel, group_size: null}}"),
    "W4A16 RTN per-channel asym": A16.format(scheme="{preset: W4A16, weights: {granularity: channel, group_size: null, symmetric: false}}"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--n", type=int, default=32, help="calibration sequences (for recipes that calibrate)")
    ap.add_argument("--only", nargs="*", help="subset of the row names")
    ap.add_argument("--base", type=float, help="reuse a measured base perplexity instead of evaluating it")
    args = ap.parse_args()
    text = load_text("wiki", "eval")
    model, tok = load_model("smollm2-135m")
    base = args.base or perplexity(model, tok, text, windows=args.windows).ppl
    rows = [("base fp32", base, 1.0, 32.0, None, 0.0)]
    print(f"base {base:.3f}", flush=True)
    for name, spec in RECIPES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        model, tok = load_model("smollm2-135m")
        recipe = Recipe.from_yaml(spec) if "\n" in spec else Recipe.load(spec)
        calib = sample_calibration(tok, "wiki", n=args.n, seqlen=512) if recipe.needs_calibration else None
        t0 = time.perf_counter()
        compress(model, recipe, calib=calib)
        secs = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            out = save(model, f"{d}/ckpt", tokenizer=tok)
            info = inspect(out)
            ppl = perplexity(load(out), tok, text, windows=args.windows).ppl
        rows.append((name, ppl, ppl / base, info["quantized_bits_per_weight"], info["file_bytes"], secs))
        print(f"{name}: {ppl:.3f}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nSmolLM2-135M, wiki eval split, {args.windows} windows x 512 tokens; peak RSS {rss:.2f} GiB\n")
    print("| recipe | ppl | ratio | bits/weight (quantized linears) | checkpoint MiB | compress s |")
    print("|---|---|---|---|---|---|")
    for name, ppl, ratio, bits, size, secs in rows:
        mib = f"{size / 2**20:.1f}" if size else "-"
        print(f"| {name} | {ppl:.3f} | {ratio:.4f} | {bits} | {mib} | {secs:.1f} |")


if __name__ == "__main__":
    main()
