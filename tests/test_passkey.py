"""Passkey retrieval (eval/passkey.py): deterministic prompts of exactly n_ctx tokens with the needle at
its depth, answer scoring, and a run through generate with the default and a quantized runtime cache."""
from __future__ import annotations

import torch

from lmpress.compress.models import byte_tokenizer, tiny_llama
from lmpress.eval.passkey import NEEDLE, PasskeyResult, answer_key, passkey_accuracy, passkey_samples

TEXT = "".join(f"Sentence number {i} of a long and irrelevant haystack. " for i in range(400))


def test_samples_are_deterministic_and_exactly_n_ctx_tokens():
    tok = byte_tokenizer()
    a = passkey_samples(tok, n_ctx=600, n=5, seed=3, text=TEXT)
    b = passkey_samples(tok, n_ctx=600, n=5, seed=3, text=TEXT)
    assert [s.key for s in a] == [s.key for s in b] and all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    assert [s.depth for s in a] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for s in a:
        assert s.ids.shape == (600,) and len(s.key) == 5 and s.key.isdigit()
        text = tok.decode(s.ids)
        needle = NEEDLE.format(key=s.key)
        assert text.count(needle) == 1 and text.endswith("The pass key is")
        where = text.index(needle) / len(text)
        assert abs(where - s.depth) < 0.35  # the needle moves from the start to the end of the haystack
    assert [s.key for s in passkey_samples(tok, n_ctx=600, n=5, seed=4, text=TEXT)] != [s.key for s in a]


def test_answer_key_reads_the_first_five_digits():
    assert answer_key(" 71432. Remember") == "71432"
    assert answer_key(" 7143 then 12345 and 99999") == "12345"
    assert answer_key(" unknown") is None


def test_too_short_a_text_is_refused():
    import pytest

    with pytest.raises(ValueError, match="longer"):
        passkey_samples(byte_tokenizer(), n_ctx=600, n=1, text="short")


def test_accuracy_runs_through_generate_with_either_cache():
    from lmpress.compress import compress
    from lmpress.kernels.kv_cache import QuantizedKVCache

    model, tok = tiny_llama()
    samples = passkey_samples(tok, n_ctx=300, n=2, seed=0, text=TEXT)
    res = passkey_accuracy(model, tok, samples, max_new_tokens=4)
    assert isinstance(res, PasskeyResult) and res.n == 2 and res.n_ctx == 300 and 0.0 <= res.accuracy <= 1.0
    assert set(res.by_depth) == {0.0, 1.0} and len(res.answers) == 2
    compress(model, "kv2-kivi")
    q = passkey_accuracy(model, tok, samples, max_new_tokens=4, make_cache=QuantizedKVCache)
    sim = passkey_accuracy(model, tok, samples, max_new_tokens=4)
    assert q.answers == sim.answers  # the runtime cache decodes as the simulation does
