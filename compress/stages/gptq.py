"""Stage `gptq`: GPTQ weights, layer by layer on the calibration set.

Every module of the plan is first swapped for its `SimQuantLinear` (so the activation fake-quant
of modules not yet reached is already in place). Then the decoder layers are walked with the
`LayerwiseRunner` (each layer sees the outputs of the already-quantized layers before it).
Inside a layer the linears go in `arch.sequential_groups` order:

- `true_sequential: true` (default): for each group (q/k/v, o, gate/up, down), run the layer on
  the calibration batches with hooks on the group's modules, then quantize the group, so later
  groups see the quantized earlier ones. The modules of later groups are replaced by zero stubs
  during these collection passes: their outputs cannot reach the hooked inputs, so computing
  them would be wasted time (the runner's own pass afterwards uses the real modules);
- `true_sequential: false`: one pass collects every Hessian of the layer, then all its modules
  are quantized.

The Hessian is collected on the input a module really computes with: for a scheme with input
quantization, the fake-quantized input; a static input scale (`inputs.dynamic: false`) is first
calibrated on the same inputs (`observe_inputs`, one extra pass of the group). Modules that read the same input with the same input
scheme share one Hessian, and are solved together when their weight schemes agree (GPTQ treats
rows independently, so this gives the same codes in one pass).

`act_order: true` uses static groups (qparams per natural-order group fixed up front: no g_idx
in the packed format); `act_order: false` computes each group's qparams when GPTQ reaches it,
from the error-compensated weights (the classic GPTQ).

`gptaq: alpha` (GPTAQ, Li et al. 2025, "asymmetric calibration"; its code uses alpha 0.25): the
stage also carries the float model's hidden states beside the quantized ones (as signround's
`float_model` reference), runs each float layer on them, and records the float input x of every
sequential group's linears. Each weight is then solved towards the float model's output rather than
its own: GPTQ runs on `quant.gptq.asymmetric_target` (W + alpha W dXX H⁻¹, dXX = (2/N) Σ (x - x̃) x̃ᵀ
over the tokens of H), with the same H. A layer thereby also undoes the error of the layers before
it. The float pass keeps the plan's activation fake-quant where a scheme has one (as signround's
does). Only the in-memory walk carries those hidden states (larger-than-memory runs refuse it).

`token_cap: c` (default null: off) counts a token whose squared input norm is above c times its
batch's median as if it were at c times the median (`calibration.stats.token_weights`). The
attention-sink token's massive activations otherwise fill a few Hessians (99.8% of the trace of
SmolLM2-135M's layer-11 down_proj), and GPTQ then fits those tokens before the rest. On that
model the cap lowered single layers' errors on held-out text but not the perplexity, so it is off
by default; calibration/stats.py has the figures.

Modules of the plan outside the decoder layers' known linears (e.g. `lm_head` when a recipe
quantizes it) have no layer inputs to calibrate on here: they fall back to RTN, with a log note.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lmpress.calibration.layerwise import LayerwiseRunner, group_passes
from lmpress.calibration.stats import capture_input_stats, check_token_cap, token_weights
from lmpress.quant.gptq import asymmetric_target, gptq_quantize_shared, layer_objective, single_thread
from lmpress.quant.primitives import dequantize, quant_error, without_sinks
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.sim import SimQuantLinear
from lmpress.quant.smooth import static_tensor_ratio

from ..stage import register_stage
from ..surgery import get_module, set_module, to_sim
from .rtn import rtn_modules

log = logging.getLogger(__name__)

RTN_FALLBACK = "outside the decoder layers: RTN fallback of stage gptq"


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        hint = " or null (use the pipeline's batch size)" if allow_none else ""
        raise ValueError(f"gptq: option {name}={value!r} must be a positive integer{hint}")


class _Zero(nn.Module):
    """Stands in for a linear whose output cannot influence the inputs being collected."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextmanager
def stubbed(layer: nn.Module, rels: list[str]):
    """Temporarily replace the linears at `rels` (paths inside `layer`) by zero stubs."""
    saved = []
    try:
        for rel in rels:
            mod = layer.get_submodule(rel)
            out = getattr(mod, "out_features", None)
            if out is None:
                continue  # not a linear we understand: leave it running
            saved.append((rel, mod))
            set_module(layer, rel, _Zero(out))
        yield
    finally:
        for rel, mod in saved:
            set_module(layer, rel, mod)


