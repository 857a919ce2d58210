"""How lmpress compares: the headline table, lmpress against the best available peer, row by row, in one run.

    make scoreboard                                        # = python bench/scoreboard.py --quick
    python bench/scoreboard.py --quick --json /tmp/scoreboard.json
    python bench/scoreboard.py                             # full: 64 windows, 128 calibration samples
    python bench/scoreboard.py --quick --rows w4a16,kv2 --eval-data notes.txt

Rows (`--rows`, comma-separated; every row by default) and what runs in each, ours then the peers:
  w8a8    recipe w8a8-smoothquant-rtn | llm-compressor SmoothQuant (0.8) + GPTQ W8A8
  w4a16   recipe w4a16-gptq (int4 g64 asym, act-order) | llm-compressor GPTQ, the same scheme; AutoRound
          (llm-compressor's AutoRoundModifier, same scheme, `--autoround-iters`; left out in --quick)
  w4a4    recipe w4a4kv4-quarot-gptq at the peer's setting (weights g64, no KV quantization; `--w4a4`
          picks another bench/rotations.py configuration) | llm-compressor SpinQuant-style random
          Hadamard R1/R2/R4 (SpinQuantModifier) + GPTQ W4A4 g64
  2:4     recipe sparse24-sparsegpt | llm-compressor SparseGPT 2:4 (bench/sparsity.py's run_peer)
  kv2     recipe kv2-rotatekv, runtime QuantizedKVCache | transformers QuantizedCache, HQQ and quanto
          backends, 2 bits, groups of 64, 128 recent tokens in full precision (bench/kv_cache.py)
  decode  decode tokens/s at batch 1, packed W4A16 checkpoint against the fp32 base, alternating in one
          process (lmpress.eval.latency); the checkpoint is w4a16-rtn's: the same format as w4a16-gptq's
The compress-time / peak-RSS row comes with w4a16 (ours and the llm-compressor GPTQ peer): the
compression's seconds, and the process's peak RSS after it (model load, calibration sampling and
compression; the eval text is tokenized afterwards, for both).

Protocol: every configuration is a child process of bench/_runner.py (same --threads, fresh model).
Calibration is `sample_calibration(tok, "wiki", n, seqlen, seed)` for ours and the peers alike (the
same token tensor: its fingerprint is in every row and checked in the table). Perplexity is the
papers' protocol (`perplexity_from_ids`: the first `windows` windows of `seqlen` tokens of the eval
text, no BOS) on the wiki eval split or `--eval-data FILE`, the same windows for every row, models
in their simulated / fake-quantized form. KV2 caches only act while decoding, so that row scores
each window's second half token by token through the cache after prefilling its first half
(teacher-forced; the fp32 DynamicCache on the same windows is its base). Ratios are computed from
this run's rows: `x base` against the fp32 model, `lmpress / peer` below 1 where lmpress is better.

Peers install on first use, pinned, into their own folder and only onto their child's PYTHONPATH
(bench/_peers.py; `$LMPRESS_PEERS`): a peer that cannot install or run leaves a row saying why.
--quick (16 windows, 32 calibration samples, cheap peers only) is budgeted for 45 minutes on 2
cores (`--budget`; estimated minutes a configuration: QUICK_MINUTES below).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import _peers
import _runner

ROWS = {  # row -> (our configuration, the peers' configurations)
    "w8a8": ("w8a8", ["w8a8-llmc"]),
    "w4a16": ("w4a16", ["w4a16-llmc", "w4a16-autoround"]),
    "w4a4": ("w4a4", ["w4a4-llmc"]),
    "2:4": ("2:4", ["2:4-llmc"]),
    "kv2": ("kv2", ["kv2-hqq", "kv2-quanto"]),
    "decode": ("decode", []),
}
ROW_TITLE = {"w8a8": "W8A8", "w4a16": "W4A16", "w4a4": "W4A4", "2:4": "2:4 sparsity", "kv2": "KV2 (decode ppl)"}
# the run order: cheap rows first, so that a --budget cut takes the most expensive ones
ORDER = ["base", "decode", "kv2", "kv2-hqq", "kv2-quanto", "w4a16", "w4a16-llmc", "w4a16-autoround", "w8a8", "w8a8-llmc",
         "2:4", "2:4-llmc", "w4a4", "w4a4-llmc"]
# Estimated minutes of each configuration in --quick on this project's 2-core CPU machine (2 threads):
# forward FLOPs (SmolLM2-135M: ~0.16 TFLOP a 512-token window with attention and lm_head) at the
# ~80 GFLOP/s a core measured for fp32 GEMMs of its shapes, i.e. ~0.5 min for 16 windows and
# ~2 min for a layer-wise GPTQ/SparseGPT calibration over 32 x 512 tokens (about three passes of
# the decoder layers plus Hessians), plus ~15 s of process start, model load and tokenization;
# llm-compressor's rows add its import and tracing, KV2's 256 decode steps a cache.
QUICK_MINUTES = {"base": 1, "decode": 1.5, "kv2": 2.5, "kv2-hqq": 1.5, "kv2-quanto": 2.5, "w4a16": 3.5,
                 "w4a16-llmc": 4.5, "w8a8": 2, "w8a8-llmc": 5, "2:4": 3.5, "2:4-llmc": 4.5, "w4a4": 5, "w4a4-llmc": 6}
KV_BATCH = 16  # windows decoded together in the KV2 row
W4G64_ASYM = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}


@dataclass(frozen=True)
class Side:
    row: str
    label: str
    peer: str | None = None  # bench/_peers.py name; None = lmpress


SIDES = {
    "base": Side("base", "fp32"),
    "w8a8": Side("w8a8", "w8a8-smoothquant-rtn"),
    "w8a8-llmc": Side("w8a8", "llm-compressor SmoothQuant 0.8 + GPTQ W8A8", "llmcompressor"),
    "w4a16": Side("w4a16", "w4a16-gptq"),
    "w4a16-llmc": Side("w4a16", "llm-compressor GPTQ W4 g64 asym (static act-order)", "llmcompressor"),
    "w4a16-autoround": Side("w4a16", "AutoRound W4 g64 asym (llm-compressor AutoRoundModifier)", "autoround"),
    "w4a4": Side("w4a4", "w4a4kv4-quarot-gptq at g64, KV16"),
    "w4a4-llmc": Side("w4a4", "llm-compressor SpinQuant-style random Hadamard R1/R2/R4 + GPTQ W4A4 g64", "llmcompressor"),
    "2:4": Side("2:4", "sparse24-sparsegpt"),
    "2:4-llmc": Side("2:4", "llm-compressor SparseGPT 2:4", "llmcompressor"),
    "kv2": Side("kv2", "kv2-rotatekv (QuantizedKVCache)"),
    "kv2-hqq": Side("kv2", "transformers QuantizedCache, HQQ 2-bit", "hqq"),
    "kv2-quanto": Side("kv2", "transformers QuantizedCache, quanto 2-bit", "quanto"),
    "decode": Side("decode", "W4A16 packed vs fp32 base"),
}


# --------------------------------------------------------------------------- in the child


def _eval_ids(tok, args):
    """The eval ids (1-D): the same for every configuration."""
    from lmpress.calibration.data import load_text, tokenize

    return tokenize(tok, load_text(args.eval_data or "wiki", "eval"))  # (N,)


def _data(args):
    """The model, its tokenizer and the eval ids."""
    from lmpress.compress.models import load_model

    model, tok = load_model(args.model)
    return model, tok, _eval_ids(tok, args)


def _ppl(model, ids, args) -> dict:
    from lmpress.calibration.data import fingerprint
    from lmpress.eval.ppl import perplexity_from_ids

    t0 = time.perf_counter()
    res = perplexity_from_ids(model, ids, seqlen=args.seqlen, windows=args.windows)
    return {"ppl": res.ppl, "windows": res.windows, "eval_s": time.perf_counter() - t0,
            "eval_fingerprint": fingerprint(ids[: res.windows * args.seqlen])}


def _compressed(args, apply) -> dict:
    """Load, sample the calibration set, `apply(model, tok, calib)` (timed, memory sampled), evaluate.
    `peak_rss_mib` is the process's peak after compressing: model load, calibration sampling and
    compression (the eval text is tokenized after it, for both sides)."""
    from lmpress.calibration.data import sample_calibration
    from lmpress.compress.models import load_model

    model, tok = load_model(args.model)
    calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.seqlen, seed=args.seed)
    t0 = time.perf_counter()
    with _runner.RssPeak() as peak:
        out = apply(model, tok, calib)  # compress: its Report; an llm-compressor peer: what was mended after it
    row = {"compress_s": time.perf_counter() - t0, "peak_rss_mib": _runner.rss_mib(), "peak_compress_mib": peak.mib,
           "calib_fingerprint": calib.fingerprint, **(out if isinstance(out, dict) else {})}
    row.update(_ppl(model, _eval_ids(tok, args), args))
    return row


def _recipe(config: str, args):
    from lmpress.compress import Recipe

    if config == "w4a4":
        import rotations  # the rotation bench's configurations: -g64 -nokv is the peer's setting

        return rotations.recipe_for(f"{args.w4a4}-g64-nokv")
    return Recipe.load({"w8a8": "w8a8-smoothquant-rtn", "w4a16": "w4a16-gptq", "2:4": "sparse24-sparsegpt",
                        "kv2": "kv2-rotatekv"}[config])


def _ours(config: str, args) -> dict:
    from lmpress.compress import compress

    recipe = _recipe(config, args)
    return {"recipe": recipe.name, **_compressed(args, lambda model, tok, calib: compress(model, recipe, calib))}


def _llmc_recipe(config: str, args) -> list:
    """The llm-compressor modifiers of a peer configuration (imported in the child, from the peer folder)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    gptq = dict(ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    if config == "w8a8-llmc":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(targets="Linear", scheme="W8A8", **gptq)]
    if config == "w4a16-llmc":
        return [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": W4G64_ASYM}}, **gptq)]
    if config == "w4a16-autoround":
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        return [AutoRoundModifier(ignore=["lm_head"], iters=args.autoround_iters, enable_torch_compile=False,
                                  config_groups={"group_0": {"targets": ["Linear"], "weights": W4G64_ASYM}})]
    if config == "w4a4-llmc":
        from llmcompressor.modifiers.transform import SpinQuantModifier

        w4a4 = {"targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64},
                "input_activations": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True}}
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"),
                GPTQModifier(config_groups={"group_0": w4a4}, **gptq)]
    raise ValueError(config)


