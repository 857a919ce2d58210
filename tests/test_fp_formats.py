"""quant.fp: the FP8/FP6/FP4 grids and the MXFP4 / NVFP4 block formats, exact in float32."""
import pytest
import torch

from lmpress.quant import fp


def test_grids_have_the_published_values():
    assert fp.E2M1.grid().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert len(fp.E4M3.grid()) == 127 and fp.E4M3.grid()[-1] == 448 and fp.E4M3.grid()[1] == 2.0 ** -9
    assert fp.E2M3.grid()[-1] == 7.5 and fp.E3M2.grid()[-1] == 28 and len(fp.E2M3.grid()) == 32 == len(fp.E3M2.grid())


@pytest.mark.parametrize("fmt", [fp.E2M1, fp.E2M3, fp.E3M2, fp.E4M3, fp.E5M2])
def test_rounding_is_nearest_ties_to_even_and_saturating(fmt):
    """Against the grid itself (the oracle): FP8 rounds through torch's native casts, the others
    through the table's search (`fp.NATIVE`); both must be nearest, ties to even, saturating."""
    grid = fmt.grid()  # float64, ascending, non-negative
    g = torch.Generator().manual_seed(0)
    mags = torch.exp2(torch.empty(20000, dtype=torch.float64).uniform_(fmt.emin - fmt.man - 2, fmt.emax + 1.5, generator=g))
    x = torch.cat([torch.linspace(-1.5 * fmt.max, 1.5 * fmt.max, 20001, dtype=torch.float64), mags, -mags])
    x = x.float().double()  # values a float32 input can hold
    q = fp.round_to_grid(x.float(), fmt).double()
    both = torch.cat([-grid.flip(0), grid])
    assert torch.all((q[:, None] == both[None, :]).any(1))  # on the grid
    best = (x[:, None] - both[None, :]).abs().min(1).values
    inside = x.abs() <= fmt.max
    assert torch.all((q - x).abs()[inside] <= best[inside] + 1e-12)  # nearest
    assert torch.all(q[~inside].abs() == fmt.max)  # saturated
    mids = (grid[1:] + grid[:-1]) / 2
    for sign in (1, -1):
        r = fp.round_to_grid((sign * mids).float(), fmt).double().abs()
        assert torch.all(torch.searchsorted(grid, r) % 2 == 0)  # a tie goes to the even code (mantissa LSB 0)
    assert torch.equal(fp.grid_index(x.float(), fmt), torch.searchsorted(grid, q.abs()))  # the index of that value
    if fmt.name in fp.NATIVE:  # the cast the native path relies on is torch's own
        assert torch.equal(fp.round_to_grid(x[inside].float(), fmt), x[inside].float().to(fp.NATIVE[fmt.name]).float())


def test_mxfp4_scales_are_powers_of_two_with_the_shared_exponent_rule():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 96, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    s = fp.block_scales(x, fp.MXFP4)  # (6, 3)
    amax = x.abs().reshape(6, 3, 32).amax(-1)
    e = torch.floor(torch.log2(amax))
    up = amax / torch.exp2(e) >= 1.75  # compressed-tensors' / vLLM's rounding of amax to a power of two
    assert torch.equal(s, torch.exp2(e + up.float() - 2))
    assert up.any() and (~up).any()
    edge = torch.tensor([[1.75 - 2 ** -20] + [0.0] * 31, [1.75] + [0.0] * 31])  # (2, 32): just below / at the threshold
    assert fp.block_scales(edge, fp.MXFP4).flatten().tolist() == [0.25, 0.5]
    q, _ = fp.quantize_block(x, fp.MXFP4)
    assert torch.all((q.abs()[..., None] == fp.E2M1.grid().float()).any(-1))
    err = (fp.dequantize_block(q, s, fp.MXFP4) - x).abs().reshape(6, 3, 32).amax(-1)
    assert torch.all(err <= amax / 4)  # within a quarter of the group's range (E2M1 steps are at most 2 of 8)


