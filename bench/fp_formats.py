"""Floating-point formats against integers on SmolLM2-135M: FP8 vs INT8 (W8A8), NVFP4 / MXFP4
vs INT4 (W4A4 and weight-only), each by RTN and by GPTQ on the format's grid, with and without
QuaRot's rotation.

    python bench/fp_formats.py                        # 128 x 512 calibration, 64 x 512 eval windows
    python bench/fp_formats.py --n 32 --windows 16    # a quicker look
    python bench/fp_formats.py --configs base,fp8-rtn,nvfp4-gptq

Configurations: `base`; the built-in recipes `fireq` (`w4afp8-fireq`: W4AFP8, a per-token INT4 KV
cache and FP8 queries after SmoothQuant-style scaling and Q/K scaling around RoPE; GPTQ), `kv-fp8`
and `w8a8-fp8-static`; and `<format>-<method>[-rot|-brot]`:
- format: `int8` (W8A8: int8 per-channel weights, int8 per-token activations), `fp8`
  (FP8_DYNAMIC: E4M3 per-channel weights, E4M3 per-token activations), `fp8s` (FP8: E4M3
  per-tensor weights, a static per-tensor activation scale calibrated by `act_scales` after RTN
  or inside GPTQ), `nvfp4` / `mxfp4` (W4A4 in the block format; NVFP4's activation tensor scale
  calibrated), `int4` (W4A4: int4 per-channel symmetric weights, int4 per-token activations),
  `int4g64` (the same with weights in groups of 64), `nvfp4a16` / `mxfp4a16` (weight-only);
- method: `rtn` (min-max scales; FP8 and FP4 round to nearest on their grid) or `gptq`
  (act-order, static groups, on the format's grid);
- `-rot`: QuaRot first (fuse_norms, then the randomized Hadamard R1/R2 and the online R4 on
  down_proj's input), as in `w4a4kv4-quarot-gptq` without the KV cache; `-brot`: the same with
  block-diagonal Hadamards of the format's group size (`rotate.block`: 16 for NVFP4, 32 for
  MXFP4 and the integer formats), as BRQ (arXiv 2511.04214) proposes for MXFP4.
lm_head stays in high precision. Columns: perplexity (simulated model), its ratio to the base,
the format's bits per weight (codes plus its own scale width per group: FP8/INT per-channel
float32 scales over 576 or 1536 inputs, NVFP4 4 + 8/16, MXFP4 4 + 8/32), the lmpress checkpoint's
MiB (`save`: packed codes, float32 scales; the embeddings and lm_head in fp32 dominate), and
whether the reloaded packed model's logits equal the simulated ones on one window.
"""
from __future__ import annotations

import _runner

FORMATS = {  # scheme-map values: a preset name or a mapping
    "int8": "W8A8", "fp8": "FP8_DYNAMIC", "fp8s": "FP8", "nvfp4": "NVFP4", "mxfp4": "MXFP4",
    "int4": "W4A4", "int4g64": {"preset": "W4A4", "weights": {"granularity": "group", "group_size": 64}},
    "nvfp4a16": "NVFP4A16", "mxfp4a16": "MXFP4A16",
}
RECIPES = {"fireq": "w4afp8-fireq", "kv-fp8": "kv-fp8", "w8a8-fp8-static": "w8a8-fp8-static"}  # built-in recipes, run as they are
RECIPE_LABELS = {"fireq": ("W4AFP8 + KV4 per token", "smoothquant + RoPE scaling + GPTQ"),
                 "kv-fp8": ("FP8 KV cache only", "act_scales"), "w8a8-fp8-static": ("FP8 (static activations)", "RTN + act_scales")}
METHODS = {"rtn": {"rtn": {}}, "gptq": {"gptq": {"act_order": True, "block_size": 128, "damp": 0.01}}}
ROTATION = ["fuse_norms", {"rotate": {"kind": "hadamard", "seed": 0, "online": ["down_proj"], "r2": True}}]
DEFAULT_CONFIGS = ("base,int8-rtn,int8-gptq,fp8-rtn,fp8-gptq,fp8s-rtn,fireq,nvfp4a16-gptq,mxfp4a16-gptq,"
                   "int4-gptq,int4-gptq-rot,int4g64-gptq-rot,nvfp4-rtn,nvfp4-gptq,nvfp4-gptq-rot,nvfp4-gptq-brot,"
                   "mxfp4-rtn,mxfp4-gptq,mxfp4-gptq-rot,mxfp4-gptq-brot")


BLOCK = {"nvfp4": 16, "nvfp4a16": 16, "mxfp4": 32, "mxfp4a16": 32, "int4": 32, "int4g64": 64, "fp8": 32, "fp8s": 32, "int8": 32}


