"""Which recipes each model family takes: the support matrix of the architecture records and the
generic path, on tiny seeded models (`lmpress.compress.models.tiny_model`: the tiny LLaMA's
shape with hidden 128, FFN 192, 8 query heads; each family's own structure).

    python -P bench/architectures.py                    # every family x every recipe
    python -P bench/architectures.py --families gemma3 --recipes w4a16-gptq,kv2-kivi

Per cell: `ok` (the artifact's form; the decoder layers' matrices left in high precision, if any;
compressed, saved, `load()` gives the simulated model's logits; for an artifact
in compressed-tensors form, stock transformers in a process that never imports lmpress gives the
same logits, max |diff| / max |logit| <= 1e-4), `refused` with the one-line reason lmpress gives
before anything changes, or `FAILED` with the error. Rows `fuse_norms`, `smoothquant` and
`rotate` are the float64 invariance checks (max |logit diff| <= 1e-8; the families' RMSNorms
computed in float64, the reference taken after any split of fused linears or experts). Calibration: 8 x 32 random tokens (seed 0); one thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen3", "gemma3", "phi3", "mixtral", "qwen3_moe", "gpt_neox")
RECIPES = ("fuse_norms", "smoothquant", "rotate", "w4a16-gptq", "w4a16-rtn", "w8a8-rtn", "w8a8-fp8", "w4a16-nvfp4",
           "sparse24-wanda", "w4a16-awq", "w4a16-awq-gptq", "w8a8-smoothquant-rtn", "w4a4kv4-quarot-gptq", "w4a4kv4-flatquant", "kv2-kivi",
           "kv2-rotatekv", "kv-fp8", "w4afp8-fireq", "mixed-w3.5-gptq")
SHAPE = dict(hidden_size=128, intermediate_size=192, num_attention_heads=8)  # groups of 64 divide every input width
INVARIANCE = {"fuse_norms": [("fuse_norms", {})], "smoothquant": [("smoothquant", {"alpha": 0.5})],
              "rotate": [("fuse_norms", {}), ("rotate", {"kind": "hadamard", "online": ["down_proj", "qk"], "r2": True})]}

def calibration():
    from lmpress.calibration.data import CalibrationSet, fingerprint

    toks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=8, seqlen=32, seed=0, fingerprint=fingerprint(toks))


def run_cell(family: str, recipe: str, calib, tokens, folder: Path) -> dict:
    """One cell: {"status": ok | refused | FAILED, "detail": ..., "path": artifact for the stock check}."""
    from lmpress.compress import Recipe, arch_for, compress, load, save
    from lmpress.compress.pipeline import prepare
    from lmpress.compress.models import float64_norms, tiny_model
    from lmpress.compress.report import Report
    from lmpress.compress.stage import Context, make_stage

    try:
        if recipe in INVARIANCE:
            with float64_norms():
                model, _ = tiny_model(family, seed=1, dtype=torch.float64, **SHAPE)
                arch = prepare(model, Recipe.from_dict({"version": 1, "name": recipe, "schemes": {},
                                                        "stages": [{n: o} for n, o in INVARIANCE[recipe]]}))
                with torch.no_grad():  # after the structural split (exact: tests/test_architectures.py)
                    ref = model(tokens).logits
                ctx = Context(arch=arch, plan={}, report=Report(), calib=calib, batch_size=8)
                with torch.no_grad():
                    for name, opts in INVARIANCE[recipe]:
                        make_stage(name, opts).apply(model, ctx)
                    diff = (model(tokens).logits - ref).abs().max().item()
            return {"status": "ok" if diff <= 1e-8 else "FAILED", "detail": f"max abs diff {diff:.0e}"}
        model, tok = tiny_model(family, seed=0, **SHAPE)
        compress(model, recipe, calib)
        path = save(model, folder / f"{family}-{recipe}", tokenizer=tok)
        with torch.no_grad():
            sim = model(tokens).logits
            loaded = load(path)(tokens).logits
        if not torch.equal(sim, loaded):
            return {"status": "FAILED", "detail": f"load() differs from the simulated model by {(sim - loaded).abs().max().item():.1e}"}
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        form = ("lmpress-packed" if qc.get("quant_method") != "compressed-tensors"
                else "compressed-tensors + lmpress block" if qc.get("lmpress") else "compressed-tensors")
        layers = arch_for(model).decoder_layers(model)
        quantized = {id(p) for m in layers.modules() if hasattr(m, "scheme") for p in m.parameters()}
        left = sorted({n.split(".", 1)[1] for n, p in layers.named_parameters() if p.dim() > 1 and id(p) not in quantized})
        detail = form + (f"; kept: {', '.join(left)}" if left and len(quantized) else "")
        return {"status": "ok", "detail": detail, "path": str(path) if form == "compressed-tensors" else None, "logits": loaded}
    except Exception as e:  # noqa: BLE001 - a cell's failure is a figure of the table
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, ValueError) and "cannot run on" in msg:
            return {"status": "refused", "detail": msg}
        return {"status": "FAILED", "detail": f"{type(e).__name__}: {msg}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--json", help="write the cells here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.disable(logging.INFO)
    from lmpress.compress import arch_for
    from lmpress.compress.arch import record_for
    from lmpress.compress.models import tiny_model
    from lmpress.eval.stock import StockLoadError, stock_logits

    families, recipes = args.families.split(","), args.recipes.split(",")
    calib = calibration()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    cells: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="lmpress-arch-") as d:
        for fam in families:
            for rec in recipes:
                t0 = time.perf_counter()
                cells[fam, rec] = cell = run_cell(fam, rec, calib, tokens, Path(d))
                print(f"{fam:10s} {rec:24s} {cell['status']:8s} {time.perf_counter() - t0:5.1f}s {cell['detail'][:110]}",
                      file=sys.stderr, flush=True)
        paths = [c["path"] for c in cells.values() if c.get("path")]
        try:
            stock, err = (stock_logits(paths, tokens, timeout=900) if paths else {}), ""
        except StockLoadError as e:
            stock, err = {}, str(e).strip().splitlines()[-1]
        for c in cells.values():
            if c.get("path"):
                if c["path"] not in stock:
                    c["status"], c["detail"] = "FAILED", "stock load: " + err
                    continue
                rel = ((stock[c["path"]] - c["logits"]).abs().max() / c["logits"].abs().max()).item()
                c["stock"] = rel
                if rel > 1e-4:
                    c["status"], c["detail"] = "FAILED", f"stock transformers differs: {rel:.1e}"
    arch_names = {f: (record_for(m) or arch_for(m)).name for f in families for m in [tiny_model(f)[0]]}
    print("| recipe | " + " | ".join(f"{f} ({arch_names[f]})" for f in families) + " |")
    print("|---|" + "---|" * len(families))
    for rec in recipes:
        row = []
        for fam in families:
            c = cells[fam, rec]
            text = c["status"]
            if c["status"] == "ok":
                text += f" (stock {c['stock']:.0e})" if "stock" in c else ""
                text += f" ({c['detail']})" if c["detail"] else ""
            elif "(discovered, no record)" in c["detail"]:
                text += ": needs a record"
            else:
                text += ": " + c["detail"].split(f"{arch_names[fam]}: ", 1)[-1][:200]
            row.append(text)
        print(f"| {rec} | " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{f}/{r}": {k: v for k, v in c.items() if k != "logits"}
                                               for (f, r), c in cells.items()}, indent=1))


if __name__ == "__main__":
    main()