def _llmc(config: str, args) -> dict:
    if config == "2:4-llmc":
        import sparsity  # its llm-compressor SparseGPT 2:4 peer, as that bench runs it

        apply = lambda model, tok, calib: sparsity.run_peer("peer-sparsegpt-2:4", model, tok, calib)  # noqa: E731
    else:
        apply = lambda model, tok, calib: _peers.llmcompressor_oneshot(model, tok, calib, _llmc_recipe(config, args))  # noqa: E731
    row = _compressed(args, apply)
    row["versions"] = _runner.versions("llmcompressor", "compressed-tensors", "auto-round")
    return row


def _kv(config: str, args) -> dict:
    """Teacher-forced NLL of each window's second half, decoded through the cache after its first half."""
    from transformers import DynamicCache

    import kv_cache  # bench/kv_cache.py: teacher_forced_nll and the peer's QuantizedCache
    from lmpress.calibration.data import fingerprint, sample_calibration
    from lmpress.compress import compress
    from lmpress.kernels.kv_cache import QuantizedKVCache

    model, tok, ids = _data(args)
    n = min(args.windows, ids.numel() // args.seqlen)
    windows = ids[: n * args.seqlen].view(n, args.seqlen)  # (N,) -> (n, seqlen), the perplexity windows
    half = args.seqlen // 2

    def nll(make_cache) -> float:
        total = 0.0
        for chunk in windows.split(KV_BATCH):  # (b, seqlen): prompt (b, half), scored continuation (b, seqlen - half)
            total += kv_cache.teacher_forced_nll(model, chunk[:, :half], chunk[:, half:], make_cache()) * chunk.shape[0]
        return total / n

    row = {"windows": n, "prefill": half, "eval_fingerprint": fingerprint(windows)}
    t0 = time.perf_counter()
    if config == "kv2":
        row["fp_nll"] = nll(DynamicCache)
        calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.seqlen, seed=args.seed)
        recipe = _recipe(config, args)
        t1 = time.perf_counter()
        compress(model, recipe, calib)
        row.update(recipe=recipe.name, compress_s=time.perf_counter() - t1, calib_fingerprint=calib.fingerprint)
        row["nll"] = nll(lambda: QuantizedKVCache(model))
    else:
        backend = config.split("-")[1]
        row["nll"] = nll(lambda: kv_cache.quantized_cache(backend, model, 2))
        row["versions"] = _runner.versions("optimum-quanto", "hqq")
    row.update(ppl=math.exp(row["nll"]), eval_s=time.perf_counter() - t0 - row.get("compress_s", 0.0))
    if "fp_nll" in row:
        row["fp_ppl"] = math.exp(row["fp_nll"])
    return row


