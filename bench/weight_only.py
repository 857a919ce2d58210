"""Weight-only quantization on SmolLM2-135M at 4 and 3 bits: lmpress's RTN, GPTQ, AWQ, AWQ + GPTQ,
learned rounding (SignRound), QuaRot + GPTQ with offline rotations only and SqueezeLLM
dense-and-sparse, beside llm-compressor's GPTQ and AWQ and AutoRound (issue 24's table).

    python bench/weight_only.py                          # 128 x 512 calibration, 64 x 512 eval windows
    python bench/weight_only.py --n 32 --windows 16      # a quicker look
    python bench/weight_only.py --configs base,w4-rtn,w4-squeezellm,w4-llmc-gptq

Configurations: `base`, and `w<bits>-<method>` with bits 4 or 3 and method
- `rtn`: min-max round to nearest;
- `gptq`: GPTQ (act-order, static groups, true-sequential; recipe w4a16-gptq);
- `awq`: AWQ scales and clipping search, then RTN (recipe w4a16-awq);
- `awq-gptq`: AWQ, then GPTQ on the scaled weights (recipe w4a16-awq-gptq);
- `signround`: learned rounding, 200 SignSGD steps a layer (recipe w4a16-signround; with the library
  of 83f5ad4 on, against the float model's output of each layer, AutoRound's reference, and the
  least-loss step kept; before, against the float layer on the quantized inputs, the last step kept);
- `quarot-gptq`: fused norms, R1 and R2 offline (no online op: a plain model), then GPTQ (recipe
  w4a16-quarot-gptq; with the library of c49288e on, that recipe searches the clipping: `mse_clip`);
- `spinquant-gptq` (library c49288e on): learned R1 / R2 fused offline, then GPTQ with `mse_clip`
  (recipe w4a16-spinquant-gptq);
- `squeezellm`: per-channel Fisher-weighted k-means codebooks with 0.45% of the weights kept
  exactly in a sparse part (recipe w4a16-squeezellm / w3a16-squeezellm);
- peers, run by llm-compressor 0.13 (installed on first use into an isolated folder, `_peers.py`)
  on the same calibration tokens: `llmc-gptq` (GPTQModifier, static act-order), `llmc-awq`
  (AWQModifier, its LLaMA mappings, duo scaling), `autoround` (llm-compressor's AutoRoundModifier
  over auto-round 0.14.2, 200 iterations a block; llm-compressor 0.13 drops AutoRound's zero points,
  `_peers.autoround_zero_points` gives them back and the row records how many had differed);
- ideas, not in the default list: `gptq-mse`, `quarot-gptq-mse`, `awq-gptq-mse` (the recipe with the
  weights' clipping ratio searched for the least squared error, `mse_clip`), `quarot-signround` (the
  offline rotations, then learned rounding instead of GPTQ), `spinquant-gptq-mse` (learned R1 / R2,
  SpinQuant's, 100 steps on the next-token loss, fused offline, then GPTQ with `mse_clip`;
  `spinquant200-gptq-mse` the same with 200 steps), `spinquant-signround` (the learned rotations,
  then learned rounding instead of GPTQ), `signround-float-layer` (library 83f5ad4 on: learned
  rounding as it was before, against the float layer on the quantized inputs, the last step kept),
  `signround-amp` (the stage's `amp`, added after 83f5ad4: its steps under bfloat16 autocast, AutoRound's amp),
  `signround-ar` (added after 58e75c5: AutoRound's zero point with a gradient, `zero_grad`, and its random batches,
  `sampler: random`),
  `gptq-damp10` and `gptq-mse-damp10` (GPTQ's damping 10% of the mean Hessian diagonal instead of 1%),
  `gptaq` (added after 60b1cb0: GPTQ solved towards the float model's output, stage option `gptaq: 0.25`; the
  recipe w4a16-gptaq since 392f67e), `gptaq-mse` (the same with `mse_clip`), `quarot-gptaq-mse` (the offline
  rotations of quarot-gptq, then GPTAQ with `mse_clip`), `awq-gptaq-mse` (AWQ's scales, then GPTAQ with `mse_clip`),
  `gptaq50-mse` and `quarot-gptaq50-mse` (the same with GPTAQ's alpha 0.5 instead of 0.25), `quarot-gptaq100-mse`
  (alpha 1: the exact least squares), `gptq-cap100`, `gptq-mse-cap100`, `gptaq-mse-cap100` and
  `quarot-gptaq-mse-cap100` (added after ae6825e: stage gptq's `token_cap: 100`, each token's share of the
  Hessian capped at 100 times its batch's median, against the attention sink's massive activations),
  `signround-normed` (added after 2fcd0fb: signround's `loss: normed`, each token's squared error divided by
  its reference hidden state's mean square, as the next RMSNorm divides it),
  `squeezellm-plain` (k-means without the Fisher weights), `squeezellm-s20` (0.20% sparse instead of 0.45%: W3 at
  3.30 bits per weight, below uniform g64's 3.3125), `squeezellm-gptq` and `squeezellm-gptq-s20` (added after
  da35be8: the same codebooks and sparse part, the codes chosen by GPTQ's error compensation, stage option `gptq`).
- `--val pydoc`: a third text (Python's reference documentation, `pydoc_text`; or any source of load_text), for
  choosing settings that generalize without looking at `--ood`: rows then report its perplexity and the share of
  RTN's gap closed there too. An idea for the out-of-domain rule is judged by that rule on the validation text
  (below RTN, at least half of the wiki share kept); the `--ood` columns only report. Rows on `--val pydoc`
  calibrate on wiki alone (the `-mix` rows calibrate on pydoc, so they have no held-out validation there).
- `<method or idea>-mix` (e.g. `w4-gptq-mix`): calibrated on the mix `MIX` (wiki 3 parts, Python's reference
  documentation 1 part) instead of wiki alone; the row's `calib` names it (rows w4-gptq-mix, w4-gptq-mse-mix and
  w4-squeezellm-mix are in the f4cc7ab table).
The table of bench/results/weight_only-f4cc7ab.jsonl carries on with `--resume` only from a checkout whose
library folders are f4cc7ab's (`git restore --source=f4cc7ab --staged --worktree -- calibration compress eval kernels prune quant
pyproject.toml constraints.txt` in a clone of main, committed there): rows are reused on equal library trees.
bench/results/weight_only-83f5ad4.jsonl holds the rows of signround's new reference (library tree 9292d727e79c,
main at 83f5ad4: base, w4-rtn and w3-rtn there equal the f4cc7ab table's to the last digit; w4-signround and
w3-signround with the new reference).
bench/results/weight_only-f4cc7ab-val.jsonl holds rows with `--val pydoc` on the f4cc7ab library (base and RTN again,
with their pydoc figures; ideas gptq-damp10, gptq-mse-damp10, squeezellm-plain, squeezellm-s20, and w4-gptq once
more: on the AMD machine of that run it gives 19.293, against 19.192 in the f4cc7ab table from another machine, so
compare GPTQ rows within one file). bench/results/weight_only-7ce128d.jsonl holds w4-gptaq, w4-gptaq-mse and
w3-gptaq-mse (library 7ce128d, `--val pydoc`); bench/results/weight_only-58e75c5.jsonl w3-squeezellm-gptq-s20 and
w4-squeezellm-gptq (library 58e75c5, `--val pydoc`); bench/results/weight_only-fb9d8ea.jsonl w3-quarot-gptaq-mse,
w4-quarot-gptaq-mse, w3-rtn with its pydoc figure, w3-quarot-gptaq50-mse, w3-gptaq50-mse and w3-quarot-gptaq100-mse
(library fb9d8ea, `--val pydoc`); bench/results/weight_only-2fcd0fb.jsonl w4-gptq-cap100 and w4-gptq-mse-cap100
(library 2fcd0fb, `--val pydoc`, AMD: compare w4-gptq-cap100 with the f4cc7ab-val file's w4-gptq);
bench/results/weight_only-fa040ce.jsonl w3-signround-normed (library fa040ce, `--val pydoc`, AMD), exactly the
recipe w3a16-signround.
All integer rows are groups of 64, asymmetric; the W3 rows are the same recipes with 3-bit weights.
lm_head and the embeddings stay in high precision. Columns: perplexity on the wiki eval split
(first `--windows` windows of `--seqlen` tokens) and its ratio to the base; the same on the
out-of-domain text (`--ood`, default the built-in `canterbury` source: Carroll's Alice first, a
text no recipe calibrates or tunes on); the share of RTN's gap (same width) each row closes on
each text; bits per weight of the quantized linears (codes + an fp16 scale and a 4-bit zero point
per group of 64 as compressed-tensors packs them; SqueezeLLM: codes, fp16 codebooks and the CSR
part as stored); compression seconds; the child process's peak RSS; whether the reloaded packed
model gives the simulated logits (lmpress rows).
"""
from __future__ import annotations

