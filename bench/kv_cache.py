"""KV2: KIVI and RotateKV KV caches on SmolLM2-135M (FP weights): perplexity, peer comparison with
transformers' `QuantizedCache`, simulated-vs-runtime agreement, memory and decode speed.

    python bench/kv_cache.py ppl [--windows 64] [--configs fp,kivi4,kivi2,rotkv4,rotkv2]
    PYTHONPATH=/tmp/lmpress-bench-site python bench/kv_cache.py peer [--prompts 8 --new 128 --prompt-len 256]
    python bench/kv_cache.py agree [--prompts 8 --new 128 --config rotkv2]
    python bench/kv_cache.py memory [--context 4096 --decode 16 --config rotkv2-s4] [--bytes-only] [--dtype float32]

Run each through the heavy lock (`flock /tmp/lmpress-heavy.lock ...`), one at a time.

Configurations (`lmpress` KV settings, all on fp32 weights):
  fp      no KV quantization (full-precision cache)
  kivi4   KIVI 4-bit: keys per channel over 64 tokens, values per token over 64 channels, asymmetric
          min-max, fp16 scale/min, 128 most recent tokens in full precision (flush rule in quant/kv_cache.py)
  kivi2   the same at 2 bits (recipe kv2-kivi)
  rotkv4 / rotkv2   RotateKV + KIVI (recipe kv2-rotatekv at 4 / 2 bits): pre-RoPE keys reordered by
          calibration abs-max (4 x 512 calibration tokens) and Hadamard-rotated across the 3 KV heads,
          values rotated per head (folded into v_proj / o_proj)
  modifiers (any order, e.g. rotkv2-s4-cs): -s<N> N attention-sink tokens kept in full precision;
  -cs per-group clip search; -tok per-token keys; -b<N> RotateKV Hadamard blocks of N channels;
  -noreorder no calibrated channel reordering; GEAR (KVCacheArgs.gear_*): -r<N> rank-N residual per
  block of 64 tokens of a head, -o<P> P% of each block's entries kept exactly (e.g. rotkv2-s4-r2-o1);
  -g<N> groups of N (keys: tokens, values: channels; default 64); -res<N> the N most recent tokens
  kept in full precision (default 128): at 4k tokens the window costs N/256 bits an element

`ppl`: `eval.ppl.perplexity`, wiki eval split (`--split calib`: the calibration split, for screening
settings), the first `windows` windows of 512 tokens, no BOS,
through the decode-exact simulation (every query sees the cache as decoding would hold it).

`peer`: the issue's protocol for caches that only act when decoding: `prompts` windows of
`prompt-len` tokens from the wiki eval split (batch, no padding); `new` greedy tokens generated with
the FP cache; then each cache is prefilled with the prompt and fed the FP continuation token by
token (teacher-forced); mean NLL of the continuation tokens. transformers' `QuantizedCache`
(quanto / HQQ backends, q_group_size 64, residual_length 128, its default axes) against our runtime
`QuantizedKVCache` with the configurations above. quanto and hqq are installed only for the bench:
`pip install --target /tmp/lmpress-bench-site --no-deps optimum-quanto==0.2.7 hqq==0.2.8.post1 einops termcolor ninja`.

`agree`: greedy `generate()` of `prompts` wiki prompts of different lengths (left padding, batch)
x `new` tokens, with the simulated hook (DynamicCache, the "lmpress" attention function) and with
`QuantizedKVCache`: fraction of equal tokens, max |logit difference| over the first 16 steps.

`memory`: bytes held at `context` tokens (chunked prefill of 512 tokens) by an fp16 `DynamicCache`
(bf16 model, 2 bytes an element as fp16; `--dtype float32` runs the model in fp32, much faster on
CPUs without bf16 matmul units, and the DynamicCache then holds 4 bytes an element) and by `QuantizedKVCache` (bf16 residual, fp16 scale/min,
packed codes), and decode tokens/s with each (batch 1, `decode` steps after the context, this CPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from lmpress.calibration.data import load_text, sample_calibration
from lmpress.compress import Recipe, compress
from lmpress.compress.models import load_model
from lmpress.kernels.kv_cache import cache_kwargs

MODEL = "smollm2-135m"
BASE = {"version": 1, "schemes": {}}


def recipe_for(name: str) -> Recipe | None:
    base, *mods = name.split("-")
    if base == "fp":
        return None
    bits = {"kivi4": 4, "kivi2": 2, "rotkv4": 4, "rotkv2": 2}.get(base)
    if bits is None:
        raise SystemExit(f"unknown config {name!r}; use fp, kivi4, kivi2, rotkv4, rotkv2 (+ -s<N>, -b<N>, -cs, -tok, -r<N>, -o<P>, -z<P>, -g<N>, -res<N>)")
    kv = {"bits": bits, "group_size": 64, "residual": 128, "key_granularity": "channel"}
    rot = {"group_heads": 0, "block": 0, "reorder": True, "values": True, "seed": 0, "samples": 4}
    for m in mods:
        if m.startswith("s") and m[1:].isdigit():
            kv["sink_tokens"] = int(m[1:])
        elif m.startswith("b") and m[1:].isdigit():
            rot["block"] = int(m[1:])
        elif m == "cs":
            kv["clip_search"] = True
        elif m == "tok":
            kv["key_granularity"] = "token"
        elif m == "noreorder":
            rot["reorder"] = False
        elif m.startswith("res") and m[3:].isdigit():  # the most recent N tokens kept in full precision
            kv["residual"] = int(m[3:])
        elif m.startswith("g") and m[1:].isdigit():  # tokens (keys) / channels (values) a quantization group
            kv["group_size"] = int(m[1:])
        elif m.startswith("r") and m[1:].isdigit():
            kv["gear_rank"] = int(m[1:])
        elif m.startswith("o") and m[1:].replace(".", "", 1).isdigit():
            kv["gear_outliers"] = float(m[1:]) / 100
        elif m.startswith("z") and m[1:].isdigit():  # ZipCache: this percent of each block's tokens at 4 bits (KIVI's
            kv["salient"] = int(m[1:]) / 100  # layout; with -tok the paper's channel-separable token-wise form)
        else:
            raise SystemExit(f"unknown modifier {m!r} in {name!r}")
    stages: list = [{"kv_cache": {}}]
    if base.startswith("rotkv"):
        stages.insert(0, {"rotate_kv": rot})
    return Recipe.from_dict({**BASE, "name": name, "kv_cache": kv, "stages": stages})


def build(name: str, dtype=torch.float32):
    model, tok = load_model(MODEL)
    model = model.to(dtype).eval()
    recipe = recipe_for(name)
    if recipe is not None:
        calib = sample_calibration(tok, "wiki", 4, 512, 0) if recipe.needs_calibration else None
        compress(model, recipe, calib)
    return model, tok


# ----------------------------------------------------------------------------- ppl
def cmd_ppl(a) -> list[dict]:
    from lmpress.eval.ppl import perplexity

    text = load_text("wiki", a.split)
    rows = []
    for name in a.configs.split(","):
        t0 = time.time()
        model, tok = build(name)
        r = perplexity(model, tok, text, seqlen=512, windows=a.windows)
        rows.append({"config": name, "ppl": r.ppl, "nll": r.nll, "windows": r.windows, "split": a.split,
                     "seconds": time.time() - t0})
        print(f"{name:12s} ppl {r.ppl:8.3f}  ({r.windows} x 512, {time.time() - t0:.0f} s)", flush=True)
    fp = next((r["ppl"] for r in rows if r["config"] == "fp"), None)
    if fp:
        print("\nconfig        ppl      vs fp")
        for r in rows:
            print(f"{r['config']:12s} {r['ppl']:8.3f}  {100 * (r['ppl'] / fp - 1):+6.2f}%")
    return rows


# ----------------------------------------------------------------------------- peer
def wiki_windows(tok, n: int, length: int) -> torch.Tensor:
    ids = tok(load_text("wiki", "eval"), return_tensors="pt").input_ids[0]
    return ids[: n * length].reshape(n, length)


@torch.no_grad()
def teacher_forced_nll(model, prompt: torch.Tensor, cont: torch.Tensor, cache) -> float:
    """Mean NLL of `cont` (B, N) after `prompt` (B, P), prefilling the cache then one token a step."""
    out = model(prompt, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    total = 0.0
    for i in range(cont.shape[1]):
        logits = out.logits[:, -1].float()  # (B, V): the prediction of cont[:, i]
        total += torch.nn.functional.cross_entropy(logits, cont[:, i], reduction="sum").item()
        if i + 1 < cont.shape[1]:
            out = model(cont[:, i:i + 1], use_cache=True, **cache_kwargs(cache))
    return total / cont.numel()


def quantized_cache(backend: str, model, bits: int):
    """The peer: transformers' `QuantizedCache` (quanto or hqq backend), groups of 64, 128 recent tokens kept."""
    from transformers import QuantizedCache

    return QuantizedCache(backend, model.config, nbits=bits, q_group_size=64, residual_length=128)


