"""Backend choice for the runtime modules, and the one place that knows how a Triton kernel is launched.

Backends (`LMPRESS_KERNELS`, read on every call so tests can flip it):

- ``auto`` (default): CUDA tensors -> ``triton``; CPU tensors -> ``cpu`` for layers large enough
  to profit (see `lmpress.kernels.cpu.MIN_FAST_WEIGHTS`), else ``ref``.
- ``ref``: the torch reference (unpack + dequantize + F.linear), the oracle every path is tested
  against; bit-identical to the simulated model.
- ``cpu``: the CPU path (`lmpress.kernels.cpu`: torch's bf16 int4/int8 weight-only GEMMs on
  repacked weights for decode-sized calls, exact on-the-fly dequantization otherwise), for every
  layer whatever its size; it keeps no dequantized copy.
- ``triton``: the Triton kernels; on CPU tensors they run through Triton's interpreter (slow:
  tests only).

What a Triton kernel cannot serve (3-bit weights) takes the reference; what torch's CPU ops
cannot serve takes the CPU path's dequantization. Each module records what it ran, and why
when it is a fallback, in its ``kernel_path`` attribute; `describe(model)` collects those.

Triton on CPU: `@triton.jit` decides at decoration time whether it makes a compiled
(`JITFunction`) or an interpreted function, from ``TRITON_INTERPRET``, and so does every
`@triton.jit` function of triton's own standard library (``tl.cdiv``, ``tl.max``...), decorated
when triton is first imported. transformers imports triton (through torch._dynamo) as soon as a
model class is imported, so the variable must be in the environment when the process starts:
``TRITON_INTERPRET=1 python ...``. `interpreter_ready()` says whether it was; the Triton wrappers
refuse CPU tensors with that instruction otherwise (tests re-run themselves in a subprocess).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "ref", "cpu", "triton")
ENV = "LMPRESS_KERNELS"


def requested_backend() -> str:
    """The backend asked for through ``LMPRESS_KERNELS`` (default ``auto``), validated."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r} is not a kernel backend; use one of {list(BACKENDS)}")
    return value


@dataclass(frozen=True)
class Path:
    """What a module runs: ``kind`` (e.g. ``cpu-int4pack``, ``triton-w4a16``, ``ref``) and why."""

    kind: str
    reason: str = ""

    def __str__(self) -> str:
        return self.kind + (f" ({self.reason})" if self.reason else "")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency
        return False
    return True


def describe(model: torch.nn.Module) -> dict[str, str]:
    """{module name: last kernel path it ran} for every module that records one."""
    return {name: str(m.kernel_path) for name, m in model.named_modules() if getattr(m, "kernel_path", None) is not None}


# ---- launching Triton kernels ---------------------------------------------------------------
def interpreting(device: torch.device) -> bool:
    """Triton kernels on CPU tensors run through the interpreter; on CUDA they are compiled."""
    return torch.device(device).type == "cpu"


def interpreter_ready() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (its stdlib is interpreted)."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(tl.cdiv, InterpretedFunction)


def launchable(kernel, device: torch.device):
    """The `@triton.jit` kernel, after checking it can run on tensors on `device`."""
    from triton.runtime.interpreter import InterpretedFunction

    # Triton 3.9 warns when FP fusion is left to its default (the default flips in 3.10): say it.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    dev = torch.device(device)
    interpreted = isinstance(kernel, InterpretedFunction)
    if dev.type == "cuda" and interpreted:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set when triton was imported, but the tensors are on CUDA; "
            "unset TRITON_INTERPRET to run the compiled kernels"
        )
    if dev.type == "cpu" and not (interpreted and interpreter_ready()):
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: start the process with TRITON_INTERPRET=1 "
            "in the environment (it must be set before triton is first imported), or use "
            "LMPRESS_KERNELS=cpu / ref, or move the tensors to CUDA"
        )
    if dev.type not in ("cuda", "cpu"):
        raise RuntimeError(f"the Triton kernels run on CUDA (or on CPU through the interpreter), not on {dev.type}")
    return kernel


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    wrong = {n: str(d) for n, d in devices.items() if d != first}
    if wrong:
        raise ValueError(f"all operands must be on one device; got {first} and {wrong}: move them with .to(device)")
    return first


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, next_pow2(n)))
