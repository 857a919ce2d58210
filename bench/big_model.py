"""Larger-than-memory compression (`--lazy`): peak memory on a synthetic ~3B LLaMA, flat in the
layer count, and kill -9 / `--resume` giving a bitwise-identical artifact on SmolLM2-135M.

    python bench/big_model.py write  --dir /tmp/big3b                 # synthetic LLaMA as bf16 shards
    python bench/big_model.py memory --dir /tmp/big3b --recipes w4a16-gptq,w4a4kv4-quarot-rtn
    python bench/big_model.py memory --dir /tmp/big3b --layers 2,4 --recipes w4a16-gptq   # flatness
    python bench/big_model.py resume --threads 2                      # SmolLM2 kill -9 / resume / sha256
    ... --json FILE   also write the rows as JSON

Model (`write`): LLaMA-3.2-3B's shape (hidden 3072, intermediate 8192, 24 heads / 8 KV heads
of 128, RoPE theta 500000, untied head) with a 32000-token vocabulary and `--layers` layers
(28 = 3.0B parameters). Weights are seeded N(0, 0.02) (norm gains U(0.5, 1.5)), written as
bfloat16 safetensors, one shard per layer plus one for embeddings/norm/head, with an HF index.
The config is built locally; nothing is downloaded. `--layers-of` writes a model whose first
K layers reuse the shards of another directory (hard links), to compare layer counts at the
same width without writing twice.

Memory (`memory`): each run is `lmpress.compress.lazy.compress_lazy` in its own subprocess,
computing in float32 on CPU, 16 calibration sequences x 256 tokens (seeded random token ids:
the model is random, so real text would mean nothing); `peak RSS` is the subprocess's maximum
resident set size as the kernel reports it to the parent (`os.wait4` rusage, the figure
`/usr/bin/time -v` prints as "Maximum resident set size"). `--layers 2,4` restricts a run to
the first K layers (a model directory sharing the shards, see above).

Resume (`resume`): SmolLM2-135M, recipe w4a16-gptq, `--n` x `--seqlen` wiki calibration. Run A
uninterrupted; run B killed with SIGKILL once `--kill-after` layers are persisted (mid
calibration), then resumed with `resume=True`; the sha256 of every tensor shard of A and B
must match. All runs use the same `--threads`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _config(layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        architectures=["LlamaForCausalLM"], dtype="bfloat16",
    )


def _write_index(d: Path, weight_map: dict, total: int) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_model(d: Path, layers: int, vocab: int, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    cfg = _config(layers, vocab)
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(seed)
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def gain(n):
        return (torch.rand(n, generator=g) + 0.5).to(torch.bfloat16)

    weight_map, total, params = {}, 0, 0
    shards = layers + 1
    rest = {"model.embed_tokens.weight": randn(vocab, h), "model.norm.weight": gain(h), "lm_head.weight": randn(vocab, h)}
    items = [("rest", rest)] + [(i, None) for i in range(layers)]
    for k, (tag, tensors) in enumerate(items):
        if tensors is None:
            p = f"model.layers.{tag}."
            tensors = {p + "self_attn.q_proj.weight": randn(h, h), p + "self_attn.k_proj.weight": randn(kv, h),
                       p + "self_attn.v_proj.weight": randn(kv, h), p + "self_attn.o_proj.weight": randn(h, h),
                       p + "mlp.gate_proj.weight": randn(f, h), p + "mlp.up_proj.weight": randn(f, h),
                       p + "mlp.down_proj.weight": randn(h, f), p + "input_layernorm.weight": gain(h),
                       p + "post_attention_layernorm.weight": gain(h)}
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        params += sum(t.numel() for t in tensors.values())
        del tensors
    _write_index(d, weight_map, total)
    return {"dir": str(d), "layers": layers, "params": params, "bytes": total}


def first_layers(src: Path, dst: Path, layers: int) -> Path:
    """A model directory with the first `layers` layers of `src` (shards hard-linked, no copy)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    cfg = json.loads((src / "config.json").read_text())
    if layers > cfg["num_hidden_layers"]:
        raise SystemExit(f"{src} has {cfg['num_hidden_layers']} layers, fewer than {layers}")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    keep = {k: v for k, v in index.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    for name in set(keep.values()):
        os.link(src / name, dst / name)
    _write_index(dst, keep, 0)
    return dst


# --------------------------------------------------------------------------- child processes


def child_memory(a) -> None:
    """One lazy compression (runs in a subprocess); prints a JSON line."""
    import logging

    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.compress.lazy import compress_lazy

    g = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(a.dir) / "config.json").read_text())["vocab_size"]
    toks = torch.randint(0, vocab, (a.n, a.seqlen), generator=g)
    cal = CalibrationSet(tokens=toks, source="random-ids", split="calib", n=a.n, seqlen=a.seqlen, seed=0, fingerprint=fingerprint(toks))
    t0 = time.perf_counter()
    rep = compress_lazy(a.dir, a.recipe, cal, a.out, dtype=torch.float32, overwrite=True, resume=a.resume)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "modules": len(rep.modules)}), flush=True)