import time

import _peers
import _runner

METHODS = {"rtn": "w4a16-rtn", "gptq": "w4a16-gptq", "awq": "w4a16-awq", "awq-gptq": "w4a16-awq-gptq",
           "signround": "w4a16-signround", "quarot-gptq": "w4a16-quarot-gptq", "squeezellm": "w{bits}a16-squeezellm",
           "spinquant-gptq": "w4a16-spinquant-gptq"}  # the last: library c49288e on
PEERS = {"llmc-gptq": "llmcompressor", "llmc-awq": "llmcompressor", "autoround": "autoround"}


def _mse(data: dict) -> None:
    data["schemes"]["re:.*"]["weights"]["mse_clip"] = True


def _signround_after_rotation(data: dict) -> None:
    from lmpress.compress import Recipe

    learn = Recipe.load(METHODS["signround"]).to_dict()["stages"]  # the w4a16-signround recipe's own stage
    data["stages"] = [s for s in data["stages"] if "gptq" not in s] + learn
    data["schemes"]["re:.*"]["weights"].pop("mse_clip", None)  # signround learns the clipping itself


def _options(stage: str, **options):
    """A tweak that sets `options` of the recipe's stage `stage`."""
    def tweak(data: dict) -> None:
        for s in data["stages"]:
            if stage in s:
                s[stage].update(options)
    return tweak