def cmd_peer(a) -> list[dict]:
    from transformers import DynamicCache

    from lmpress.kernels.kv_cache import QuantizedKVCache

    model, tok = build("fp")
    prompt = wiki_windows(tok, a.prompts, a.prompt_len)
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.new, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    cont = gen[:, a.prompt_len:]
    rows = []

    def run(label, model, make):
        t0 = time.time()
        try:
            nll = teacher_forced_nll(model, prompt, cont, make())
        except Exception as e:  # a backend that is not installed
            print(f"{label:24s} skipped: {type(e).__name__}: {str(e)[:120]}", flush=True)
            return
        rows.append({"cache": label, "nll": nll, "seconds": time.time() - t0})
        print(f"{label:24s} mean NLL {nll:.4f}  ({time.time() - t0:.0f} s)", flush=True)

    run("fp DynamicCache", model, DynamicCache)
    for backend in ("quanto", "hqq"):
        for bits in (4, 2):
            run(f"QuantizedCache {backend} {bits}b", model, lambda: quantized_cache(backend, model, bits))
    for name in a.configs.split(","):
        qmodel, _ = build(name)
        run(f"lmpress {name}", qmodel, lambda: QuantizedKVCache(qmodel))
    fp = rows[0]["nll"]
    print(f"\n{a.prompts} prompts x {a.prompt_len} tokens, {a.new} greedy FP tokens scored teacher-forced")
    print("cache                     mean NLL   delta vs fp (nats/token)")
    for r in rows:
        print(f"{r['cache']:24s} {r['nll']:8.4f}   {r['nll'] - fp:+.4f}")
    return rows


