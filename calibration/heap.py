"""Hand the C allocator's free pages back to the operating system.

glibc keeps freed blocks in its heap: a tokenizer's buffers (about 450 bytes a token for a whole
corpus) or the tensors a layer-by-layer pass frees stay in the process's resident memory until
`malloc_trim` returns them. The calibration sampler and the layer walks call `trim_heap()` after
their large frees; elsewhere (not glibc) it does nothing."""
from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