def _decode(config: str, args) -> dict:
    from lmpress.compress import Recipe, compress, load, save
    from lmpress.compress.models import load_model
    from lmpress.eval.latency import LatencyConfig, measure_latency

    base, tok = load_model(args.model)
    q, _ = load_model(args.model)
    compress(q, Recipe.load("w4a16-rtn"))
    cfg = LatencyConfig(prompt_len=32, prefill_batch=1, decode_batches=(1,), decode_tokens=args.decode_tokens,
                        repeats=args.decode_repeats)
    with tempfile.TemporaryDirectory(prefix="lmpress-scoreboard-") as d:
        save(q, os.path.join(d, "ckpt"), tokenizer=tok)
        del q
        res = measure_latency({"base": base, "packed": load(os.path.join(d, "ckpt"))}, cfg)
    return {"decode_tok_s": {k: r.decode_tok_s[1] for k, r in res.items()},
            "prefill_tok_s": {k: r.prefill_tok_s for k, r in res.items()},
            "weight_bytes": {k: r.weight_bytes for k, r in res.items()}, "device": res["packed"].device,
            "decode_tokens": cfg.decode_tokens, "repeats": cfg.repeats}


def _base(config: str, args) -> dict:
    model, _, ids = _data(args)
    return _ppl(model, ids, args)


