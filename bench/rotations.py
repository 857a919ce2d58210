"""W4A4(KV4) on SmolLM2-135M with and without QuaRot rotations: perplexity, compress time, peak memory.

    python bench/rotations.py                                  # 64 x 512 eval windows, 128 x 512 calibration
    python bench/rotations.py --windows 16                     # a quicker look
    python bench/rotations.py --configs base,quarot-rtn        # a subset
    python bench/rotations.py --json /tmp/rot.json             # also write the rows as JSON

Protocol (the same as the tests and `bench/gptq.py`): the bundled `wiki` source; calibration =
`sample_calibration(tok, "wiki", n, calib_seqlen, seed)` from the calib split (only for stages
that need it: GPTQ); perplexity = `eval.ppl.perplexity` on the eval split, the first `windows`
windows of `seqlen` tokens, no BOS, fp32 on CPU. Each configuration runs in its own subprocess
on a freshly loaded model, so its peak memory is its own: `peak RSS` is the process's maximum
resident set (resource.getrusage) measured right after compression (model load + calibration +
compression), `peak compress` the largest RSS sampled (every 20 ms) during `compress()` alone.
Compressed models are evaluated in their simulated form (SimQuantLinear + the "lmpress"
attention function), which the checkpoint tests tie to the packed form within 1e-4.

Configurations (`--configs`, comma-separated):
  base          the fp32 model
  w4a4-rtn      recipe w4a4-rtn: W4A4 (int4 per-channel sym weights, int4 per-token activations), no rotation
  quarot-rtn    recipe w4a4kv4-quarot-rtn: fuse_norms + Hadamard R1/R2 + online R3 (Q/K) and R4 (down_proj), RTN, KV4
  quarot-gptq   recipe w4a4kv4-quarot-gptq: the same with GPTQ (act-order, block 128, damp 0.01)
  spinquant-rtn   recipe w4a4kv4-spinquant-rtn: the learned rotation with RTN weights (compare with quarot-rtn)
  spinquant-gptq  recipe w4a4kv4-spinquant-gptq: R1 / per-layer R2 learned by Cayley SGD (`--learn-steps`), then GPTQ
suffixes (any order of the built-in recipe, e.g. quarot-gptq-g64, quarot-gptq-g64-nokv):
  -g64          weights in groups of 64 (symmetric) instead of per channel (the peer figure's weights)
  -nokv         no KV-cache quantization (the peer figure's setting)
lm_head stays in high precision in every configuration.
"""
from __future__ import annotations

import time

import _runner

CONFIGS = {
    "base": None,
    "w4a4-rtn": "w4a4-rtn",
    "quarot-rtn": "w4a4kv4-quarot-rtn",
    "quarot-gptq": "w4a4kv4-quarot-gptq",
    "spinquant-gptq": "w4a4kv4-spinquant-gptq",
    "spinquant-rtn": "w4a4kv4-spinquant-rtn",
}
LABELS = {
    "base": "base (fp32)",
    "w4a4-rtn": "W4A4 RTN, no rotation",
    "quarot-rtn": "QuaRot-RTN W4A4KV4",
    "quarot-gptq": "QuaRot-GPTQ W4A4KV4",
    "spinquant-gptq": "learned rotation (SpinQuant-style) + GPTQ W4A4KV4",
    "spinquant-rtn": "learned rotation (SpinQuant-style) + RTN W4A4KV4",
}
# modifiers, appended to a configuration: quarot-gptq-g64-nokv is the peer figure's setting
MODIFIERS = {
    "g64": "weights in groups of 64 (symmetric) instead of per channel",
    "nokv": "no KV-cache quantization",
}
DEFAULT_CONFIGS = "base,w4a4-rtn,quarot-rtn,quarot-gptq,spinquant-gptq"
PEERS = [
    ("llm-compressor 0.13: base", 16.5),
    ("llm-compressor 0.13: W4A4 GPTQ g64, no rotation (32 calib seqs)", 10326),
    ("llm-compressor 0.13: SpinQuant-style random-Hadamard R1/R2/R4 + GPTQ W4A4 g64, no KV quant", 36.7),
]


def parse_config(config: str) -> tuple[str, list[str]]:
    base, mods = config, []
    while True:
        head, _, tail = base.rpartition("-")
        if head and tail in MODIFIERS:
            mods.insert(0, tail)
            base = head
        else:
            break
    if base not in CONFIGS or (base == "base" and mods):
        raise SystemExit(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}, with optional suffixes "
                         f"{', '.join('-' + m for m in MODIFIERS)}")
    return base, mods