def test_nvfp4_two_level_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=g)
    s_t = fp.tensor_scale(x)
    ratio = (s_t / (x.abs().amax() / (448 * 6))).item()  # NVIDIA's amax / (448·6), rounded up to a power of two
    assert 1 <= ratio < 2 and torch.equal(s_t, torch.exp2(torch.log2(s_t).round()))
    s_g, s_t2 = fp.nvfp4_scales(x)  # (8, 4), ()
    assert torch.equal(s_t2, s_t) and torch.equal(fp.round_to_grid(s_g, fp.E4M3), s_g)  # the group scales are E4M3 values
    assert torch.equal(fp.block_scales(x, fp.NVFP4), s_g * s_t)
    assert s_g.max() <= 448 and s_g.max() >= 224  # the largest group uses the top binade of E4M3's range
    s_g2, s_t3 = fp.split_nvfp4(s_g * s_t)  # the two levels back from their product, exactly
    assert torch.equal(s_g2 * s_t3, s_g * s_t) and torch.equal(fp.round_to_grid(s_g2, fp.E4M3), s_g2)
    with pytest.raises(ValueError, match="not NVFP4 scales"):
        fp.split_nvfp4(s_g * s_t * 1.1)
    y = fp.fake_quantize_block(x, fp.NVFP4)
    sqnr = 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())
    assert sqnr > 18  # measured on 256 x 1024 Gaussian: NVFP4 20.4 dB, MXFP4 18.8, INT4 g16 sym 21.4, INT4 g32 sym 20.3
    with pytest.raises(ValueError, match="multiple of the format's group size 16"):
        fp.block_scales(torch.randn(2, 24), fp.NVFP4)


def _fp8_reference(x: torch.Tensor) -> torch.Tensor:
    """Per-row FP8 E4M3: x / (amax / 448) on the grid, times the scale."""
    s = (x.abs().amax(dim=1, keepdim=True) / fp.E4M3.max).clamp_min(torch.finfo(torch.float32).tiny)
    return fp.round_to_grid(x / s, fp.E4M3) * s


def test_fp8_fake_quant_per_channel():
    x = torch.randn(4, 32) * torch.tensor([1e-2, 1.0, 1e2, 1e4])[:, None]
    s = x.abs().amax(dim=1, keepdim=True) / 448
    y = _fp8_reference(x)
    rel = ((y - x).abs() / x.abs().clamp_min(1e-30))[x.abs() > s * 2.0 ** -6]  # normal range of E4M3 after scaling
    assert rel.max() <= 2.0 ** -4 + 1e-6  # E4M3: 3 mantissa bits, half a step relative


# --------------------------------------------------------------------------- the schemes


from lmpress.quant.primitives import (compute_qparams, decode_fp, dequantize, encode_fp, fake_quantize,  # noqa: E402
                                      quantize)
from lmpress.quant.scheme import PRESETS, QuantArgs, QuantScheme  # noqa: E402


