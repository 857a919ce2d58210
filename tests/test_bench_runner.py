"""The bench driver's resume: rows of an earlier sitting are reused only when they were measured with
the same options on the same library tree (bench/_runner.py)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def runner(monkeypatch):
    spec = importlib.util.spec_from_file_location("_runner_under_test", os.path.join(ROOT, "bench", "_runner.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "lib_tree", lambda commit="HEAD": "abc123def456")
    return mod


def _args(**kw):
    base = dict(model="smollm2-135m", n=128, seqlen=512, windows=64, seed=0, threads=2, configs="a,b", repeats=1,
                json=None, jsonl="x.jsonl", budget=None, only=None, resume=True)
    return argparse.Namespace(**{**base, **kw})


def test_protocol_keeps_the_options_that_shape_a_row(runner):
    assert runner.protocol(_args()) == {"model": "smollm2-135m", "n": 128, "seed": 0, "seqlen": 512, "threads": 2, "windows": 64}
    assert runner.protocol(_args(configs="c", budget=5.0, jsonl="y")) == runner.protocol(_args())


def test_resumable_takes_only_matching_clean_rows(runner, tmp_path):
    args = _args()
    same = json.loads(json.dumps(runner.protocol(args)))
    rows = [
        {"config": "a", "ppl": 1.0, "args": same, "versions": {"lib_tree": "abc123def456"}},
        {"config": "b", "error": "exit 1", "args": same, "versions": {"lib_tree": "abc123def456"}},
        {"config": "c", "ppl": 2.0, "args": {**same, "windows": 16}, "versions": {"lib_tree": "abc123def456"}},
        {"config": "d", "ppl": 3.0, "args": same, "versions": {"lib_tree": "fff000fff000"}},
        {"config": "e", "ppl": 4.0, "versions": {"lib_tree": "abc123def456"}},  # written before rows had args
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(runner.resumable(str(path), args)) == ["a"]
    assert runner.resumable(str(tmp_path / "none.jsonl"), args) == {}


def test_a_dirty_library_tree_resumes_nothing(runner, tmp_path, monkeypatch):
    args = _args()
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"config": "a", "args": json.loads(json.dumps(runner.protocol(args))),
                                "versions": {"lib_tree": "abc123def456+dirty"}}) + "\n")
    monkeypatch.setattr(runner, "lib_tree", lambda commit="HEAD": "abc123def456+dirty")
    assert runner.resumable(str(path), args) == {}


def test_lib_tree_names_the_library_folders_of_a_commit():
    spec = importlib.util.spec_from_file_location("_runner_tree", os.path.join(ROOT, "bench", "_runner.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    tree = mod.lib_tree("HEAD")
    assert tree is not None and len(tree.removesuffix("+dirty")) == 12
    assert mod.lib_tree("HEAD~0").removesuffix("+dirty") == tree.removesuffix("+dirty")
