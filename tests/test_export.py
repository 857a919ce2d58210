"""Artifacts other runtimes load: compressed-tensors form, GPTQ export, `from_pretrained` via lmpress.

The stock-transformers checks run in a subprocess that never imports lmpress."""
import json

import pytest
import torch
from typer.testing import CliRunner

from lmpress.cli.main import app
from lmpress.compress import Recipe, compress, inspect, load, save
from lmpress.compress.export import export_gptq, load_gptq, read_gptq, to_gptq
from lmpress.eval.stock import stock_logits
from lmpress.kernels.linear import PackedLinear
from lmpress.quant.scheme import QuantArgs

SCHEMES = {  # tiny model: input widths 96 and 160, so groups of 32 divide every layer
    "w4a16-g32-asym": "{preset: W4A16, weights: {group_size: 32, symmetric: false}}",
    "w4a16-channel": "{preset: W4A16, weights: {granularity: channel}}",
    "w8a8": "W8A8",  # activations absmax/127.5 (full_range), compressed-tensors' rule
    "w8a8-vllm-rule": "{preset: W8A8, inputs: {full_range: false}}",  # absmax/127: expressible, not identical
    "w3a16-g32": "{preset: W3A16, weights: {group_size: 32, symmetric: false}}",  # 3-bit fields straddle words
    "w8a16-channel": "W8A16",
}


def _recipe(scheme: str) -> Recipe:
    return Recipe.from_yaml(f'version: 1\nname: t\nschemes: {{lm_head: null, "re:.*": {scheme}}}\nstages: [rtn]\n')


def _artifact(tiny, tmp_path, name: str, recipe) -> tuple:
    model, tok = tiny
    compress(model, _recipe(SCHEMES[name]) if name in SCHEMES else recipe)
    return model, save(model, tmp_path / name, tokenizer=tok)


