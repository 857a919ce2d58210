"""Every Triton kernel compiles ahead of time for real GPUs (sm_80, sm_90 and sm_100 where the bundled
ptxas accepts it), in every autotune configuration and dtype its CUDA path launches, without spills
and within the architecture's shared memory: `lmpress.kernels.aot`, no GPU needed."""
from __future__ import annotations

import importlib

import pytest

triton = pytest.importorskip("triton")

from lmpress.kernels import aot  # noqa: E402


def test_every_triton_kernel_has_aot_variants():
    from triton.runtime.jit import JITFunction

    covered = {v.kernel.__name__ for _, _, v in aot.variants()}
    for mod in aot.KERNEL_MODULES + ("dispatch", "linear", "cpu", "formats", "kv_cache", "online"):
        m = importlib.import_module(f"lmpress.kernels.{mod}")
        jitted = {name for name, obj in vars(m).items() if isinstance(obj, JITFunction) and obj.__module__ == m.__name__}
        assert jitted <= covered, f"lmpress.kernels.{mod}: {sorted(jitted - covered)} have no aot_variants()"
    assert len(covered) == 10


def test_every_kernel_compiles_for_cuda_without_spills_within_shared_memory():
    archs = tuple(a for a in aot.ARCHS if a != 100 or aot.ptxas_accepts(100))
    assert 80 in archs and 90 in archs
    results = aot.check(archs)
    print("\n" + aot.table(results))  # pytest -s shows the table
    bad = [r for r in results if r.problems]
    assert not bad, aot.table(bad)
    assert {r.kernel for r in results} >= {"w4a16_gemm", "fp_gemm", "lut_gemm", "w4a4_gemm", "w4ax_gemm", "sparse24_gemm", "act_quant",
                                           "transform_act_quant", "kv_quant", "kv_dequant"}


def test_the_check_catches_spills_and_shared_memory_overflow():
    from lmpress.kernels.transform_act_quant import _transform_act_quant_kernel
    from lmpress.kernels.w4a16_gemm import _w4a16_gemm_kernel

    big = aot.Variant(_transform_act_quant_kernel,
                      dict(x_ptr="*fp16", a_ptr="*fp32", b_ptr="*fp32", sg_ptr="*fp32", q_ptr="*i8", pk_ptr="*i32",
                           s_ptr="*fp32", clip="fp32", norm="fp32", qdiv="fp32"),
                      dict(QMAX=7, HAS_SIGNS=True, HAS_NORM=True, WRITE_CODES=True, WRITE_PACKED=True, BLOCK_A=128,
                           BLOCK_B=128), num_warps=16, label="128x128 tile")
    r = aot.compile_variant(big, 90)
    assert r.ok and r.spills and any("spills" in p for p in r.problems)
    deep = aot.Variant(_w4a16_gemm_kernel,
                       dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp32", z_ptr="*fp32", b_ptr="*fp16", out_ptr="*fp16"),
                       dict(BITS=4, GROUP_SIZE=128, HAS_ZERO=True, HAS_BIAS=True, PARTIAL=False, DOT_FP32=False,
                            BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8), num_warps=8, num_stages=5, label="deep")
    r = aot.compile_variant(deep, 80)
    assert r.smem > aot.SMEM_LIMIT[80] and any("shared memory" in p for p in r.problems)
    with pytest.raises(ValueError, match="not arguments"):
        aot.Variant(_w4a16_gemm_kernel, {"nope": "*fp16"}, {}).signature()
