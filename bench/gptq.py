"""GPTQ vs RTN on SmolLM2-135M, W4A16 (and 3-bit): perplexity, compress time, peak memory.

    python bench/gptq.py                                   # the standard figure: 128 x 512 calib, 64 x 512 eval
    python bench/gptq.py --n 32 --windows 16               # a quicker look
    python bench/gptq.py --configs base,rtn-g64,gptq-g64   # a subset

Protocol: the bundled `wiki` source; calibration = `sample_calibration(tok, "wiki", n, seqlen,
seed)` from the calib split; perplexity = `eval.ppl.perplexity` on the eval split, the first
`windows` windows of `seqlen` tokens, no BOS, fp32 on CPU. Each configuration runs in its own
subprocess on a freshly loaded model, so `peak RSS` (resource.getrusage ru_maxrss, measured right
after compression: model load + calibration + compression) belongs to that configuration alone.
The compressed model is evaluated in its simulated form (SimQuantLinear), which the checkpoint
tests tie to the packed form within 1e-4 on the logits.

Configurations (`--configs`, comma-separated): `base`, and `<method>-<scheme>` with method
`rtn` | `gptq` | `gptq-noact` (GPTQ without act-order: lazy groups) and scheme `g64` (int4, groups
of 64, asym: the `w4a16-rtn`/`w4a16-gptq` recipes), `ch` (int4 per-channel, asym), `w3g64` (int3,
groups of 64, asym). lm_head stays in high precision. Note that the SmolLM2 weights shipped as
GGUF Q4_1 already lie on a 4-bit grid of groups of 32 (asym), so W4 g32 would be nearly free;
g64, per-channel and 3-bit are the informative settings.
"""
from __future__ import annotations

import time

import _runner

SCHEMES = {
    "g64": {"preset": "W4A16", "weights": {"group_size": 64, "symmetric": False}},
    "ch": {"preset": "W4A16", "weights": {"granularity": "channel", "symmetric": False}},
    "w3g64": {"preset": "W3A16", "weights": {"group_size": 64, "symmetric": False}},
}
SCHEME_LABEL = {"g64": "W4 g64 asym", "ch": "W4 per-channel asym", "w3g64": "W3 g64 asym"}
METHODS = {
    "rtn": {"rtn": {}},
    "gptq": {"gptq": {"act_order": True}},
    "gptq-noact": {"gptq": {"act_order": False}},
}
DEFAULT_CONFIGS = "base,rtn-g64,gptq-g64,rtn-ch,gptq-ch,rtn-w3g64,gptq-w3g64"


def recipe_for(config: str):
    from lmpress.compress import Recipe

    method, _, scheme = config.rpartition("-")
    if method not in METHODS or scheme not in SCHEMES:
        raise SystemExit(f"unknown configuration {config!r}: use base or <{'|'.join(METHODS)}>-<{'|'.join(SCHEMES)}>")
    return Recipe.from_dict({
        "version": 1,
        "name": config,
        "schemes": {"lm_head": None, "re:.*": SCHEMES[scheme]},
        "stages": [METHODS[method]],
    })


def run_one(config: str, args) -> dict:
    """Load, (calibrate, compress,) evaluate one configuration in this process."""
    import torch

    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import compress
    from lmpress.compress.models import load_model
    from lmpress.eval.ppl import perplexity

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    row = {"config": config, "compress_s": 0.0}
    if config != "base":
        recipe = recipe_for(config)
        t0 = time.perf_counter()
        calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.seqlen, seed=args.seed) if recipe.needs_calibration else None
        t1 = time.perf_counter()
        report = compress(model, recipe, calib)
        row["compress_s"] = time.perf_counter() - t1
        row["calib_s"] = t1 - t0
        mods = report.modules.values()
        g = sum(m.get("gptq_loss", 0.0) for m in mods)
        r = sum(m.get("rtn_loss", 0.0) for m in mods)
        row["objective_ratio"] = g / r if r > 0 else None
        row["mean_sqnr_db"] = report.summary()["mean_sqnr_db"]
    row["peak_rss_mib"] = _runner.rss_mib()
    t0 = time.perf_counter()
    res = perplexity(model, tok, load_text("wiki", "eval"), seqlen=args.seqlen, windows=args.windows)
    row.update(ppl=res.ppl, windows=res.windows, eval_s=time.perf_counter() - t0)
    return row


def table(rows: list[dict], args) -> str:
    base = next((r["ppl"] for r in rows if r["config"] == "base"), None)
    lines = [
        f"SmolLM2-135M ({args.model}), wiki eval split, {rows[0]['windows'] if rows else args.windows} windows x "
        f"{args.seqlen} tokens; calibration {args.n} x {args.seqlen} (seed {args.seed}); lm_head kept; CPU fp32",
        "",
        "| config | weights | method | ppl | vs base | compress s | peak RSS MiB | GPTQ/RTN layer objective |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["config"]
        method, _, scheme = c.rpartition("-")
        label = "fp32" if c == "base" else SCHEME_LABEL[scheme]
        meth = "-" if c == "base" else {"rtn": "RTN", "gptq": "GPTQ act-order", "gptq-noact": "GPTQ"}[method]
        vs = f"{r['ppl'] / base:.3f}x" if base else "-"
        obj = f"{r['objective_ratio']:.3f}" if r.get("objective_ratio") else "-"
        lines.append(f"| {c} | {label} | {meth} | {r['ppl']:.3f} | {vs} | {r['compress_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {obj} |")
    return "\n".join(lines)


def check(config: str, args) -> None:
    if config != "base":
        recipe_for(config)  # fail fast on a bad name


if __name__ == "__main__":
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=_runner.protocol_args, check=check)
