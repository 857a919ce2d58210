"""llama.cpp as the judge of a GGUF file: its own perplexity on our token windows, its decode speed,
and what a file holds. Optional: needs the `llamacpp` extra (llama-cpp-python, which builds
llama.cpp with the system compiler on install).

Perplexity: each window of token ids (no BOS added: a window is evaluated exactly as given) runs
once through a Llama whose context is the window; the logits of positions 0..n-2 predict tokens
1..n-1 (log-softmax in float64), and the result is exp(mean NLL) over all predicted tokens of all
windows: the protocol of `lmpress.eval.ppl` (equal windows), so the two compare directly. Decode
speed: the prompt is prefilled untimed, then `new_tokens` single-token evals are timed, each on
the argmax of the previous logits; the median tokens/s over the repeats.
"""
from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class LlamaCppUnavailable(ImportError):
    """llama-cpp-python is not installed."""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- reading GGUF files


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name (F32, Q4_K, ...) of a GGUF file."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def file_mib(path: Path) -> float:
    """The file's size in MiB (what a GGUF row reports as its size on disk)."""
    return Path(path).stat().st_size / 2**20


# --------------------------------------------------------------------------- llama.cpp's runtime


def _amx_built(llama_cpp) -> bool:
    """Whether this llama.cpp build has ggml's AMX int8 kernels (built with -march=native on an AMX Xeon)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextmanager
def _without_extra_buffer_types(llama_cpp):
    """Models loaded inside get `use_extra_bufts = False`: their weights stay in llama.cpp's plain CPU
    buffers, neither repacked for AMX nor for the AVX2 kernels. `Llama` takes no argument for it, so the
    default-params function its constructor calls is wrapped for the duration."""
    module = llama_cpp.llama.llama_cpp  # the name `Llama.__init__` calls llama_model_default_params through
    default = module.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


def _llama(path: Path, n_ctx: int, n_batch: int, logits_all: bool, threads: int):
    try:
        import llama_cpp
        import llama_cpp.llama
    except ImportError as e:
        raise LlamaCppUnavailable(f"import llama_cpp failed ({e}); install the extra: pip install 'lmpress[llamacpp]'") from None
    # llama-cpp-python 0.3.36 (ggml 0.25.3) built on a Sapphire Rapids Xeon (AMX_INT8) segfaults in its first
    # llama_decode on any model with quantized weights in the AMX buffer: our Q4_K file and llama.cpp's own
    # Q4_1 SmolLM2 file alike, at 1 or 2 threads, batch 16 or 256; F32 files and use_extra_bufts=False run.
    # So on an AMX build, weights stay in plain buffers (perplexity unchanged; decode speed without repacking).
    amx = _amx_built(llama_cpp)
    if amx:
        log.info("llama.cpp built with AMX: loading %s without extra buffer types (its AMX path segfaults)", Path(path).name)
    with _without_extra_buffer_types(llama_cpp) if amx else nullcontext():
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                               logits_all=logits_all, n_threads=threads, n_threads_batch=threads, verbose=False)


def _window_nll(logits: np.ndarray, window: list[int]) -> np.ndarray:
    """NLL of tokens 1..n-1 of `window` from the logits of positions 0..n-2 (log-softmax in float64)."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    targets = np.asarray(window[1:], dtype=np.int64)
    return logz - x[np.arange(len(targets)), targets]


def perplexity(path: Path, windows: list[list[int]], threads: int = 2) -> float:
    """exp(mean NLL) of every window's tokens 1..n-1 given the ones before, by llama.cpp on the GGUF `path`."""
    if not windows or min(len(w) for w in windows) < 2:
        raise ValueError("perplexity needs at least one window, each of at least 2 token ids")
    n_max = max(len(w) for w in windows)
    llm = _llama(path, n_ctx=n_max, n_batch=n_max, logits_all=True, threads=threads)
    try:
        vocab = llm.n_vocab()
        nll = []
        for w in windows:
            if max(w) >= vocab or min(w) < 0:
                raise ValueError(f"token ids outside {Path(path).name}'s vocabulary ({vocab}); use its tokenizer")
            llm.reset()
            llm.eval(w)
            nll.append(_window_nll(llm.scores[: len(w) - 1], w))  # scores: (n_ctx, vocab) float32 numpy
    finally:
        llm.close()
    all_nll = np.concatenate(nll)
    ppl = float(np.exp(all_nll.mean()))
    log.info("llama.cpp perplexity of %s: %.4f over %d windows (%d predicted tokens)", Path(path).name, ppl,
             len(windows), all_nll.size)
    return ppl


def _greedy_next(llm) -> int:
    """argmax of the logits of the last evaluated token (logits_all=False: llama.cpp's last output row)."""
    import llama_cpp

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def decode_tps(path: Path, prompt: list[int], new_tokens: int = 128, threads: int = 1, repeats: int = 3) -> float:
    """Median greedy decode speed (tokens/s) at batch 1 in llama.cpp: the prompt prefilled untimed, then
    `new_tokens` timed single-token evals, each on the argmax of the previous logits."""
    if not prompt or new_tokens < 1 or repeats < 1:
        raise ValueError("decode_tps needs a non-empty prompt, new_tokens >= 1 and repeats >= 1")
    llm = _llama(path, n_ctx=len(prompt) + new_tokens, n_batch=len(prompt), logits_all=False, threads=threads)
    rates = []
    try:
        for _ in range(repeats):
            llm.reset()
            llm.eval(prompt)
            tok = _greedy_next(llm)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([tok])
                tok = _greedy_next(llm)
            rates.append(new_tokens / (time.perf_counter() - t0))
    finally:
        llm.close()
    tps = statistics.median(rates)
    log.info("llama.cpp decode of %s: %.1f tokens/s (median of %s, %d threads)", Path(path).name, tps,
             ", ".join(f"{r:.1f}" for r in rates), threads)
    return tps


