"""Passkey retrieval over long contexts (a needle in a haystack), generated deterministically from text.

KV-cache quantization hurts retrieval before it hurts perplexity, so long-context caches are judged
on this beside perplexity. Each sample is exactly `n_ctx` tokens:

    INTRO + haystack[: cut] + NEEDLE(key) + haystack[cut:] + QUESTION

with the haystack a seeded window of the source's eval text (the wiki eval split by default), the
key a seeded 5-digit number and the needle at depth i / (n - 1) of the haystack for sample i (from
the start to the end). The model answers greedily (`max_new_tokens`); a sample is correct when the
first 5-digit number of its answer is the key. The prompt follows the passkey task of Mohtashami
and Jaggi ("Landmark Attention", 2023), as used by LongLoRA and the KV-cache papers.

    from lmpress.eval.passkey import passkey_samples, passkey_accuracy
    samples = passkey_samples(tok, n_ctx=4096, n=20)
    res = passkey_accuracy(model, tok, samples)                       # model.generate, DynamicCache
    res = passkey_accuracy(model, tok, samples, make_cache=QuantizedKVCache)  # a runtime KV cache
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
_KEY = re.compile(r"\d{5}")


@dataclass(frozen=True, eq=False)
class PasskeySample:
    ids: torch.Tensor  # LongTensor (n_ctx,)
    key: str  # the 5 digits
    depth: float  # where the needle sits in the haystack, 0 (start) .. 1 (end)


@dataclass(frozen=True)
class PasskeyResult:
    accuracy: float
    n: int
    n_ctx: int
    by_depth: dict[float, float]  # depth -> accuracy there
    answers: list[str] = field(repr=False)
    seconds: float = 0.0


def passkey_samples(tokenizer, n_ctx: int = 4096, n: int = 20, seed: int = 0, text: str | None = None) -> list[PasskeySample]:
    """`n` prompts of exactly `n_ctx` tokens (see the module doc); `text`: the haystack (default: the wiki eval split)."""
    from lmpress.calibration.data import load_text, tokenize

    hay = tokenize(tokenizer, text if text is not None else load_text("wiki", "eval"))  # (N,)
    intro, question = tokenize(tokenizer, INTRO), tokenize(tokenizer, QUESTION)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        key = str(10000 + int(torch.randint(0, 90000, (1,), generator=gen)))
        needle = tokenize(tokenizer, NEEDLE.format(key=key))
        room = n_ctx - intro.numel() - needle.numel() - question.numel()  # haystack tokens
        if room < 1 or hay.numel() < room:
            raise ValueError(f"n_ctx={n_ctx} leaves {room} haystack tokens and the text has {hay.numel()}: "
                             "give a longer context or a longer text")
        start = int(torch.randint(0, hay.numel() - room + 1, (1,), generator=gen))
        depth = i / (n - 1) if n > 1 else 0.5
        cut = round(depth * room)
        window = hay[start:start + room]
        ids = torch.cat([intro, window[:cut], needle, window[cut:], question])  # (n_ctx,)
        samples.append(PasskeySample(ids=ids, key=key, depth=round(depth, 4)))
    return samples


def answer_key(answer: str) -> str | None:
    """The first 5-digit number of an answer, or None."""
    m = _KEY.search(answer)
    return m.group(0) if m else None


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer, samples: list[PasskeySample], max_new_tokens: int = 8,
                     make_cache: Callable[[nn.Module], object] | None = None) -> PasskeyResult:
    """Greedy answers of `model` to `samples` (batch 1), scored by `answer_key`. `make_cache(model)`
    builds the KV cache of each generation (None: transformers' default, a DynamicCache)."""
    from lmpress.kernels.kv_cache import cache_kwargs

    device = next(model.parameters()).device
    t0 = time.perf_counter()
    answers, hits = [], []
    for s in samples:
        ids = s.ids[None].to(device)  # (1, n_ctx)
        extra = cache_kwargs(make_cache(model)) if make_cache is not None else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0, **extra)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        answers.append(text)
        hits.append(answer_key(text) == s.key)
    by_depth: dict[float, list[bool]] = {}
    for s, h in zip(samples, hits):
        by_depth.setdefault(s.depth, []).append(h)
    acc = sum(hits) / len(hits) if hits else 0.0
    log.info("passkey: %d/%d at %d tokens", sum(hits), len(hits), samples[0].ids.numel() if samples else 0)
    return PasskeyResult(accuracy=acc, n=len(hits), n_ctx=samples[0].ids.numel() if samples else 0,
                         by_depth={d: sum(v) / len(v) for d, v in sorted(by_depth.items())}, answers=answers,
                         seconds=time.perf_counter() - t0)