def _learned_rotation(data: dict, steps: int = 100) -> None:
    """quarot-gptq's randomized Hadamard R1 / R2 replaced by SpinQuant's learned ones (Cayley SGD on the
    next-token loss under the weights' RTN fake-quant, all fused offline), and GPTQ with `mse_clip`."""
    learn = {"steps": steps, "lr": 1.5, "momentum": 0.9, "max_step": 0.05, "batch_size": 1, "samples": None, "seqlen": 256,
             "loss": "ce", "weights": True, "r2": True, "init": "hadamard", "seed": 0, "keep_best": True, "holdout": 4,
             "online": []}
    data["stages"] = [{"learn_rotation": learn} if "rotate" in s else s for s in data["stages"]]
    _mse(data)


# ideas tried on the table's protocol (issue 24: "each idea tried"), built here from a library recipe so the
# library tree stays the table's: method -> (the method it starts from, what it changes in the recipe's dict)
IDEAS = {"gptq-mse": ("gptq", _mse), "quarot-gptq-mse": ("quarot-gptq", _mse), "awq-gptq-mse": ("awq-gptq", _mse),
         "quarot-signround": ("quarot-gptq", _signround_after_rotation), "spinquant-gptq-mse": ("quarot-gptq", _learned_rotation),
         "spinquant200-gptq-mse": ("quarot-gptq", lambda d: _learned_rotation(d, steps=200)),
         "spinquant-signround": ("quarot-gptq", lambda d: (_learned_rotation(d), _signround_after_rotation(d))),
         # signround as before 83f5ad4: each layer against the float layer on its quantized inputs, the last step kept
         "signround-float-layer": ("signround", _options("signround", reference="float_layer", keep_best=False)),
         # signround's steps under bfloat16 autocast (AutoRound's amp; the choices between steps stay float32)
         "signround-amp": ("signround", _options("signround", amp=True)),
         # AutoRound's two remaining choices (library 58e75c5 on): gradients through the zero point, random batches
         "signround-ar": ("signround", _options("signround", zero_grad=True, sampler="random")),
         # GPTQ's damping at 10% of the mean Hessian diagonal instead of 1%: a stronger isotropic prior where the
         # calibration text has little variance (for the out-of-domain rule; chosen on the validation text, not on --ood)
         "gptq-damp10": ("gptq", _options("gptq", damp=0.1)),
         "gptq-mse-damp10": ("gptq", lambda d: (_mse(d), _options("gptq", damp=0.1)(d))),
         # GPTAQ (library 60b1cb0 on): GPTQ towards the float model's output, its alpha 0.25
         "gptaq": ("gptq", _options("gptq", gptaq=0.25)),
         "gptaq-mse": ("gptq", lambda d: (_mse(d), _options("gptq", gptaq=0.25)(d))),
         "quarot-gptaq-mse": ("quarot-gptq", lambda d: (_mse(d), _options("gptq", gptaq=0.25)(d))),
         "awq-gptaq-mse": ("awq-gptq", lambda d: (_mse(d), _options("gptq", gptaq=0.25)(d))),
         # GPTAQ's alpha at 0.5 instead of the paper's 0.25 (1 is the exact least squares): judged on the validation text
         "gptaq50-mse": ("gptq", lambda d: (_mse(d), _options("gptq", gptaq=0.5)(d))),
         "quarot-gptaq50-mse": ("quarot-gptq", lambda d: (_mse(d), _options("gptq", gptaq=0.5)(d))),
         "quarot-gptaq100-mse": ("quarot-gptq", lambda d: (_mse(d), _options("gptq", gptaq=1.0)(d))),
         # (library after ae6825e) each token's share of the Hessian capped at 100x the batch's median: the
         # attention sink's massive activations no longer fill the Hessians of a few down_proj
         "gptq-cap100": ("gptq", _options("gptq", token_cap=100)),
         "gptq-mse-cap100": ("gptq", lambda d: (_mse(d), _options("gptq", token_cap=100)(d))),
         "gptaq-mse-cap100": ("gptq", lambda d: (_mse(d), _options("gptq", gptaq=0.25, token_cap=100)(d))),
         "quarot-gptaq-mse-cap100": ("quarot-gptq", lambda d: (_mse(d), _options("gptq", gptaq=0.25, token_cap=100)(d))),
         # (library after 2fcd0fb) signround's loss on each token's error relative to its hidden state's mean square
         "signround-normed": ("signround", _options("signround", loss="normed")),
         # SqueezeLLM's k-means unweighted (no Fisher): the codebooks see no calibration text
         "squeezellm-plain": ("squeezellm", _options("squeezellm", fisher=False)),
         # SqueezeLLM with 0.20% sparse (0.15% outliers, 0.05% Fisher-sensitive) instead of 0.45%: at 3 bits its bits
         # per weight (3.30) are then below uniform g64's 3.3125, for "SqueezeLLM 3-bit beats W3 GPTQ at equal bits"
         "squeezellm-s20": ("squeezellm", _options("squeezellm", outliers=0.0015, sensitive=0.0005)),
         # SqueezeLLM's codebooks and sparse part, its codes chosen by GPTQ's error compensation (library da35be8 on)
         "squeezellm-gptq": ("squeezellm", _options("squeezellm", gptq=True)),
         "squeezellm-gptq-s20": ("squeezellm", _options("squeezellm", gptq=True, outliers=0.0015, sensitive=0.0005))}
