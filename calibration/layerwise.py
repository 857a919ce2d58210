"""The layer-by-layer runner used by calibration stages (GPTQ, SparseGPT, statistics passes).

The inputs of decoder layer 0 are captured once per batch: while the model runs, every decoder
layer is stood in for by a recorder that stashes its call's arguments and hands the hidden states
on unchanged, and the last one stops the forward with a private exception (only the embeddings,
the rotary and the masks are computed). Layer 0's hidden states are kept, and the keyword
arguments (position_embeddings, attention_mask, position_ids, ...) of every layer: models that mix
layer types (Gemma 3's sliding-window and global layers, Qwen's sliding layers) give each type its
own mask and rotary embedding, and each layer is run with exactly what the model would give it.
Iterating the runner then yields one `LayerStep` per decoder layer. While a step is out, the
caller may collect statistics (`step.forward()` runs the layer on every batch, firing its hooks)
and modify the layer (e.g. replace linears with quantized ones). When the caller asks for the next step, the runner runs the layer, as modified,
on its inputs to produce the next layer's inputs, so quantization error propagates.

Peak memory is one layer on `device` plus the cached activations, which stay on CPU.

    runner = LayerwiseRunner(model, arch_for(model), calib.tokens, batch_size=8, device="cuda")
    for step in runner:
        step.forward()          # statistics hooks see the layer's real inputs
        quantize(step.layer)
    hidden = runner.outputs     # after the last layer (before the final norm)
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lmpress.quant.mixed import kl_to_reference, token_nll

from .heap import map_large_blocks, trim_heap

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised to stop the model: by the last layer's recorder in a capture, or by `stop_after`."""


class _Record(nn.Module):
    """Stands in for a decoder layer during the capture: stashes the call's (args, kwargs), hands
    the hidden states on unchanged (the last one stops the forward); any other attribute is the
    real layer's (a model that reads, say, `layer.attention_type` in its loop)."""

    def __init__(self, layer: nn.Module, stash: list, last: bool):
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: nothing of it is registered twice
        self.stash, self.last = stash, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args, **kwargs):
        self.stash.append((args, kwargs))
        if self.last:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