def label(config: str) -> str:
    base, mods = parse_config(config)
    text = LABELS[base]
    if "nokv" in mods:
        text = text.replace("KV4", "") + " (KV16)"
    if "g64" in mods:
        text += ", weights g64"
    return text


def recipe_for(config: str, learn_steps: int | None = None):
    """The recipe of `config` (None for base); `learn_steps` overrides learn_rotation.steps."""
    from lmpress.compress import Recipe
    from lmpress.compress.stage import STAGES, load_builtin_stages

    base, mods = parse_config(config)
    name = CONFIGS[base]
    if name is None:
        return None
    load_builtin_stages()
    if "gptq" in name and "gptq" not in STAGES:
        raise SystemExit(f"{config}: the gptq stage is not registered in this checkout")
    recipe = Recipe.load(name)
    data = recipe.to_dict()
    if learn_steps:
        for st in data["stages"]:
            if isinstance(st, dict) and "learn_rotation" in st:
                st["learn_rotation"]["steps"] = learn_steps
    if not mods:
        return Recipe.from_dict(data)
    data["name"] = "-".join([name] + mods)
    if "nokv" in mods:
        data["kv_cache"] = None
        data["stages"] = [s for s in data["stages"] if "kv_cache" not in s]
    if "g64" in mods:
        spec = data["schemes"]["re:.*"]
        spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
        spec["weights"] = {**(spec.get("weights") or {}), "granularity": "group", "group_size": 64}
        data["schemes"]["re:.*"] = spec
    return Recipe.from_dict(data)


def run_one(config: str, args) -> dict:
    """Load, (calibrate, compress,) evaluate one configuration in this process."""
    import torch

    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import compress
    from lmpress.compress.models import load_model
    from lmpress.eval.ppl import perplexity

    torch.manual_seed(0)
    recipe = recipe_for(config, args.learn_steps)
    model, tok = load_model(args.model)
    row: dict = {"config": config, "recipe": recipe.name if recipe else None, "compress_s": 0.0, "calib_s": 0.0}
    if recipe is not None:
        t0 = time.perf_counter()
        calib = None
        if recipe.needs_calibration:
            calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.calib_seqlen, seed=args.seed)
        t1 = time.perf_counter()
        with _runner.RssPeak() as peak:
            report = compress(model, recipe, calib)
        row["compress_s"] = time.perf_counter() - t1
        row["calib_s"] = t1 - t0
        row["peak_compress_mib"] = peak.mib
        row["stages"] = {s["stage"]: s["seconds"] for s in report.stages}
        if "learn_rotation" in report.extra:
            row["learn_rotation"] = {k: v for k, v in report.extra["learn_rotation"].items() if k != "losses"}
    row["peak_rss_mib"] = _runner.rss_mib()
    t0 = time.perf_counter()
    res = perplexity(model, tok, load_text("wiki", "eval"), seqlen=args.seqlen, windows=args.windows)
    row["eval_s"] = time.perf_counter() - t0
    row.update(ppl=res.ppl, windows=res.windows, seqlen=res.seqlen)
    return row


def markdown(rows: list[dict], args) -> str:
    head = (f"SmolLM2-135M, wiki eval split, {args.windows} windows x {args.seqlen} tokens; "
            f"calibration {args.n} x {args.calib_seqlen} (GPTQ only); fp32, CPU, {args.threads} threads")
    lines = [head, "",
             "| configuration | recipe | ppl | compress (s) | peak RSS after compress (MiB) | peak during compress (MiB) | eval (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak_c = f"{r['peak_compress_mib']:.0f}" if "peak_compress_mib" in r else "-"
        lines.append(
            f"| {label(r['config'])} | {r['recipe'] or '-'} | {r['ppl']:.2f} | {r['compress_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {peak_c} | {r['eval_s']:.0f} |"
        )
    lines += ["", "Peer figures (same model and windows, from the issue):", ""]
    lines += [f"- {name}: {ppl}" for name, ppl in PEERS]
    return "\n".join(lines)


def add_args(p) -> None:
    _runner.protocol_args(p, calib_seqlen=True)
    p.add_argument("--learn-steps", type=int, help="override learn_rotation.steps of the spinquant recipe")


def check(config: str, args) -> None:
    parse_config(config)


def main(argv=None) -> None:
    _runner.main(run_one, markdown, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=add_args, check=check, argv=argv,
                 configs_help=f"comma-separated, from: {', '.join(CONFIGS)}; suffixes: "
                              + ", ".join(f"-{k} ({v})" for k, v in MODIFIERS.items()))


if __name__ == "__main__":
    main()
