"""Packed artifacts on the CPU: perplexity of the simulated model, of the reloaded checkpoint
through the CPU path, and through the torch reference path, same windows.

    python bench/packed_ppl.py                       # w4a16-rtn and w4a4kv4-quarot-rtn, 16 windows
    python bench/packed_ppl.py --windows 64 --recipes w4a16-rtn

Each recipe: SmolLM2-135M is compressed (simulated form: SimQuantLinear), evaluated, saved,
reloaded with `load()` and evaluated with LMPRESS_KERNELS=cpu (every quantized linear through
`lmpress.kernels.cpu`, whatever its size) and LMPRESS_KERNELS=ref (unpack + dequantize +
F.linear). Perplexity protocol: `eval.ppl.perplexity` on the wiki eval split, no BOS. The
issue's bar: both packed paths within 0.5% of the simulation.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from lmpress.calibration.data import load_text, sample_calibration
from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.models import load_model
from lmpress.eval.ppl import perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="w4a16-rtn,w4a4kv4-quarot-rtn")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--n", type=int, default=16, help="calibration sequences (recipes that calibrate)")
    args = ap.parse_args()
    text = load_text("wiki", "eval")
    rows = []
    for name in args.recipes.split(","):
        model, tok = load_model("smollm2-135m")
        recipe = Recipe.load(name)
        calib = sample_calibration(tok, "wiki", n=args.n, seqlen=512) if recipe.needs_calibration else None
        compress(model, recipe, calib=calib)
        row = {"recipe": name, "sim": perplexity(model, tok, text, windows=args.windows).ppl}
        with tempfile.TemporaryDirectory() as d:
            out = save(model, f"{d}/ckpt", tokenizer=tok)
            del model
            for backend in ("cpu", "ref"):
                os.environ["LMPRESS_KERNELS"] = backend
                packed = load(out)
                t0 = time.perf_counter()
                row[backend] = perplexity(packed, tok, text, windows=args.windows).ppl
                row[f"{backend}_s"] = time.perf_counter() - t0
                del packed
        os.environ.pop("LMPRESS_KERNELS", None)
        rows.append(row)
        print(row, flush=True)
    print(f"\nSmolLM2-135M, wiki eval split, {args.windows} windows x 512 tokens\n")
    print("| recipe | simulated | packed, CPU path | diff | packed, reference | diff | eval s cpu / ref |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d_cpu = 100 * (r["cpu"] / r["sim"] - 1)
        d_ref = 100 * (r["ref"] / r["sim"] - 1)
        print(f"| {r['recipe']} | {r['sim']:.3f} | {r['cpu']:.3f} | {d_cpu:+.3f}% | {r['ref']:.3f} | {d_ref:+.3f}% | "
              f"{r['cpu_s']:.0f} / {r['ref_s']:.0f} |")


if __name__ == "__main__":
    main()
