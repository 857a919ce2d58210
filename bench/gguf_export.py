"""GGUF: lmpress's calibrated quantization on llama.cpp's own block grids against llama.cpp's own
quantizer, both measured in llama.cpp.

One run, one set of windows and calibration sequences:
- base: the fp32 model written as an F16 GGUF (lmpress's exporter), its perplexity in llama.cpp;
- per row (a llama.cpp file type): llama.cpp's `llama-quantize` on that F16 file, without and
  with an importance matrix (`llama-imatrix` on the same calibration text), and lmpress's GPTQ on
  exactly the per-tensor types llama.cpp's imatrix run chose (the same file size; without the
  imatrix llama.cpp keeps a few early ffn_down tensors one type lower), written by
  `lmpress.compress.gguf`;
- the `mix` row: lmpress's own plan (Fisher-weighted knapsack over block types, exact bytes) at
  the size of llama.cpp's Q3_K_M file, against llama.cpp's Q3_K_M;
- every lmpress file's perplexity in llama.cpp next to lmpress's simulation (the dequantized
  weights in torch, activations quantized as llama.cpp's matmul does), and decode tokens/s in llama.cpp (batch 1,
  --decode-threads threads) beside the fp32 torch base and lmpress's own runtime (a w4a16-rtn packed checkpoint).

    python bench/gguf_export.py                 # 64 x 512 wiki eval windows, 128 x 512 calibration
    python bench/gguf_export.py --windows 8 --calib 16 --rows Q4_0      # a quick look

llama.cpp's side (the tools built once into ~/.cache/lmpress/peers) is bench/_llamacpp.py.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = {"Q4_0": "Q4_0", "Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S", "mix": "Q3_K_M"}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=64, help="wiki eval windows of --seqlen tokens")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib", type=int, default=128, help="calibration sequences of --seqlen tokens")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-threads", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="folder for the GGUF files (default: a temporary one)")
    return p.parse_args(argv)


def _decode_torch(model, prompt: list[int], new_tokens: int, threads: int) -> float:
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ids = torch.tensor([prompt])
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(n)


def _decode_packed(model, tok, prompt: list[int], new_tokens: int, threads: int) -> float:
    """lmpress's own CPU runtime: a copy of the model through `w4a16-rtn`, saved packed and loaded back."""
    from lmpress.compress import compress, load, save

    q = copy.deepcopy(model)
    compress(q, "w4a16-rtn")
    with tempfile.TemporaryDirectory(prefix="lmpress-gguf-packed-") as d:
        save(q, Path(d) / "ckpt", tokenizer=tok)
        packed = load(Path(d) / "ckpt").eval()
    return _decode_torch(packed, prompt, new_tokens, threads)