# the order of a full run: the rows each target compares first, the slow ones last
DEFAULT_CONFIGS = ",".join(["base"] + [f"w{b}-{m}" for m in ("rtn", "gptq", "squeezellm", "awq-gptq", "quarot-gptq", "llmc-gptq",
                                                               "llmc-awq", "awq", "signround", "autoround") for b in (4, 3)])
GROUP = 64
# `<method>-mix`: a method or idea calibrated on a mix of sources instead of wiki alone (issue 24, item 5):
# wiki's calibration split 3 parts, Python's reference documentation (the `pydoc_data.topics` that ships
# with CPython: technical prose and code, another domain than wiki and than the out-of-domain text) 1 part.
# Fixed before any run of it; its share was never tuned on the out-of-domain windows.
MIX = "wiki@3+{pydoc}@1"


def pydoc_text() -> str:
    """The path of Python's reference documentation as one text file (written once into lmpress's cache)."""
    import os
    import sys

    import pydoc_data.topics

    from lmpress.compress.models import cache_dir

    path = cache_dir() / f"pydoc-topics-{sys.version_info[0]}.{sys.version_info[1]}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)), encoding="utf-8")
        tmp.replace(path)
    return str(path)


def calib_source(method: str) -> str:
    """The calibration source of a method: the mix for `<method>-mix`, else wiki."""
    return MIX.format(pydoc=pydoc_text()) if method.endswith("-mix") else "wiki"


