"""Weight-and-activation quantization on SmolLM2-135M (issue 27's table): perplexity of the simulated
model, its ratio to the base, average activation bits, compress minutes, and the perplexity of the
packed checkpoint reloaded (`save` + `load`, the CPU runtime path), same windows.

    python bench/w4a4_table.py                                     # the default rows, 64 x 512, 128 x 512 calibration
    python bench/w4a4_table.py --configs base,W4A4-gptq,mq-gptq --windows 16 --n 32

Configurations: `base`; a built-in recipe by name (`w4a4kv4-flatquant-gptq`, `w4a4-rtn`, ...);
`<preset>-<rtn|gptq>`, the preset (W4A4, W6A6, W5A5, W3A8, W2A8, ...) on every linear but lm_head;
`flatquant-comet<P>[-wg<G>][-e<E>][-s<N>]-gptq`, recipe w4a4kv4-flatquant-comet-gptq (FlatQuant, then COMET's
inputs in groups of 64) with P% of the groups 8-bit, with `-wg<G>` int4 weights in groups of G input
channels instead of per channel, `-e<E>` E FlatQuant epochs instead of 2, `-s<N>` FlatQuant trained on
the first N calibration sequences instead of 32, `-kvg<G>` the int4 KV cache in groups of G instead of 64;
`comet<P>-<rtn|gptq>`, recipe w4a4kv4-comet (COMET's FMPQ, int4 KV cache) with P% of the activation
channel groups at 8 bits (comet0: every group int4, the fine-grained baseline); `quarot-<preset>-<rtn|gptq>`, the
preset after QuaRot's rotations (fused norms, Hadamard R1 and R2, online Hadamard on down_proj's input; no KV
cache); `W4A4s-<rtn|gptq>`, int4
per-channel weights and int4 *static* per-tensor activations (one calibrated
scale per linear); `mq-<rtn|gptq>`: the same scheme after stage `mergequant` (MergeQuant's static
per-channel steps migrated into the neighbours, clip search; no dynamic quantization op at run time), without a rotation;
`quarot-W4A4s-<m>` and `quarot-mq-<m>`, those static schemes after QuaRot's rotations (mq: down_proj, rotated
online, keeps a calibrated static scale). `<scheme>-sink<N>-<m>`: any of them with the static inputs keeping
each sequence's first N positions in float (`inputs.sink_tokens`: the attention sink, IntactKV / PrefixQuant);
`<scheme>-aclip-<m>`: the static scales' clip ratio searched for the least squared error (`inputs.mse_clip`);
`<scheme>-c<P>-<m>`: every input scheme's `clip_ratio` P% (QuaRot clips dynamic activations at 90%);
`<scheme>-wmse-<m>`: every weight scheme's clipping searched (`weights.mse_clip`, as the QuaRot recipes).
Average activation bits: the input bits of every quantized linear weighted by its in_features (the
elements of a token's inputs), 16 where inputs stay in float.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

import _runner

DEFAULT_CONFIGS = ("base,W4A4-gptq,W4A4s-gptq,mq-gptq,mq-rtn,W6A6-rtn,W6A6-gptq,W5A5-gptq,W2A8-gptq,w4a4kv4-flatquant-gptq,"
                   "comet0-gptq,comet10-gptq,comet25-gptq")
W4A4S = {"weights": {"bits": 4, "granularity": "channel", "symmetric": True},
         "inputs": {"bits": 4, "granularity": "tensor", "symmetric": True, "dynamic": False}}


def with_static(recipe, **inputs):
    """`recipe` with `inputs` (sink_tokens, mse_clip) set on every static input scheme."""
    from lmpress.compress import Recipe

    d = copy.deepcopy(recipe.to_dict())
    for body in d["schemes"].values():
        if isinstance(body, dict) and isinstance(body.get("inputs"), dict) and not body["inputs"].get("dynamic", False):
            body["inputs"].update(inputs)
    return Recipe.from_dict(d)


def recipe_for(config: str):
    from lmpress.compress import Recipe
    from lmpress.quant.scheme import PRESETS, parse_scheme

    scheme, _, method = config.rpartition("-")
    head, _, option = scheme.rpartition("-")
    if (option.startswith("c") and option[1:].isdigit()) or option == "wmse":
        # "-c90": every input scheme's clip_ratio 0.90 (QuaRot's); "-wmse": every weight scheme's mse_clip
        d = copy.deepcopy(recipe_for(f"{head}-{method}").to_dict())
        for name, body in d["schemes"].items():
            if isinstance(body, str):
                body = d["schemes"][name] = parse_scheme(body).to_dict()
            side, key, value = ("weights", "mse_clip", True) if option == "wmse" else ("inputs", "clip_ratio", int(option[1:]) / 100)
            if isinstance(body, dict) and body.get(side):
                body[side][key] = value
        return Recipe.from_dict({**d, "name": config})
    if option.startswith("sink") or option == "aclip":  # static inputs: the first N positions float / the scale clip-searched
        inputs = {"sink_tokens": int(option[4:])} if option.startswith("sink") else {"mse_clip": True}
        return _renamed(with_static(recipe_for(f"{head}-{method}"), **inputs), config)
    if method not in ("rtn", "gptq") or not scheme:
        return Recipe.load(config)
    if scheme.startswith("flatquant-comet") and method == "gptq":  # recipe w4a4kv4-flatquant-comet-gptq at P%
        share, *options = scheme[15:].split("-")  # "10-wg64-e3" -> "10", ["wg64", "e3"]
        recipe = Recipe.load("w4a4kv4-flatquant-comet-gptq").to_dict()
        body = recipe["schemes"]["re:.*"]
        body["inputs"]["outliers"] = int(share) / 100
        for option in options:
            if option.startswith("wg"):  # int4 weights in groups of <G> input channels (symmetric, MSE clip)
                body["weights"] = {**body["weights"], "granularity": "group", "group_size": int(option[2:])}
            elif option.startswith("kvg"):  # the int4 KV cache in groups of <G> along head_dim
                recipe["kv_cache"]["group_size"] = int(option[3:])
            elif option[:1] in ("e", "s"):  # FlatQuant epochs / training sequences
                flat = next(s for s in recipe["stages"] if "flatquant" in s)["flatquant"]
                flat["epochs" if option[0] == "e" else "samples"] = int(option[1:])
            else:
                raise ValueError(f"{config}: unknown option {option!r} (wg<G>: weight groups, e<E>: FlatQuant epochs, "
                                 "s<N>: FlatQuant training sequences, kvg<G>: KV cache groups)")
        recipe["name"] = config
        return Recipe.from_dict(recipe)
    if scheme.startswith("comet"):  # COMET's FMPQ at <P>% 8-bit groups, as recipe w4a4kv4-comet (int4 KV cache)
        recipe = Recipe.load("w4a4kv4-comet").to_dict()
        recipe["schemes"]["re:.*"]["inputs"]["outliers"] = int(scheme[5:]) / 100
        recipe["name"], recipe["stages"] = config, [{"kv_cache": {}}, {method: {}}]
        return Recipe.from_dict(recipe)
    if scheme.startswith("quarot-") and scheme[7:] in tuple(PRESETS) + ("W4A4s", "mq"):
        # QuaRot's offline R1/R2 and online R4, no KV cache; W4A4s: static per-tensor inputs; mq: MergeQuant's steps
        # migrated after the rotation (down_proj's input is rotated online, so it keeps a calibrated static scale)
        rotate = {"rotate": {"kind": "hadamard", "seed": 0, "online": ["down_proj"], "r2": True}}
        body = W4A4S if scheme[7:] in ("W4A4s", "mq") else scheme[7:]
        merge = [{"mergequant": {"down_proj": False}}] if scheme[7:] == "mq" else []
        return Recipe.from_dict({"version": 1, "name": config, "schemes": {"lm_head": None, "re:.*": body},
                                 "stages": [{"fuse_norms": {}}, rotate] + merge + [{method: {}}]
                                 + ([{"act_scales": {}}] if body is W4A4S and method == "rtn" else [])})
    if scheme == "mq":  # MergeQuant as published, without a rotation (recipe w4a4-static-mergequant adds QuaRot's)
        return Recipe.from_dict({"version": 1, "name": config, "schemes": {"lm_head": None, "re:.*": W4A4S},
                                 "stages": [{"mergequant": {}}, {method: {}}]})
    if scheme == "W4A4s":
        body, stages = W4A4S, [{method: {}}] + ([{"act_scales": {}}] if method == "rtn" else [])
    elif scheme in PRESETS:
        body, stages = scheme, [{method: {}}]
    else:
        return Recipe.load(config)
    return Recipe.from_dict({"version": 1, "name": config, "schemes": {"lm_head": None, "re:.*": body}, "stages": stages})


def _renamed(recipe, name: str):
    from lmpress.compress import Recipe

    return Recipe.from_dict({**recipe.to_dict(), "name": name})


def act_bits(model) -> float:
    """Input bits of the quantized linears weighted by in_features (16 for float inputs; COMET's 4/8-bit
    groups at their average, `quant.fmpq.average_bits`)."""
    from lmpress.quant.fmpq import average_bits

    num = den = 0
    for m in model.modules():
        scheme = getattr(m, "scheme", None)
        if scheme is None or not hasattr(m, "in_features"):
            continue
        a = scheme.inputs
        bits = 16 if a is None else average_bits(m.in_features, a) if a.outliers else a.bits
        num += bits * m.in_features
        den += m.in_features
    return num / den if den else 16.0


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.compress import load, save
    from lmpress.compress.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    row = {"config": config, "compress_s": 0.0, "act_bits": 16.0}
    if config != "base":
        row["compress_s"] = _runner.compress_timed(model, tok, recipe_for(config), args)
        row["act_bits"] = act_bits(model)
    row.update(_runner.wiki_ppl(model, tok, args))
    _runner.partial(row)
    if config != "base":
        with tempfile.TemporaryDirectory(prefix="lmpress-bench-") as d:
            packed = load(save(model, os.path.join(d, "ckpt"), tokenizer=tok))
            del model
            t0 = time.perf_counter()
            row["packed_ppl"] = _runner.wiki_ppl(packed, tok, args)["ppl"]
            row["packed_eval_s"] = time.perf_counter() - t0
    return row


def table(rows: list[dict], args) -> str:
    base = next((r for r in rows if r["config"] == "base" and "ppl" in r), None)
    lines = [f"{args.model}; wiki eval, first {args.windows} windows x {args.seqlen}; calibration wiki {args.n} x "
             f"{args.seqlen} (seed {args.seed}); lm_head kept; CPU fp32, {args.threads} threads", "",
             "| config | ppl | vs base | avg act bits | compress min | packed reload ppl | packed vs simulated |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r or "ppl" not in r:
            lines.append(f"| {r['config']} | error: {str(r.get('error'))[:80]} | | | | | |")
            continue
        vs = f"{r['ppl'] / base['ppl']:.3f}x" if base else "-"
        pk = f"{r['packed_ppl']:.3f}" if "packed_ppl" in r else "-"
        pvs = f"{r['packed_ppl'] / r['ppl'] - 1:+.2%}" if "packed_ppl" in r else "-"
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {vs} | {r['act_bits']:.2f} | {r['compress_s'] / 60:.1f} | {pk} | {pvs} |")
    return "\n".join(lines)


def check(config: str, args) -> None:
    if config != "base":
        recipe_for(config)


if __name__ == "__main__":
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=lambda p: _runner.protocol_args(p),
                 check=check, errors_in_table=True)