def main(argv=None) -> int:
    a = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import _llamacpp as L

    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import gguf as CG
    from lmpress.compress.models import gguf_source, load_model
    from lmpress.eval.ppl import perplexity_from_ids

    torch.set_num_threads(a.threads)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; use some of {list(ROWS)}")
    out = a.out or Path(tempfile.mkdtemp(prefix="lmpress-gguf-"))
    out.mkdir(parents=True, exist_ok=True)
    L.ensure_tools()
    src = gguf_source("smollm2-135m")
    model, tok = load_model("smollm2-135m")
    model.eval()
    base_state = copy.deepcopy(model.state_dict())
    ids = tok(load_text("wiki", split="eval"), add_special_tokens=False)["input_ids"]
    windows = [ids[i * a.seqlen:(i + 1) * a.seqlen] for i in range(a.windows)]
    ids_t = torch.tensor(ids[: a.windows * a.seqlen])

    def sim(types=None) -> float:
        """lmpress's simulation: the model's (dequantized) weights, and with `types` the activations as
        llama.cpp's matmul quantizes them next to each tensor's type."""
        if types is None:
            return perplexity_from_ids(model, ids_t, a.seqlen, a.windows).ppl
        with CG.llamacpp_activations(model, types):
            return perplexity_from_ids(model, ids_t, a.seqlen, a.windows).ppl

    t0 = time.perf_counter()
    base_sim = sim()
    f16 = CG.write_gguf(model, out / "base-F16.gguf", src, CG.plan_types(model, "F16"))
    base_ll = L.perplexity(f16, windows, threads=a.threads)
    prompt = ids[:128]
    base_tps = _decode_torch(model, prompt, a.decode_tokens, a.decode_threads)
    f16_tps = L.decode_tps(f16, prompt, a.decode_tokens, threads=a.decode_threads)
    packed_tps = _decode_packed(model, tok, prompt, a.decode_tokens, a.decode_threads)
    print(f"base: torch fp32 ppl {base_sim:.3f}, llama.cpp F16 ppl {base_ll:.3f}; decode tok/s fp32 torch "
          f"{base_tps:.1f}, lmpress packed W4A16 {packed_tps:.1f}, llama.cpp F16 {f16_tps:.1f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    cal = sample_calibration(tok, "wiki", n=a.calib, seqlen=a.seqlen, seed=0)
    text = out / "calibration.txt"
    text.write_text("\n".join(tok.decode(s) for s in cal.tokens.tolist()))
    imat = L.imatrix(f16, text, out / "imatrix.gguf", ctx=a.seqlen, chunks=a.calib, threads=a.threads)

    table = []
    for row in rows:
        ftype = ROWS[row]
        theirs = L.quantize(f16, out / f"llamacpp-{ftype}.gguf", ftype, threads=a.threads)
        theirs_im = L.quantize(f16, out / f"llamacpp-{ftype}-imatrix.gguf", ftype, imatrix=imat, threads=a.threads)
        # llama.cpp's imatrix run picks a few types of its own (Q4_0/Q5_0: the first n_layer/8 ffn_down
        # become Q4_1/Q5_1, "guard against craziness"): ours takes the imatrix file's map, the same size
        their_types = L.tensor_types(theirs_im)
        model.load_state_dict(base_state)
        t1 = time.perf_counter()
        if row == "mix":
            tensors = CG.model_tensors(model, "llama")
            options = CG.type_options(model, CG.MIX_CANDIDATES)
            fixed = {g: their_types[g] for g in tensors if g not in options}
            budget = sum(CG.tensor_bytes(t, their_types[g]) for g, (_, t) in tensors.items())
            types = CG.allocate_types(model, fixed, options, budget, cal.tokens[:16])
        else:
            types = their_types
        payload = CG.quantize_model(model, types, calib=cal, method="gptq")
        ours = CG.write_gguf(model, out / f"lmpress-{row}.gguf", src, types, payload)
        secs = time.perf_counter() - t1
        r = {
            "row": row, "llama ftype": ftype, "MiB": L.file_mib(ours), "their MiB": L.file_mib(theirs), "their imatrix MiB": L.file_mib(theirs_im),
            "bpw": CG.bits_per_weight(model, types), "their bpw": CG.bits_per_weight(model, L.tensor_types(theirs)),
            "ours": L.perplexity(ours, windows, threads=a.threads), "sim": sim(types),
            "theirs": L.perplexity(theirs, windows, threads=a.threads),
            "theirs+imatrix": L.perplexity(theirs_im, windows, threads=a.threads),
            "tok/s": L.decode_tps(ours, prompt, a.decode_tokens, threads=a.decode_threads), "compress s": secs,
        }
        table.append(r)
        print(_line(r, base_ll), flush=True)

    print(f"\nSmolLM2-135M, wiki eval {a.windows} x {a.seqlen}, calibration {a.calib} x {a.seqlen}, {a.threads} threads; "
          f"base fp32 torch {base_sim:.3f}, base F16 in llama.cpp {base_ll:.3f} (ratios against it); decode "
          f"{a.decode_tokens} tokens at batch 1, {a.decode_threads} thread(s): fp32 torch {base_tps:.1f}, "
          f"lmpress's runtime (w4a16-rtn packed checkpoint) {packed_tps:.1f}, llama.cpp F16 {f16_tps:.1f} tok/s\n")
    print("| row | file MiB (ours / llama.cpp / llama.cpp imatrix) | bpw (ours / llama.cpp) | ppl llama.cpp, our file | ratio | "
          "lmpress sim | llama.cpp vs sim | llama.cpp quantizer | ratio | + imatrix | ratio | our gap / imatrix gap | "
          "decode tok/s (llama.cpp, our file) | our compress s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(_line(r, base_ll))
    print(f"\nfiles in {out}")
    return 0


def _line(r: dict, base: float) -> str:
    gap = lambda p: p / base - 1  # noqa: E731
    best_peer = min(gap(r["theirs"]), gap(r["theirs+imatrix"]))
    return (f"| {r['row']} ({r['llama ftype']}) | {r['MiB']:.2f} / {r['their MiB']:.2f} / {r['their imatrix MiB']:.2f} | "
            f"{r['bpw']:.3f} / {r['their bpw']:.3f} | "
            f"{r['ours']:.3f} | {r['ours'] / base:.4f} | {r['sim']:.3f} | {100 * (r['ours'] / r['sim'] - 1):+.2f}% | "
            f"{r['theirs']:.3f} | {r['theirs'] / base:.4f} | {r['theirs+imatrix']:.3f} | {r['theirs+imatrix'] / base:.4f} | "
            f"{gap(r['ours']) / best_peer:.2f} | {r['tok/s']:.1f} | {r['compress s']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