# ----------------------------------------------------------------------------- agree
def cmd_agree(a) -> dict:
    from lmpress.kernels.kv_cache import QuantizedKVCache

    model, tok = build(a.config)
    ids = tok(load_text("wiki", "eval"), return_tensors="pt").input_ids[0]
    lengths = [64 + 24 * i for i in range(a.prompts)]  # 64 .. 232 tokens
    P = max(lengths)
    prompt = torch.full((a.prompts, P), tok.eos_token_id, dtype=torch.long)
    mask = torch.zeros_like(prompt)
    start = 0
    for i, n in enumerate(lengths):
        prompt[i, P - n:] = ids[start:start + n]
        mask[i, P - n:] = 1
        start += n
    kw = dict(attention_mask=mask, max_new_tokens=a.new, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        t0 = time.time()
        sim = model.generate(prompt, **kw)
        t1 = time.time()
        cache = QuantizedKVCache(model)
        rt = model.generate(prompt, **cache_kwargs(cache), **kw)
        t2 = time.time()
    s, r = sim.sequences[:, P:], rt.sequences[:, P:]
    same = (s == r).float().mean().item()
    steps = min(16, len(sim.logits), len(rt.logits))
    dlog = max((sim.logits[i] - rt.logits[i]).abs().max().item() for i in range(steps))
    out = {"config": a.config, "prompts": a.prompts, "new": a.new, "same_token_fraction": same,
           "max_logit_diff_first16": dlog, "sim_seconds": t1 - t0, "runtime_seconds": t2 - t1}
    print(f"{a.config}: {a.prompts} prompts ({min(lengths)}..{max(lengths)} tokens, left-padded) x {a.new} new tokens")
    print(f"  same token at {100 * same:.2f}% of positions; max |logit diff| over the first {steps} steps {dlog:.2e}")
    print(f"  generate: simulated {t1 - t0:.1f} s, runtime cache {t2 - t1:.1f} s")
    return out


# ----------------------------------------------------------------------------- memory
@torch.no_grad()
def fill_and_decode(model, ids: torch.Tensor, cache, nbytes, decode: int, chunk: int = 512):
    """Chunked prefill of `ids`, bytes held then (`nbytes(cache)`), then `decode` greedy steps: (bytes, tokens/s)."""
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s:s + chunk], use_cache=True, **cache_kwargs(cache))
    held = nbytes(cache)
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.time()
    for _ in range(decode):
        out = model(nxt, use_cache=True, **cache_kwargs(cache))
        nxt = out.logits[:, -1:].argmax(-1)
    return held, decode / (time.time() - t0)


