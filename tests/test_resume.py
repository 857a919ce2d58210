"""--resume: a run killed after some layers continues from the persisted state and writes a
bitwise-identical artifact; a changed model, recipe or calibration is refused."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _lazy_util import calib, digests, write_tiny
from lmpress.compress import lazy
from lmpress.compress.checkpoint import read_manifest
from lmpress.compress.lazy import compress_lazy
from lmpress.compress.resume import ResumeError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("src"), layers=4)


class Crash(Exception):
    pass


def _crash_at(monkeypatch, layer: int):
    real = lazy.materialize

    def materialize(module, prefix, *a, **k):
        if prefix == f"model.layers.{layer}.":
            raise Crash(prefix)
        return real(module, prefix, *a, **k)

    monkeypatch.setattr(lazy, "materialize", materialize)


FLAT_GPTQ = """
version: 1
schemes: {lm_head: null, re:.*: {preset: W4A4, inputs: {clip_ratio: 0.9}}}
kv_cache: {bits: 4, group_size: 64, symmetric: false, residual: 0, key_granularity: token}
stages: [{flatquant: {epochs: 1, samples: 4, batch_size: 2}}, kv_cache, {gptq: {block_size: 8}}]
"""
STRUCTURED = "version: 1\nschemes: {re:.*: W4A16}\nstages: [{structured: {ffn_keep: 0.5, heads_keep: 0.5}}, gptq]\n"
SMOOTH_GPTQ = "version: 1\nschemes: {lm_head: null, re:.*: W8A8}\nstages: [{smoothquant: {}}, {gptq: {block_size: 8}}]\n"


@pytest.mark.parametrize("recipe,crash", [("w4a16-gptq", 2), ("w4a4kv4-quarot-gptq", 1), ("w4a16-rtn", 3),
                                          (SMOOTH_GPTQ, 2), ("kv2-rotatekv", 2), (FLAT_GPTQ, 2), (STRUCTURED, 1)],
                         ids=["w4a16-gptq", "quarot-gptq", "w4a16-rtn", "two-streams", "rotatekv", "flatquant-gptq", "structured"])
def test_resume_is_bitwise_identical(src, tmp_path, monkeypatch, recipe, crash):
    """Every stream (smoothquant's and gptq's; flatquant's two and gptq's) is persisted and
    resumed; RotateKV's channel orders and FlatQuant's figures of the layers before the crash come
    from the persisted state."""
    from lmpress.compress import Recipe

    recipe = Recipe.from_yaml(recipe) if "\n" in recipe else recipe
    cal = calib()
    compress_lazy(src, recipe, cal, tmp_path / "a", batch_size=2)
    with monkeypatch.context() as m:
        _crash_at(m, crash)
        with pytest.raises(Crash):
            compress_lazy(src, recipe, cal, tmp_path / "b", batch_size=2)
    state = json.loads((tmp_path / "b.partial" / "state.json").read_text())
    assert state["done"] == crash and not (tmp_path / "b").exists()
    rep = compress_lazy(src, recipe, cal, tmp_path / "b", batch_size=2, resume=True)
    assert rep.extra["lazy"]["resumed_at"] == crash
    if "flatquant" in rep.extra:  # the figures of the layers before the crash, from the persisted state
        assert len(rep.extra["flatquant"]["layers"]) == 4
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert len(digests(tmp_path / "a")) == 5
    assert read_manifest(tmp_path / "a")[1].get("lmpress") == read_manifest(tmp_path / "b")[1].get("lmpress")


def test_kill_9_then_resume(src, tmp_path):
    """A real SIGKILL in the middle of layer 2 (its GPTQ solves), then --resume."""
    out = tmp_path / "b"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from _lazy_util import calib
        from lmpress.compress import lazy
        from lmpress.compress.stages import gptq
        real = gptq.gptq_quantize_shared
        calls = []
        def solve(*a, **k):
            calls.append(1)
            if len(calls) == 9:  # layer 2 (4 solves per layer), mid-layer
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        gptq.gptq_quantize_shared = solve
        lazy.compress_lazy({str(src)!r}, "w4a16-gptq", calib(), {str(out)!r}, batch_size=2, resume=len(sys.argv) > 1)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.loads((tmp_path / "b.partial" / "state.json").read_text())["done"] == 2
    resumed = script.replace("if len(calls) == 9", "if False")
    p = subprocess.run([sys.executable, "-c", resumed, "resume"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    ref = script.replace("if len(calls) == 9", "if False").replace(repr(str(out)), repr(str(tmp_path / "a")))
    p = subprocess.run([sys.executable, "-c", ref], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert digests(tmp_path / "a") == digests(out)


@pytest.mark.parametrize("change,part", [("recipe", "recipe"), ("calib", "calibration"), ("model", "model")])
def test_resume_refuses_a_different_run(src, tmp_path, monkeypatch, change, part):
    with monkeypatch.context() as m:
        _crash_at(m, 1)
        with pytest.raises(Crash):
            compress_lazy(src, "w4a16-gptq", calib(), tmp_path / "b", batch_size=2)
    recipe, cal, model = "w4a16-gptq", calib(), src
    if change == "recipe":
        recipe = "w4a16-rtn"
    elif change == "calib":
        cal = calib(seed=1)
    else:
        model = write_tiny(tmp_path / "other", layers=4)
        (model / "config.json").write_text((model / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    with pytest.raises(ResumeError, match=f"the {part} differs.*without --resume"):
        compress_lazy(model, recipe, cal, tmp_path / "b", batch_size=2, resume=True)


def test_resume_without_a_previous_run(src, tmp_path):
    with pytest.raises(ResumeError, match="no interrupted run"):
        compress_lazy(src, "w4a16-rtn", None, tmp_path / "b", resume=True)
