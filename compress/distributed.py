"""Several processes (GPUs with NCCL, or CPU processes with gloo) sharing a lazy compression run.

Built on `torch.distributed` collectives only; no scheduler of our own. Every rank walks the
same decoder layers in the same order; the work of a layer is split where its pieces are
independent, and results are broadcast from the rank that computed them, in a fixed order:

- the GPTQ solves of a layer (one per group of linears sharing a Hessian and a weight scheme,
  e.g. q/k/v, gate/up) go round-robin over the ranks (`owner(u) = u % world`);
- propagating the calibration batches through the finished layer (the next layer's inputs)
  goes round-robin by batch.

The Hessian collection passes run on every rank over all batches: splitting them would
change the order of the float additions and with it the bits of the artifact. Each piece is
computed by exactly the code the single-process run uses on exactly the same inputs, so the
artifact is identical to the single-process one (given the same intra-op thread count).
Rank 0 writes the shards and the persisted state; the others read what they need after a
barrier.

Launch with `torchrun --nproc-per-node N -m lmpress.cli.main compress --lazy ...` (the
environment variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT select this path), or from
Python with `spawn(fn, world)` (gloo on CPU, as the tests do).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: rank, world size and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def owner(self, unit: int) -> int:
        return unit % self.world

    def owns(self, unit: int) -> bool:
        return self.owner(unit) == self.rank

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """`obj` from rank `src` on every rank (pickled; tensors come back on CPU)."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def broadcast_tensor(self, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """A tensor of known shape/dtype from rank `src` (CPU in, CPU out)."""
        dev = self._comm_device()
        buf = t.to(dev).contiguous() if self.rank == src else torch.empty(shape, dtype=dtype, device=dev)
        dist.broadcast(buf, src=src)
        return buf.cpu()

    def barrier(self) -> None:
        dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def from_env(device: str = "auto") -> Dist | None:
    """Join the process group described by the torchrun environment (WORLD_SIZE > 1), else None.
    NCCL when this rank has a CUDA device, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    log.info("rank %d of %d on %s (%s)", rank, world, dev, dist.get_backend())
    return Dist(rank, world, dev)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args) -> None:
    """Run `fn(*args)` in `world` fresh processes that form a group via the environment
    (`from_env` inside `fn` joins it); raises if any process fails."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