def parse(config: str) -> tuple[int, str]:
    bits, _, method = config.partition("-")
    plain = method.removesuffix("-mix")
    if bits not in ("w4", "w3") or (plain not in METHODS and plain not in IDEAS and (plain != method or method not in PEERS)):
        raise SystemExit(f"unknown configuration {config!r}: use base or w4|w3-<{'|'.join([*METHODS, *IDEAS, *PEERS])}>, "
                         f"or w4|w3-<method or idea>-mix (calibrated on {MIX.format(pydoc='pydoc')})")
    return int(bits[1]), method


def recipe_for(config: str):
    from lmpress.compress import Recipe

    bits, method = parse(config)
    method = method.removesuffix("-mix")
    start, tweak = IDEAS.get(method, (method, None))
    data = Recipe.load(METHODS[start].format(bits=bits)).to_dict()
    if start != "squeezellm":
        weights = data["schemes"]["re:.*"].setdefault("weights", {})
        weights.update(bits=bits, group_size=GROUP, symmetric=False)
        data["name"] = f"{data['name']}-w{bits}" if bits != 4 else data["name"]
    if tweak is not None:
        tweak(data)
        data["name"] = f"{data['name']}+{method}"
    return Recipe.from_dict(data)


def peer_modifiers(bits: int, method: str, args) -> list:
    """llm-compressor modifiers (imported in the child, from the peer folder) for a peer row."""
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if method == "llmc-gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static")]
    if method == "llmc-awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(config_groups=groups, ignore=["lm_head"], duo_scaling=True)]
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    return [AutoRoundModifier(config_groups=groups, ignore=["lm_head"], iters=args.autoround_iters, enable_torch_compile=False)]


def bits_per_weight(model, bits: int) -> float:
    """Stored bits over weights of the quantized linears: SqueezeLLM modules as stored, else the uniform
    grid's codes + fp16 scale + 4-bit zero point per group."""
    from lmpress.kernels.linear import LUTLinear

    luts = [m for m in model.modules() if isinstance(m, LUTLinear)]
    if not luts:
        return bits + (16 + 4) / GROUP
    return sum(m.bits_per_weight() * m.in_features * m.out_features for m in luts) / sum(m.in_features * m.out_features for m in luts)


def ood_ppl(model, tok, args) -> dict:
    """Perplexity on the out-of-domain text (`ood_ppl`) and, with `--val`, on the validation text (`val_ppl`)."""
    from lmpress.calibration.data import load_text
    from lmpress.eval.ppl import perplexity

    out = {}
    for key, source in (("ood", args.ood), ("val", val_source(args))):
        if source is not None:
            t0 = time.perf_counter()
            out[f"{key}_ppl"] = perplexity(model, tok, load_text(source, "eval"), seqlen=args.seqlen, windows=args.windows).ppl
            out[f"{key}_eval_s"] = time.perf_counter() - t0
    return out


def val_source(args) -> str | None:
    """The validation text's source: `--val pydoc` is Python's reference documentation (`pydoc_text`)."""
    return pydoc_text() if args.val == "pydoc" else args.val


def run_one(config: str, args) -> dict:
    import torch

    from lmpress.calibration.data import sample_calibration
    from lmpress.compress.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    row = {"config": config, "compress_s": 0.0}
    if config != "base":
        bits, method = parse(config)
        if method in PEERS:
            calib = sample_calibration(tok, "wiki", n=args.n, seqlen=args.seqlen, seed=args.seed)
            t0 = time.perf_counter()
            mended = _peers.llmcompressor_oneshot(model, tok, calib, peer_modifiers(bits, method, args))
            row["compress_s"] = time.perf_counter() - t0
            row.update(mended)
            row["versions"] = _runner.versions("llmcompressor", "compressed-tensors", "auto-round")
            left = sorted({str(t.dtype) for t in model.state_dict().values() if t.is_floating_point() and t.dtype != torch.float32})
            if left:  # AutoRound tunes under bf16 autocast where the CPU has bf16 and leaves its weights in bf16
                row["peer_cast_from"] = left  # to fp32 (exact) for the fp32 evaluation every row gets
                model.float()
        else:
            source = calib_source(method)
            row["compress_s"] = _runner.compress_timed(model, tok, recipe_for(config), args, source=source)
            row["calib"] = source if source == "wiki" else MIX.format(pydoc="pydoc")
            row.update(_runner.packed_check(model, args))
        row["bpw"] = bits_per_weight(model, bits)
    row.update(_runner.wiki_ppl(model, tok, args))
    row.update(ood_ppl(model, tok, args))
    return row