def cmd_memory(a) -> dict:
    from transformers import DynamicCache

    from lmpress.kernels.kv_cache import QuantizedKVCache, dynamic_cache_nbytes

    dtype = getattr(torch, a.dtype)
    if a.bytes_only:
        return memory_bytes_only(a, dtype)
    fp, tok = build("fp", dtype)
    ids = tok(load_text("wiki", "eval"), return_tensors="pt").input_ids[:, : a.context]
    fp_bytes, fp_tps = fill_and_decode(fp, ids, DynamicCache(), dynamic_cache_nbytes, a.decode)
    del fp
    q, _ = build(a.config, dtype)
    q_bytes, q_tps = fill_and_decode(q, ids, QuantizedKVCache(q), lambda c: c.nbytes(), a.decode)
    out = {"context": a.context, "config": a.config, "fp16_dynamic_bytes": fp_bytes, "quantized_bytes": q_bytes,
           "ratio": q_bytes / fp_bytes, "decode_tps_fp": fp_tps, "decode_tps_quantized": q_tps,
           "torch_threads": torch.get_num_threads()}
    print(f"cache bytes at {a.context} tokens: {'fp16' if dtype == torch.bfloat16 else a.dtype} DynamicCache {fp_bytes / 2**20:.2f} MiB, "
          f"QuantizedKVCache ({a.config}) {q_bytes / 2**20:.2f} MiB = {q_bytes / fp_bytes:.3f}x")
    print(f"decode (batch 1, {a.decode} steps after {a.context} tokens, {a.dtype} weights, {torch.get_num_threads()} threads): "
          f"DynamicCache {fp_tps:.2f} tok/s, QuantizedKVCache {q_tps:.2f} tok/s")
    return out


@torch.no_grad()
def memory_bytes_only(a, dtype) -> dict:
    """Bytes at `context` tokens without running the model: both caches are fed random keys/values of
    the model's shapes (one chunk of 512 tokens at a time); what they hold depends only on shapes."""
    from transformers import DynamicCache

    from lmpress.kernels.kv_cache import QuantizedKVCache, dynamic_cache_nbytes

    q, _ = build(a.config, dtype)
    cfg = q.config
    n_kv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    qc, dc = QuantizedKVCache(q), DynamicCache()
    g = torch.Generator().manual_seed(0)
    for s in range(0, a.context, 512):
        n = min(512, a.context - s)
        for layer in range(cfg.num_hidden_layers):
            k = torch.randn(1, n_kv, n, d, generator=g).to(dtype)
            v = torch.randn(1, n_kv, n, d, generator=g).to(dtype)
            qc.update(k, v, layer)
            dc.update(k.half(), v.half(), layer)
    fp_bytes, q_bytes = dynamic_cache_nbytes(dc), qc.nbytes()
    out = {"context": a.context, "config": a.config, "fp16_dynamic_bytes": fp_bytes, "quantized_bytes": q_bytes,
           "ratio": q_bytes / fp_bytes, "bytes_only": True}
    print(f"cache bytes at {a.context} tokens (random K/V of {a.config}'s shapes, {cfg.num_hidden_layers} layers x "
          f"{n_kv} KV heads x {d}): fp16 DynamicCache {fp_bytes / 2**20:.2f} MiB, QuantizedKVCache "
          f"{q_bytes / 2**20:.2f} MiB = {q_bytes / fp_bytes:.3f}x")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ppl")
    s.add_argument("--windows", type=int, default=64)
    s.add_argument("--configs", default="fp,kivi4,kivi2,kivi2-s4,rotkv2,rotkv2-s4")
    s.add_argument("--split", default="eval", choices=["eval", "calib"],
                   help="wiki split of the windows: eval (the reported figure) or calib (screening: choose settings "
                        "on calibration text, never on the eval windows)")
    s = sub.add_parser("peer")
    s.add_argument("--prompts", type=int, default=8)
    s.add_argument("--prompt-len", type=int, default=256)
    s.add_argument("--new", type=int, default=128)
    s.add_argument("--configs", default="kivi4,kivi2,rotkv2-s4")
    s = sub.add_parser("agree")
    s.add_argument("--prompts", type=int, default=8)
    s.add_argument("--new", type=int, default=128)
    s.add_argument("--config", default="rotkv2-s4")
    s = sub.add_parser("memory")
    s.add_argument("--context", type=int, default=4096)
    s.add_argument("--decode", type=int, default=16)
    s.add_argument("--config", default="rotkv2-s4")
    s.add_argument("--bytes-only", action="store_true", help="measure bytes only, feeding random K/V (no model run)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model dtype of the decode run")
    for s in sub.choices.values():
        s.add_argument("--json", default=None, help="also write the result as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    out = {"ppl": cmd_ppl, "peer": cmd_peer, "agree": cmd_agree, "memory": cmd_memory}[a.cmd](a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