@contextmanager
def stop_after(modules: list[nn.Module]):
    """While active, a forward raises `_StopForward` once every module of `modules` has received
    its input (a forward pre-hook registered after any already there, so those run first)."""
    seen: set[int] = set()

    def hook(module, _args):
        seen.add(id(module))
        if len(seen) == len({id(m) for m in modules}):
            seen.clear()
            raise _StopForward

    handles = [m.register_forward_pre_hook(hook) for m in {id(m): m for m in modules}.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _to(obj: Any, device: torch.device | str, memo: dict | None = None) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to `device`; with `memo`, an
    object met again (the same mask handed to many layers) is moved once and shared."""
    if memo is not None and id(obj) in memo:
        return memo[id(obj)][1]
    if isinstance(obj, torch.Tensor):
        out = obj.to(device)
    elif isinstance(obj, (tuple, list)):
        out = type(obj)(_to(o, device, memo) for o in obj)
    elif isinstance(obj, dict):
        out = {k: _to(v, device, memo) for k, v in obj.items()}
    else:
        return obj
    if memo is not None:
        memo[id(obj)] = (obj, out)  # the source is kept alive with its id
    return out


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class _Batch:
    hidden: torch.Tensor  # (B, T, hidden) on CPU
    kwargs: dict  # decoder layer 0's keyword arguments for this batch, tensors on CPU
    by_layer: tuple[dict, ...] | None = None  # every layer's, where some differ from layer 0's (shared tensors)

    def for_layer(self, index: int | None) -> dict:
        """The keyword arguments of decoder layer `index` (None: a layer the caller cannot name,
        allowed only when every layer takes the same)."""
        if self.by_layer is None:
            return self.kwargs
        if index is None:
            raise ValueError("this model's decoder layers take different arguments (layer types); name the layer's index")
        return self.by_layer[index]


Batch = _Batch  # public name: one batch of a decoder layer's inputs (hidden states + keyword arguments)


@dataclass
class LayerStep:
    """One decoder layer and the inputs it sees, handed to a stage by `LayerwiseRunner`."""

    index: int
    name: str  # e.g. "model.layers.3"
    layer: nn.Module
    inputs: list[torch.Tensor]  # one (B, T, hidden) tensor per batch, on CPU
    _run: Callable[[], list[torch.Tensor]] = field(repr=False)
    _replayed: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def forward(self, until: list[nn.Module] | None = None) -> list[torch.Tensor]:
        """Run every input batch through the current `layer` (no_grad); outputs on CPU. With
        `until`, each batch stops as soon as every module in it has received its input (their
        forward pre-hooks, e.g. statistics, have run): a collection pass that needs nothing
        after those modules skips the rest of the layer, and returns no outputs."""
        return self._run(until)

    def replay(self, path: str) -> None:
        """The submodule at `path` is final for this step (its weights and its inputs no longer
        change): the next pass over the batches computes and records its outputs, later passes
        (more collection, the propagation to the next layer) get copies of them. `restore()` (the
        runner calls it after propagating) puts the module back."""
        if path not in self._replayed and self.inputs:  # (a driver that spills its inputs gives none: no replay)
            module = self.layer.get_submodule(path)
            self._replayed[path] = module
            self.layer.set_submodule(path, _Replay(module, len(self.inputs)))

    def last_pass(self) -> None:
        """The next pass over the batches is the last: replayed outputs are dropped as they are used."""
        for path in self._replayed:
            self.layer.get_submodule(path).last = True

    def restore(self) -> None:
        for path, module in self._replayed.items():
            self.layer.set_submodule(path, module)
        self._replayed.clear()


def _copy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copy(o) for o in out)
    return out


class _Replay(nn.Module):
    """Stands in for a module whose outputs are known: the first `n` calls (one pass over the
    batches, in order) run it and record the outputs; each later call k returns a copy of
    recording k mod n. A call interrupted by an exception records nothing."""

    def __init__(self, module: nn.Module, n: int):
        super().__init__()
        self.module, self.n = module, n
        self.outputs: list[Any] = []
        self.calls = 0
        self.last = False  # set for the last pass: each recording is handed over, not copied

    def forward(self, *args, **kwargs):
        if self.calls < self.n:
            out = self.module(*args, **kwargs)
            self.calls += 1
            if not self.last:
                self.outputs.append(out)
            return _copy(out)
        k = self.calls % self.n
        self.calls += 1
        if self.last:
            out, self.outputs[k] = self.outputs[k], None
            return out
        return _copy(self.outputs[k])


def group_passes(groups, mine, true_sequential: bool = True) -> list[tuple[list[str], list[str]]]:
    """Group-by-group over one layer: the (targets, later) passes of a stage that collects
    statistics on the linears `mine` (paths in the layer) and then changes them. True-sequential:
    one pass per group of `groups` (linears sharing an input, in execution order) holding any of
    `mine`, with the linears of later groups (`later`, stubbed while collecting: their outputs
    cannot reach the hooked inputs); otherwise one pass over all of them."""
    if not true_sequential:
        return [([rel for g in groups for rel in g if rel in mine], [])]
    return [([rel for rel in group if rel in mine], [rel for g in groups[gi + 1:] for rel in g])
            for gi, group in enumerate(groups) if any(rel in mine for rel in group)]


class LayerwiseRunner:
    """Iterate over the decoder layers of `model`, one at a time, on calibration `tokens`.
    `arch` is the model's `lmpress.compress.ArchMap` (the runner reads its `layers`, `embed`,
    `rotary` and `decoder_layers`)."""

    def __init__(self, model: nn.Module, arch, tokens: torch.Tensor, batch_size: int = 8,
                 device: torch.device | str | None = None):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (n, seqlen), got shape {tuple(tokens.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model, self.arch, self.tokens, self.batch_size = model, arch, tokens, batch_size
        self.device = torch.device(device) if device is not None else None
        self.layers = arch.decoder_layers(model)
        self.outputs: list[torch.Tensor] | None = None  # hidden states after the last layer
        map_large_blocks()  # a layer's activations are mapped blocks, returned when freed (calibration.heap)

    # ----------------------------------------------------------------- capture

    @torch.no_grad()
    def _capture(self) -> list[_Batch]:
        """Layer 0's inputs and every layer's kwargs, one entry per batch (only the modules before
        the layers run: each layer is stood in for by a `_Record`)."""
        stash: list[list[tuple[tuple, dict]]] = [[] for _ in self.layers]
        # Only the modules before layer 0 run: put them on `device` for the capture if asked.
        pre = [self.model.get_submodule(p) for p in (self.arch.embed, self.arch.rotary) if p]
        homes = [_device_of(m) for m in pre]
        if self.device is not None:
            for m in pre:
                m.to(self.device)
        run_device = _device_of(pre[0])
        real = list(self.layers)
        for i, layer in enumerate(real):
            self.layers[i] = _Record(layer, stash[i], last=i == len(real) - 1)
        batches = []
        try:
            for chunk in self.tokens.split(self.batch_size):  # (B, T) each; the last may be smaller
                try:
                    self.model(input_ids=chunk.to(run_device, torch.long), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the model did not call its last decoder layer during the capture")
                calls = [s.pop() for s in stash]
                args, kwargs = calls[0]
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                rest = [{k: v for k, v in kw.items() if k != "hidden_states"} for _, kw in calls]
                same = all(kw.keys() == rest[0].keys() and all(kw[k] is rest[0][k] for k in kw) for kw in rest)
                memo: dict = {}
                batches.append(_Batch(hidden.to("cpu"), _to(kwargs, "cpu", memo),
                                      None if same else tuple(_to(kw, "cpu", memo) for kw in rest)))
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer
            for m, home in zip(pre, homes):
                m.to(home)
        return batches

    # ----------------------------------------------------------------- running a layer

    @torch.no_grad()
    def _run_layer(self, layer: nn.Module, batches: list[_Batch], until: list[nn.Module] | None = None,
                   index: int | None = None) -> list[torch.Tensor]:
        """`layer` (decoder layer `index`; found among the model's layers when not given) applied to
        every batch; outputs (B, T, hidden) on CPU (none with `until`: see `LayerStep.forward`)."""
        dev = self.device if self.device is not None else _device_of(layer)
        if index is None:
            index = next((i for i, m in enumerate(self.layers) if m is layer), None)
        if until:
            with stop_after(until):
                for b in batches:
                    try:
                        layer(b.hidden.to(dev), **_to(b.for_layer(index), dev))
                    except _StopForward:
                        continue
                    raise RuntimeError("the layer finished without calling every module of `until`")
            return []
        outs = []
        for b in batches:
            out = layer(b.hidden.to(dev), **_to(b.for_layer(index), dev))
            out = out[0] if isinstance(out, (tuple, list)) else out  # older transformers: a tuple
            outs.append(out.to("cpu"))
        return outs

    # public entry points for drivers that own the layer loop (the lazy path, `compress.lazy`)

    def capture(self) -> list[_Batch]:
        """Layer 0's inputs and keyword arguments, one `Batch` per batch of `batch_size` sequences.
        Only the modules before layer 0 run (the layers themselves may be on the meta device)."""
        return self._capture()

    def run_layer(self, layer: nn.Module, batches: list[_Batch], until: list[nn.Module] | None = None,
                  index: int | None = None) -> list[torch.Tensor]:
        """`layer` (decoder layer `index`, else found by identity among the model's layers) applied
        to every batch (no_grad, on the runner's device); outputs on CPU."""
        return self._run_layer(layer, batches, until, index)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerStep]:
        self.outputs = None
        # Captured afresh on every iteration: earlier stages may have changed the embeddings.
        batches = self._capture()
        log.info("captured layer-0 inputs: %d batches of up to %d x %d tokens",
                 len(batches), self.batch_size, self.tokens.shape[1])
        for i in range(len(self.layers)):
            layer = self.layers[i]
            home = _device_of(layer)
            if self.device is not None:
                layer.to(self.device)
            step = LayerStep(index=i, name=f"{self.arch.layers}.{i}", layer=layer,
                             inputs=[b.hidden for b in batches],
                             _run=lambda until=None, i=i, bs=batches: self._run_layer(self.layers[i], bs, until, i))
            try:
                yield step
            except GeneratorExit:  # the caller stopped early: put the layer back where it was
                step.restore()
                if self.device is not None:
                    self.layers[i].to(home)
                raise
            # The caller is done with layer i (maybe replaced linears): propagate through it as it is now,
            # a batch at a time, each input dropped as its output arrives (and each replayed output
            # with it: this is the last pass over them).
            layer = self.layers[i]
            if self.device is not None:
                layer.to(self.device)  # modules swapped in on another device follow the layer
            step.inputs.clear()
            step.last_pass()
            for j, b in enumerate(batches):
                batches[j] = _Batch(self._run_layer(layer, [b], index=i)[0], b.kwargs, b.by_layer)
                del b
            step.restore()
            if self.device is not None:
                layer.to(home)
            trim_heap()  # the layer's freed inputs, activations and working tensors
        self.outputs = [b.hidden for b in batches]


class LayerReplay:
    """Replay from layer l: the calibration subset cut at every decoder layer. `capture` runs the
    model once and keeps each layer's input (hidden states and keyword arguments) per batch, and
    the log-probabilities / NLL; `metric(l, ...)` reruns the model from layer `l` on those inputs
    (mixed precision's measured scores: swap one module, rerun from its layer)."""

    def __init__(self, model, arch, tokens: torch.Tensor, batch_size: int, device):
        self.model, self.arch, self.tokens = model, arch, tokens
        self.layers = arch.decoder_layers(model)
        self.batches = list(tokens.split(batch_size))  # (B, T) each
        self.device = device
        self.inputs: list[list[tuple[torch.Tensor, dict]]] = []
        self._fp_inputs = None

    @torch.no_grad()
    def capture(self, keep_logp: bool, ref_logp=None) -> dict:
        L = len(self.layers)
        stash: list[list] = [[] for _ in range(L + 1)]
        hooks = []
        for i, layer in enumerate(self.layers):
            def pre(_m, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                stash[i].append((h.detach(), kw))
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        norm = self.model.get_submodule(self.arch.final_norm)
        hooks.append(norm.register_forward_pre_hook(lambda _m, args: stash[L].append((args[0].detach(), {}))))
        nll = count = 0.0
        logps = []
        try:
            for b in self.batches:
                logits = self.model(input_ids=b.to(self.device), use_cache=False).logits
                s, n = token_nll(logits, b)
                nll, count = nll + s, count + n
                if keep_logp:
                    logps.append(torch.log_softmax(logits.float(), dim=-1))
        finally:
            for h in hooks:
                h.remove()
        self.inputs = stash
        if self._fp_inputs is None:
            self._fp_inputs = stash
        return {"nll": nll / count, "logp": logps if keep_logp else ref_logp}

    def restore_fp(self) -> None:
        if self._fp_inputs is not None:
            self.inputs = self._fp_inputs

    @torch.no_grad()
    def run_layer(self, idx: int) -> None:
        """Run decoder layer `idx` (or the final norm + head for idx == L) on its captured inputs."""
        L = len(self.layers)
        for h, kw in self.inputs[idx]:
            if idx < L:
                self.layers[idx](h, **kw)
            else:
                self.model.get_submodule(self.arch.lm_head)(self.model.get_submodule(self.arch.final_norm)(h))

    @torch.no_grad()
    def metric(self, start: int, metric: str, fp: dict) -> float:
        """Mean KL to the FP model ("kl") or mean next-token NLL ("loss") with the model as it is
        now, run from layer `start` on the captured inputs."""
        L = len(self.layers)
        norm = self.model.get_submodule(self.arch.final_norm)
        head = self.model.get_submodule(self.arch.lm_head)
        total = count = 0.0
        for bi, b in enumerate(self.batches):
            h = self.inputs[start][bi][0]
            for i in range(start, L):
                out = self.layers[i](h, **self.inputs[i][bi][1])
                h = out[0] if isinstance(out, (tuple, list)) else out
            logits = head(norm(h))
            s, n = kl_to_reference(logits, fp["logp"][bi]) if metric == "kl" else token_nll(logits, b)
            total, count = total + s, count + n
        return total / count
