"""Latency and memory of causal LMs, several models measured in the same run, alternating.

    from lmpress.eval.latency import LatencyConfig, measure_latency
    res = measure_latency({"base": base, "compressed": packed}, LatencyConfig(prompt_len=128))
    res["compressed"].prefill_tok_s, res["compressed"].decode_tok_s[8]

Protocol, per model and per repeat (models alternate, and their order flips every repeat so
neither always runs on a warmer machine); each figure is the median over `repeats`:

- prefill: one forward of ``prefill_batch × prompt_len`` tokens with a KV cache;
  tokens/s = prefill_batch · prompt_len / time;
- time to first token: batch 1, the prompt's forward plus the argmax of its last logits;
- decode at each batch in `decode_batches`: after an untimed prefill, `decode_tokens` greedy
  steps of one token per sequence through the KV cache; tokens/s = batch · steps / time;
- memory: ``weight_bytes`` = bytes of the model's parameters and buffers; ``peak_bytes`` = on
  CUDA, ``torch.cuda.max_memory_allocated`` during the model's measurement minus what was
  allocated before it, plus its weights; on CPU, the peak of the process's resident set
  (sampled every 2 ms) above its level before the measurement, plus the weights — an
  allocator-dependent estimate, labelled as such in `device`.

Prompts are seeded random token ids (identical for every model). A warm-up pass (untimed)
precedes the first repeat of each model.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
from torch import nn

from lmpress.kernels.dispatch import describe
from lmpress.kernels.kv_cache import cache_kwargs, returned_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyConfig:
    prompt_len: int = 128
    prefill_batch: int = 4
    decode_batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 16
    repeats: int = 3
    warmup: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("prompt_len", "prefill_batch", "decode_tokens", "repeats"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"LatencyConfig.{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.decode_batches or any(not isinstance(b, int) or b < 1 for b in self.decode_batches):
            raise ValueError(f"LatencyConfig.decode_batches must be positive integers, got {self.decode_batches!r}")
        object.__setattr__(self, "decode_batches", tuple(self.decode_batches))


@dataclass(frozen=True)
class LatencyResult:
    prefill_tok_s: float
    ttft_s: float
    decode_tok_s: dict[int, float]  # batch -> tokens/s
    weight_bytes: int
    peak_bytes: int
    device: str
    raw: dict[str, list[float]] = field(default_factory=dict)  # every repeat, for the record
    threads: int = 1  # torch threads the figures were measured with (CPU)
    kernel_paths: dict[str, int] = field(default_factory=dict)  # runtime path kind -> modules that ran it (packed models)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decode_tok_s"] = {str(k): v for k, v in self.decode_tok_s.items()}
        return d


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (packed weights are buffers or parameters of PackedLinear)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; a lifetime peak


class _PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.peak = device, interval, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.max = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.max, _rss_bytes()) - self.base
        return False


def _prompt(vocab: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)  # (batch, length)


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def _one_pass(model: nn.Module, cfg: LatencyConfig, vocab: int) -> dict[str, float]:
    dev = _device_of(model)
    figures: dict[str, float] = {}
    ids = _prompt(vocab, cfg.prefill_batch, cfg.prompt_len, cfg.seed, dev)
    t, _ = _timed(lambda: model(input_ids=ids, use_cache=True), dev)
    figures["prefill_tok_s"] = cfg.prefill_batch * cfg.prompt_len / t

    one = ids[:1]  # (1, prompt_len)
    t, _ = _timed(lambda: model(input_ids=one, use_cache=True).logits[:, -1].argmax(-1), dev)
    figures["ttft_s"] = t

    for b in cfg.decode_batches:
        prompt = _prompt(vocab, b, cfg.prompt_len, cfg.seed + b, dev)
        out = model(input_ids=prompt, use_cache=True)
        past, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)  # (b, 1)

        def decode(past=past, nxt=nxt):
            for _ in range(cfg.decode_tokens):
                o = model(input_ids=nxt, use_cache=True, **cache_kwargs(past))
                past, nxt = returned_cache(o), o.logits[:, -1:].argmax(-1)  # (b, 1)
            return nxt

        t, _ = _timed(decode, dev)
        figures[f"decode_tok_s@{b}"] = b * cfg.decode_tokens / t
    return figures


def path_counts(model: nn.Module) -> dict[str, int]:
    """{runtime path kind (``cpu-int4pack``, ``ref``, ``triton-w4a16``...): modules that last ran it}."""
    counts: dict[str, int] = {}
    for path in describe(model).values():
        kind = path.split(" (", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


SPEED = ("prefill_tok_s", "ttft_s", "decode_tok_s@")  # the figures that say faster or slower


def slower_than_base(recovery: Mapping[str, float | None]) -> dict[str, float]:
    """{latency figure: recovery} for every speed figure where the compressed model lost to its base
    (recovery < 1: tokens/s lower, or time to first token longer)."""
    out = {}
    for key, r in recovery.items():
        name = key[len("latency/"):] if key.startswith("latency/") else None
        if name and name.startswith(SPEED) and r is not None and r < 1.0:
            out[name] = r
    return out


def measure_latency(models: Mapping[str, nn.Module], config: LatencyConfig | None = None) -> dict[str, LatencyResult]:
    """Latency of each model in `models` (name -> causal LM), alternating; see the module doc."""
    cfg = config or LatencyConfig()
    if not models:
        raise ValueError("measure_latency needs at least one model")
    names = list(models)
    vocab = min(int(getattr(m.config, "vocab_size", 256)) for m in models.values())
    raw: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    peaks: dict[str, list[int]] = {n: [] for n in names}
    states = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        if cfg.warmup:
            warm = LatencyConfig(prompt_len=min(cfg.prompt_len, 16), prefill_batch=1, decode_batches=cfg.decode_batches,
                                 decode_tokens=2, repeats=1, warmup=False, seed=cfg.seed)
            for n in names:
                _one_pass(models[n], warm, vocab)
        for r in range(cfg.repeats):
            for n in (names if r % 2 == 0 else names[::-1]):
                with _PeakMemory(_device_of(models[n])) as mem:
                    figs = _one_pass(models[n], cfg, vocab)
                peaks[n].append(mem.peak)
                for k, v in figs.items():
                    raw[n].setdefault(k, []).append(v)
                log.info("latency %s repeat %d: %s", n, r, {k: round(v, 4) for k, v in figs.items()})
    finally:
        for n, m in models.items():
            m.train(states[n])
    out = {}
    for n in names:
        dev = _device_of(models[n])
        med = {k: statistics.median(v) for k, v in raw[n].items()}
        wb = model_bytes(models[n])
        where = f"{dev.type}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else
                                 f", {torch.get_num_threads()} threads; peak = weights + sampled RSS increase")
        out[n] = LatencyResult(
            prefill_tok_s=med["prefill_tok_s"], ttft_s=med["ttft_s"],
            decode_tok_s={b: med[f"decode_tok_s@{b}"] for b in cfg.decode_batches},
            weight_bytes=wb, peak_bytes=wb + int(statistics.median(peaks[n])), device=where,
            raw={**raw[n], "peak_extra_bytes": [float(p) for p in peaks[n]]},
            threads=torch.get_num_threads(), kernel_paths=path_counts(models[n]),
        )
    return out
