"""Token-level perplexity: the protocol on the tiny model, the reference figure on SmolLM2."""
from __future__ import annotations

import math

import pytest
import torch

from lmpress.compress.models import tiny_llama
from lmpress.eval.ppl import PerplexityResult, perplexity, perplexity_from_ids

TEXT = "Perplexity is the exponential of the mean negative log-likelihood. " * 4  # 272 bytes


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _hand_nll(model, ids: list[int], seqlen: int, windows: int) -> float:
    losses = []
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor(ids[w * seqlen:(w + 1) * seqlen])
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)  # (seqlen, vocab)
            losses.append(-sum(logp[t, x[t + 1]].item() for t in range(seqlen - 1)) / (seqlen - 1))
    return sum(losses) / len(losses)


def test_matches_hand_computed(tiny):
    model, tok = tiny
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    r = perplexity(model, tok, TEXT, seqlen=64, batch_size=3)
    assert isinstance(r, PerplexityResult)
    assert (r.windows, r.seqlen, r.tokens) == (len(ids) // 64, 64, len(ids) // 64 * 64) == (4, 64, 256)
    nll = _hand_nll(model, ids, 64, 4)
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_bos_and_batch_size(tiny):
    model, tok = tiny
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    r = perplexity(model, tok, TEXT, seqlen=64, add_bos=True)
    assert r.nll == pytest.approx(_hand_nll(model, [tok.bos_token_id] + ids, 64, 4), rel=1e-5)
    a = perplexity_from_ids(model, torch.tensor(ids), seqlen=32, batch_size=1)
    b = perplexity_from_ids(model, torch.tensor([ids]), seqlen=32, batch_size=5, progress=True)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


def test_windows_bound(tiny):
    model, tok = tiny
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    r = perplexity(model, tok, TEXT, seqlen=64, windows=2)
    assert r.windows == 2 and r.tokens == 128
    assert r.nll == pytest.approx(_hand_nll(model, ids, 64, 2), rel=1e-5)
    assert perplexity(model, tok, TEXT, seqlen=64, windows=100).windows == 4  # capped at what exists


def test_too_short(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "short", seqlen=64)
    with pytest.raises(ValueError, match="windows"):
        perplexity(model, tok, TEXT, seqlen=64, windows=0)


@pytest.mark.slow
def test_smollm2_reference_ppl():
    """The reference figure: fp32, wiki eval split, first 64 windows of 512 tokens, no BOS."""
    from lmpress.calibration.data import load_text
    from lmpress.compress.models import load_model

    model, tok = load_model("smollm2-135m", dtype=torch.float32)  # converted once, then cached
    r = perplexity(model.float(), tok, load_text("wiki", "eval"), seqlen=512, windows=64, batch_size=8)
    assert r.windows == 64
    assert r.ppl == pytest.approx(16.51, abs=0.01)
