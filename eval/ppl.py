"""Token-level perplexity, the papers' protocol (GPTQ, QuaRot, SpinQuant...).

Join the text, tokenize it once, cut the ids into non-overlapping windows of `seqlen` tokens
(the tail shorter than a window is dropped), score each window on its own with labels = inputs
(HF-style shift: `seqlen - 1` next-token predictions per window), and report
``ppl = exp(mean over windows of the window's mean NLL)``.

This is not lm-eval's `wikitext` word perplexity. Takes any causal LM `nn.Module` returning
`.logits`; knows nothing of `lmpress.compress`.

Reference: SmolLM2-135M-Instruct in fp32, bundled `wiki` eval split, first 64 windows of 512
tokens: 16.51 (no BOS; see `perplexity`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean over windows of each window's mean next-token NLL (nats)
    windows: int  # windows scored
    seqlen: int
    tokens: int  # tokens fed to the model: windows * seqlen

    def __str__(self) -> str:
        return f"ppl {self.ppl:.3f} ({self.windows} windows x {self.seqlen} tokens)"


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def perplexity_from_ids(model: nn.Module, ids: torch.Tensor, seqlen: int = 512, windows: int | None = None,
                        batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Perplexity of `model` on token `ids` (1-D, or (1, N)); `windows=None` scores every full window."""
    ids = ids.reshape(-1).long()  # (1, N) or (N,) -> (N,)
    available = ids.numel() // seqlen
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one next-token prediction), got {seqlen}")
    if available < 1:
        raise ValueError(f"text has {ids.numel()} tokens: fewer than one window of seqlen={seqlen}; "
                         "use a longer text or a smaller seqlen")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be positive or None, got {windows}")
    n = available if windows is None else min(windows, available)
    if windows is not None and windows > available:
        log.warning("asked for %d windows of %d tokens; the text has only %d", windows, seqlen, available)
    chunks = ids[: n * seqlen].view(n, seqlen)  # (N,) -> (n, seqlen) non-overlapping windows

    device = _device_of(model)
    batches = chunks.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"ppl ({n} x {seqlen})", unit="batch")
    losses = []
    for batch in batches:  # (B, seqlen)
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, seqlen, vocab)
        shift_logits = logits[:, :-1].float()  # (B, seqlen-1, vocab): predictions of tokens 1..seqlen-1
        labels = batch[:, 1:]  # (B, seqlen-1)
        nll = F.cross_entropy(shift_logits.transpose(1, 2), labels, reduction="none")  # (B, seqlen-1)
        losses.append(nll.mean(dim=1).cpu())  # (B,) one mean NLL per window
    mean_nll = torch.cat(losses).double().mean().item()
    return PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, windows=n, seqlen=seqlen, tokens=n * seqlen)


def perplexity(model: nn.Module, tokenizer, text: str, seqlen: int = 512, windows: int | None = None,
               batch_size: int = 1, progress: bool = False, add_bos: bool = False) -> PerplexityResult:
    """Perplexity of `model` on `text`, tokenized once with `tokenizer`.

    `add_bos=False` (the default) tokenizes without special tokens: this is what reproduces the
    reference 16.51 for SmolLM2-135M-Instruct (wiki eval, 64 x 512). `add_bos=True` prepends
    the tokenizer's BOS once, at the start of the text (not per window).
    """
    # No BOS by default: SmolLM2-135M-Instruct fp32, wiki eval, 64 x 512 gives 16.507 without BOS
    # (the reference 16.51) and 16.491 with the BOS (<|im_start|>) prepended once.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id] + list(ids)
    return perplexity_from_ids(model, torch.tensor(ids, dtype=torch.long), seqlen=seqlen, windows=windows,
                               batch_size=batch_size, progress=progress)
