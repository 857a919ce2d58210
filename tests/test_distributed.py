"""Two CPU processes (gloo) share a lazy compression: GPTQ solves and calibration batches are
split between the ranks, and the artifact is bitwise the single-process one."""

import pytest
import torch

from _lazy_util import calib, digests, write_tiny
from lmpress.compress import distributed
from lmpress.compress.lazy import compress_lazy


def _worker(src: str, recipe: str, out: str, spill: int) -> None:
    torch.set_num_threads(1)
    d = distributed.from_env("cpu")
    compress_lazy(src, recipe, calib(n=5), out, batch_size=2, spill_bytes=spill, dist=d)


def _single(src, recipe, out) -> None:
    torch.set_num_threads(1)
    compress_lazy(src, recipe, calib(n=5), out, batch_size=2)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("src"), layers=3)


# one configuration: each case starts three interpreters (~40 s on this CPU); quarot-gptq with
# spilled activations exercises the most (rotations, shared solves, batches read back from disk)
@pytest.mark.parametrize("recipe,spill", [("w4a4kv4-quarot-gptq", 0)])
def test_two_processes_write_the_single_process_artifact(src, tmp_path, recipe, spill):
    # the single-process reference also runs in a fresh process with one thread, like each rank
    distributed.spawn(_single, 1, str(src), recipe, str(tmp_path / "one"))
    distributed.spawn(_worker, 2, str(src), recipe, str(tmp_path / "two"), spill)
    one, two = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert len(one) == 4 and one == two


def test_from_env_without_a_group_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.from_env() is None


def test_ownership_is_round_robin():
    d = distributed.Dist(rank=1, world=2, device=torch.device("cpu"))
    assert [d.owns(u) for u in range(5)] == [False, True, False, True, False]
    assert not d.is_writer