def layer_output(o):
    """A decoder layer's hidden states out of what it returns (a tensor, or a tuple led by it)."""
    return o[0] if isinstance(o, (tuple, list)) else o


def layer_kwargs(step) -> list[dict]:
    """The keyword arguments (position embeddings, mask, ...) the layer is called with, one dict per batch."""
    kwargs: list[dict] = []
    hook = step.layer.register_forward_pre_hook(lambda _m, _a, kw: kwargs.append(kw), with_kwargs=True)
    try:
        step.forward(until=[step.layer])  # stops as each batch enters the layer
    finally:
        hook.remove()
    return kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], inputs_of: dict[str, list] | None = None
              ) -> list[torch.Tensor]:
    """`layer` on each batch of `hidden` (B, T, hidden_size) with its `kwargs`; outputs on CPU. With
    `inputs_of` ({path in the layer: []}), each of those modules' inputs is appended to its list, one
    per batch, on CPU."""
    dev = next(layer.parameters()).device
    hooks = [layer.get_submodule(rel).register_forward_pre_hook(lambda _m, args, got=got: got.append(args[0].detach().to("cpu")))
             for rel, got in (inputs_of or {}).items()]
    try:
        return [layer_output(layer(x.to(dev), **kw)).to("cpu") for x, kw in zip(hidden, kwargs)]
    finally:
        for h in hooks:
            h.remove()


STATIC_CLIP_STRIDE = 4  # every 4th calibration token searched for a static scale's clip ratio (memory)


def observe_inputs(step, rels: list[str], later: list[str]) -> None:
    """Calibrate the static input scales (or COMET's channel orders) of the linears `rels` (paths in
    the layer of `step`): one pass with `later` stubbed, the per-channel absmax of each one's input
    over the calibration batches (`SimQuantLinear.calibrate_inputs`), for static inputs with
    `mse_clip` shrunk by the clip ratio of least squared error (`quant.smooth.static_tensor_ratio`,
    on every `STATIC_CLIP_STRIDE`-th token). Sink positions (`inputs.sink_tokens`) are left out. The
    body of stage `act_scales`; stage `gptq` runs it before collecting a group's Hessians."""
    layer = step.layer
    # a scale fixed by an earlier stage (mergequant: the steps were migrated into the weights) is kept
    sims = {rel: layer.get_submodule(rel) for rel in rels if not getattr(layer.get_submodule(rel), "input_scale_fixed", False)}
    if not sims:
        return
    amax: dict[str, torch.Tensor] = {}
    # static inputs with mse_clip: every STATIC_CLIP_STRIDE-th token kept for the clip search
    rows: dict[str, list[torch.Tensor]] = {rel: [] for rel, sim in sims.items() if sim.static_inputs and sim.scheme.inputs.mse_clip}

    def hook(rel, _m, args):
        x = without_sinks(args[0].detach(), sims[rel].scheme.inputs)  # sink positions stay float: not calibrated on
        x2 = x.reshape(-1, x.shape[-1])  # (..., in) -> (n, in)
        a = x2.abs().amax(dim=0).float()  # per channel (in,)
        amax[rel] = torch.maximum(amax[rel], a) if rel in amax else a
        if rel in rows:
            rows[rel].append(x2[::STATIC_CLIP_STRIDE].float().cpu())

    hooks = [sim.register_forward_pre_hook(partial(hook, rel)) for rel, sim in sims.items()]
    try:
        with stubbed(layer, later):
            step.forward(until=list(sims.values()))
    finally:
        for h in hooks:
            h.remove()
    for rel, sim in sims.items():
        ratio = static_tensor_ratio(torch.cat(rows.pop(rel)), sim.scheme.inputs) if rel in rows else 1.0
        if ratio != 1.0:
            log.info("%s.%s: static input scale clipped to %.2f of the calibration absmax (mse_clip)", step.name, rel, ratio)
        sim.calibrate_inputs(amax[rel] * ratio)


def static_outside_layers(model: nn.Module, ctx, fqns) -> None:
    """Refuse static activation scales on modules outside the decoder layers' known linears: the
    layer-by-layer calibration never sees their inputs."""
    n_layers = len(ctx.arch.decoder_layers(model))
    for fqn in fqns:
        scheme = ctx.plan[fqn]
        idx, rel = ctx.arch.layer_of(fqn, n_layers)
        if scheme.inputs is not None and not scheme.inputs.dynamic and (idx is None or rel not in ctx.arch.linears):
            raise ValueError(f"{fqn}: static activation scales are calibrated on the decoder layers' linears only; "
                             "give it a dynamic input scheme (inputs: {dynamic: true}) or none")