def recipe_for(config: str):
    from lmpress.compress import Recipe

    if config in RECIPES:
        return Recipe.load(RECIPES[config])
    parts = config.split("-")
    rot = parts[-1] if parts[-1] in ("rot", "brot") else None
    parts = parts[:-1] if rot else parts
    if len(parts) != 2 or parts[0] not in FORMATS or parts[1] not in METHODS:
        raise SystemExit(f"unknown configuration {config!r}: use base or <{'|'.join(FORMATS)}>-<{'|'.join(METHODS)}>[-rot|-brot]")
    stages = []
    if rot:
        rotate = {**ROTATION[1]["rotate"], **({"block": BLOCK[parts[0]]} if rot == "brot" else {})}
        stages = [ROTATION[0], {"rotate": rotate}]
    static = _scheme(parts[0]).inputs is not None and not _scheme(parts[0]).inputs.dynamic
    calibrate = [{"act_scales": {}}] if static and parts[1] == "rtn" else []  # gptq calibrates them itself
    return Recipe.from_dict({"version": 1, "name": config, "schemes": {"lm_head": None, "re:.*": FORMATS[parts[0]]},
                             "stages": stages + [METHODS[parts[1]]] + calibrate})


def _scheme(fmt: str):
    from lmpress.quant.scheme import parse_scheme

    return parse_scheme(FORMATS[fmt])


def format_bits(config: str) -> float | None:
    """Codes plus the format's own scale bits per weight (SmolLM2's linears: 576 or 1536 inputs, weighted by size)."""
    scheme = None if config == "base" else recipe_for(config).scheme_for("model.layers.0.mlp.down_proj")
    if scheme is None or scheme.weights is None:  # the base, a KV-only recipe
        return None
    w = scheme.weights
    if w.block_format is not None:
        return w.bits + 8 / w.group_size
    if w.granularity == "group":  # float32 scales (the last group of 576 inputs is partial at 128)
        return w.bits + 32 / w.group_size
    # per-channel float32 scales, one per output row: SmolLM2's (out, in) q, k, v, o, gate, up, down
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    return w.bits + 32 * sum(o for o, _ in shapes) / sum(o * i for o, i in shapes)


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.compress.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    row = {"config": config, "compress_s": 0.0, "format_bpw": format_bits(config)}
    if config != "base":
        row["compress_s"] = _runner.compress_timed(model, tok, recipe_for(config), args)
        row.update(_runner.packed_check(model, args))
    row.update(_runner.wiki_ppl(model, tok, args))
    return row


def table(rows: list[dict], args) -> str:
    base = next((r["ppl"] for r in rows if r["config"] == "base" and "ppl" in r), None)
    lines = [
        f"SmolLM2-135M, wiki eval split, {args.windows} windows x {args.seqlen} tokens; calibration {args.n} x "
        f"{args.seqlen} (seed {args.seed}); lm_head kept; CPU fp32 simulation",
        "",
        "| config | scheme | method | ppl | vs base | format bits/weight | checkpoint MiB | packed = simulated | compress s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        c = r["config"]
        if "error" in r:
            lines.append(f"| {c} | | | error: {r['error'][:80]} | | | | | |")
            continue
        fmt, _, rest = c.partition("-")
        scheme = "fp32" if c == "base" else RECIPE_LABELS[c][0] if c in RECIPES else _label(fmt)
        method = "-" if c == "base" else RECIPE_LABELS[c][1] if c in RECIPES else (rest.replace("-brot", " + block QuaRot").replace("-rot", " + QuaRot")
                                          .upper().replace("QUAROT", "QuaRot").replace("BLOCK", "block"))
        vs = f"{r['ppl'] / base:.3f}x" if base else "-"
        bpw = f"{r['format_bpw']:.3f}" if r.get("format_bpw") else "32"
        mib = f"{r['checkpoint_mib']:.1f}" if "checkpoint_mib" in r else "-"
        eq = {True: "yes", False: "NO"}.get(r.get("packed_equal"), "-")
        lines.append(f"| {c} | {scheme} | {method} | {r['ppl']:.3f} | {vs} | {bpw} | {mib} | {eq} | {r['compress_s']:.0f} |")
    return "\n".join(lines)


def _label(fmt: str) -> str:
    spec = FORMATS[fmt]
    return spec if isinstance(spec, str) else f"{spec['preset']} g{spec['weights']['group_size']}"


def check(config: str, args) -> None:
    if config != "base":
        recipe_for(config)


if __name__ == "__main__":
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=_runner.protocol_args, check=check)
