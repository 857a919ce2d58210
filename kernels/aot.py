"""Ahead-of-time CUDA compile of every Triton kernel, on a machine without a GPU.

Each kernel file says what it launches on CUDA in `aot_variants()`: one `Variant` per autotune
configuration and supported dtype (argument types, constexprs, num_warps, num_stages).
`compile_variant` builds one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`` (the bundled ptxas makes the cubin), then reads the registers, the stack frame and local
memory (where ptxas puts spills) from the cubin with the bundled cuobjdump, and the shared memory
from the kernel's metadata. `check` fails a variant that does not compile, spills, or needs more
shared memory than the architecture gives one block.

    python -m lmpress.kernels.aot                 # every kernel, sm_80 / sm_90 / sm_100: the table
    python -m lmpress.kernels.aot --arch 90 --kernel w4a16

Shared memory per block (opt-in maximum), from the CUDA C++ Programming Guide's table of
technical specifications per compute capability: 8.0 (A100) 163 KB, 9.0 (H100/H200) 227 KB,
10.0 (B200) 227 KB.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

ARCHS = (80, 90, 100)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}  # bytes per block, opt-in maximum
KERNEL_MODULES = ("w4a16_gemm", "fp_gemm", "lut_gemm", "w4a4_gemm", "w4ax_gemm", "sparse24_gemm", "act_quant", "transform_act_quant", "kv_quant")
ACT_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}  # activation pointer types the GEMMs take


@dataclass(frozen=True)
class Variant:
    """One compile of one kernel: `types` gives every argument that is not an i32 scalar or a constexpr
    (pointers ``*fp16``/``*i32``..., float scalars ``fp32``)."""

    kernel: Any  # triton JITFunction
    types: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""

    @property
    def name(self) -> str:
        return self.kernel.__name__.lstrip("_").removesuffix("_kernel")

    def signature(self) -> dict[str, str]:
        unknown = (set(self.types) | set(self.constexprs)) - set(self.kernel.arg_names)
        if unknown:
            raise ValueError(f"{self.name}: {sorted(unknown)} are not arguments of the kernel")
        return {a: self.types.get(a) or ("constexpr" if a in self.constexprs else "i32") for a in self.kernel.arg_names}


@dataclass
class Result:
    kernel: str
    label: str
    arch: int
    ok: bool
    regs: int = 0
    stack: int = 0  # bytes of stack frame per thread (spill stores land here)
    local: int = 0  # bytes of local memory per thread
    smem: int = 0  # bytes of shared memory per block (dynamic, as launched)
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def variants(modules: tuple[str, ...] = KERNEL_MODULES) -> Iterator[tuple[str, int, Variant]]:
    """(module, index, variant) for every variant of every kernel module."""
    import importlib

    for mod in modules:
        m = importlib.import_module(f"lmpress.kernels.{mod}")
        for i, v in enumerate(m.aot_variants()):
            yield mod, i, v


def _resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from the bundled cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[-1]))
    return {k: int(v) for k, v in found.items()}


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile `v` for sm_`arch` and measure it (see the module doc)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(v.name, v.label, arch, ok=False)
    sig = v.signature()
    # pointers as a real launch specializes them: 16-byte aligned
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(v.kernel.arg_names) if sig[a].startswith("*")}
    try:
        ck = triton.compile(ASTSource(v.kernel, sig, dict(v.constexprs), attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": v.num_warps, "num_stages": v.num_stages})
        r = _resources(ck.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - reported, and `check` fails on it
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        res.problems.append("compile failed")
        return res
    res.ok = True
    res.regs, res.stack, res.local = r.get("REG", 0), r.get("STACK", 0), r.get("LOCAL", 0)
    res.smem = max(int(ck.metadata.shared), r.get("SHARED", 0))
    if res.spills:
        res.problems.append(f"spills ({res.stack} B stack, {res.local} B local per thread)")
    if res.smem > SMEM_LIMIT[arch]:
        res.problems.append(f"shared memory {res.smem} B > sm_{arch}'s {SMEM_LIMIT[arch]} B")
    return res


def _compile_one(job: tuple[str, int, int]) -> Result:
    mod, index, arch = job
    import importlib

    v = list(importlib.import_module(f"lmpress.kernels.{mod}").aot_variants())[index]
    return compile_variant(v, arch)


@functools.lru_cache(maxsize=None)
def ptxas_accepts(arch: int) -> bool:
    """Whether the bundled toolchain compiles for sm_`arch` (a trivial kernel)."""
    from lmpress.kernels.act_quant import aot_variants

    return compile_variant(next(iter(aot_variants())), arch).ok


def check(archs: tuple[int, ...] = ARCHS, modules: tuple[str, ...] = KERNEL_MODULES, workers: int = 2) -> list[Result]:
    """Compile every variant for every architecture (in `workers` processes); the results, in order."""
    jobs = [(mod, i, arch) for arch in archs for mod, i, _ in variants(modules)]
    if workers <= 1:
        return [_compile_one(j) for j in jobs]
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, jobs, chunksize=4))


def table(results: list[Result]) -> str:
    """Markdown: one row per kernel and architecture (variants, worst registers, shared memory, spills,
    failures), then one row per variant that has a problem."""
    lines = ["| kernel | arch | variants | max regs | max shared KiB | limit KiB | spilling | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.arch), []).append(r)
    for (kernel, arch), rs in groups.items():
        ok = [r for r in rs if r.ok]
        lines.append(f"| {kernel} | sm_{arch} | {len(rs)} | {max((r.regs for r in ok), default=0)} | "
                     f"{max((r.smem for r in ok), default=0) / 1024:.1f} | {SMEM_LIMIT[arch] / 1024:.0f} | "
                     f"{sum(r.spills for r in ok)} | {sum(not r.ok for r in rs)} |")
    bad = [r for r in results if r.problems]
    if bad:
        lines += ["", "| kernel | variant | arch | problem |", "|---|---|---|---|"]
        lines += [f"| {r.kernel} | {r.label} | sm_{r.arch} | {'; '.join(r.problems)} {r.error} |" for r in bad]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile every Triton kernel for CUDA targets ahead of time (no GPU needed).")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90,100")
    ap.add_argument("--kernel", default=",".join(KERNEL_MODULES), help="kernel modules of lmpress.kernels")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.arch.split(","))
    unknown = [x for x in archs if x not in SMEM_LIMIT]
    if unknown:
        ap.error(f"--arch {unknown}: known capabilities are {sorted(SMEM_LIMIT)}")
    results = check(archs, tuple(k.strip() for k in a.kernel.split(",")), a.workers)
    print(table(results))
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