def collect_hessians(step, ctx, targets: list[str], later: list[str], float_inputs: dict[int, list] | None = None,
                     token_cap: float | None = None):
    """Run the layer once with `later` stubbed and collect one Hessian per distinct input:
    the modules of a sequential group read the same tensor, and those with the same input
    quantization see the same values. Returns (sims {rel: module}, by_input {(group, input
    args): [rel, ...]}, stats {first rel of each input: HessianAccumulator}, cross). With
    `float_inputs` ({sequential group: the float model's input of its linears, one per batch}),
    cross is {first rel of each input: Σ (x - x̃) x̃ᵀ (in, in) float64} over the same tokens as its
    Hessian (x̃ the input counted there, x the float one); else {}. `token_cap` caps each token's
    share of H (and of cross, with the same weights): see `calibration.stats.token_weights`."""
    layer = step.layer
    sims: dict[str, SimQuantLinear] = {rel: layer.get_submodule(rel) for rel in targets}
    group_of = {rel: gi for gi, group in enumerate(ctx.arch.sequential_groups) for rel in group}
    by_input: dict[tuple, list[str]] = {}
    for rel in targets:
        by_input.setdefault((group_of[rel], sims[rel].scheme.inputs), []).append(rel)
    static = [rel for rel in targets if sims[rel].calibrated_inputs]
    if static:
        observe_inputs(step, static, later)
    hooked = {rels[0]: sims[rels[0]] for rels in by_input.values()}
    transforms = {rels[0]: sims[rels[0]].quantize_input for (_, inp), rels in by_input.items() if inp is not None}
    cross: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}

    def accumulate(rel, _m, args):
        fn = transforms.get(rel)
        xq = (fn(args[0]) if fn is not None else args[0]).detach().float()
        xq = xq.reshape(-1, xq.shape[-1])  # (..., in) -> (n, in)
        xf = float_inputs[group_of[rel]][seen.get(rel, 0)].to(xq.device).float().reshape(xq.shape)  # (n, in)
        seen[rel] = seen.get(rel, 0) + 1
        d = xf - xq if token_cap is None else (xf - xq) * token_weights(xq, token_cap)[:, None]  # (n, in)
        c = (d.T @ xq).double()  # (in, in)
        cross[rel] = cross[rel].add_(c) if rel in cross else c

    hooks = [] if float_inputs is None else [m.register_forward_pre_hook(partial(accumulate, rel)) for rel, m in hooked.items()]
    try:
        with stubbed(layer, later), capture_input_stats(hooked, transforms=transforms, norms=False,
                                                        token_cap=token_cap) as stats:
            step.forward(until=list(hooked.values()))  # nothing after the hooked inputs is needed
    finally:
        for h in hooks:
            h.remove()
    return sims, by_input, stats, cross


