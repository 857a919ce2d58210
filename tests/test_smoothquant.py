import pytest
import torch

from lmpress.calibration.data import CalibrationSet, fingerprint
from lmpress.compress import Recipe, compress
from lmpress.quant.smooth import smoothing_factors


def _calib(tokens):
    return CalibrationSet(tokens=tokens, source="random", split="calib", n=tokens.shape[0], seqlen=tokens.shape[1], seed=0, fingerprint=fingerprint(tokens))


def test_smoothing_is_exact_in_float64(tiny, tokens):
    model, _ = tiny
    model = model.double()
    ref = model(tokens).logits
    # only the smoothing runs (no quantization stage, a weight-only scheme on the head that
    # nothing quantizes): the float model must be unchanged
    recipe = Recipe.from_yaml("schemes: {lm_head: W8A16}\nstages: [{smoothquant: {alpha: 0.8}}]\n")
    compress(model, recipe, calib=_calib(tokens))
    assert (model(tokens).logits - ref).abs().max().item() <= 1e-8
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(96, dtype=torch.float64))


def test_smoothing_factors_balance_ranges():
    a = torch.tensor([100.0, 1.0, 0.0])
    w = [torch.tensor([[0.01, 1.0, 1.0]])]
    s = smoothing_factors(a, w, alpha=0.5)
    assert s[0] == pytest.approx(100.0) and s[1] == pytest.approx(1.0) and s[2] == 1.0
    # after smoothing, activation and weight ranges of channel 0 meet: 100/s = 0.01*s = 1
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(a, w, alpha=2)


def test_smoothquant_needs_calibration_and_valid_alpha(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="need calibration data"):
        compress(model, Recipe.from_yaml("schemes: {'re:.*': W8A8}\nstages: [smoothquant, rtn]\n"))
    with pytest.raises(ValueError, match="alpha"):
        Recipe.from_yaml("stages: [{smoothquant: {alpha: 3}}]\n")
