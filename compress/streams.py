"""The calibration streams of the larger-than-memory path (`compress.lazy`).

In memory each calibrating stage walks the model with its own `LayerwiseRunner`, so each sees the
inputs of layer i as they come out of layers 0..i-1 *as that stage left them*. The lazy path
visits each layer once and applies every stage to it, so it keeps one stream per kind of stage,
each captured as that stage captures it (sequences, batch size) and propagated through the layer
at the point where that stage is done with it:

- "structured": through the cut layers (captured before the embeddings are rotated);
- "transform": smoothquant's and rotate_kv's, through the transformed layers;
- "flat_float" / "flat_quant": flatquant's float targets and quantized training inputs;
- "pruned": wanda's / sparsegpt's, through the pruned, not yet quantized layers;
- "compressed": gptq's, through the finished layers.

Each layer's outputs are written to disk (what `--resume` continues from) and kept in memory
while all streams together stay under `spill_bytes`, else read back one batch at a time.

    streams = Streams(wanted, device)
    streams.capture(model, arch, ["structured"]); ...; streams.capture(model, arch, rest)
    streams.start(state, n_layers, spill_bytes)
    for i ...:
        streams.begin_layer(folder)               # where layer i's outputs go (None: the last layer)
        stage.per_layer(streams.step("transform", i, layer))
        streams.propagate("transform", layer)
        streams.end_layer()                       # the outputs become the inputs
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmpress.calibration.layerwise import Batch, LayerStep, LayerwiseRunner

log = logging.getLogger(__name__)


class Activations:
    """The calibration hidden states entering one layer: in memory (`mem`), or on disk (one
    safetensors file per batch in `folder`) when `mem` is None."""

    def __init__(self, n: int, folder: Path | None, mem: list[torch.Tensor] | None):
        self.n, self.folder, self.mem = n, folder, mem

    def get(self, j: int) -> torch.Tensor:
        if self.mem is not None:
            return self.mem[j]
        return load_file(str(self.folder / f"b{j:05d}.safetensors"))["h"]

    @staticmethod
    def write(folder: Path, j: int, t: torch.Tensor) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"h": t.contiguous()}, str(folder / f"b{j:05d}.safetensors"))


class Streams:
    """The streams `wanted` ({name: (token-set tag, tokens (n, seqlen), batch size)}); streams
    with the same tag and batch size share one capture."""

    def __init__(self, wanted: dict[str, tuple[str, torch.Tensor, int]], device, writer: bool = True, dist=None):
        self.wanted, self.device, self.writer, self.dist = wanted, device, writer, dist
        self.runner: LayerwiseRunner | None = None
        self._captured: dict[tuple[str, int], list] = {}
        self.acts: dict[str, Activations] = {}
        self.kwargs: dict[str, list[tuple]] = {}  # per stream, per batch: (layer 0's kwargs, every layer's or None)
        self.next: dict[str, Activations] = {}
        self.folder: Path | None = None
        self.keep, self.bytes = True, 0

    def __contains__(self, name: str) -> bool:
        return name in self.wanted

    def capture(self, model: nn.Module, arch, names) -> None:
        """Layer 0's inputs of the streams `names` (only the embeddings and rotary run)."""
        for tag, tokens, bs in (self.wanted[k] for k in names):
            if (tag, bs) not in self._captured:
                self.runner = LayerwiseRunner(model, arch, tokens, batch_size=bs, device=self.device)
                self._captured[(tag, bs)] = self.runner.capture()

    def start(self, state, n_layers: int, spill_bytes: int) -> None:
        """The first layer's inputs: the captures, or a resumed run's persisted outputs."""
        first = {k: self._captured[(tag, bs)] for k, (tag, _, bs) in self.wanted.items()}
        self.bytes = sum(b.hidden.numel() * b.hidden.element_size() for k in first for b in first[k])
        self.keep = self.bytes <= spill_bytes
        self.kwargs = {k: [(b.kwargs, b.by_layer) for b in first[k]] for k in first}
        for k, batches in first.items():
            if 0 < state.done < n_layers:
                folder = state.work / state.data["acts"] / k
                a = Activations(len(batches), folder, None)
                self.acts[k] = Activations(a.n, folder, [a.get(j) for j in range(a.n)] if self.keep else None)
            else:
                self.acts[k] = Activations(len(batches), None, [b.hidden for b in batches])
        self._captured.clear()  # the streams hold the layer-0 inputs now
        if self.wanted:
            log.info("lazy: %.1f MiB of calibration activations (%s; streams %s)", self.bytes / 2**20,
                     "in memory" if self.keep else f"spilled to {state.work}", list(self.wanted))

    # ------------------------------------------------------------------ one layer

    def begin_layer(self, folder: Path | None) -> None:
        """Layer outputs go to `folder` (None: the last layer, whose outputs nothing reads)."""
        self.folder, self.next = folder, {}

    def end_layer(self) -> None:
        self.acts, self.next = self.next, {}

    def step(self, name: str, i: int, layer: nn.Module, layer_name: str) -> LayerStep:
        """A `LayerStep` over stream `name` for a stage's per-layer method."""
        acts, kwargs = self.acts[name], self.kwargs[name]

        def run_all(until=None):
            outs = []
            for j in range(acts.n):
                o = self.runner.run_layer(layer, [Batch(acts.get(j), *kwargs[j])], until, i)
                if self.keep and not until:
                    outs.append(o[0])
            return outs
        return LayerStep(index=i, name=layer_name, layer=layer, inputs=acts.mem or [], _run=run_all)

    def layer_kwargs(self, name: str, i: int) -> list[dict]:
        """Decoder layer i's keyword arguments for every batch of stream `name` (on CPU)."""
        return [Batch(None, *kw).for_layer(i) for kw in self.kwargs[name]]

    def inputs(self, name: str) -> list[torch.Tensor]:
        """Every batch of stream `name`, on the device (a stage that trains on them all)."""
        acts = self.acts[name]
        return [acts.get(j).to(self.device) for j in range(acts.n)]

    def propagate(self, name: str, layer: nn.Module) -> None:
        """Stream `name` through `layer`, as the next layer's inputs (shared out between
        processes by `dist`)."""
        if self.folder is None:
            return
        acts, kwargs, dist, folder = self.acts[name], self.kwargs[name], self.dist, self.folder / name
        outs: list[torch.Tensor | None] = []
        for j in range(acts.n):
            o = None
            if dist is None or dist.owns(j):
                o = self.runner.run_layer(layer, [Batch(acts.get(j), *kwargs[j])])[0]
            if dist is not None:
                h = acts.get(j)
                o = dist.broadcast_tensor(o, tuple(h.shape), h.dtype, src=dist.owner(j))
            if self.writer:
                Activations.write(folder, j, o)
            outs.append(o if self.keep else None)
        self.next[name] = Activations(acts.n, folder, outs if self.keep else None)

    def put(self, name: str, outputs: list[torch.Tensor]) -> None:
        """`outputs` (one per batch, computed by a stage) as stream `name`'s next inputs."""
        if self.folder is None:
            return
        folder = self.folder / name
        if self.writer:
            for j, t in enumerate(outputs):
                Activations.write(folder, j, t.to("cpu"))
        self.next[name] = Activations(len(outputs), folder, outputs if self.keep else None)
