"""Static inputs that keep each sequence's first positions in float (`inputs.sink_tokens`: the attention
sink, IntactKV / PrefixQuant): the quantizer, its calibration, and the position it is told by the model."""
from __future__ import annotations

import pytest
import torch

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress import Recipe, compress, load, save
from lmpress.compress.ct_format import why_not
from lmpress.compress.models import tiny_llama
from lmpress.kernels.kv_cache import cache_kwargs, returned_cache
from lmpress.quant import primitives
from lmpress.quant.primitives import continuing_sequence, fake_quantize_input, sink_rows, static_input_scale, without_sinks
from lmpress.quant.scheme import QuantArgs, QuantScheme

STATIC = dict(bits=4, granularity="tensor", symmetric=True, dynamic=False)


def _recipe(sinks: int, stages: str = "[gptq]") -> Recipe:
    inputs = f"{{bits: 4, granularity: tensor, symmetric: true, dynamic: false, sink_tokens: {sinks}}}"
    return Recipe.from_yaml(f'version: 1\nname: t\nschemes: {{lm_head: null, "re:.*": {{weights: {{bits: 4, granularity: '
                            f'channel, symmetric: true}}, inputs: {inputs}}}}}\nstages: {stages}\n')


def _calib(n=8, T=24, seed=3):
    toks = torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(tokens=toks, source="random", split="calib", n=n, seqlen=T, seed=seed, fingerprint=fingerprint(toks))


def test_args_validate_and_round_trip():
    args = QuantArgs(**STATIC, sink_tokens=1)
    assert args.to_dict()["sink_tokens"] == 1 and QuantArgs.from_dict(args.to_dict()) == args
    assert "sink_tokens" not in QuantArgs(**STATIC).to_dict()  # manifests written before it stay identical
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="sink_tokens"):
            QuantArgs(**STATIC, sink_tokens=bad)
    with pytest.raises(ValueError, match="static inputs"):
        QuantArgs(bits=4, granularity="token", symmetric=True, dynamic=True, sink_tokens=1)
    with pytest.raises(ValueError, match="inputs"):
        QuantScheme(weights=QuantArgs(bits=4, sink_tokens=1))


def test_sink_rows_stay_float_and_the_rest_take_the_static_grid():
    args = QuantArgs(**STATIC, sink_tokens=2)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    x[:, 0] *= 100  # a massive first token
    scale = static_input_scale(without_sinks(x, args).abs().amax(), args)
    out = fake_quantize_input(x, args, scale)
    assert torch.equal(out[:, :2], x[:, :2])
    assert torch.equal(out[:, 2:], fake_quantize_input(x[:, 2:], QuantArgs(**STATIC), scale))
    assert sink_rows(x[:, :1], args) == 1 and sink_rows(x[0, 0], args) == 0  # a 1-D x has no positions
    with continuing_sequence():  # a decode step: no row is a first position
        assert sink_rows(x, args) == 0
        assert torch.equal(fake_quantize_input(x, args, scale), fake_quantize_input(x, QuantArgs(**STATIC), scale))
    assert sink_rows(x, args) == 2
    # before calibration a static scheme quantizes per tensor from x itself, sinks included
    assert torch.equal(fake_quantize_input(x, args), fake_quantize_input(x, QuantArgs(**STATIC)))


def _spiked_sink(stages: str = "[gptq]"):
    """A tiny LLaMA compressed under static inputs with one sink token, on calibration sequences that all
    open with token 0 (found nowhere else), a spike on channel 3: after the input norm a massive value, as a
    sink's. Returns (model, calibration tokens, layer 0's q_proj input over them (n, T, in))."""
    calib = _calib()
    calib.tokens[:, 0] = 0
    calib.tokens[:, 1:] = calib.tokens[:, 1:].clamp(min=1)
    model, _ = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 0.0
        model.model.embed_tokens.weight[0, 3] = 1.0
    compress(model, _recipe(1, stages), calib)
    q = model.model.layers[0].self_attn.q_proj  # its input, the embedding's norm, is the same after compression
    seen = []
    h = q.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(calib.tokens)
    finally:
        h.remove()
    return model, q, seen[0]


def test_static_scales_are_calibrated_without_the_sink_positions():
    _, q, x = _spiked_sink()
    assert torch.allclose(q.input_scale, static_input_scale(x[:, 1:].abs().amax(), q.scheme.inputs), rtol=1e-5)
    assert x[:, 0].abs().amax() > 1.3 * x[:, 1:].abs().amax()  # the sink would have set a scale 1.3x as large


