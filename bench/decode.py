"""CPU greedy decode: a packed SmolLM2-135M checkpoint (any recipe; W4A16 below) vs the fp32 base, same run.

    lmpress compress smollm2-135m --recipe w4a16-rtn --out /tmp/w4a16     # once (groups of 64, asym)
    python bench/decode.py --ckpt /tmp/w4a16                              # 5 alternating repeats
    python bench/decode.py --ckpt /tmp/w4a16 --threads 1 --tokens 32 --repeats 3
    python bench/decode.py --ckpt /tmp/w4a16 --kernels ref                # the reference path instead
    python bench/decode.py --ckpt /tmp/w4a16 --batch 8                    # 8 sequences a step

Protocol: both models are loaded once; each repeat decodes `--tokens` new tokens greedily
for each of `--batch` sequences after a fixed prompt each (`--prompt-len` tokens of the bundled
wiki eval text, consecutive slices), with the KV cache, first the base then the packed model
(alternating, so drifting machine load hits both). Timed apart: the prefill with the argmax of
its last logits (time to first token, for the whole batch), and every decode step after it
(`torch.no_grad`, `use_cache=True`, argmax of the last logits). Reported: median decode tokens/s
(all sequences) and median time to first token over the repeats for each model, their ratios,
and whether the packed model's greedy tokens (first sequence) equal the reference path's. Memory: the bytes each
model holds for the weights of the linears that the recipe quantizes (lm_head and embeddings
are kept in both and left out): nn.Linear weights for the base, `weight_nbytes()` of each PackedLinear or Sparse24Linear
after decoding for the packed model (packed words, qparams and any runtime copy: the CPU
path's repacked int4 weight; the reference path's cached fp32 weight would show up here too).
The machine's thread count and load average are printed with the result, because on shared
cores OpenMP spinning makes every figure swing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/tmp/w4a16", help="packed W4A16 checkpoint of SmolLM2-135M (lmpress compress ... --out)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "cpu", "ref"], help="LMPRESS_KERNELS for the packed model")
    args = ap.parse_args(argv)

    os.environ["LMPRESS_KERNELS"] = args.kernels
    import torch
    from torch import nn

    from lmpress.calibration.data import load_text
    from lmpress.compress import load
    from lmpress.compress.models import load_model
    from lmpress.kernels.kv_cache import cache_kwargs, returned_cache
    from lmpress.kernels.linear import PackedLinear, Sparse24Linear

    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.ckpt):
        print(f"no checkpoint at {args.ckpt}; make it with: lmpress compress smollm2-135m --recipe w4a16-rtn --out {args.ckpt}",
              file=sys.stderr)
        return 2
    base, tok = load_model("smollm2-135m")
    packed = load(args.ckpt)
    n = args.batch * args.prompt_len
    text = tok(load_text("wiki", "eval")[: 40 * n], add_special_tokens=False, return_tensors="pt").input_ids[0]
    if text.numel() < n:
        print(f"the bundled eval text has {text.numel()} tokens, fewer than --batch x --prompt-len = {n}", file=sys.stderr)
        return 2
    ids = text[:n].view(args.batch, args.prompt_len)  # (batch, prompt_len): consecutive slices

    @torch.no_grad()
    def decode(model) -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        past, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)  # (batch, 1)
        ttft = time.perf_counter() - t0
        toks = [int(nxt[0])]
        t0 = time.perf_counter()
        for _ in range(args.tokens - 1):
            out = model(input_ids=nxt, use_cache=True, **cache_kwargs(past))
            past, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)  # (batch, 1)
            toks.append(int(nxt[0]))
        return args.batch * (args.tokens - 1) / (time.perf_counter() - t0), ttft, toks

    decode(base), decode(packed)  # warm up (and repack the packed weights once)
    rates = {"fp32 base": [], "packed": []}
    ttfts = {"fp32 base": [], "packed": []}
    toks_packed = None
    for _ in range(args.repeats):
        for name, model in (("fp32 base", base), ("packed", packed)):
            r, t, toks = decode(model)
            rates[name].append(r)
            ttfts[name].append(t)
        toks_packed = toks

    runtime = (PackedLinear, Sparse24Linear)  # the packed model's quantized (or 2:4-sparse) linears
    paths: dict[str, int] = {}
    for m in packed.modules():
        if isinstance(m, runtime) and m.kernel_path is not None:
            paths[str(m.kernel_path)] = paths.get(str(m.kernel_path), 0) + 1
    packed_bytes = sum(m.weight_nbytes() for m in packed.modules() if isinstance(m, runtime))
    os.environ["LMPRESS_KERNELS"] = "ref"
    _, _, toks_ref = decode(packed)  # the oracle's greedy tokens (this fills the reference's fp32 cache)
    os.environ["LMPRESS_KERNELS"] = args.kernels

    rotated = {n for n, m in packed.named_modules() if type(m).__name__ == "RotatedInput"}  # an online transform's wrapper
    quantized = {n.rpartition(".")[0] if n.rpartition(".")[0] in rotated else n
                 for n, m in packed.named_modules() if isinstance(m, runtime)}  # the base model's names
    base_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in base.named_modules()
                     if isinstance(m, nn.Linear) and n in quantized)
    load_avg = os.getloadavg()
    print(f"SmolLM2-135M greedy decode, batch {args.batch}, prompt {ids.shape[1]} tokens, {args.tokens} new tokens, "
          f"{args.repeats} alternating repeats, median")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f} "
          f"on {os.cpu_count()} cpus; packed model kernels: {args.kernels}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    first = {k: statistics.median(v) for k, v in ttfts.items()}
    for k, v in rates.items():
        print(f"  {k:14s} {med[k]:7.2f} tokens/s   (runs: {', '.join(f'{x:.2f}' for x in v)}); "
              f"time to first token {1e3 * first[k]:.1f} ms (runs: {', '.join(f'{1e3 * x:.1f}' for x in ttfts[k])})")
    print(f"  ratio packed / base: {med['packed'] / med['fp32 base']:.2f}x decode tokens/s, "
          f"{first['fp32 base'] / first['packed']:.2f}x time to first token (base / packed: above 1 is faster)")
    print(f"  paths of the packed linears (last call): {paths}")
    print(f"  linear-weight bytes: fp32 {base_bytes / 2**20:.1f} MiB, packed {packed_bytes / 2**20:.1f} MiB "
          f"({100 * packed_bytes / base_bytes:.1f}% of fp32) over {len(quantized)} linears")
    same = sum(a == b for a, b in zip(toks_packed, toks_ref))
    print(f"  greedy tokens equal to the reference path's: {same}/{len(toks_ref)}"
          f" (first difference at {next((i for i, (a, b) in enumerate(zip(toks_packed, toks_ref)) if a != b), None)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
