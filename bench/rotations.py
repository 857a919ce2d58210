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

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time

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


args_global = None  # the parsed command line (recipe_for reads --learn-steps)


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


def recipe_for(config: str):
    from lmpress.compress import Recipe
    from lmpress.compress.stage import STAGES, _load_builtin_stages

    base, mods = parse_config(config)
    name = CONFIGS[base]
    if name is None:
        return None
    _load_builtin_stages()
    if "gptq" in name and "gptq" not in STAGES:
        raise SystemExit(f"{config}: the gptq stage is not registered in this checkout")
    recipe = Recipe.load(name)
    data = recipe.to_dict()
    if getattr(args_global, "learn_steps", None):
        for st in data["stages"]:
            if isinstance(st, dict) and "learn_rotation" in st:
                st["learn_rotation"]["steps"] = args_global.learn_steps
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


class _RssSampler:
    """Largest resident set size (bytes) seen while the `with` block runs."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def run_one(config: str, args) -> dict:
    """Load, (calibrate, compress,) evaluate one configuration in this process."""
    import torch

    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import compress
    from lmpress.compress.models import load_model
    from lmpress.eval.ppl import perplexity

    torch.manual_seed(0)
    recipe = recipe_for(config)
    model, tok = load_model(args.model)
    row: dict = {"config": config, "recipe": recipe.name if recipe else None, "compress_s": 0.0, "calib_s": 0.0}
    if recipe is not None:
        t0 = time.perf_counter()
        calib = None
        if recipe.needs_calibration:
            calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.calib_seqlen, seed=args.seed)
        t1 = time.perf_counter()
        with _RssSampler() as sampler:
            report = compress(model, recipe, calib)
        row["compress_s"] = time.perf_counter() - t1
        row["calib_s"] = t1 - t0
        row["peak_compress_mib"] = sampler.peak / 2**20
        row["stages"] = {s["stage"]: s["seconds"] for s in report.stages}
        if "learn_rotation" in report.extra:
            row["learn_rotation"] = {k: v for k, v in report.extra["learn_rotation"].items() if k != "losses"}
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
        if "error" in r:
            lines.append(f"| {label(r['config'])} | - | error: {r['error']} | | | | |")
            continue
        peak_c = f"{r['peak_compress_mib']:.0f}" if "peak_compress_mib" in r else "-"
        lines.append(
            f"| {label(r['config'])} | {r['recipe'] or '-'} | {r['ppl']:.2f} | {r['compress_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {peak_c} | {r['eval_s']:.0f} |"
        )
    lines += ["", "Peer figures (same model and windows, from the issue):", ""]
    lines += [f"- {name}: {ppl}" for name, ppl in PEERS]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated, from: {', '.join(CONFIGS)}; suffixes: " + ", ".join(f"-{k} ({v})" for k, v in MODIFIERS.items()))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=64, help="eval windows (default 64)")
    p.add_argument("--seqlen", type=int, default=512, help="eval window length (default 512)")
    p.add_argument("--n", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learn-steps", type=int, help="override learn_rotation.steps of the spinquant recipe")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one configuration, print its row as JSON
    args = p.parse_args(argv)
    global args_global
    args_global = args

    import torch

    torch.set_num_threads(args.threads)
    if args.only:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"[{args.only}] %(levelname)s %(name)s: %(message)s")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        print("ROW " + json.dumps(run_one(args.only, args)), flush=True)
        return

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        parse_config(c)
    rows = []
    for c in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--only", c, "--model", args.model, "--windows", str(args.windows),
               "--seqlen", str(args.seqlen), "--n", str(args.n), "--calib-seqlen", str(args.calib_seqlen),
               "--seed", str(args.seed), "--threads", str(args.threads)]
        if args.learn_steps:
            cmd += ["--learn-steps", str(args.learn_steps)]
        print(f"[{time.strftime('%H:%M:%S')}] {c} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the child's log goes to our stderr
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not found:
            tail = f"exit status {proc.returncode} (see the log above)"
            rows.append({"config": c, "error": tail})
            print(f"  failed: {tail}", file=sys.stderr, flush=True)
            continue
        row = json.loads(found[-1])
        rows.append(row)
        print(f"  ppl {row['ppl']:.3f}, compress {row['compress_s']:.1f}s, eval {row['eval_s']:.0f}s", file=sys.stderr, flush=True)
        if args.json:  # written as it goes, so a long run leaves its finished rows behind
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