def child_resume(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from lmpress.calibration.data import sample_calibration
    from lmpress.compress.lazy import compress_lazy
    from lmpress.compress.models import resolve_model
    from transformers import AutoTokenizer

    src = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src)
    cal = sample_calibration(tok, "wiki", n=a.n, seqlen=a.seqlen, seed=0)
    t0 = time.perf_counter()
    compress_lazy(src, a.recipe, cal, a.out, tokenizer=tok, overwrite=True, resume=a.resume, batch_size=8)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def _spawn(kind: str, a, **over) -> subprocess.Popen:
    args = {"dir": a.dir, "recipe": "w4a16-gptq", "out": None, "n": a.n, "seqlen": a.seqlen, "threads": a.threads,
            "resume": False, **over}
    cmd = [sys.executable, str(HERE), f"_{kind}", "--args", json.dumps(args)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait(p: subprocess.Popen) -> tuple[int, float, str, str]:
    """(exit status, peak RSS in GiB, stdout, stderr) of a child, rusage taken from wait4."""
    import threading

    out, err = [], []
    ts = [threading.Thread(target=lambda s=s, b=b: b.append(s.read())) for s, b in ((p.stdout, out), (p.stderr, err))]
    for t in ts:
        t.start()
    _, status, ru = os.wait4(p.pid, 0)
    for t in ts:
        t.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_maxrss / 2**20, "".join(out), "".join(err)  # ru_maxrss in KiB on Linux


# --------------------------------------------------------------------------- commands


def cmd_memory(a) -> list[dict]:
    rows = []
    src = Path(a.dir)
    total = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for layers in [int(x) for x in a.layers.split(",")] if a.layers else [total]:
        d = src if layers == total else first_layers(src, Path(f"{src}-first{layers}"), layers)
        for recipe in a.recipes.split(","):
            out = Path(a.out_root) / f"{recipe}-{layers}"
            t0 = time.perf_counter()
            p = _spawn("memory", a, dir=str(d), recipe=recipe, out=str(out))
            rc, peak, so, se = _wait(p)
            row = {"recipe": recipe, "layers": layers, "rc": rc, "peak_rss_gib": round(peak, 3),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            if rc != 0:
                row["error"] = se.strip().splitlines()[-1] if se.strip() else "?"
            else:
                row.update(json.loads(so.strip().splitlines()[-1]))
                row["artifact_mib"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, 1)
                shutil.rmtree(out, ignore_errors=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'recipe':<22} {'layers':>6} {'peak RSS GiB':>13} {'time s':>8} {'artifact MiB':>13}")
    for r in rows:
        print(f"{r['recipe']:<22} {r['layers']:>6} {r['peak_rss_gib']:>13.3f} {r.get('seconds', float('nan')):>8} {r.get('artifact_mib', '-'):>13}"
              + (f"  FAILED: {r['error']}" if r["rc"] else ""))
    return rows


def _shard_digests(d: Path) -> dict[str, str]:
    from lmpress.compress.checkpoint import sha256_file

    return {f.name: sha256_file(f) for f in sorted(d.glob("*.safetensors"))}


def cmd_resume(a) -> list[dict]:
    root = Path(a.out_root)
    A, B = root / "resume-A", root / "resume-B"
    for d in (A, B, B.with_name(B.name + ".partial")):
        shutil.rmtree(d, ignore_errors=True)
    rc, peak, so, se = _wait(_spawn("resume", a, out=str(A)))
    if rc:
        raise SystemExit(f"uninterrupted run failed: {se[-2000:]}")
    t_a = json.loads(so.strip().splitlines()[-1])["seconds"]
    p = _spawn("resume", a, out=str(B))
    state = B.with_name(B.name + ".partial") / "state.json"
    done = 0
    while p.poll() is None:
        if state.is_file():
            try:
                done = json.loads(state.read_text())["done"]
            except (ValueError, KeyError):
                pass
            if done >= a.kill_after:
                os.kill(p.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    rc_k, _, _, _ = _wait(p)
    killed_at = json.loads(state.read_text())["done"]
    rc, _, so, se = _wait(_spawn("resume", a, out=str(B), resume=True))
    if rc:
        raise SystemExit(f"resumed run failed: {se[-2000:]}")
    da, db = _shard_digests(A), _shard_digests(B)
    same = da == db
    row = {"model": "smollm2-135m", "recipe": "w4a16-gptq", "calib": f"{a.n}x{a.seqlen}", "threads": a.threads,
           "killed_rc": rc_k, "killed_after_layers": killed_at, "shards": len(da), "identical": same,
           "sha256_first_shard": next(iter(da.values()))[:16], "uninterrupted_s": t_a}
    print(json.dumps(row))
    print(f"\nkill -9 after {killed_at} of 30 layers (exit {rc_k}), resumed: {len(da)} shards, sha256 "
          f"{'IDENTICAL' if same else 'DIFFERENT'} to the uninterrupted run")
    if not same:
        raise SystemExit(1)
    return [row]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("_memory", "_resume") and sys.argv[2] == "--args":
        a = argparse.Namespace(**json.loads(sys.argv[3]))
        (child_memory if sys.argv[1] == "_memory" else child_resume)(a)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["write", "memory", "resume"])
    ap.add_argument("--dir", default="/tmp/lmpress-big3b")
    ap.add_argument("--layers", default=None, help="write: layer count (default 28); memory: comma-separated layer counts")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--recipes", default="w4a16-gptq,w4a4kv4-quarot-rtn")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kill-after", type=int, default=12, help="resume: SIGKILL once this many layers are persisted")
    ap.add_argument("--out-root", default="/tmp/lmpress-big-out")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    Path(a.out_root).mkdir(parents=True, exist_ok=True)
    if a.command == "write":
        t0 = time.perf_counter()
        info = write_model(Path(a.dir), int(a.layers or 28), a.vocab, seed=0)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(info))
        rows = [info]
    elif a.command == "memory":
        rows = cmd_memory(a)
    else:
        rows = cmd_resume(a)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
