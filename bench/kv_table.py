"""KV caches beyond KIVI on SmolLM2-135M, fp32 weights (issue 28's table): perplexity, long-context
passkey retrieval, average bits per cached element with metadata, bytes at the passkey context vs an
fp16 DynamicCache, and (optionally) decode speed there.

    python bench/kv_table.py                                   # 64 x 512 wiki windows, passkey 20 x 4096 tokens
    python bench/kv_table.py --configs fp,rotkv2,rotkv2-r2 --passkey 10 --ctx 2048
    python bench/kv_table.py --decode 16                       # also decode tok/s at --ctx, vs DynamicCache

Configurations: `fp`; `fp8-head` (FP8 E4M3, a calibrated scale per KV head: recipe kv-fp8 with
scale: head); `fp8-tensor` (one calibrated scale per layer for K and one for V, vLLM's default);
`-qk` on either (QuaRot's online Hadamard on post-RoPE Q and K before the FP8 rounding);
`int4-tokhead` (INT4 per token and head: asymmetric min-max over each head's 64
channels, the per-token form); and the KIVI family of bench/kv_cache.py (`kivi2`, `rotkv2`, with
its modifiers: -s<N> sinks, -r<N> GEAR rank, -o<P> GEAR outlier percent, -z<P> ZipCache with P% salient
tokens at 4 bits (KIVI's layout; -tok-z<P> the paper's channel-separable token-wise form), -cs clip search...).

Columns: wiki perplexity (first `--windows` windows of 512 tokens, the decode-exact simulation) and
its ratio to fp; passkey accuracy (`lmpress.eval.passkey`, `--passkey` samples of `--ctx` tokens,
needle depths 0..1, greedy through `generate` with the simulated cache); average bits per cached
element at `--ctx` tokens, metadata included (per-token and FP8 forms: by formula, 16 for fp; the
KIVI family: `QuantizedKVCache.nbytes(float_bytes=2)` after feeding `--ctx` tokens, which counts codes,
scales, GEAR's and ZipCache's parts as held and the full-precision sinks and residual at 16 bits, as an
fp16 model holds them; the row also keeps `bits_fp32_model`, those at the 32 bits these fp32 weights
hold); that as a ratio of fp16 bytes;
decode tokens/s at `--ctx` (batch 1, the runtime cache against DynamicCache with the KV settings switched off, the
stock sdpa attention on the same weights; both in this child).
"""
from __future__ import annotations

import time

import _runner

DEFAULT_CONFIGS = ("fp,fp8-head,fp8-tensor,int4-tokhead,kivi2,rotkv2,rotkv2-s4,rotkv2-s4-r2,rotkv2-s4-r4,rotkv2-s4-r2-o1,kivi2-s4-z25,"
                   "kivi2-s4-z50,rotkv2-s4-res64-z5,rotkv2-s4-z25,rotkv2-s4-z50")  # res64-z5: ZipCache at ~3 bits


def recipe_for(config: str):
    import kv_cache

    from lmpress.compress import Recipe

    if config in ("fp8-head", "fp8-tensor", "fp8-head-qk", "fp8-tensor-qk"):
        # -qk: QuaRot's online Hadamard on post-RoPE Q and K (R3) before the keys are rounded to FP8; the stage also
        # fuses R1 into the weights (exact in fp32), r2 off
        rot = "fuse_norms, {rotate: {online: [qk], r2: false}}, " if config.endswith("-qk") else ""
        scale = config.split("-")[1]
        return Recipe.from_yaml(f"version: 1\nname: {config}\nschemes: {{}}\nkv_cache: {{preset: FP8_KV, scale: {scale}}}\n"
                                f"stages: [{rot}kv_cache, act_scales]\n")
    if config == "int4-tokhead":
        return Recipe.from_dict({"version": 1, "name": config, "schemes": {}, "stages": [{"kv_cache": {}}],
                                 "kv_cache": {"bits": 4, "group_size": 64, "key_granularity": "token"}})
    return kv_cache.recipe_for(config)


