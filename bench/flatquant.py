"""W4A4KV4 with FlatQuant-style learned Kronecker transforms on SmolLM2-135M: perplexity,
calibration time, peak memory, packed-checkpoint reload, and an epochs trade-off.

    python bench/flatquant.py --threads 2                          # the default configurations
    python bench/flatquant.py --configs flatquant,flatquant-e1     # a subset
    python bench/flatquant.py --json /tmp/flat.json                # also write the rows as JSON

Protocol: the same as `bench/rotations.py` (bundled `wiki` source; calibration =
`sample_calibration(tok, "wiki", n, calib_seqlen, seed)` from the calib split; perplexity on the
eval split, the first `windows` windows of `seqlen` tokens, no BOS, fp32 on CPU; each
configuration in its own subprocess, `peak RSS` its resident-set maximum after compression,
`peak compress` the largest RSS sampled during `compress()`). The flatquant stage uses the first
`samples` (recipe: 32) of the `n` calibration sequences; GPTQ uses all `n`.

Configurations (`--configs`, comma-separated):
  base             the fp32 model
  flatquant        recipe w4a4kv4-flatquant (RTN weights after flattening); also saved, reloaded
                   packed (PackedLinear, KronTransform) and evaluated again (`ppl packed`; this
                   configuration only, not its -e<N> variants)
  flatquant-gptq   recipe w4a4kv4-flatquant-gptq (GPTQ weights after flattening)
  suffix -float    flatquant.train_inputs = float (train each layer on the float stream)
  suffix -e<N>     flatquant.epochs = N (e.g. flatquant-e1: the epochs trade-off)
  suffix +k=v      any flatquant option (YAML value), repeatable: flatquant+loss=mse+samples=64
  quarot-gptq, spinquant-gptq, ...   the rotation bench's configurations (`bench/rotations.py`), for
                   the comparison in one run: pass --n 128 to give GPTQ the rotation bench's calibration
lm_head stays in high precision in every configuration.
"""
from __future__ import annotations

import os
import re
import tempfile
import time

import yaml

import _runner
import rotations  # its configurations, for the comparison rows

RECIPES = {"base": None, "flatquant": "w4a4kv4-flatquant", "flatquant-gptq": "w4a4kv4-flatquant-gptq"}
DEFAULT_CONFIGS = "base,flatquant,flatquant-gptq,quarot-gptq,spinquant-gptq,flatquant-e1"


def parse_config(config: str) -> tuple[str, dict]:
    """(recipe key, flatquant option overrides) of e.g. "flatquant-float-e1+loss=mse"; the
    rotation bench's configurations (quarot-gptq, spinquant-gptq, ...) come back as ("rot:<name>", {})."""
    if not config.startswith("flatquant") and config != "base":
        rotations.parse_config(config)  # exits with the known names if it is not one of them either
        return f"rot:{config}", {}
    name, *sets = config.split("+")
    m = re.fullmatch(r"(.+?)(-float)?(?:-e(\d+))?", name)
    base, over = m.group(1), {}
    if m.group(2):
        over["train_inputs"] = "float"
    if m.group(3):
        over["epochs"] = int(m.group(3))
    for kv in sets:
        key, eq, value = kv.partition("=")
        if not eq:
            raise SystemExit(f"configuration {config!r}: write overrides as +option=value")
        over[key] = yaml.safe_load(value)
    if base not in RECIPES or (base == "base" and over):
        raise SystemExit(f"unknown configuration {config!r}; known: {', '.join(RECIPES)} "
                         "(flatquant ones with -float, -e<N> and +option=value suffixes)")
    return base, over