def _qc(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _stock_logits(paths, tokens, tmp_path=None) -> dict:
    return stock_logits(paths, tokens, timeout=300)


def test_compressed_tensors_artifacts_load_in_stock_transformers(tmp_path, tokens, monkeypatch):
    pytest.importorskip("compressed_tensors")
    import lmpress.kernels.linear as packed_linear
    from lmpress.compress.models import tiny_llama

    paths, ours = {}, {}
    for name in SCHEMES:
        _, path = _artifact(tiny_llama(seed=0), tmp_path, name, None)
        qc = _qc(path)
        assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
        assert qc["format"] == ("int-quantized" if name.startswith("w8a8") else "pack-quantized")
        assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
        paths[name] = path
        with torch.no_grad():
            ours[name] = load(path)(tokens).logits
    stock = _stock_logits(paths.values(), tokens, tmp_path)
    # weight-only: same weights, same logits
    for name in ("w4a16-g32-asym", "w4a16-channel", "w3a16-g32", "w8a16-channel"):
        diff = (stock[str(paths[name])] - ours[name]).abs().max().item()
        assert diff <= 1e-4, (name, diff)
    # W8A8: same int8 weights and, with the preset's full_range rule, the same activation codes as
    # compressed-tensors' reference forward. That forward sums dequantized fp32 products (fake-quant +
    # F.linear); ours sums the integer codes and scales after (`int_linear`, as int8 kernels do), which
    # differs per layer by rounding (max 4e-3 on logits of max 2 here). Run the fake-quant way, ours is it.
    assert (stock[str(paths["w8a8"])] - ours["w8a8"]).abs().max().item() <= 1e-2
    monkeypatch.setattr(packed_linear, "int_factored", lambda weights, inputs: False)
    monkeypatch.setenv("LMPRESS_KERNELS", "ref")
    with torch.no_grad():
        fq = {name: load(paths[name])(tokens).logits for name in ("w8a8", "w8a8-vllm-rule")}
    assert (stock[str(paths["w8a8"])] - fq["w8a8"]).abs().max().item() <= 1e-4
    # the absmax/127 rule (vLLM's) is a different quantizer: transformers runs it differently
    assert (stock[str(paths["w8a8-vllm-rule"])] - fq["w8a8-vllm-rule"]).abs().max().item() > 1e-3


FP_SCHEMES = {  # tiny model: input widths 96 and 160, multiples of 16 and 32
    "fp8-dynamic": "FP8_DYNAMIC",
    "fp8-w8a16-tensor": "{preset: FP8_DYNAMIC, inputs: null, weights: {granularity: tensor}}",
    "nvfp4a16": "NVFP4A16",
    "nvfp4a16-mse": "{preset: NVFP4A16, weights: {mse_clip: true}}",  # per-group clip ratios under one tensor scale
    "mxfp4a16": "MXFP4A16",
    "mxfp4": "MXFP4",
    "mxfp8a16": "MXFP8A16",
    "mxfp8": "MXFP8",
    "w4afp8-g32": "{preset: W4AFP8, weights: {group_size: 32}}",  # int4 weights, FP8 per-token activations
    "fp8-block32": "{preset: FP8_BLOCK, weights: {group_size: 32}, inputs: {group_size: 32}}",  # 32 x 32 tiles, groups of 32
}


def test_float_artifacts_load_in_stock_transformers(tmp_path, tokens):
    pytest.importorskip("compressed_tensors")
    from lmpress.compress.models import tiny_llama

    fmts = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "w4afp8": "pack-quantized",
            "mxfp8": "mxfp8-quantized"}
    paths, ours = {}, {}
    for name, scheme in FP_SCHEMES.items():
        model, tok = tiny_llama(seed=0)
        compress(model, _recipe(scheme))
        paths[name] = path = save(model, tmp_path / name, tokenizer=tok)
        qc = _qc(path)
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmts[name.split("a16")[0].split("-")[0]], (name, qc)
        with torch.no_grad():
            ours[name] = load(path)(tokens).logits
            assert torch.equal(ours[name], model(tokens).logits), name  # load() is the in-memory model
    stock = _stock_logits(paths.values(), tokens, tmp_path)
    for name, path in paths.items():
        # MX W4A4 / W8A8 keep activation quantization, so not compressed-tensors' dequantize-at-load
        # route: in float32 their bfloat16-decompressed weights need the cast (exact: E2M1 / E4M3 x 2^k)
        key = str(path) + (":cast" if name in ("mxfp4", "mxfp8") else "")
        assert key in stock, (name, sorted(stock))
        diff = ((stock[key] - ours[name]).abs().max() / ours[name].abs().max()).item()
        assert diff <= 1e-4, (name, diff)
    assert "cast the Linear weights" in inspect(paths["mxfp4"])["runtimes"]["transformers"]
    assert "cast" not in inspect(paths["nvfp4a16"])["runtimes"]["transformers"]


