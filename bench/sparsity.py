"""N:M sparsity on SmolLM2-135M: magnitude vs Wanda vs SparseGPT (2:4, 4:8), and 2:4 SparseGPT
jointly with W4 weights: perplexity, compress time, N:M check on the saved-and-reloaded
checkpoint, and the bytes of the 2:4 + int4 linears against dense int4.

    python bench/sparsity.py                                # 32 x 512 calibration, 64 x 512 eval, every config
    python bench/sparsity.py --windows 16 --configs sparsegpt-2:4

Protocol: as bench/gptq.py (bundled `wiki`; calibration `sample_calibration(tok, "wiki", n,
seqlen, seed)` from the calib split; perplexity `eval.ppl.perplexity` on the eval split, first
`windows` windows of `seqlen` tokens, fp32 CPU, no BOS). Every linear of the decoder layers is
pruned (lm_head and embeddings kept dense), true-sequential, one configuration per subprocess.
The perplexity is of the simulated model; for 2:4 configs the model is then saved, reloaded
(`Sparse24Linear`) and every pruned linear's stored positions checked (exactly 2 of every 4),
with the reloaded model's logits compared on one window.

Configurations: `base`, `<magnitude|wanda|sparsegpt>-<2:4|4:8>`, `sparsegpt-<2:4|4:8>-norefit`
(the sweep's weights without the least-squares refit), `sparsegpt-2:4-w4` (int4 weights, groups
of 64, asymmetric, quantized inside the SparseGPT sweep); the peer, llm-compressor, on the same
calibration tokens and windows: `peer-sparsegpt-2:4`, `peer-wanda-2:4` (llm-compressor is
installed on first use into its own folder, put on those children's PYTHONPATH only: bench/_peers.py).
"""
from __future__ import annotations

import os
import tempfile
import time

import _peers
import _runner

W4 = {"preset": "W4A16", "weights": {"group_size": 64, "symmetric": False}}
DEFAULT_CONFIGS = "base,magnitude-2:4,wanda-2:4,sparsegpt-2:4,magnitude-4:8,wanda-4:8,sparsegpt-4:8,sparsegpt-2:4-w4"


PEERS = ("peer-sparsegpt-2:4", "peer-wanda-2:4")


