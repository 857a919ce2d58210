"""Mixed precision on SmolLM2-135M: an allocated plan against uniform and two-level splits at
equal bits, W4A4 with 10% of the linears at A8 against uniform W4A4, and the tolerance search.

    python bench/mixed.py --threads 2                          # every configuration below
    python bench/mixed.py --configs w3,mixed-3.5 --windows 16  # a subset, a quicker look
    python bench/mixed.py --json /tmp/mixed.json

Protocol: the bundled `wiki` source; calibration = `sample_calibration(tok, "wiki", n, seqlen, seed)`
from the calib split (`--n`, 32 by default here, to spare the shared CPU: the standard GPTQ
figure uses 128); the `mixed_precision` stage scores on the first `--sens-samples` (8) of those
sequences; perplexity = `eval.ppl.perplexity` on the eval split, the first `--windows` (64)
windows of 512 tokens, no BOS, fp32 on CPU, simulated form. lm_head stays in high precision.
Weights in groups of 64, asymmetric, for W3/W4/W8 (SmolLM2's GGUF weights lie on a 4-bit grid
of groups of 32, which would flatter W4 g32). Each configuration runs in its own subprocess.

Configurations (`--configs`):
  base          the fp32 model
  w3            uniform W3 g64, GPTQ
  split-lo4     layers 0..L/2-1 at W4 g64, the rest at W3 g64 (3.5 bits), GPTQ
  split-hi4     the reverse (3.5 bits), GPTQ
  mixed-3.5     recipe mixed-w3.5-gptq: W3/W4/W8 g64 per linear at <= 3.5 average bits (Fisher scores)
  mixed-3.5-hessian  the same with the Hessian proxy tr(ΔW H ΔWᵀ) as the score
  w4a4          recipe w4a4kv4-quarot-gptq (QuaRot, W4A4KV4, GPTQ)
  w4a4-a8       recipe mixed-w4a4-a8outliers: the same with 10% of the linears at A8 (Fisher scores)
  tolerance     W3/W4/W8 g64, the smallest average weight bits whose calibration perplexity (RTN,
                `--tol-samples` sequences) is within `--tolerance` of the fp32 model, then GPTQ;
                reuses the scores of `mixed-3.5` when it ran first
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

import _runner

W = {"bits": 3, "granularity": "group", "group_size": 64, "symmetric": False}
GPTQ = {"gptq": {"block_size": 128, "damp": 0.01, "act_order": True, "true_sequential": True}}
DEFAULT = "w3,mixed-3.5,split-lo4,split-hi4,w4a4,w4a4-a8,tolerance,mixed-3.5-hessian"
BASE_PPL_REFERENCE = 16.507  # helper context: SmolLM2-135M fp32, wiki eval, 64 x 512, no BOS


def _w(bits: int) -> dict:
    return {"weights": {**W, "bits": bits}}


def recipe_for(config: str, args, n_layers: int = 30):
    from lmpress.compress import Recipe

    if config == "w3":
        return Recipe.from_dict({"version": 1, "name": config, "schemes": {"lm_head": None, "re:.*": _w(3)}, "stages": [GPTQ]})
    if config in ("split-lo4", "split-hi4"):
        half = n_layers // 2
        lo = "|".join(str(i) for i in range(half))
        first, rest = (4, 3) if config == "split-lo4" else (3, 4)
        return Recipe.from_dict({"version": 1, "name": config, "stages": [GPTQ], "schemes": {
            "lm_head": None, f"re:model\\.layers\\.({lo})\\..*": _w(first), "re:.*": _w(rest)}})
    if config in ("mixed-3.5", "mixed-3.5-hessian", "tolerance"):
        d = Recipe.load("mixed-w3.5-gptq").to_dict()
        mp = d["stages"][0]["mixed_precision"]
        mp["samples"] = args.sens_samples
        if config == "mixed-3.5-hessian":
            mp["sensitivity"] = "hessian"
        if config == "tolerance":
            mp.update(budget=None, tolerance=args.tolerance, samples=args.tol_samples)
            scores = os.path.join(args.work, "mixed-3.5.scores.json")
            if os.path.exists(scores):
                mp["scores_file"] = scores
        d["name"] = config
        return Recipe.from_dict(d)
    if config == "w4a4":
        return Recipe.load("w4a4kv4-quarot-gptq")
    if config == "w4a4-a8":
        d = Recipe.load("mixed-w4a4-a8outliers").to_dict()
        d["stages"][2]["mixed_precision"]["samples"] = args.sens_samples
        return Recipe.from_dict(d)
    raise SystemExit(f"unknown configuration {config!r}; known: base,{DEFAULT}")


def avg_bits(model, plan) -> tuple[float, float]:
    from lmpress.quant import mixed as mx

    shapes = {f: (model.get_submodule(f).out_features, model.get_submodule(f).in_features) for f in plan}
    n = sum(r * c for r, c in shapes.values())
    return (sum(mx.weight_bits(s, shapes[f]) for f, s in plan.items()) / n,
            sum(mx.act_bits(s) for s in plan.values()) / len(plan))


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import compress
    from lmpress.compress.models import load_model
    from lmpress.eval.ppl import perplexity
    from lmpress.quant import mixed as mx

    model, tok = load_model(args.model)
    row: dict = {"config": config}
    t0 = time.perf_counter()
    if config != "base":
        calib = sample_calibration(tok, "wiki", args.n, args.seqlen, args.seed)
        report = compress(model, recipe_for(config, args, model.config.num_hidden_layers), calib)
        row["compress_s"] = round(time.perf_counter() - t0, 1)
        row["avg_weight_bits"], row["avg_act_bits"] = avg_bits(model, model.lmpress_meta["plan"])
        mp = report.extra.get("mixed_precision")
        if mp:
            row["plan_counts"] = {}
            for p in mp["plan"].values():
                row["plan_counts"][p["scheme"]] = row["plan_counts"].get(p["scheme"], 0) + 1
            row["scores_s"] = mp["seconds"]["scores"]
            if config == "mixed-3.5":
                with open(os.path.join(args.work, "mixed-3.5.scores.json"), "w") as f:
                    json.dump(mp["scores"], f)
            if "tolerance" in mp:
                tol = mp["tolerance"]
                row["tolerance"] = {k: tol[k] for k in ("tolerance", "budget", "calib_ppl_ratio", "history", "fp_calib_ppl")}
                toks = calib.tokens[: args.tol_samples]
                nll = cnt = 0.0
                with torch.no_grad():
                    for b in toks.split(2):
                        s, k = mx.token_nll(model(input_ids=b, use_cache=False).logits, b)
                        nll, cnt = nll + s, cnt + k
                row["tolerance"]["final_calib_ppl_ratio"] = math.exp(nll / cnt) / tol["fp_calib_ppl"]
    t1 = time.perf_counter()
    res = perplexity(model, tok, load_text("wiki", "eval"), seqlen=args.seqlen, windows=args.windows)
    row["ppl"], row["windows"], row["eval_s"] = res.ppl, res.windows, round(time.perf_counter() - t1, 1)
    return row


def table(rows: list[dict], args) -> str:
    by = {r["config"]: r for r in rows}
    out = [f"{args.model}, wiki eval {args.windows} x {args.seqlen}; GPTQ calibration {args.n} x {args.seqlen}; "
           f"sensitivities on {args.sens_samples} x {args.seqlen}; weights g64 asym; lm_head fp", "",
           "| configuration | avg W bits | avg A bits | ppl | plan | compress s |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r.get('avg_weight_bits', 32):.4f} | {r.get('avg_act_bits', 32):.3f} | {r['ppl']:.3f} | "
                   f"{r.get('plan_counts', '')} | {r.get('compress_s', '')} |")
    splits = [by[c] for c in ("split-lo4", "split-hi4") if c in by]
    if splits:
        best = min(splits, key=lambda r: r["ppl"])
        out.append(f"\nbest two-level split: {best['config']} ppl {best['ppl']:.3f}")
    if "tolerance" in by and "tolerance" in by["tolerance"]:
        t = by["tolerance"]["tolerance"]
        base = by["base"]["ppl"] if "base" in by else BASE_PPL_REFERENCE
        out.append(f"tolerance {t['tolerance']}: budget {t['budget']:.4f} avg weight bits, calib ppl ratio (RTN, search) "
                   f"{t['calib_ppl_ratio']:.4f}, after GPTQ {t['final_calib_ppl_ratio']:.4f}; eval ppl ratio "
                   f"{by['tolerance']['ppl'] / base:.4f} (base {base:.3f}{'' if 'base' in by else ', reference figure'}); "
                   f"search {[(round(b, 3), round(r, 4)) for b, r in t['history']]}")
    return "\n".join(out)


def add_args(p) -> None:
    _runner.protocol_args(p, n=32)
    p.add_argument("--sens-samples", type=int, default=8, help="sequences the mixed_precision stage scores on")
    p.add_argument("--tol-samples", type=int, default=4, help="sequences the tolerance search measures on")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--work", default=None, help="folder for scores shared between configurations")


def check(config: str, args) -> None:
    if config != "base":
        recipe_for(config, args)


def prepare(args) -> list[str]:
    """One work folder for the whole run, handed to every child (mixed-3.5 leaves its scores there)."""
    args.work = args.work or tempfile.mkdtemp(prefix="lmpress-mixed-")
    os.makedirs(args.work, exist_ok=True)
    return ["--work", args.work]


def main(argv=None) -> None:
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT, add_args=add_args, check=check, prepare=prepare,
                 threads=2, argv=argv)


if __name__ == "__main__":
    main()