def test_static_activation_scales_load_in_stock_transformers(tmp_path, tokens):
    """FP8 (per-tensor weights, a calibrated static activation scale) and NVFP4 W4A4 (the activation
    tensor scale calibrated, group scales at run time) by GPTQ and by RTN + act_scales."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file

    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.compress.models import tiny_llama

    toks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))
    calib = CalibrationSet(tokens=toks, source="random", split="calib", n=8, seqlen=32, seed=5, fingerprint=fingerprint(toks))
    paths, ours = {}, {}
    for scheme in ("FP8", "NVFP4"):
        for stages in ("[gptq]", "[rtn, act_scales]"):
            model, tok = tiny_llama(seed=0)
            recipe = Recipe.from_yaml(f'version: 1\nname: t\nschemes: {{lm_head: null, "re:.*": {scheme}}}\nstages: {stages}\n')
            compress(model, recipe, calib)
            sims = [m for m in model.modules() if hasattr(m, "static_inputs")]
            assert sims and all(m.input_scale is not None and m.input_scale.shape == (1, 1) for m in sims)
            name = f"{scheme}-{stages[1:4]}"
            paths[name] = path = save(model, tmp_path / name, tokenizer=tok)
            state = load_file(str(path / "model.safetensors"))
            key = "model.layers.1.self_attn.o_proj"
            scale = model.get_submodule(key).input_scale
            if scheme == "FP8":
                assert _qc(path)["format"] == "float-quantized" and torch.equal(state[f"{key}.input_scale"], scale.reshape(1))
            else:
                assert _qc(path)["format"] == "nvfp4-pack-quantized"
                assert _qc(path)["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
                assert torch.equal(state[f"{key}.input_global_scale"], 1 / scale.reshape(1))
            with torch.no_grad():
                ours[name] = load(path)(tokens).logits
                assert torch.equal(ours[name], model(tokens).logits), name
    stock = _stock_logits(paths.values(), tokens, tmp_path)
    for name, path in paths.items():
        key = str(path) + (":cast" if name.startswith("NVFP4") else "")  # W4A4 FP4: see test_float_artifacts_...
        diff = ((stock[key] - ours[name]).abs().max() / ours[name].abs().max()).item()
        assert diff <= 1e-4, (name, diff)


def test_static_activation_scales_are_refused_where_they_cannot_be_calibrated(tiny):
    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.quant.scheme import QuantScheme

    model, _ = tiny
    toks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(tokens=toks, source="random", split="calib", n=2, seqlen=16, seed=0, fingerprint=fingerprint(toks))
    with pytest.raises(ValueError, match="add `- act_scales: {}` after the weight stage"):
        Recipe.from_yaml('version: 1\nname: t\nschemes: {lm_head: null, "re:.*": FP8}\nstages: [rtn]\n')
    with pytest.raises(ValueError, match="static activation scales are calibrated on the decoder layers' linears only"):
        compress(model, Recipe.from_yaml('version: 1\nname: t\nschemes: {"re:.*": FP8}\nstages: [rtn, act_scales]\n'), calib)
    with pytest.raises(ValueError, match="dynamic: false takes one calibrated scale"):
        QuantScheme(weights=QuantArgs(bits=8), inputs=QuantArgs(bits=8, granularity="channel"))


@pytest.mark.parametrize("name", ["fp8-dynamic", "fp8-w8a16-tensor", "nvfp4a16", "mxfp4"])
def test_float_tensor_layout_is_compressed_tensors(tmp_path, name):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from safetensors.torch import load_file

    from lmpress.compress import ct_format
    from lmpress.compress.models import tiny_llama

    model, tok = tiny_llama(seed=0)
    compress(model, _recipe(FP_SCHEMES[name]))
    path = save(model, tmp_path / name, tokenizer=tok)
    state = load_file(str(path / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj"  # 96 x 160
    pl = load(path).model.layers[0].mlp.down_proj
    w = pl.dequantized_weight()  # (96, 160)
    assert f"{key}.weight_shape" not in state
    scale = state[f"{key}.weight_scale"]
    if name.startswith("fp8"):
        assert state[f"{key}.weight"].dtype == torch.float8_e4m3fn and state[f"{key}.weight"].shape == (96, 160)
        assert scale.shape == ((96, 1) if name == "fp8-dynamic" else (1,))
        assert torch.equal(state[f"{key}.weight"].float() * scale, w)
        return
    packed = state[f"{key}.weight_packed"]
    assert packed.dtype == torch.uint8 and packed.shape == (96, 80)
    values = unpack_fp4_from_uint8(packed, 96, 160, dtype=torch.float32)  # compressed-tensors' own reader
    if name == "nvfp4a16":
        assert scale.dtype == torch.float8_e4m3fn and scale.shape == (96, 10)
        gs = state[f"{key}.weight_global_scale"]
        assert gs.shape == (1,) and torch.equal(gs, torch.exp2(torch.log2(gs).round()))  # a power of two
        dense = values * (scale.float() / gs).repeat_interleave(16, dim=1)
    else:
        assert scale.dtype == torch.uint8 and scale.shape == (96, 5)
        dense = values * torch.exp2(scale.float() - 127).repeat_interleave(32, dim=1)
    assert torch.equal(dense, w)
    back = ct_format.from_disk(dict(state), {key: pl.scheme}, _qc(path)["format"])
    for buf in ("weight_packed", "weight_scale", "weight_shape"):
        assert torch.equal(back[f"{key}.{buf}"], getattr(pl, buf)), buf


@pytest.mark.parametrize("preset_name", ["FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 224)])
def test_float_disk_form_round_trips_over_odd_shapes(preset_name, shape):
    from lmpress.compress import ct_format
    from lmpress.kernels.formats import pack
    from lmpress.quant.primitives import compute_qparams, quantize
    from lmpress.quant.scheme import preset

    s = preset(preset_name)
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g) * torch.logspace(-4, 2, shape[0])[:, None]  # rows over six decades
    scale, zero = compute_qparams(w, s.weights)
    runtime = {"l.weight_packed": pack(quantize(w, scale, zero, s.weights), s.weights.bits), "l.weight_scale": scale,
               "l.weight_shape": torch.tensor(shape, dtype=torch.int64)}
    fmt = ct_format.format_for(s)
    disk = ct_format.to_disk(runtime, {"l": s}, fmt)
    assert "l.weight_shape" not in disk
    back = ct_format.from_disk(dict(disk), {"l": s}, fmt)
    assert sorted(back) == sorted(runtime)
    for k in runtime:
        assert torch.equal(back[k], runtime[k]), k


def test_compressed_tensors_tensor_layout(tiny, tmp_path):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from safetensors.torch import load_file

    model, path = _artifact(tiny, tmp_path, "w4a16-g32-asym", None)
    sim = model.model.layers[0].mlp.down_proj  # 96 x 160, 5 groups
    state = load_file(str(path / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj"
    assert state[f"{key}.weight_packed"].dtype == torch.int32 and state[f"{key}.weight_packed"].shape == (96, 20)
    assert state[f"{key}.weight_zero_point"].dtype == torch.int32 and state[f"{key}.weight_zero_point"].shape == (12, 5)
    assert state[f"{key}.weight_shape"].tolist() == [96, 160]
    codes = ct.unpack_from_int32(state[f"{key}.weight_packed"], 4, torch.Size([96, 160]))
    assert torch.equal(codes, sim.weight_codes)
    zp = ct.unpack_from_int32(state[f"{key}.weight_zero_point"], 4, torch.Size([96, 5]), packed_dim=0)
    assert torch.equal(zp.float(), sim.weight_zero_point.float())
    assert torch.equal(state[f"{key}.weight_scale"], sim.weight_scale.float())

    model, path = _artifact(tiny_llama_fresh(), tmp_path, "w8a8", None)
    state = load_file(str(path / "model.safetensors"))
    assert state[f"{key}.weight"].dtype == torch.int8 and f"{key}.weight_shape" not in state
    assert torch.equal(state[f"{key}.weight"], model.model.layers[0].mlp.down_proj.weight_codes)


def tiny_llama_fresh():
    from lmpress.compress.models import tiny_llama

    return tiny_llama(seed=0)


MIXED = ('version: 1\nname: mixed\nschemes: {lm_head: null, down_proj: W8A16, '
         '"re:.*": {preset: W4A16, weights: {group_size: 32}}}\nstages: [rtn]\n')


@pytest.mark.parametrize("recipe,reason", [
    ("w4a16-rtn", "group size 64 does not divide"),  # 96 and 160 are not multiples of 64
    ("w4a4kv4-quarot-rtn", "online transforms"),
    ("w4a4-rtn", "activations"),
    (MIXED, "mixed precision"),
])
def test_what_compressed_tensors_cannot_describe_stays_lmpress(tiny, tokens, tmp_path, recipe, reason):
    model, tok = tiny
    compress(model, Recipe.from_yaml(recipe) if "\n" in recipe else Recipe.load(recipe))
    path = save(model, tmp_path / "a", tokenizer=tok)
    assert _qc(path)["quant_method"] == "lmpress"
    rt = inspect(path)["runtimes"]
    assert reason in rt["vLLM"] and "import lmpress" in rt["transformers"]


def test_inspect_and_load_of_a_compressed_tensors_artifact(tiny, tokens, tmp_path):
    model, path = _artifact(tiny, tmp_path, "w8a8", None)
    info = inspect(path)
    assert info["runtimes"]["vLLM"].startswith("yes") and "without lmpress" in info["runtimes"]["transformers"]
    assert info["modules"]["model.layers.0.mlp.down_proj"]["shape"] == [96, 160]
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0 and "vLLM: yes (compressed-tensors int-quantized)" in res.output
    with torch.no_grad():
        assert (load(path)(tokens).logits - model(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("recipe", ["w4a4kv4-quarot-rtn", "w4a4kv4-flatquant"])
def test_lmpress_artifact_loads_with_from_pretrained(tiny, tokens, tmp_path, text_file, recipe):
    from transformers import AutoModelForCausalLM

    from lmpress.calibration.data import sample_calibration
    from lmpress.kernels.online import RotatedInput

    model, tok = tiny
    calib = sample_calibration(tok, text_file, n=4, seqlen=32, seed=0) if recipe.endswith("flatquant") else None
    compress(model, recipe, calib=calib)
    path = save(model, tmp_path / "q", tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(path)  # lmpress.compress is imported: quant_method lmpress is known
    assert isinstance(hf.model.layers[0].mlp.down_proj, RotatedInput)
    assert isinstance(hf.model.layers[0].mlp.down_proj.linear, PackedLinear)
    assert hf.config._attn_implementation == "lmpress"
    with torch.no_grad():
        diff = (hf(tokens).logits - load(path)(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff


def _gptq_reference_pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack loop, written out: u (in, out) unsigned -> (in*bits/32, out)."""
    per = 32 // bits
    rows = []
    for r in range(u.shape[0] // per):
        word = torch.zeros(u.shape[1], dtype=torch.int64)
        for j in range(per):
            word |= u[r * per + j].to(torch.int64) << (bits * j)
        rows.append(word)
    w = torch.stack(rows)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


@pytest.mark.parametrize("name", ["w4a16-g32-asym", "w4a16-channel"])
@pytest.mark.parametrize("fmt", ["gptq_v2", "gptq"])
def test_gptq_export_round_trips(tiny, tokens, tmp_path, name, fmt):
    _, path = _artifact(tiny, tmp_path, name, None)
    ours = load(path)
    out = export_gptq(path, tmp_path / f"{name}-{fmt}", checkpoint_format=fmt, dtype=torch.float32)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == fmt and qc["group_size"] == (32 if "g32" in name else -1) and qc["desc_act"] is False
    _, modules, _ = read_gptq(out)
    assert set(modules) == {n for n, m in ours.named_modules() if isinstance(m, PackedLinear)}
    for fqn, m in modules.items():
        pl = ours.get_submodule(fqn)
        assert torch.equal(m["weight_packed"], pl.weight_packed) and torch.equal(m["weight_scale"], pl.weight_scale)
        if pl.weight_zero_point is None:
            assert m["weight_zero_point"] is None
        else:
            assert torch.equal(m["weight_zero_point"], pl.weight_zero_point)
    # the layout, against AutoGPTQ's packing loop and GPTQ's dequantization (g_idx, z + 1 in v1)
    from safetensors.torch import load_file

    st = load_file(str(out / "model.safetensors"))
    pl, key = ours.model.layers[1].mlp.down_proj, "model.layers.1.mlp.down_proj"
    q = pl.dequantized_weight()  # (96, 160)
    codes = torch.round(q / pl.weight_scale.repeat_interleave(32 if "g32" in name else 160, 1)[:, :160])
    zero = pl.weight_zero_point if pl.weight_zero_point is not None else torch.zeros_like(pl.weight_scale)
    u = (codes + zero.repeat_interleave(32 if "g32" in name else 160, 1)[:, :160] + 8).to(torch.int64)  # unsigned codes
    assert torch.equal(st[f"{key}.qweight"], _gptq_reference_pack(u.t(), 4))
    zu = (zero + 8).to(torch.int64) - (1 if fmt == "gptq" else 0)  # (96, n_groups)
    assert torch.equal(st[f"{key}.qzeros"], _gptq_reference_pack(zu, 4).t().contiguous())  # packed along out
    shifts = torch.arange(8) * 4
    uu = ((st[f"{key}.qweight"].unsqueeze(1).to(torch.int64) >> shifts.view(1, 8, 1)) & 15).reshape(160, 96)  # (in, out)
    zz = ((st[f"{key}.qzeros"].unsqueeze(2).to(torch.int64) >> shifts.view(1, 1, 8)) & 15).reshape(-1, 96)  # (groups, out)
    zz = zz + (1 if fmt == "gptq" else 0)
    g = st[f"{key}.g_idx"].long()
    w = (st[f"{key}.scales"][g] * (uu - zz[g])).t()  # (out, in), GPTQ's formula
    assert torch.equal(w, pl.dequantized_weight())
    with torch.no_grad():
        assert (load_gptq(out)(tokens).logits - ours(tokens).logits).abs().max().item() <= 1e-4


def test_gptq_export_float16_and_refusals(tiny, tmp_path):
    _, path = _artifact(tiny, tmp_path, "w4a16-g32-asym", None)
    ours = load(path)
    out = export_gptq(path, tmp_path / "fp16")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    _, modules, rest = read_gptq(out)
    m, pl = modules["model.layers.0.self_attn.q_proj"], ours.model.layers[0].self_attn.q_proj
    assert torch.equal(m["weight_packed"], pl.weight_packed)
    assert torch.equal(m["weight_scale"], pl.weight_scale.half().float())
    assert rest["model.embed_tokens.weight"].dtype == torch.float16
    # v1 stores z - 1: an unsigned zero point of 0 has no encoding
    args = QuantArgs(bits=4, granularity="channel", symmetric=False)
    zero = torch.full((8, 1), -8.0)
    with pytest.raises(ValueError, match="gptq_v2"):
        to_gptq(torch.zeros(8, 1, dtype=torch.int32), torch.ones(8, 1), zero, args, 8, checkpoint_format="gptq")
    assert to_gptq(torch.zeros(8, 1, dtype=torch.int32), torch.ones(8, 1), zero, args, 8)["qzeros"].tolist() == [[0]]
    # what GPTQ cannot describe is refused with the reason, from the CLI too
    model, tok = tiny_llama_fresh()
    compress(model, "w4a4kv4-quarot-rtn")
    q = save(model, tmp_path / "q")
    res = CliRunner().invoke(app, ["export", str(q), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "cannot be exported as GPTQ" in res.output and "online transforms" in res.output
    res = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "y"), "--format", "gptq-v1", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "y" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"


def test_lm_eval_hf_model_loads_an_lmpress_artifact(tiny, tokens, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from lmpress.kernels.online import RotatedInput

    model, tok = tiny
    compress(model, "w4a4kv4-quarot-rtn")
    path = save(model, tmp_path / "q", tokenizer=tok)
    lm = HFLM(pretrained=str(path), device="cpu", batch_size=1)  # lm-eval's `--model hf --model_args pretrained=DIR`
    assert isinstance(lm.model.model.layers[1].mlp.down_proj, RotatedInput)
    with torch.no_grad():
        assert (lm.model(tokens).logits - load(path)(tokens).logits).abs().max().item() <= 1e-4