def recipe_for(config: str):
    from lmpress.compress import Recipe

    base, over = parse_config(config)
    if base.startswith("rot:"):
        return rotations.recipe_for(config)
    if RECIPES[base] is None:
        return None
    data = Recipe.load(RECIPES[base]).to_dict()
    for st in data["stages"]:
        if isinstance(st, dict) and "flatquant" in st:
            st["flatquant"].update(over)
    data["name"] += config[len(base):].replace("+", "-").replace("=", "-")  # e.g. w4a4kv4-flatquant-e1-loss-mse
    return Recipe.from_dict(data)


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import compress, load, save
    from lmpress.compress.models import load_model
    from lmpress.eval.ppl import perplexity

    torch.manual_seed(0)
    recipe = recipe_for(config)
    model, tok = load_model(args.model)
    text = load_text("wiki", "eval")
    row: dict = {"config": config, "recipe": recipe.name if recipe else None, "compress_s": 0.0}
    if recipe is not None:
        calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.calib_seqlen, seed=args.seed)
        t1 = time.perf_counter()
        with _runner.RssPeak() as peak:
            report = compress(model, recipe, calib)
        row["compress_s"] = time.perf_counter() - t1
        row["peak_compress_mib"] = peak.mib
        row["stages"] = {s["stage"]: s["seconds"] for s in report.stages}
        fq = report.extra.get("flatquant", {})
        row["flatquant"] = {k: fq.get(k) for k in ("samples", "seqlen", "seconds")}
        row["flatquant"]["epochs"] = fq.get("options", {}).get("epochs")
        layers = fq.get("layers") or []
        row["flatquant"]["mse_first_batch"] = [[r["init_loss"], r["final_loss"]] for r in layers]
    row["peak_rss_mib"] = _runner.rss_mib()
    t0 = time.perf_counter()
    res = perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows)
    row["eval_s"] = time.perf_counter() - t0
    row.update(ppl=res.ppl, windows=res.windows, seqlen=res.seqlen)
    _runner.partial(row)  # kept if the packed reload below fails
    if parse_config(config) == ("flatquant", {}) and not args.no_packed:
        with tempfile.TemporaryDirectory(prefix="lmpress-flat-") as d:
            save(model, os.path.join(d, "ckpt"), tokenizer=tok)
            del model
            packed = load(os.path.join(d, "ckpt"))
            res2 = perplexity(packed, tok, text, seqlen=args.seqlen, windows=args.windows)
        row["ppl_packed"] = res2.ppl
        row["packed_rel"] = res2.ppl / res.ppl - 1.0
    return row


def markdown(rows: list[dict], args) -> str:
    head = (f"SmolLM2-135M, wiki eval split, {args.windows} windows x {args.seqlen} tokens; calibration {args.n} x "
            f"{args.calib_seqlen} (flatquant uses the recipe's `samples` of them, GPTQ all); fp32, CPU, {args.threads} threads")
    base = next((r["ppl"] for r in rows if r.get("config") == "base" and "ppl" in r), None)
    lines = [head, "",
             "| configuration | recipe | epochs | ppl | x base | ppl packed (rel) | flatquant (s) | compress (s) | peak RSS (MiB) | peak during compress (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fq = r.get("flatquant") or {}
        packed = f"{r['ppl_packed']:.3f} ({100 * r['packed_rel']:+.2f}%)" if "ppl_packed" in r else "-"
        ratio = f"{r['ppl'] / base:.2f}" if base else "-"
        lines.append(
            f"| {r['config']} | {r['recipe'] or '-'} | {fq.get('epochs', '-')} | {r['ppl']:.3f} | {ratio} | {packed} | "
            f"{fq.get('seconds') or '-'} | {r['compress_s']:.0f} | {r['peak_rss_mib']:.0f} | {r.get('peak_compress_mib', 0):.0f} |"
        )
    return "\n".join(lines)


def add_args(p) -> None:
    _runner.protocol_args(p, calib_seqlen=True)
    p.add_argument("--no-packed", action="store_true", help="skip the save / reload / packed perplexity")


def check(config: str, args) -> None:
    parse_config(config)


def main(argv=None) -> None:
    _runner.main(run_one, markdown, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=add_args, check=check, argv=argv)


if __name__ == "__main__":
    main()