def _closed(r: dict, base: dict | None, rtn: dict | None, key: str) -> str:
    """The share of RTN's gap to the base that row `r` closes on `key` ("ppl" or "ood_ppl")."""
    if not base or not rtn or r is rtn or key not in r or rtn[key] <= base[key]:
        return "-"
    return f"{(rtn[key] - r[key]) / (rtn[key] - base[key]):+.0%}"


def table(rows: list[dict], args) -> str:
    ok = {r["config"]: r for r in rows if "error" not in r}
    base = ok.get("base")
    val = f" {args.val} ppl | RTN gap closed ({args.val}) |" if args.val else ""
    lines = [
        f"{args.model}; wiki eval split and `{args.ood}`, first {args.windows} windows x {args.seqlen} tokens each; "
        f"calibration wiki {args.n} x {args.seqlen} (seed {args.seed}); groups of {GROUP}, asymmetric; lm_head kept; "
        f"CPU fp32, {args.threads} threads",
        "",
        f"| config | by | wiki ppl | vs base | {args.ood} ppl | vs base | RTN gap closed (wiki / {args.ood}) | bits/weight "
        f"| compress s | peak RSS MiB | packed = simulated |{val}",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + "---:|---:|" * bool(val),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | | error: {r['error'][:80]} | | | | | | | | |" + " | |" * bool(val))
            continue
        method = r["config"].partition("-")[2]
        by = "llm-compressor" if method.startswith("llmc") else "auto-round" if method == "autoround" else "lmpress"
        rtn = ok.get(r["config"].partition("-")[0] + "-rtn")
        vs = f"{r['ppl'] / base['ppl']:.3f}x" if base else "-"
        vs_ood = f"{r['ood_ppl'] / base['ood_ppl']:.3f}x" if base and "ood_ppl" in r else "-"
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") else "32"
        eq = {True: "yes", False: "NO"}.get(r.get("packed_equal"), "-")
        lines.append(f"| {r['config']} | {by} | {r['ppl']:.3f} | {vs} | {r.get('ood_ppl', float('nan')):.3f} | {vs_ood} | "
                     f"{_closed(r, base, rtn, 'ppl')} / {_closed(r, base, rtn, 'ood_ppl')} | {bpw} | {r['compress_s']:.0f} | "
                     f"{r.get('max_rss_mib', 0):.0f} | {eq} |"
                     + (f" {r.get('val_ppl', float('nan')):.3f} | {_closed(r, base, rtn, 'val_ppl')} |" if val else ""))
    return "\n".join(lines)


def add_args(p) -> None:
    _runner.protocol_args(p)
    p.add_argument("--ood", default="canterbury", help="the out-of-domain eval text (a source of load_text; default canterbury)")
    p.add_argument("--val", default=None, help="a third text, to choose settings for generalizing on (`pydoc`, or a source "
                   "of load_text); rows then report its perplexity too (default: none)")
    p.add_argument("--autoround-iters", type=int, default=200, help="AutoRound iterations a block (default 200)")


def check(config: str, args) -> None:
    if config != "base":
        bits, method = parse(config)
        if (plain := method.removesuffix("-mix")) in METHODS or plain in IDEAS:
            recipe_for(config)


def peer_env(config: str, args) -> dict:
    method = config.partition("-")[2]
    return _peers.env(PEERS[method]) if method in PEERS else {}


if __name__ == "__main__":
    _runner.main(run_one, table, doc=__doc__, configs=DEFAULT_CONFIGS, add_args=add_args, check=check, env=peer_env,
                 errors_in_table=True)
