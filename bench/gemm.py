"""Linear-layer kernels on the shapes of SmolLM2-135M and LLaMA-2-7B, M in {1, 16, 128, 2048}.

    python bench/gemm.py                          # CPU: the CPU path vs fp32 / bf16 matmul
    python bench/gemm.py --models smollm2 --m 1,16 --threads 1
    python bench/gemm.py --max-gflop 50           # also the big CPU shapes (slow: minutes)
    python bench/gemm.py                          # on a CUDA machine: the Triton kernels vs fp16 matmul

Shapes (N out, K in): SmolLM2-135M (hidden 576, intermediate 1536, 9 query / 3 KV heads of 64:
k/v out 192) q 576x576, k 192x576, v 192x576, o 576x576, gate 1536x576, up 1536x576,
down 576x1536; LLaMA-2-7B q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008.
Weights: int4 groups of 64 asymmetric for SmolLM2 (the w4a16-rtn recipe), groups of 128
symmetric for LLaMA (the usual GPTQ setting); W4A4 / W8A8 per-channel symmetric.

CUDA (`triton.testing.do_bench`, median ms): `w4a16_gemm` (on-disk and kn layouts),
`act_quant` + `w4a4_gemm` (W4A4), `act_quant` + `w8a8_gemm` (W8A8), each against
`torch.matmul` in fp16 on the same shape; and the online Hadamard of the input (QuaRot's R4,
`OnlineHadamard(K, 0)`) fused into the int4 quantization (`online_act_quant`: the
`transform_act_quant` kernel where the Kronecker factors fit one tile, else torch transform +
`act_quant`), then "rot overhead" = (fused - act_quant alone) / (act_quant + w4a4 GEMM), the
cost of the transform relative to the W4A4 layer without it (FlatQuant reports 0.07x for its
Kronecker transform); TFLOP/s = 2MNK / t, GB/s = (weight + activation +
output bytes) / t, and the roofline fraction = achieved / min(peak ops, intensity x bandwidth)
with the device's dense fp16 (int8 for the integer GEMMs) peak and memory bandwidth from a
small table (unknown devices print n/a).

CPU (median of wall-clock repeats, `PackedLinear` with LMPRESS_KERNELS=cpu: torch's bf16 int4
op up to 64 rows (`cpu.SMALL_M`; 16 before 2026-12-06), on-the-fly dequantization + fp32 matmul above): against fp32 and bf16
`torch.matmul` with the same activations; ratio = matmul time / CPU-path time (> 1: the CPU
path is faster). "warm" times one weight over and over (it sits in cache: flattering for fp32);
"cold" (M <= 16) rotates over copies of the layer that together exceed the caches, as a decode
step does when it walks 30 layers (`--cold-mib`). Calls above `--max-gflop` are skipped (bf16 matmul is not vectorized for
large shapes on AVX2 and a 2048-row LLaMA call takes minutes). The thread count and the load
average are printed: other processes on the same cores change everything.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SHAPES = {
    "smollm2": [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
                ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536)],
    "llama2-7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
}
# dense fp16 tensor-core TFLOP/s, int8 TOP/s, memory TB/s (SXM parts; vendor data sheets)
PEAKS = {"H100": (989e12, 1979e12, 3.35e12), "H200": (989e12, 1979e12, 4.8e12), "A100": (312e12, 624e12, 2.0e12),
         "L40S": (362e12, 733e12, 0.864e12), "RTX 4090": (165e12, 660e12, 1.008e12)}


def _weight_args(model: str, bits: int):
    from lmpress.quant.scheme import QuantArgs

    if bits == 4 and model == "smollm2":
        return QuantArgs(bits=4, granularity="group", group_size=64, symmetric=False)
    if bits == 4:
        return QuantArgs(bits=4, granularity="group", group_size=128, symmetric=True)
    return QuantArgs(bits=8, granularity="channel", symmetric=True)


def _packed_weight(N: int, K: int, args, device):
    import torch

    from lmpress.kernels.formats import pack
    from lmpress.quant.rtn import rtn_quantize

    W = torch.randn(N, K, device=device) * 0.02
    q, s, z = rtn_quantize(W, args)
    return pack(q, args.bits), s, (None if args.symmetric else z)


def _wall(fn, budget_s: float = 0.5, max_reps: int = 200) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    reps = max(3, min(max_reps, int(budget_s / max(once, 1e-6))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3  # ms


def bench_cpu(models, ms, max_gflop: float, cold_bytes: int) -> None:
    import copy

    import torch
    from torch import nn

    from lmpress.kernels.linear import PackedLinear
    from lmpress.quant.rtn import rtn_quantize
    from lmpress.quant.scheme import QuantScheme
    from lmpress.quant.sim import SimQuantLinear

    os.environ["LMPRESS_KERNELS"] = "cpu"
    la = os.getloadavg()
    print(f"CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cpus")
    print("warm: one weight, resident in cache after the first call; cold (M <= 16): calls rotate over copies "
          f"holding {cold_bytes / 2**20:.0f} MiB of fp32 weight, so every call streams its weight from memory (decode)")
    print(f"{'model':10s} {'layer':8s} {'N':>6s} {'K':>6s} {'M':>5s} {'regime':6s} {'path':14s} {'cpu ms':>9s} {'fp32 ms':>9s} "
          f"{'bf16 ms':>9s} {'vs fp32':>8s} {'vs bf16':>8s}")
    for model in models:
        for layer, N, K in SHAPES[model]:
            args = _weight_args(model, 4)
            scheme = QuantScheme(weights=args)
            lin = nn.Linear(K, N, bias=False)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02)
            sim = SimQuantLinear(lin, scheme)
            sim.set_quantized(*rtn_quantize(lin.weight.detach(), args))
            packed = PackedLinear.from_sim(sim)
            w32 = sim.weight.detach().clone()
            del sim, lin
            copies = max(1, min(64, cold_bytes // (N * K * 4))) if cold_bytes else 0
            for M in ms:
                if 2 * M * N * K / 1e9 > max_gflop:
                    print(f"{model:10s} {layer:8s} {N:6d} {K:6d} {M:5d} skipped: {2 * M * N * K / 1e9:.0f} GFLOP > --max-gflop {max_gflop:g}")
                    continue
                x = torch.randn(M, K)
                xb = x.bfloat16()
                regimes = [("warm", [packed], [w32])]
                if copies and M <= 16:
                    regimes.append(("cold", [copy.deepcopy(packed) for _ in range(copies)], [w32.clone() for _ in range(copies)]))
                for regime, mods, ws in regimes:
                    wbs = [w.bfloat16() for w in ws]
                    it = {"i": 0}

                    def nxt(seq):
                        it["i"] = (it["i"] + 1) % len(seq)
                        return seq[it["i"]]

                    with torch.no_grad():
                        for m in mods:  # repack every copy before timing
                            m(x)
                        t_cpu = _wall(lambda: nxt(mods)(x))
                        path = next(m.kernel_path.kind for m in mods if m.kernel_path is not None)
                        t32 = _wall(lambda: torch.matmul(x, nxt(ws).t()))
                        tbf = _wall(lambda: torch.matmul(xb, nxt(wbs).t()))
                    print(f"{model:10s} {layer:8s} {N:6d} {K:6d} {M:5d} {regime:6s} {path:14s} {t_cpu:9.3f} {t32:9.3f} {tbf:9.3f} "
                          f"{t32 / t_cpu:7.2f}x {tbf / t_cpu:7.2f}x", flush=True)
                    del mods, ws, wbs
    la = os.getloadavg()
    print(f"load average at the end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


def bench_cuda(models, ms) -> None:
    import torch
    import triton

    from lmpress.kernels.act_quant import act_quant
    from lmpress.kernels.formats import to_kn_layout
    from lmpress.kernels.online import OnlineHadamard
    from lmpress.kernels.transform_act_quant import online_act_quant
    from lmpress.kernels.w4a4_gemm import w4a4_gemm, w8a8_gemm
    from lmpress.kernels.w4a16_gemm import w4a16_gemm

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peaks = next((v for k, v in PEAKS.items() if k in name), None)
    print(f"CUDA: {name}, torch {torch.__version__}, triton {triton.__version__}; peaks (fp16, int8, B/s) = {peaks}")
    print(f"{'model':10s} {'layer':8s} {'N':>6s} {'K':>6s} {'M':>5s} {'kernel':16s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>8s} "
          f"{'roofline':>8s} {'fp16 ms':>8s} {'speedup':>8s}")

    def report(model, layer, N, K, M, kname, ms_, wbytes, ref_ms, int_peak):
        flops = 2 * M * N * K
        nbytes = wbytes + M * K * 2 + M * N * 2
        tflops, gbs = flops / ms_ / 1e9, nbytes / ms_ / 1e6
        if peaks:
            peak = peaks[1] if int_peak else peaks[0]
            roof = min(peak, flops / nbytes * peaks[2])
            frac = f"{flops / (ms_ * 1e-3) / roof:8.2f}"
        else:
            frac = f"{'n/a':>8s}"
        print(f"{model:10s} {layer:8s} {N:6d} {K:6d} {M:5d} {kname:16s} {ms_:8.4f} {tflops:8.2f} {gbs:8.1f} {frac} "
              f"{ref_ms:8.4f} {ref_ms / ms_:7.2f}x", flush=True)

    for model in models:
        for layer, N, K in SHAPES[model]:
            a4 = _weight_args(model, 4)
            p4, s4, z4 = _packed_weight(N, K, a4, dev)
            p4kn = to_kn_layout(p4, 4)
            from lmpress.quant.scheme import QuantArgs

            pc4, sc4, _ = _packed_weight(N, K, QuantArgs(bits=4), dev)
            p8, s8, _ = _packed_weight(N, K, _weight_args(model, 8), dev)
            w16 = torch.randn(N, K, device=dev, dtype=torch.float16)
            rot = OnlineHadamard(K, 0).to(dev)
            for M in ms:
                x = torch.randn(M, K, device=dev, dtype=torch.float16)
                ref = triton.testing.do_bench(lambda: torch.matmul(x, w16.t()))
                report(model, layer, N, K, M, "fp16 matmul", ref, N * K * 2, ref, False)
                gs = a4.group_size
                t = triton.testing.do_bench(lambda: w4a16_gemm(x, p4, s4, z4, in_features=K, group_size=gs))
                report(model, layer, N, K, M, "w4a16 (nk)", t, N * K // 2 + s4.numel() * 8, ref, False)
                t = triton.testing.do_bench(lambda: w4a16_gemm(x, p4kn, s4, z4, in_features=K, group_size=gs, layout="kn"))
                report(model, layer, N, K, M, "w4a16 (kn)", t, N * K // 2 + s4.numel() * 8, ref, False)
                t = triton.testing.do_bench(lambda: act_quant(x, 4))
                report(model, layer, N, K, M, "act_quant int4", t, 0, ref, False)

                def w4a4():
                    q, _, sx = act_quant(x, 4)
                    return w4a4_gemm(q, sx, pc4, sc4, in_features=K, out_dtype=torch.float16)

                report(model, layer, N, K, M, "w4a4 (+quant)", triton.testing.do_bench(w4a4), N * K // 2 + N * 4, ref, True)
                t_aq = triton.testing.do_bench(lambda: act_quant(x, 4))
                q0, _, sx0 = act_quant(x, 4)
                t_gemm = triton.testing.do_bench(lambda: w4a4_gemm(q0, sx0, pc4, sc4, in_features=K, out_dtype=torch.float16))
                t_rot = triton.testing.do_bench(lambda: online_act_quant(x, rot, 4))
                why = online_act_quant(x, rot, 4)[3]
                report(model, layer, N, K, M, "had+quant int4", t_rot, 0, ref, False)

                def rot_w4a4():
                    q, _, sx, _ = online_act_quant(x, rot, 4)
                    return w4a4_gemm(q, sx, pc4, sc4, in_features=K, out_dtype=torch.float16)

                report(model, layer, N, K, M, "w4a4 (+had+quant)", triton.testing.do_bench(rot_w4a4), N * K // 2 + N * 4, ref, True)
                print(f"{'':10s} rot overhead {(t_rot - t_aq) / (t_aq + t_gemm):.3f}x (act_quant {t_aq:.4f} ms, had+quant {t_rot:.4f} ms, "
                      f"w4a4 GEMM {t_gemm:.4f} ms; {('torch transform: ' + why) if why else 'fused kernel'})", flush=True)

                def w8a8():
                    q, _, sx = act_quant(x, 8)
                    return w8a8_gemm(q, sx, p8, s8, in_features=K, out_dtype=torch.float16)

                report(model, layer, N, K, M, "w8a8 (+quant)", triton.testing.do_bench(w8a8), N * K + N * 4, ref, True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama2-7b", help="comma-separated: " + ",".join(SHAPES))
    ap.add_argument("--m", default="1,16,128,2048", help="comma-separated row counts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-gflop", type=float, default=10.0, help="CPU: skip calls above this many GFLOP")
    ap.add_argument("--cold-mib", type=int, default=128, help="CPU, M <= 16: also time rotating over this much fp32 weight (0: off)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {list(SHAPES)}")
    ms = [int(v) for v in args.m.split(",")]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        bench_cuda(models, ms)
    else:
        bench_cpu(models, ms, args.max_gflop, args.cold_mib << 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