def _decode_logits(model, toks: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of `toks` (B, T): the first `prompt` tokens as one forward into a cache, then one token a step."""
    with torch.no_grad():
        out = model(toks[:, :prompt], use_cache=True)
        logits, cache = [out.logits], returned_cache(out)
        for t in range(prompt, toks.shape[1]):
            out = model(toks[:, t:t + 1], use_cache=True, **cache_kwargs(cache))
            logits.append(out.logits)
            cache = returned_cache(out)
    return torch.cat(logits, dim=1)


def _spy_sink_rows(model, got: list):
    q = model.model.layers[0].self_attn.q_proj
    return q.register_forward_pre_hook(lambda m, a: got.append(sink_rows(a[0], m.scheme.inputs)))


def _compressed_with_a_sink():
    """A tiny LLaMA compressed under static inputs with one sink token; (model, tokenizer, tokens (2, 12),
    the simulation's logits on them)."""
    calib = _calib()
    model, tok = tiny_llama(seed=0)
    compress(model, _recipe(1), calib)
    toks = calib.tokens[:2, :12]
    with torch.no_grad():
        logits = model(toks).logits
    return model, tok, toks, logits


def test_decode_steps_quantize_every_row_and_equal_the_full_forward(tmp_path):
    calib = _calib()
    model, tok, toks, full = _compressed_with_a_sink()
    rows: list[int] = []
    h = _spy_sink_rows(model, rows)
    try:
        inc = _decode_logits(model, toks, prompt=5)
    finally:
        h.remove()
    assert rows == [1] + [0] * 7  # the prompt has its sink; no decode step does
    assert torch.allclose(inc, full, atol=1e-4), (inc - full).abs().max()
    # the same model with the sink quantized too is a different model: the option is in force
    plain, _ = tiny_llama(seed=0)
    compress(plain, _recipe(0), calib)
    with torch.no_grad():
        assert not torch.allclose(plain(toks).logits, full, atol=1e-3)
    packed = load(save(model, tmp_path / "ckpt", tokenizer=tok))  # hooks are not saved: load puts them back
    with torch.no_grad():
        assert torch.allclose(packed(toks).logits, full, atol=1e-4)
    rows.clear()
    h = _spy_sink_rows(packed, rows)
    try:
        inc = _decode_logits(packed, toks, prompt=5)
    finally:
        h.remove()
    assert rows == [1] + [0] * 7 and torch.allclose(inc, full, atol=1e-4)


def test_mergequant_steps_are_taken_without_the_sink_positions():
    _, q, x = _spiked_sink("[{mergequant: {clip_search: false, samples: 8}}, gptq]")
    # with clip_search off the steps are each channel's absmax / 7 over the non-sink positions
    assert torch.equal(q.input_scale, torch.ones(1, 1)) and primitives.sink_rows(x, q.scheme.inputs) == 1
    assert x[:, 1:].abs().amax() <= 7 + 1e-3
    assert x[:, 0].abs().amax() > 7 * 2  # the sink's spike would have set channel 3's step


def test_compressed_tensors_export_refuses_it():
    fp8 = dict(bits=8, granularity="tensor", type="float")  # FP8 static: expressible but for the sinks
    scheme = QuantScheme(weights=QuantArgs(**fp8), inputs=QuantArgs(**fp8, dynamic=False, sink_tokens=1))
    assert why_not({"model.layers.0.mlp.up_proj": QuantScheme(weights=QuantArgs(**fp8), inputs=QuantArgs(**fp8))},
                   {"model.layers.0.mlp.up_proj": 64}, None, None) is None
    why = why_not({"model.layers.0.mlp.up_proj": scheme}, {"model.layers.0.mlp.up_proj": 64}, None, None)
    assert why is not None and "sink_tokens" in why


def test_static_inputs_run_the_int8_gemm_on_the_cpu_and_keep_the_sinks_float(tmp_path):
    """Static int inputs factor into the integer GEMM as per-token ones do: the simulation is `int_linear`
    with the calibrated scale (sink rows by `float_rows`), and the CPU's int8 GEMM returns it bit for bit."""
    from lmpress.kernels import cpu

    if cpu.int8mm_misfit(QuantArgs(bits=4), QuantArgs(**STATIC)) or not cpu.int8_sums("onednn"):
        pytest.skip("no exact oneDNN int8 GEMM on this CPU/torch")
    model, tok, toks, sim = _compressed_with_a_sink()
    packed = load(save(model, tmp_path / "ckpt", tokenizer=tok))
    q = packed.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, q.in_features)
    with torch.no_grad():
        ref = q._forward_ref(x, "")  # the simulation's operations: `int_linear` on the codes
        fast = q._forward_cpu(x)
        assert q.kernel_path.kind == "cpu-int8mm"
        assert torch.equal(fast, ref)
        # the sink row: float input against the dequantized weight
        assert torch.allclose(fast[:, :1], torch.nn.functional.linear(x[:, :1], q.dequantized_weight(), q.bias), atol=1e-5)
        with continuing_sequence():  # a decode step: every row on the integer GEMM, the first one quantized too
            decode = q._forward_cpu(x)
            assert torch.equal(decode, q._forward_ref(x, ""))
        assert torch.equal(decode[:, 1:], fast[:, 1:]) and not torch.allclose(decode[:, :1], fast[:, :1], atol=1e-4)
        codes, _ = cpu.static_codes(x.reshape(-1, x.shape[-1]), q.scheme.inputs, q.input_scale, zero=None)
        assert torch.equal(codes, primitives.quantize(x.reshape(-1, x.shape[-1]), q.input_scale, torch.zeros(1, 1),
                                                      q.scheme.inputs).float())
        assert torch.equal(packed(toks).logits, sim)
