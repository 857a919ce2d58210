"""SmolLM2-135M artifacts in other runtimes: compressed-tensors in stock transformers, GPTQ
export round trip, `from_pretrained` of an lmpress-only artifact.

    flock /tmp/lmpress-heavy.lock .venv/bin/python bench/export_check.py --out /tmp/export-check
    flock /tmp/lmpress-heavy.lock .venv/bin/python bench/export_check.py --configs quarot --windows 8

Protocol: logits of the first 2 x 256 tokens of the bundled wiki eval split, fp32 on CPU.
`stock` = `AutoModelForCausalLM.from_pretrained(dir, dtype=float32)` in a subprocess that never
imports lmpress (it checks `sys.modules`); `lmpress` = `lmpress.compress.load(dir)`. GPTQ runs
with `--n` calibration sequences of 512 tokens (seed 0). The W8A8 row also reports lmpress's
logits with compressed-tensors' activation rule (absmax/127.5, the reference forward transformers
runs) substituted for lmpress's (absmax/127, as vLLM's kernel). `quarot` compares
`from_pretrained` after `import lmpress.compress` with `load()`, and its perplexity (first
`--windows` windows of 512 tokens, no BOS) with the simulated model's before saving.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {  # cheapest first
    "w8a8": {"base": "w8a8-rtn", "scheme": None},
    "quarot": {"base": "w4a4kv4-quarot-rtn", "scheme": None},
    "gptq-g64": {"base": "w4a16-gptq", "scheme": None},  # int4 groups of 64, asymmetric
    "gptq-ch": {"base": "w4a16-gptq", "scheme": {"preset": "W4A16", "weights": {"granularity": "channel", "symmetric": True}}},
}


def _recipe(cfg):
    from lmpress.compress import Recipe

    r = Recipe.load(cfg["base"])
    if cfg["scheme"] is None:
        return r
    d = r.to_dict()
    d["schemes"] = {"lm_head": None, "re:.*": cfg["scheme"]}
    d["name"] = f"{d['name']}-custom"
    return Recipe.from_dict(d)


def _stock(path: Path, tokens: torch.Tensor, work: Path) -> torch.Tensor:
    from lmpress.eval.stock import stock_logits

    return stock_logits([path], tokens)[str(path)]


def _ct_rule(x, args, scale=None, zero=None):
    s = x.abs().amax(dim=-1, keepdim=True) / ((args.qmax - args.qmin) / 2)
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(s.dtype).eps), s)
    return torch.clamp(torch.round(x / s), args.qmin, args.qmax) * s


def run(name: str, out: Path, n: int, windows: int, model_name: str = "smollm2-135m") -> dict:
    from lmpress.calibration.data import load_text, sample_calibration
    from lmpress.compress import compress, inspect, load, save
    from lmpress.compress.models import load_model
    from lmpress.eval.ppl import perplexity

    cfg = CONFIGS[name]
    model, tok = load_model(model_name)
    text = load_text("wiki", "eval")
    tokens = tok(text, return_tensors="pt").input_ids[0, :512].view(2, 256)
    recipe = _recipe(cfg)
    cal = sample_calibration(tok, "wiki", n=n, seqlen=512, seed=0) if recipe.needs_calibration else None
    t0 = time.perf_counter()
    compress(model, recipe, calib=cal)
    row = {"config": name, "recipe": recipe.name, "compress_s": round(time.perf_counter() - t0, 1)}
    if name == "quarot":
        row["ppl_simulated"] = perplexity(model, tok, text, seqlen=512, windows=windows).ppl
    path = save(model, out / name, tokenizer=tok, overwrite=True)
    del model
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    row["quant_method"], row["format"] = qc["quant_method"], qc.get("format")
    row["runtimes"] = inspect(path)["runtimes"]
    ours = load(path)
    with torch.no_grad():
        ref = ours(tokens).logits
    if name == "quarot":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            row["max_abs_diff_from_pretrained_vs_load"] = (hf(tokens).logits - ref).abs().max().item()
        row["ppl_from_pretrained"] = perplexity(hf, tok, text, seqlen=512, windows=windows).ppl
        row["ppl_rel_diff"] = row["ppl_from_pretrained"] / row["ppl_simulated"] - 1
        row["windows"] = windows
        return row
    with tempfile.TemporaryDirectory() as work:
        stock = _stock(path, tokens, Path(work))
    row["max_abs_diff_stock_vs_load"] = (stock - ref).abs().max().item()
    if name == "w8a8":
        import lmpress.kernels.linear as lin

        orig, lin.fake_quantize = lin.fake_quantize, _ct_rule
        try:
            with torch.no_grad():
                row["max_abs_diff_stock_vs_load_ct_rule"] = (stock - load(path)(tokens).logits).abs().max().item()
        finally:
            lin.fake_quantize = orig
        return row
    from lmpress.compress.export import export_gptq, read_gptq

    g = export_gptq(path, out / f"{name}-gptq", dtype=torch.float32, overwrite=True)
    _, mods, _ = read_gptq(g)
    same = all(torch.equal(m["weight_packed"], ours.get_submodule(f).weight_packed)
               and torch.equal(m["weight_scale"], ours.get_submodule(f).weight_scale)
               and ((m["weight_zero_point"] is None and ours.get_submodule(f).weight_zero_point is None)
                    or torch.equal(m["weight_zero_point"], ours.get_submodule(f).weight_zero_point))
               for f, m in mods.items())
    row["gptq_round_trip_identical"] = same
    row["gptq_modules"] = len(mods)
    export_gptq(path, out / f"{name}-gptq-fp16", overwrite=True)  # the usual fp16 form, for other readers
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lmpress-export-check"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--n", type=int, default=16, help="GPTQ calibration sequences of 512 tokens")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama for a quick check of this script")
    a = ap.parse_args()
    rows = []
    for name in a.configs.split(","):
        row = run(name, a.out, a.n, a.windows, a.model)
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    (a.out / "export_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