RUN = {"base": _base, "decode": _decode, "kv2": _kv, "kv2-hqq": _kv, "kv2-quanto": _kv,
       **{c: _ours for c in ("w8a8", "w4a16", "w4a4", "2:4")},
       **{c: _llmc for c in ("w8a8-llmc", "w4a16-llmc", "w4a16-autoround", "w4a4-llmc", "2:4-llmc")}}


def run_one(config: str, args) -> dict:
    import torch

    torch.manual_seed(0)
    return RUN[config](config, args)


# --------------------------------------------------------------------------- in the parent


def _why(r: dict | None) -> str:
    """'' for a row that ran; else a short reason (the full one is listed under the table)."""
    if r is None:
        return "not run"
    if "error" not in r:
        return ""
    return r["error"] if len(r["error"]) <= 100 else "..." + r["error"][-97:]  # the end says why


def _label(config: str, r: dict | None) -> str:
    label = SIDES[config].label
    v = ((r or {}).get("versions") or {})
    if v.get("llmcompressor"):
        label = label.replace("llm-compressor", f"llm-compressor {v['llmcompressor']}")
    return label


def summary(rows: list[dict], args) -> dict:
    """The headline rows (JSON): ours, the best peer that ran, their ratios; every other peer with its figure or why not."""
    by = {r["config"]: r for r in rows}  # with --repeats, the last repeat of each
    ok = {c: r for c, r in by.items() if "error" not in r and ("ppl" in r or "decode_tok_s" in r)}
    base = ok.get("base", {}).get("ppl")
    out: dict = {"base_ppl": base, "rows": [], "notes": []}
    calib = {r["calib_fingerprint"] for r in ok.values() if "calib_fingerprint" in r}
    evals = {r["eval_fingerprint"] for r in ok.values() if "eval_fingerprint" in r}
    out["same_calibration_tokens"], out["same_eval_windows"] = len(calib) <= 1, len(evals) <= 1
    for row, (ours, peers) in ROWS.items():
        if ours not in by and not any(p in by for p in peers):
            continue
        o = ok.get(ours)
        if row == "decode":
            tps = (o or {}).get("decode_tok_s", {})
            out["rows"].append({"row": "decode tok/s", "ours": _label(ours, o), "ours_value": tps.get("packed"),
                                "peer": "fp32 base", "peer_value": tps.get("base"),
                                "ratio": tps["packed"] / tps["base"] if tps else None, "why": _why(by.get(ours))})
            continue
        ref = (o or {}).get("fp_ppl") if row == "kv2" else base
        ran = [p for p in peers if p in ok]
        best = min(ran, key=lambda p: ok[p]["ppl"]) if ran else None
        entry = {"row": ROW_TITLE[row], "ours": (o or {}).get("recipe") or _label(ours, o), "ours_ppl": (o or {}).get("ppl"),
                 "why": _why(by.get(ours)), "peer": _label(best, ok[best]) if best else None,
                 "peer_ppl": ok[best]["ppl"] if best else None,
                 "peer_why": "" if best else "; ".join(f"{SIDES[p].label}: {_why(by.get(p)) or 'not run'}" for p in peers
                                                      if p in by) or "not run"}
        entry["ours_x_base"] = entry["ours_ppl"] / ref if ref and entry["ours_ppl"] else None
        entry["peer_x_base"] = entry["peer_ppl"] / ref if ref and entry["peer_ppl"] else None
        entry["ratio"] = entry["ours_ppl"] / entry["peer_ppl"] if entry["ours_ppl"] and entry["peer_ppl"] else None
        out["rows"].append(entry)
        for p in peers:
            if best and p != best and p in by:  # without a best one, the row's peer cell says it all
                fig = f"ppl {ok[p]['ppl']:.3f}" if p in ok else _why(by[p])
                out["notes"].append(f"{ROW_TITLE[row]}, {_label(p, by[p])}: {fig}")
        if row == "w4a16" and (o or best):  # the compress-time / memory row
            peer = ok.get("w4a16-llmc")
            t = {"row": "compress s / peak RSS MiB (W4A16 GPTQ)", "ours": (o or {}).get("recipe", "w4a16-gptq"),
                 "ours_value": [o["compress_s"], o["peak_rss_mib"]] if o else None, "why": _why(by.get(ours)),
                 "peer": _label("w4a16-llmc", peer), "peer_value": [peer["compress_s"], peer["peak_rss_mib"]] if peer else None}
            t["ratio"] = [a / b for a, b in zip(t["ours_value"], t["peer_value"])] if o and peer else None
            out["rows"].append(t)
    if args.autoround_iters == 0 and "w4a16" in by:
        out["notes"].append("W4A16, AutoRound: left out in --quick (200 iterations x 30 blocks of SignSGD is hours on "
                            "2 cores); run it with --autoround-iters N")
    return out