def run_peer(config: str, model, tok, calib) -> None:
    """llm-compressor's SparseGPTModifier / WandaPruningModifier, 2:4, on the same calibration tokens,
    every decoder linear (lm_head ignored), as in its examples; dampening 0.01, block 128. Needs
    llm-compressor on PYTHONPATH (`_peers.env("llmcompressor")`; never an lmpress dependency)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = dict(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    modifier = SparseGPTModifier(**common, block_size=128, dampening_frac=0.01) if "sparsegpt" in config \
        else WandaPruningModifier(**common)
    _peers.llmcompressor_oneshot(model, tok, calib, [modifier])


def recipe_for(config: str):
    from lmpress.compress import Recipe

    parts = config.split("-")
    if len(parts) not in (2, 3) or parts[0] not in ("magnitude", "wanda", "sparsegpt") or parts[1] not in ("2:4", "4:8") \
            or (len(parts) == 3 and (parts[2] not in ("w4", "norefit") or parts[0] != "sparsegpt")):
        raise SystemExit(f"unknown configuration {config!r}: use base, <magnitude|wanda|sparsegpt>-<2:4|4:8>, "
                         "sparsegpt-<2:4|4:8>-norefit or sparsegpt-2:4-w4")
    w4 = parts[2:] == ["w4"]
    scheme = dict(W4, sparsity=parts[1]) if w4 else {"sparsity": parts[1]}
    options = {"structure": parts[1], **({"refit": False} if parts[2:] == ["norefit"] else {})}
    return Recipe.from_dict({"version": 1, "name": config, "schemes": {"lm_head": None, "re:.*": scheme},
                             "stages": [{parts[0]: options}]})


def size_rows(model) -> dict:
    """Bytes of every 2:4 + int4 linear (values, positions, qparams) vs the same codes packed dense int4."""
    from lmpress.kernels.linear import PackedLinear, Sparse24Linear
    from lmpress.quant.sim import SimQuantLinear

    def nb(mod, names=None):
        return sum(t.numel() * t.element_size() for n, t in mod.named_buffers()
                   if t is not None and n != "bias" and (names is None or n in names))

    sparse = dense = sparse_codes = dense_codes = params = 0
    for _, m in model.named_modules():
        if isinstance(m, SimQuantLinear) and m.scheme.sparsity == "2:4" and m.quantized:
            s, d = Sparse24Linear.from_sim(m), PackedLinear.from_sim(m)
            sparse, dense = sparse + nb(s), dense + nb(d)
            sparse_codes += nb(s, ("weight_sparse24_values", "weight_sparse24_meta"))
            dense_codes += nb(d, ("weight_packed",))
            params += m.in_features * m.out_features
    return {"sparse_bytes": sparse, "dense_int4_bytes": dense, "sparse_code_bytes": sparse_codes,
            "dense_code_bytes": dense_codes, "params": params}


def checkpoint_check(model, tok, ids) -> dict:
    """Save, reload, check every stored 2:4 group, compare logits on one window."""
    import torch

    from lmpress.compress import load, save
    from lmpress.kernels.formats import sparse24_mask
    from lmpress.kernels.linear import Sparse24Linear
    from lmpress.prune.masks import check_nm

    with tempfile.TemporaryDirectory() as d:
        save(model, os.path.join(d, "ckpt"), tokenizer=tok)
        loaded = load(os.path.join(d, "ckpt"))
        n = 0
        for _, m in loaded.named_modules():
            if isinstance(m, Sparse24Linear):
                check_nm(sparse24_mask(m.weight_sparse24_meta, m.in_features), 2, 4, exact=True)
                check_nm(m.dense_weight(), 2, 4, exact=False)
                n += 1
        with torch.no_grad():
            a = model(ids).logits
            b = loaded(ids).logits
    return {"ckpt_sparse24_modules": n, "ckpt_logit_maxdiff": float((a - b).abs().max())}


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.calibration.data import load_text, sample_calibration, tokenize
    from lmpress.compress.models import load_model
    from lmpress.eval.ppl import perplexity
    from lmpress.prune.masks import check_nm
    from lmpress.quant.sim import SimQuantLinear

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    row = {"config": config, "compress_s": 0.0}
    text = load_text("wiki", "eval")
    if config in PEERS:
        calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.seqlen, seed=args.seed)
        t0 = time.perf_counter()
        run_peer(config, model, tok, calib)
        row["compress_s"] = time.perf_counter() - t0
        lin = [m for n_, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n_]
        for m in lin:
            check_nm(m.weight, 2, 4, exact=False)
        row["sparsity"] = sum(int((m.weight == 0).sum()) for m in lin) / sum(m.weight.numel() for m in lin)
    elif config != "base":
        row["compress_s"] = _runner.compress_timed(model, tok, recipe_for(config), args)
        n, m = (int(v) for v in config.split("-")[1].split(":"))
        zeros = total = 0
        for _, mod in model.named_modules():
            if isinstance(mod, SimQuantLinear):
                check_nm(mod.weight, n, m, exact=False)  # at most n nonzeros in every group of m
                zeros += int((mod.weight == 0).sum())
                total += mod.weight.numel()
        row["sparsity"] = zeros / total
        if config.endswith("-w4"):
            row.update(size_rows(model))
    t0 = time.perf_counter()
    res = perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows)
    row.update(ppl=res.ppl, windows=res.windows, eval_s=time.perf_counter() - t0)
    if config != "base" and config not in PEERS and config.split("-")[1] == "2:4" and not args.no_ckpt:
        ids = tokenize(tok, text)[: args.seqlen].reshape(1, -1)
        try:
            row.update(checkpoint_check(model, tok, ids))
        except Exception as e:  # keep the perplexity row; the failure is reported in it
            row["ckpt_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def table(rows: list[dict], args) -> str:
    base = next((r["ppl"] for r in rows if r["config"] == "base"), args.base_ppl)
    lines = [
        f"{args.model}, wiki eval split, {rows[0]['windows'] if rows else args.windows} windows x {args.seqlen} tokens; "
        f"calibration {args.n} x {args.seqlen} (seed {args.seed}); decoder linears pruned, lm_head dense; CPU fp32",
        "",
        "| config | ppl | vs base | sparsity | compress s | reloaded 2:4 modules | reloaded logits max diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = f"{r['ppl'] / base:.2f}x" if base else "-"
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else "-"
        ck = str(r.get("ckpt_sparse24_modules", "-"))
        diff = f"{r['ckpt_logit_maxdiff']:.1e}" if "ckpt_logit_maxdiff" in r else "-"
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {vs} | {sp} | {r['compress_s']:.1f} | {ck} | {diff} |")
    for r in rows:
        if "sparse_bytes" in r:
            lines += ["", f"size ({r['config']}, {r['params']} weights in 2:4 linears): 2:4 + int4 {r['sparse_bytes']} B "
                          f"vs dense int4 {r['dense_int4_bytes']} B = {r['sparse_bytes'] / r['dense_int4_bytes']:.3f}x "
                          f"(values, 2-bit positions and qparams included); codes alone (values + positions vs packed "
                          f"int4): {r['sparse_code_bytes'] / r['dense_code_bytes']:.3f}x"]
    return "\n".join(lines)


def add_args(p) -> None:
    _runner.protocol_args(p, n=32)
    p.add_argument("--base-ppl", type=float, default=None, help="base perplexity to compare with when `base` is not run")
    p.add_argument("--no-ckpt", action="store_true", help="skip the save/reload check")


def check(config: str, args) -> None:
    if config != "base" and config not in PEERS:
        recipe_for(config)


def peer_env(config: str, args) -> dict:
    return _peers.env("llmcompressor") if config in PEERS else {}


if __name__ == "__main__":
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=add_args, check=check, env=peer_env)
