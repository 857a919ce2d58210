"""The foundation's claims on the real SmolLM2-135M (marked slow: converted once, then cached)."""
import pytest
import torch

from lmpress.compress import Recipe, compress, load, save

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from lmpress.compress.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def eval_text():
    from lmpress.calibration.data import load_text

    return load_text("wiki", split="eval")


def test_packed_checkpoint_reproduces_simulated_logits(smollm2, tmp_path):
    from lmpress.compress.models import load_model

    model, tok = load_model("smollm2-135m")  # a fresh copy: compress works in place
    compress(model, "w4a16-rtn")
    ids = tok("The capital of France is Paris. " * 16, return_tensors="pt").input_ids
    with torch.no_grad():
        sim = model(ids).logits
        out = save(model, tmp_path / "w4a16", tokenizer=tok)
        packed = load(out)(ids).logits
    assert (packed - sim).abs().max().item() <= 1e-4


def test_w8a8_smoothquant_rtn_within_two_percent(smollm2, eval_text):
    """8 windows and 64 calibration sequences here (the closing note reports 64 windows). With 16
    sequences the margin was thin and the CPU decided it: 1.0216 on an AMX Xeon, under 1.02 on an AVX2
    EPYC. On the Xeon, 8 windows with 64 sequences: 1.0111; 64 windows with 16, 32, 128 sequences:
    1.0188, 1.0162, 1.0105."""
    from lmpress.calibration.data import sample_calibration
    from lmpress.eval.ppl import perplexity

    model, tok = smollm2
    base = perplexity(model, tok, eval_text, seqlen=512, windows=8).ppl
    compress(model, Recipe.load("w8a8-smoothquant-rtn"), calib=sample_calibration(tok, "wiki", n=64, seqlen=512))
    w8a8 = perplexity(model, tok, eval_text, seqlen=512, windows=8).ppl
    assert w8a8 / base < 1.02, (base, w8a8)