def _f(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def table(rows: list[dict], args) -> str:
    s = summary(rows, args)
    mode = "quick" if args.quick else "full"
    src = args.eval_data or "wiki eval split"
    lines = [f"lmpress scoreboard ({mode}): {args.model}; perplexity on {src}, {args.windows} windows x {args.seqlen} tokens; "
             f"calibration {args.n} x {args.seqlen} from the wiki calib split (seed {args.seed}), the same tokens for "
             f"every row: {'yes' if s['same_calibration_tokens'] else 'NO'}, the same eval windows: "
             f"{'yes' if s['same_eval_windows'] else 'NO'}; fp32 CPU, {args.threads} threads",
             *([f"base (fp32) perplexity: {s['base_ppl']:.3f}"] if s["base_ppl"] else []), "",
             "| row | lmpress | ppl | x base | best peer, same run | peer ppl | x base | lmpress / peer |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for e in s["rows"]:
        if "ours_ppl" in e:
            ours = f"{_f(e['ours_ppl'], '.3f')}" if e["ours_ppl"] else e["why"]
            peer = e["peer"] or e["peer_why"]
            lines.append(f"| {e['row']} | {e['ours']} | {ours} | {_f(e['ours_x_base'], '.3f')} | {peer} | "
                         f"{_f(e['peer_ppl'], '.3f')} | {_f(e['peer_x_base'], '.3f')} | {_f(e['ratio'], '.3f')} |")
        elif e["row"].startswith("decode"):
            lines.append(f"| decode tok/s, batch 1 | W4A16 packed: {_f(e['ours_value'], '.1f')} {e['why']} | | | "
                         f"fp32 base: {_f(e['peer_value'], '.1f')} | | | {_f(e['ratio'], '.2f')} |")
        else:
            ov, pv = e["ours_value"] or [None, None], e["peer_value"] or [None, None]
            ratio = f"{e['ratio'][0]:.2f} / {e['ratio'][1]:.2f}" if e["ratio"] else "-"
            lines.append(f"| {e['row']} | {_f(ov[0], '.0f')} s / {_f(ov[1], '.0f')} MiB {e['why']} | | | {e['peer']}: "
                         f"{_f(pv[0], '.0f')} s / {_f(pv[1], '.0f')} MiB | | | {ratio} |")
    if any(e["row"].startswith("KV2") for e in s["rows"]):
        lines += ["", "KV2: perplexity of each window's second half decoded token by token through the cache after "
                      "its first half (x base: against the fp32 DynamicCache on the same windows)."]
    if s["notes"]:
        lines += ["", "Other peers:"] + [f"- {n}" for n in s["notes"]]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed or not run:"] + [f"- {r['config']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def add_args(p) -> None:
    p.add_argument("--quick", action="store_true", help="16 windows, 32 calibration samples, a 45 min --budget")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of: {', '.join(ROWS)} (default: all)")
    p.add_argument("--eval-data", default=None, metavar="FILE", help="evaluate on this .txt (or .jsonl) file's text "
                                                                      "instead of the wiki eval split")
    p.add_argument("--model", default="smollm2-135m", help="built-in name (tiny-llama for a smoke run), HF dir or .gguf")
    p.add_argument("--windows", type=int, default=None, help="perplexity windows (default 16 with --quick, else 64)")
    p.add_argument("--n", type=int, default=None, help="calibration samples (default 32 with --quick, else 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per eval window and calibration sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--w4a4", default="quarot-gptq", help="our W4A4 configuration (bench/rotations.py; default "
                                                          "quarot-gptq), run at the peer's g64 / KV16 setting")
    p.add_argument("--autoround-iters", type=int, default=None, help="AutoRound iterations a block (default 200; "
                                                                      "0 = leave AutoRound out, the --quick default)")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode row: tokens a repeat (32 quick, else 64)")
    p.add_argument("--decode-repeats", type=int, default=None, help="decode row: alternating repeats (3 quick, else 5)")


def prepare(args) -> None:
    """Mode defaults (in the parent and in every child), then the configurations of the asked rows."""
    quick = args.quick
    for key, q, full in (("windows", 16, 64), ("n", 32, 128), ("autoround_iters", 0, 200), ("decode_tokens", 32, 64),
                         ("decode_repeats", 3, 5)):
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if quick and args.budget is None:
        args.budget = 45.0
    if args.eval_data and not os.path.isfile(args.eval_data):
        raise SystemExit(f"--eval-data {args.eval_data}: no such file")
    if args.rows or args.configs == ",".join(ORDER):
        rows = [r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; known: {', '.join(ROWS)}")
        wanted = {c for r in rows for c in (ROWS[r][0], *ROWS[r][1])}
        if wanted & {"w8a8", "w4a16", "w4a4", "2:4"}:
            wanted.add("base")  # their "x base"
        if args.autoround_iters == 0:
            wanted.discard("w4a16-autoround")
        args.configs = ",".join(c for c in ORDER if c in wanted)
    if not args.only and args.quick:
        configs = args.configs.split(",")
        est = sum(QUICK_MINUTES.get(c, 0) for c in configs)
        print(f"scoreboard --quick: {len(configs)} configurations, estimated {est:g} min on 2 cores "
              f"(budget {args.budget:g} min)", file=sys.stderr, flush=True)


def check(config: str, args) -> None:
    if config not in SIDES:
        raise SystemExit(f"unknown configuration {config!r}; use --rows ({', '.join(ROWS)}) or configurations {', '.join(ORDER)}")


def peer_env(config: str, args) -> dict:
    peer = SIDES[config].peer
    return _peers.env(peer) if peer else {}


def main(argv=None) -> None:
    _runner.main(run_one, table, doc=__doc__, configs=",".join(ORDER), add_args=add_args, prepare=prepare, check=check,
                 env=peer_env, summary=summary, errors_in_table=True, threads=None, argv=argv)


if __name__ == "__main__":
    main()