@pytest.mark.parametrize("kw,match", [
    (dict(bits=4, type="float"), "FP4 needs block scales"),
    (dict(bits=4, type="float", granularity="group", group_size=32, scale_format="e4m3"), "is no format"),
    (dict(bits=4, type="float", granularity="group", group_size=64, scale_format="e8m0"), "is no format"),
    (dict(bits=3, type="float"), "use bits 8"),
    (dict(bits=8, type="float", symmetric=False), "symmetric"),
    (dict(bits=4, scale_format="e8m0", granularity="group", group_size=32), "belongs to type: float"),
    (dict(bits=8, type="fp"), "type='fp' is not known"),
])
def test_float_args_refuse_what_no_format_is(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantArgs(**kw)


def test_presets_round_trip_and_old_dicts_stay_identical():
    for name in ("FP8_DYNAMIC", "NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16"):
        s = PRESETS[name]
        assert QuantScheme.from_dict(s.to_dict()) == s and s.name == name
    assert "type" not in QuantArgs(bits=4).to_dict() and "scale_format" not in QuantArgs(bits=4).to_dict()
    assert PRESETS["NVFP4"].weights.block_format == "nvfp4" and PRESETS["MXFP4A16"].weights.block_format == "mxfp4"


@pytest.mark.parametrize("args", [PRESETS["FP8_DYNAMIC"].weights, PRESETS["NVFP4A16"].weights])
def test_codes_are_the_formats_bit_patterns(args):
    q = torch.arange(args.qmin, args.qmax + 1, dtype=torch.int8)
    if args.bits == 8:
        q = q[(q.long() % 256) % 128 != 127]  # E4M3's NaN patterns are never produced
        assert torch.equal(decode_fp(q, args), q.view(torch.uint8).view(torch.float8_e4m3fn).float())
    else:  # E2M1: s e e m
        mag = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        want = [(-1.0 if (c % 16) >= 8 else 1.0) * mag[(c % 16) % 8] for c in q.tolist()]
        assert decode_fp(q, args).tolist() == want
    v = decode_fp(q, args)
    back = encode_fp(v, args)
    keep = v != 0  # -0 encodes as +0
    assert torch.equal(back[keep], q[keep])


@pytest.mark.parametrize("name", ["FP8_DYNAMIC", "NVFP4A16", "MXFP4A16"])
def test_quantize_dequantize_is_the_grid_reference(name):
    args = PRESETS[name].weights
    W = torch.randn(24, 64) * torch.logspace(-2, 2, 24)[:, None]
    s, z = compute_qparams(W, args)
    got = dequantize(quantize(W, s, z, args), s, z, args)
    if args.block_format:
        want = fp.fake_quantize_block(W, fp.BLOCK_FORMATS[args.block_format])
    else:
        want = _fp8_reference(W)
    assert torch.equal(got, want)
    assert torch.equal(fake_quantize(W, args), want)


@pytest.mark.parametrize("name", ["FP8_DYNAMIC", "NVFP4A16", "MXFP4A16"])
def test_gptq_on_the_float_grids_lowers_the_objective(name):
    from lmpress.quant.gptq import gptq_quantize, layer_objective

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = X.T @ X / 1024
    W = torch.randn(32, 64, generator=g)
    args = PRESETS[name].weights
    s, z = compute_qparams(W, args)
    rtn = layer_objective(W, dequantize(quantize(W, s, z, args), s, z, args), H)
    for act_order in (False, True):
        q, sc, ze, st = gptq_quantize(W, H, args, block_size=16, act_order=act_order)
        assert st["loss"] < 0.8 * rtn
        assert torch.equal(decode_fp(q, args), fp.round_to_grid(decode_fp(q, args), fp.E4M3 if args.bits == 8 else fp.E2M1))


@pytest.mark.parametrize("name", ["FP8_DYNAMIC", "FP8", "NVFP4", "MXFP4A16"])
@pytest.mark.parametrize("backend", ["ref", "cpu"])  # triton: tests/test_fp_gemm.py, under the interpreter
def test_packed_linear_runs_float_formats_as_the_simulation(name, backend, monkeypatch):
    from torch import nn

    from lmpress.kernels.linear import PackedLinear
    from lmpress.quant.rtn import rtn_quantize
    from lmpress.quant.sim import SimQuantLinear

    monkeypatch.setenv("LMPRESS_KERNELS", backend)
    lin = nn.Linear(256, 96)
    sim = SimQuantLinear(lin, PRESETS[name])
    sim.set_quantized(*rtn_quantize(lin.weight.detach(), PRESETS[name].weights))
    x = torch.randn(3, 7, 256)
    if sim.static_inputs:  # FP8's static scale, NVFP4's activation tensor scale: calibrated on x
        with pytest.raises(ValueError, match="never calibrated"):
            PackedLinear.from_sim(sim)
        sim.set_input_scale(x.abs().amax() * 0.5)  # half the range: the static scale saturates, as calibrated ones can
        assert not torch.equal(sim(x), fake_quantize(x, sim.scheme.inputs) @ sim.weight.T + sim.bias)
    packed = PackedLinear.from_sim(sim)
    with torch.no_grad():
        assert torch.equal(packed(x), sim(x))
    assert packed.kernel_path.kind in ("ref", "cpu-dequant")


def test_which_float_schemes_compressed_tensors_describes():
    from lmpress.compress.ct_format import why_not

    def reason(scheme):
        return why_not({"a": scheme}, {"a": 64}, None, None)

    for name in ("FP8_DYNAMIC", "FP8", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4"):
        assert reason(PRESETS[name]) is None, name
    dynamic_nvfp4 = QuantScheme(weights=PRESETS["NVFP4"].weights, inputs=QuantArgs(**{**PRESETS["NVFP4"].inputs.to_dict(), "dynamic": True}))
    assert "input_global_scale" in reason(dynamic_nvfp4)  # a per-tensor scale of each batch has no compressed-tensors form
    mxfp8 = QuantArgs(bits=8, type="float", granularity="group", group_size=32, scale_format="e8m0")
    assert reason(QuantScheme(weights=mxfp8)) is None and reason(PRESETS["MXFP8"]) is None
    assert "MXFP8 weights take MXFP8" in reason(QuantScheme(weights=mxfp8, inputs=PRESETS["MXFP4"].inputs))
    assert reason(QuantScheme(weights=PRESETS["W8A8"].weights, inputs=PRESETS["FP8_DYNAMIC"].inputs)) is None  # W8AFP8, as W4AFP8
    asym = QuantArgs(bits=4, granularity="group", group_size=32, symmetric=False)
    assert "integer weights take FP8 activations" in reason(QuantScheme(weights=asym, inputs=PRESETS["FP8_DYNAMIC"].inputs))
    assert "MXFP4 dynamic activations" in reason(QuantScheme(weights=PRESETS["MXFP4"].weights, inputs=PRESETS["FP8_DYNAMIC"].inputs))


# --------------------------------------------------------------------------- FP8 KV cache


def test_fp8_kv_args_and_fake_quant():
    from lmpress.quant.kv_cache import fake_quantize_kv_fp8
    from lmpress.quant.scheme import KV_PRESETS, KVCacheArgs

    assert "type" not in KV_PRESETS["KV4"].to_dict() and "scale" not in KV_PRESETS["KV4"].to_dict()  # older manifests unchanged
    assert KVCacheArgs.from_dict(KV_PRESETS["FP8_KV"].to_dict()) == KV_PRESETS["FP8_KV"]
    with pytest.raises(ValueError, match="an FP8 cache is bits 8"):
        KVCacheArgs(bits=4, type="float", scale="tensor", symmetric=True, key_granularity="token")
    with pytest.raises(ValueError, match="belongs to the FP8 cache"):
        KVCacheArgs(bits=4, scale="head")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 16, generator=g) * torch.tensor([1.0, 10.0, 0.1])[None, :, None, None]  # (B, heads, T, D)
    s = torch.tensor([0.01, 0.05, 0.001])  # (heads,): head 1 saturates at 448 * 0.05 = 22.4 (no), head 0 at 4.48
    y = fake_quantize_kv_fp8(x, s, per_head=True)
    ref = (x / s[None, :, None, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s[None, :, None, None]
    assert torch.equal(y, ref)  # torch's own E4M3 cast, saturated first
    dyn = fake_quantize_kv_fp8(x, None)  # not calibrated: the tensor's own absmax
    assert torch.equal(dyn, fake_quantize_kv_fp8(x, x.abs().amax().reshape(1) / 448))


@pytest.mark.parametrize("scale", ["tensor", "head"])
def test_fp8_kv_cache_is_calibrated_saved_and_loaded(tmp_path, scale):
    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.compress import Recipe, compress, inspect, load, save
    from lmpress.compress.models import tiny_llama
    from lmpress.kernels.attention import observe_kv

    toks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(tokens=toks, source="random", split="calib", n=4, seqlen=32, seed=0, fingerprint=fingerprint(toks))
    model, tok = tiny_llama(seed=0)
    recipe = Recipe.load("kv-fp8") if scale == "tensor" else Recipe.from_yaml(
        "version: 1\nname: h\nschemes: {}\nkv_cache: {preset: FP8_KV, scale: head}\nstages: [kv_cache, act_scales]\n")
    compress(model, recipe, calib)
    settings = [m.self_attn.lmpress_attn for m in model.model.layers]
    shape = (2, 1, 1) if scale == "head" else (1,)  # tiny_llama: 2 KV heads; compressed-tensors' shapes
    assert all(s.k_scale.shape == shape and s.v_scale.shape == shape for s in settings)
    with torch.no_grad(), observe_kv(model):  # the whole model on the calibration set: the same ranges
        model(toks)
    for s, k, v in zip(settings, [s.k_scale.clone() for s in settings], [s.v_scale.clone() for s in settings]):
        assert torch.allclose(s.k_scale, k, rtol=1e-5) and torch.allclose(s.v_scale, v, rtol=1e-5)
    path = save(model, tmp_path / "a", tokenizer=tok)
    assert inspect(path)["kv_cache"]["type"] == "float"
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(path)(x).logits, model(x).logits)


def test_fp8_kv_cache_needs_its_calibration():
    from lmpress.compress import Recipe
    from lmpress.compress.models import tiny_llama
    from lmpress.kernels.attention import attach_attention, attention_specs
    from lmpress.compress.arch import arch_for
    from lmpress.quant.scheme import KV_PRESETS

    with pytest.raises(ValueError, match="add `- kv_cache: {}` and, after it, `- act_scales: {}`"):
        Recipe.from_yaml("version: 1\nname: x\nschemes: {}\nkv_cache: FP8_KV\nstages: [kv_cache]\n")
    model, _ = tiny_llama(seed=0)
    attach_attention(model, arch_for(model), kv=KV_PRESETS["FP8_KV"])
    with pytest.raises(ValueError, match="never calibrated"):
        attention_specs(model)


def test_fp8_kv_cache_in_compressed_tensors_form(tmp_path):
    pytest.importorskip("compressed_tensors")
    import json

    from safetensors.torch import load_file

    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.compress import Recipe, compress, load, save
    from lmpress.compress.models import tiny_llama
    from lmpress.eval.stock import stock_logits
    from lmpress.kernels.attention import cache_quant_off

    toks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(tokens=toks, source="random", split="calib", n=4, seqlen=32, seed=0, fingerprint=fingerprint(toks))
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    paths, plain = [], {}
    for scale in ("tensor", "head", "kv-only"):
        model, tok = tiny_llama(seed=0)
        recipe = Recipe.load("kv-fp8") if scale == "kv-only" else Recipe.from_yaml(
            "version: 1\nname: k\nschemes: {lm_head: null, 're:.*': FP8_DYNAMIC}\n"
            f"kv_cache: {{preset: FP8_KV, scale: {scale}}}\nstages: [kv_cache, rtn, act_scales]\n")
        compress(model, recipe, calib)
        path = save(model, tmp_path / scale, tokenizer=tok)
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == ("dense" if scale == "kv-only" else "float-quantized")
        assert qc["kv_cache_scheme"]["strategy"] == {"tensor": "tensor", "head": "attn_head", "kv-only": "tensor"}[scale]
        state = load_file(str(path / "model.safetensors"))
        s = model.model.layers[1].self_attn.lmpress_attn
        assert torch.equal(state["model.layers.1.self_attn.k_scale"], s.k_scale) and not any("lmpress_attn" in k for k in state)
        back = load(path)
        with torch.no_grad():
            assert torch.equal(back(x).logits, model(x).logits)  # the FP8 cache comes back (scales and settings)
            with cache_quant_off(back):
                plain[str(path)] = back(x).logits
        paths.append(path)
    stock = stock_logits(paths, x)  # transformers 5.25 + compressed-tensors 0.20: no kv_cache_scheme hook
    for p in paths:
        assert ((stock[str(p)] - plain[str(p)]).abs().max() / plain[str(p)].abs().max()).item() <= 1e-4


@pytest.mark.parametrize("scheme,last", [("MXFP4", "rtn"), ("NVFP4", "gptq")])
def test_flatquant_on_the_fp4_grids(tmp_path, scheme, last):
    """FlatQuant's transforms and clips are learned under the FP4 fake-quant (its STE on the E2M1
    grid), then RTN or GPTQ (NVFP4: calibrating the activation tensor scale) on the same grid."""
    from lmpress.calibration.data import CalibrationSet, fingerprint
    from lmpress.compress import Recipe, compress, load, save
    from lmpress.compress.models import tiny_llama

    toks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(tokens=toks, source="random", split="calib", n=8, seqlen=32, seed=0, fingerprint=fingerprint(toks))
    d = Recipe.load("w4a4kv4-flatquant").to_dict()
    d["schemes"] = {"lm_head": None, "re:.*": scheme}
    d["stages"] = [{"flatquant": {**d["stages"][0]["flatquant"], "samples": 8, "epochs": 1}}, {"kv_cache": {}}, {last: {}}]
    model, tok = tiny_llama(seed=0)
    compress(model, Recipe.from_dict(d), calib)
    wrapped = model.model.layers[0].mlp.down_proj
    assert type(wrapped.transform).__name__ == "KronTransform"  # the learned transform sits on the input
    path = save(model, tmp_path / scheme, tokenizer=tok)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(path)(x).logits, model(x).logits)
    assert wrapped.linear.scheme.weights.block_format == scheme.lower() and wrapped.linear.quantized


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_fp8_weight_tiles(method):
    """FP8_BLOCK: one float32 scale per 64 x 64 tile (edge tiles partial), absmax / 448; GPTQ keeps
    the tiles' scales (static, from the original weight) and lowers the layer objective."""
    from lmpress.quant.gptq import gptq_quantize, layer_objective
    from lmpress.quant.primitives import dequantize
    from lmpress.quant.rtn import rtn_quantize

    args = QuantArgs(bits=8, type="float", granularity="block", group_size=64)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(96, 160, generator=g) * torch.logspace(-2, 1, 160)[None, :]  # (out, in): 2 x 3 tiles
    ref = torch.zeros_like(W)
    for i in range(0, 96, 64):
        for j in range(0, 160, 64):
            t = W[i:i + 64, j:j + 64]
            ref[i:i + 64, j:j + 64] = fp.round_to_grid(t / (t.abs().max() / 448), fp.E4M3) * (t.abs().max() / 448)
    q, s, z = rtn_quantize(W, args)
    assert s.shape == (2, 3) and torch.equal(dequantize(q, s, z, args), ref)
    if method == "gptq":
        X = torch.randn(256, 160, generator=g) * torch.logspace(-2, 1, 160)[None, :]
        H = X.T @ X
        q2, s2, z2, _ = gptq_quantize(W, H, args)
        assert torch.equal(s2, s)
        assert layer_objective(W, dequantize(q2, s2, z2, args), H) < layer_objective(W, ref, H)
    with pytest.raises(ValueError, match="granularity 'block'"):
        QuantArgs(bits=4, granularity="block", group_size=64)
