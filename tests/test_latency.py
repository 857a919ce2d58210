import copy
import time

import pytest
from torch import nn

from lmpress.eval.latency import LatencyConfig, measure_latency, model_bytes

SMALL = dict(prompt_len=16, prefill_batch=2, decode_batches=(1, 4), decode_tokens=4)


class _Slow(nn.Module):
    """Wraps a causal LM and sleeps `delay` seconds per forward."""

    def __init__(self, inner: nn.Module, delay: float):
        super().__init__()
        self.inner, self.delay, self.config = inner, delay, inner.config

    def forward(self, **kw):
        time.sleep(self.delay)
        return self.inner(**kw)


def test_config_is_validated():
    with pytest.raises(ValueError, match="repeats"):
        LatencyConfig(repeats=0)
    with pytest.raises(ValueError, match="decode_batches"):
        LatencyConfig(decode_batches=(1, 0))


def test_figures_follow_the_definitions(tiny):
    model, _ = tiny
    delay = 0.1  # large against scheduling noise on a busy machine
    res = measure_latency({"fast": model, "slow": _Slow(copy.deepcopy(model), delay)}, LatencyConfig(repeats=2, **SMALL))
    fast, slow = res["fast"], res["slow"]
    assert set(fast.decode_tok_s) == {1, 4}
    assert all(len(v) == 2 for v in fast.raw.values())  # every repeat is kept
    # one forward per decode step: at most batch / delay tokens per second
    assert slow.decode_tok_s[1] < 1 / delay and slow.decode_tok_s[4] < 4 / delay
    assert slow.prefill_tok_s < 2 * 16 / delay and slow.ttft_s > delay
    assert fast.decode_tok_s[1] > slow.decode_tok_s[1] and fast.ttft_s < slow.ttft_s
    assert fast.weight_bytes == model_bytes(model) == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert fast.peak_bytes >= fast.weight_bytes
    assert "cpu" in fast.device


def test_models_alternate(tiny):
    model, _ = tiny
    calls = []

    def tag(name):
        return lambda *_: calls.append(name) if not calls or calls[-1] != name else None

    a, b = model, copy.deepcopy(model)
    a.register_forward_pre_hook(tag("a"))
    b.register_forward_pre_hook(tag("b"))
    measure_latency({"a": a, "b": b}, LatencyConfig(repeats=3, **SMALL))
    # warm-up a, b; then a b | b a | a b: the order flips every repeat
    assert calls == ["a", "b", "a", "b", "a", "b"]


def test_packed_model_weighs_less(tiny, tmp_path):
    from lmpress.compress import compress, load, save

    model, tok = tiny
    base = copy.deepcopy(model)
    compress(model, "w4a16-rtn")
    save(model, tmp_path / "a", tokenizer=tok)
    packed = load(tmp_path / "a")
    res = measure_latency({"base": base, "packed": packed}, LatencyConfig(repeats=1, **SMALL))
    assert res["packed"].weight_bytes < 0.6 * res["base"].weight_bytes
    assert res["packed"].decode_tok_s[1] > 0


def test_slower_than_base_flags_speed_figures_only():
    from lmpress.eval.latency import slower_than_base

    rec = {"ppl": 0.5, "latency/decode_tok_s@1": 0.66, "latency/decode_tok_s@8": 1.2, "latency/ttft_s": 0.75,
           "latency/prefill_tok_s": 1.0, "latency/peak_bytes": 0.2, "latency/weight_bytes": 0.3, "t/acc": None}
    assert slower_than_base(rec) == {"decode_tok_s@1": 0.66, "ttft_s": 0.75}
    assert slower_than_base({"latency/decode_tok_s@1": 1.01}) == {}


def test_latency_records_threads_and_the_runtime_paths_of_a_packed_model(tiny, tmp_path):
    import torch

    from lmpress.compress import compress, load, save

    model, tok = tiny
    q = copy.deepcopy(model)
    compress(q, "w4a16-rtn")
    packed = load(save(q, tmp_path / "q", tokenizer=tok))
    res = measure_latency({"base": model, "packed": packed}, LatencyConfig(repeats=1, **SMALL))
    assert res["base"].kernel_paths == {} and res["base"].threads == torch.get_num_threads()
    paths = res["packed"].kernel_paths
    assert sum(paths.values()) == sum(1 for m in packed.modules() if getattr(m, "kernel_path", None) is not None) > 0
    assert res["packed"].to_dict()["kernel_paths"] == paths