@register_stage("gptq", needs_calibration=True)
@dataclass(frozen=True)
class GPTQ:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = True
    batch_size: int | None = None
    gptaq: float = 0.0  # GPTAQ's alpha: match the float model's outputs (see the module doc); 0: GPTQ
    token_cap: float | None = None  # cap each token's share of H at this multiple of the median (attention sinks)

    def __post_init__(self) -> None:
        _positive_int("block_size", self.block_size)
        a = self.gptaq
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a <= 1):
            raise ValueError(f"gptq: option gptaq={a!r} must be a number in [0, 1] (GPTAQ's alpha, e.g. 0.25; 0 for plain GPTQ)")
        _positive_int("batch_size", self.batch_size, allow_none=True)
        check_token_cap(self.token_cap, "gptq: option token_cap")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1):
            raise ValueError(f"gptq: option damp={d!r} must be a number in (0, 1] (a fraction of the mean Hessian diagonal, e.g. 0.01)")
        for name in ("act_order", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"gptq: option {name}={getattr(self, name)!r} must be true or false")

    # ------------------------------------------------------------------ apply

    def apply(self, model: nn.Module, ctx) -> None:
        if ctx.calib is None:
            raise ValueError("stage 'gptq' needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
        static_outside_layers(model, ctx, ctx.plan)
        for fqn, scheme in ctx.plan.items():
            to_sim(model, fqn, scheme)  # every plan module, so activation fake-quant is in place
        n_layers = len(ctx.arch.decoder_layers(model))
        todo, fallback = self.targets(model, ctx, n_layers)
        if todo:
            self._walk(model, ctx, todo, n_layers)
        for fqn in fallback:
            log.info("gptq: %s is not a known linear of a decoder layer (no layer inputs to calibrate on); "
                     "quantizing it with RTN", fqn)
        rtn_modules(model, ctx, fallback, note=RTN_FALLBACK)

    @staticmethod
    def targets(model: nn.Module, ctx, n_layers: int, fqns=None) -> tuple[dict[int, dict[str, tuple[str, object]]], list[str]]:
        """({layer: {path in the layer: (fqn, scheme)}}, [fqn of the RTN fallback]) over the plan's
        SimQuantLinear modules (those of `fqns` if given) that quantize weights and are not
        quantized yet."""
        known = set(ctx.arch.linears)
        todo: dict[int, dict[str, tuple[str, object]]] = {}
        fallback: list[str] = []
        for fqn in ctx.plan if fqns is None else fqns:
            scheme = ctx.plan[fqn]
            sim = get_module(model, fqn)
            if scheme.weights is None:
                continue
            if sim.quantized:
                log.info("gptq: %s is already quantized by an earlier stage; leaving it", fqn)
                continue
            idx, rel = ctx.arch.layer_of(fqn, n_layers)
            if idx is None or rel not in known:
                fallback.append(fqn)
            else:
                todo.setdefault(idx, {})[rel] = (fqn, scheme)
        return todo, fallback

    def _walk(self, model: nn.Module, ctx, todo: dict, n_layers: int) -> None:
        runner = LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=self.batch_size or ctx.batch_size,
                                 device=ctx.device)
        log.info("gptq: %d layers, %d calibration sequences x %d tokens, act_order=%s, true_sequential=%s",
                 n_layers, ctx.calib.tokens.shape[0], ctx.calib.tokens.shape[1], self.act_order, self.true_sequential)
        t_all = time.perf_counter()
        float_hidden = None  # gptaq: the float model's inputs of the current layer, one per batch
        for step in runner:
            mine = todo.get(step.index)
            float_inputs = None
            if self.gptaq:  # the float layer (nothing of it quantized yet) on the float model's hidden states
                firsts = {gi: next(rel for rel in group if rel in mine) for gi, group in enumerate(ctx.arch.sequential_groups)
                          if mine and any(rel in mine for rel in group)}
                got = {rel: [] for rel in firsts.values()}
                float_hidden = run_layer(step.layer, float_hidden if float_hidden is not None else step.inputs,
                                         layer_kwargs(step), got)
                float_inputs = {gi: got[rel] for gi, rel in firsts.items()}
            if not mine:
                continue
            t0 = time.perf_counter()
            figures = self.quantize_layer(step, ctx, mine, float_inputs=float_inputs)
            g = sum(f["gptq_loss"] for f in figures)
            r = sum(f["rtn_loss"] for f in figures)
            log.info("gptq: layer %d/%d: %d modules in %.1fs, layer objective gptq/rtn = %.3f",
                     step.index + 1, n_layers, len(figures), time.perf_counter() - t0, g / r if r > 0 else float("nan"))
        log.info("gptq: done in %.1fs", time.perf_counter() - t_all)

    def quantize_layer(self, step, ctx, mine: dict[str, tuple[str, object]], dist=None,
                       float_inputs: dict[int, list] | None = None) -> list[dict]:
        """GPTQ of the modules `mine` ({path in the layer: (fqn, scheme)}) of the decoder layer in
        `step`, group by group in `arch.sequential_groups` order (true-sequential), or all from one
        pass. With `dist` (`compress.distributed`), solve u runs on rank `u % world` and is
        broadcast from there. The in-memory walk and the larger-than-memory path both call it;
        `gptaq` also needs `float_inputs` (see `collect_hessians`), which only the in-memory walk has."""
        if self.gptaq and float_inputs is None:
            raise ValueError("gptq: option gptaq needs the float model's hidden states, which only the in-memory "
                             "layer walk carries; set gptaq: 0 for larger-than-memory or distributed runs")
        arch = ctx.arch
        attention = [rel for rel in arch.linears if rel.startswith(arch.attention + ".")]
        figures, done = [], set()
        for targets, later in group_passes(arch.sequential_groups, mine, self.true_sequential):
            figures += self._collect_and_quantize(step, ctx, mine, targets, later, dist, float_inputs)
            done.update(targets)
            if arch.attention and later and not any(rel in mine and rel not in done for rel in attention):
                step.replay(arch.attention)  # final now: later passes and the propagation reuse its outputs
        return figures

    def _collect_and_quantize(self, step, ctx, mine: dict, targets: list[str], later: list[str], dist,
                              float_inputs: dict[int, list] | None = None) -> list[dict]:
        """One Hessian per distinct input, one solve per (input, weight scheme): modules with the
        same weight scheme are solved together. With `gptaq`, each weight is first moved to its
        asymmetric target (`asymmetric_target`)."""
        t0 = time.perf_counter()
        sims, by_input, stats, cross = collect_hessians(step, ctx, targets, later, float_inputs, self.token_cap)
        log.debug("gptq: %s: collected %s in %.1fs", step.name, list(stats), time.perf_counter() - t0)
        units = []  # (H, args, rels solved together, Σ (x - x̃) x̃ᵀ or None)
        for rels in by_input.values():
            by_args: dict[object, list[str]] = {}
            for rel in rels:
                by_args.setdefault(sims[rel].scheme.weights, []).append(rel)
            units += [(stats[rels[0]].hessian, args, same, cross.get(rels[0])) for args, same in by_args.items()]
            if rels[0] in cross:  # on the Hessian's scale: (2/N) Σ
                cross[rels[0]].mul_(2.0 / stats[rels[0]].n_tokens)
        results, seconds = {}, {}
        for u, (H, args, same, dXX) in enumerate(units):
            if dist is None or dist.owns(u):
                t1 = time.perf_counter()
                Ws = [sims[rel].weight.detach().float() for rel in same]
                if dXX is not None:
                    Ws = [asymmetric_target(W, H, dXX, self.gptaq, self.damp) for W in Ws]
                results[u] = gptq_quantize_shared(Ws, H, args, block_size=self.block_size, damp=self.damp,
                                                  act_order=self.act_order, static_groups=self.act_order)
                seconds[u] = (time.perf_counter() - t1) / len(same)
        if dist is not None:
            for u in range(len(units)):
                results[u], seconds[u] = dist.broadcast_object((results.get(u), seconds.get(u)), src=dist.owner(u))
        tokens = {rel: stats[rels[0]].n_tokens for rels in by_input.values() for rel in rels}  # what each Hessian saw
        figures = []
        for u, (H, args, same, _) in enumerate(units):
            for rel, (q, scale, zero, st) in zip(same, results[u]):
                W = sims[rel].weight.detach().to(torch.float32, copy=True)  # set_quantized overwrites the weight
                figures.append(self._install(ctx, sims[rel], mine[rel][0], W, H, q, scale, zero, {**st, "tokens": tokens[rel]},
                                             seconds[u]))
        for rels in by_input.values():
            stats[rels[0]].release()
        return figures

    def _install(self, ctx, sim: SimQuantLinear, fqn: str, W, H, q, scale, zero, st: dict, seconds: float) -> dict:
        args = sim.scheme.weights
        dev = sim.weight.device
        sim.set_quantized(q.to(dev), scale.to(dev), zero.to(dev))
        with single_thread(H.device):  # RTN on the same H, for the report
            rq, rs, rz = rtn_quantize(W.to(H.device), args)
        rtn_loss = layer_objective(W, dequantize(rq, rs, rz, args), H)
        fig = {"gptq_loss": st["loss"], "rtn_loss": rtn_loss}
        extra = {"damp": st["damp"]} if st["damp"] != self.damp else {}  # raised after a failed Cholesky
        if st["dead"]:
            extra["dead_inputs"] = st["dead"]
        if ctx.report is not None:
            ctx.report.record_module(fqn, scheme=sim.scheme.name, method="gptq", **quant_error(W, sim.weight),
                                     **fig, tokens=int(st["tokens"]), seconds=round(seconds, 4), **extra)
        log.debug("gptq: %s: loss %.4g (rtn %.4g), %.2fs", fqn, st["loss"], rtn_loss, seconds)
        return fig
