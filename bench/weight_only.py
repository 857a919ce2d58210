"""Weight-only quantization on SmolLM2-135M: RTN, GPTQ, AWQ, AWQ + GPTQ, learned rounding
(SignRound) and QuaRot + GPTQ with offline rotations only, at 4 and 3 bits, groups of 64,
asymmetric (issue 24's table, lmpress's rows).

    python bench/weight_only.py                          # 128 x 512 calibration, 64 x 512 eval windows
    python bench/weight_only.py --n 32 --windows 16      # a quicker look
    python bench/weight_only.py --configs base,w4-rtn,w4-awq

Configurations: `base`, and `w<bits>-<method>` with bits 4 or 3 and method
- `rtn`: min-max round to nearest;
- `gptq`: GPTQ (act-order, static groups, true-sequential; recipe w4a16-gptq);
- `awq`: AWQ scales and clipping search, then RTN (recipe w4a16-awq);
- `awq-gptq`: AWQ, then GPTQ on the scaled weights (recipe w4a16-awq-gptq);
- `signround`: learned rounding, 200 SignSGD steps a layer (recipe w4a16-signround);
- `quarot-gptq`: fused norms, R1 and R2 offline (no online op: a plain model), then GPTQ (recipe
  w4a16-quarot-gptq).
The W3 rows are the same recipes with 3-bit weights. lm_head and the embeddings stay in high
precision. Columns: perplexity on the wiki eval split (first `--windows` windows of `--seqlen`
tokens), its ratio to the base, bits per weight of the quantized linears (codes + an fp16 scale and
a 4-bit zero point per group of 64, as compressed-tensors packs them), compression seconds, the
child process's peak RSS, and whether the reloaded packed model gives the simulated logits.
"""
from __future__ import annotations

import _runner

METHODS = {"rtn": "w4a16-rtn", "gptq": "w4a16-gptq", "awq": "w4a16-awq", "awq-gptq": "w4a16-awq-gptq",
           "signround": "w4a16-signround", "quarot-gptq": "w4a16-quarot-gptq"}
DEFAULT_CONFIGS = "base," + ",".join(f"w{b}-{m}" for b in (4, 3) for m in METHODS)
GROUP = 64


def recipe_for(config: str):
    from lmpress.compress import Recipe

    bits, _, method = config.partition("-")
    if bits not in ("w4", "w3") or method not in METHODS:
        raise SystemExit(f"unknown configuration {config!r}: use base or w4|w3-<{'|'.join(METHODS)}>")
    data = Recipe.load(METHODS[method]).to_dict()
    weights = data["schemes"]["re:.*"].setdefault("weights", {})
    weights.update(bits=int(bits[1]), group_size=GROUP, symmetric=False)
    data["name"] = f"{data['name']}-{bits}" if bits != "w4" else data["name"]
    return Recipe.from_dict(data)


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.compress.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    row = {"config": config, "compress_s": 0.0}
    if config != "base":
        recipe = recipe_for(config)
        bits = recipe.scheme_for("model.layers.0.mlp.down_proj").weights.bits
        row["bpw"] = bits + (16 + 4) / GROUP
        row["compress_s"] = _runner.compress_timed(model, tok, recipe, args)
        row.update(_runner.packed_check(model, args))
    row.update(_runner.wiki_ppl(model, tok, args))
    return row


def table(rows: list[dict], args) -> str:
    base = next((r["ppl"] for r in rows if r["config"] == "base" and "ppl" in r), None)
    lines = [
        f"SmolLM2-135M, wiki eval split, {args.windows} windows x {args.seqlen} tokens; calibration {args.n} x "
        f"{args.seqlen} (seed {args.seed}); groups of {GROUP}, asymmetric; lm_head kept; CPU fp32",
        "",
        "| config | ppl | vs base | bits/weight | compress s | peak RSS MiB | packed = simulated |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][:80]} | | | | | |")
            continue
        vs = f"{r['ppl'] / base:.3f}x" if base else "-"
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") else "32"
        eq = {True: "yes", False: "NO"}.get(r.get("packed_equal"), "-")
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {vs} | {bpw} | {r['compress_s']:.0f} | "
                     f"{r.get('max_rss_mib', 0):.0f} | {eq} |")
    return "\n".join(lines)


def check(config: str, args) -> None:
    if config != "base":
        recipe_for(config)


if __name__ == "__main__":
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=_runner.protocol_args, check=check)