def formula_bits(recipe, head_dim: int) -> float | None:
    """Bits per cached element for the forms without a runtime cache (None for the KIVI family)."""
    if recipe is None:
        return 16.0
    kv = recipe.kv_args
    if kv.is_float:
        return 8.0  # one fp32 scale per layer or head: nothing per element
    if kv.per_token_only:
        g = min(kv.group_size, head_dim)
        return kv.bits + (16 if kv.symmetric else 32) / g  # fp16 scale (and min) per group of a token's head
    return None


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import compress
    from lmpress.compress.models import load_model
    from lmpress.eval.passkey import passkey_accuracy, passkey_samples
    from lmpress.eval.ppl import perplexity
    from lmpress.kernels.kv_cache import QuantizedKVCache, cache_kwargs

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    recipe = recipe_for(config) if config != "fp" else None
    row = {"config": config}
    if recipe is not None:
        calib = sample_calibration(tok, "wiki", 4, 512, 0) if recipe.needs_calibration else None
        t0 = time.perf_counter()
        compress(model, recipe, calib)
        row["compress_s"] = time.perf_counter() - t0
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    t0 = time.perf_counter()
    res = perplexity(model, tok, load_text("wiki", "eval"), seqlen=512, windows=args.windows)
    row.update(ppl=res.ppl, windows=res.windows, eval_s=time.perf_counter() - t0)
    _runner.partial(row)
    if args.passkey:
        # ZipCache's decisions carry over decode steps in the runtime cache only; the others decode exactly either way
        make = QuantizedKVCache if recipe is not None and recipe.kv_args is not None and recipe.kv_args.zipcache else None
        pk = passkey_accuracy(model, tok, passkey_samples(tok, n_ctx=args.ctx, n=args.passkey, seed=args.seed), make_cache=make)
        row.update(passkey=pk.accuracy, passkey_n=pk.n, passkey_by_depth=pk.by_depth, passkey_s=pk.seconds)
        _runner.partial(row)
    bits = formula_bits(recipe, head_dim)
    ids = passkey_samples(tok, n_ctx=args.ctx, n=1, seed=args.seed)[0].ids[None]  # (1, ctx): real text
    runtime = bits is None
    if runtime:  # measured: what the runtime cache holds after the context
        with torch.no_grad():
            q = QuantizedKVCache(model)
            model(ids, use_cache=True, **cache_kwargs(q))
        elements = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * ids.shape[1]
        bits = 8 * q.nbytes(float_bytes=2) / elements  # full-precision tokens as an fp16 model holds them
        row["bits_fp32_model"] = 8 * q.nbytes() / elements
    row["bits"] = bits
    row["vs_fp16"] = bits / 16
    if args.decode:
        row.update(decode_tps(model, ids, args.decode, runtime))
    return row


def decode_tps(model, ids, steps: int, runtime: bool) -> dict:
    """Greedy decode tok/s after the context: DynamicCache with the KV settings switched off (the stock sdpa
    path on the same weights) and (the KIVI family) the runtime cache."""
    import torch
    from transformers import DynamicCache

    from lmpress.kernels.attention import cache_quant_off
    from lmpress.kernels.kv_cache import QuantizedKVCache, cache_kwargs

    def one(make):
        cache = make()
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            x = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(steps):
                x = model(x, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - t0)

    with cache_quant_off(model):  # not DynamicCache under the simulation, which re-quantizes the prefix every step
        fp = one(DynamicCache)
    out = {"decode_tps_dynamic": fp}
    if runtime:
        out["decode_tps"] = one(lambda: QuantizedKVCache(model))
        out["decode_vs_dynamic"] = out["decode_tps"] / fp
    return out


def table(rows: list[dict], args) -> str:
    fp = next((r for r in rows if r["config"] == "fp" and "ppl" in r), None)
    lines = [f"{args.model}, fp32 weights; wiki eval {args.windows} x 512; passkey {args.passkey} x {args.ctx} tokens "
             f"(seed {args.seed}); bits per cached element at {args.ctx} tokens, metadata included", "",
             "| config | ppl | vs fp | passkey | bits/element | vs fp16 | decode tok/s vs DynamicCache |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][:80]} | | | | | |")
            continue
        vs = f"{r['ppl'] / fp['ppl']:.4f}x" if fp else "-"
        pk = f"{r['passkey']:.2f}" if "passkey" in r else "-"
        dec = f"{r['decode_vs_dynamic']:.2f}x" if "decode_vs_dynamic" in r else "-"
        bits = f"{r['bits']:.3f}" if r.get("bits") is not None else "-"
        ratio = f"{r['vs_fp16']:.3f}x" if r.get("vs_fp16") is not None else "-"
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {vs} | {pk} | {bits} | {ratio} | {dec} |")
    return "\n".join(lines)


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=64, help="wiki perplexity windows of 512 tokens (default 64)")
    p.add_argument("--passkey", type=int, default=20, help="passkey samples (default 20; 0 leaves the column out)")
    p.add_argument("--ctx", type=int, default=4096, help="passkey and bytes context in tokens (default 4096)")
    p.add_argument("--decode", type=int, default=0, help="decode steps after --ctx for tok/s (default 0: not measured)")
    p.add_argument("--seed", type=int, default=0)


def check(config: str, args) -> None:
    if config != "fp":
        recipe_for(config)


if __name__ == "__main__":
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=add_args, check=check, errors_in_table=True)
