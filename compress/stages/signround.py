"""Stage `signround`: learned rounding (SignRound / AutoRound-style, `lmpress.quant.signround`),
decoder block by decoder block, in place of `rtn` / `gptq`.

Per layer, on its calibration inputs (the outputs of the layers already quantized), every
weight-quantized linear of the layer gets its rounding offsets V and range multipliers alpha,
beta, trained together by SignSGD on the mean squared error of the layer's output against a
reference, one calibration batch a step (`iters` steps, AutoRound's 200 by default, lr 1/iters
decaying linearly). The reference (`reference`):

- `float_model` (AutoRound's, its `enable_quanted_input`): the float model's output of the layer,
  i.e. the float layer on the float model's own hidden states, carried alongside the quantized
  ones. The layer learns to undo the error of the layers before it, not only its own.
- `float_layer`: the float layer on the same (quantized) inputs, GPTQ's target: each layer's own
  error only.

With `keep_best` (AutoRound's default) the parameters of the step with the least batch loss are
kept where their error over all batches is below the last step's. The learned quantization is
kept only if its error over all batches is below round-to-nearest's (the starting point); then
the codes are installed, as GPTQ's are. With `amp` the training steps run under bfloat16 autocast
(AutoRound's `amp`, which on CPU tunes in bfloat16); the loss, the parameters and every choice
between steps (least-loss step, RTN) stay float32. Two more of AutoRound's choices, off by default:
`zero_grad` (the gradient also flows through the zero point, `quant.signround.dequant`) and
`sampler: random` (each step draws a batch's worth of calibration sequences at random, seeded,
instead of taking the batches in turn). `loss: normed` (lmpress's, not AutoRound's) divides each
token's squared error by the mean square of its reference hidden state, as the next layer's RMSNorm
does, so the attention sink's massive activations no longer dominate the loss
(`quant.signround.output_error`). Modules outside the decoder layers (an lm_head in the plan)
get RTN.

    stages: [{signround: {iters: 200, reference: float_model, keep_best: true}}]   # w4a16-signround
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.quant.primitives import quant_error
from lmpress.quant.signround import LOSSES, check_args, codes, dequant, init_params, output_error, sign_step

from ..stage import register_stage
from ..surgery import get_module, set_module, to_sim
from .gptq import GPTQ, layer_kwargs, layer_output, run_layer
from .rtn import rtn_modules

log = logging.getLogger(__name__)


class _Learning(nn.Module):
    """Stands in for a SimQuantLinear while its rounding is learned: the weight it computes with
    is the learned quantization's (its input quantization, if any, as the module's own)."""

    def __init__(self, sim: nn.Module, params: dict, zero_grad: bool = False):
        super().__init__()
        self.sim, self.params, self.zero_grad = sim, params, zero_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sim.scheme.inputs is not None:
            x = self.sim.quantize_input(x)
        W = dequant(self.sim.weight, self.params, self.sim.scheme.weights, self.zero_grad)
        return F.linear(x, W.to(x.dtype), self.sim.bias)


@register_stage("signround", needs_calibration=True)
@dataclass(frozen=True)
class SignRound:
    iters: int = 200
    lr: float | None = None  # default 1 / iters
    reference: str = "float_model"  # or "float_layer" (see the module doc)
    keep_best: bool = True  # the least-loss step's parameters, where better than the last step's
    amp: bool = False  # the training steps under bfloat16 autocast (faster where the CPU has bf16 dot products)
    zero_grad: bool = False  # gradients through the zero point as well (AutoRound's round_ste(-min / scale))
    sampler: str = "sequential"  # each step's batch: the calibration batches in turn, or "random" sequences
    seed: int = 0  # of the random sampler (layer i draws from seed + i)
    loss: str = "mse"  # or "normed": each token's error relative to its hidden state's mean square

    REFERENCES = ("float_model", "float_layer")
    SAMPLERS = ("sequential", "random")

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ValueError(f"signround.iters={self.iters!r} must be a positive integer (AutoRound uses 200)")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr <= 1):
            raise ValueError(f"signround.lr={self.lr!r} must be a number in (0, 1] or null (1 / iters)")
        if self.reference not in self.REFERENCES:
            raise ValueError(f"signround.reference={self.reference!r} is not one of {', '.join(self.REFERENCES)}")
        if self.sampler not in self.SAMPLERS:
            raise ValueError(f"signround.sampler={self.sampler!r} is not one of {', '.join(self.SAMPLERS)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"signround.seed={self.seed!r} must be an integer")
        if self.loss not in LOSSES:
            raise ValueError(f"signround.loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        for name in ("keep_best", "amp", "zero_grad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"signround.{name}={getattr(self, name)!r} must be true or false")

    def apply(self, model: nn.Module, ctx) -> None:
        if ctx.calib is None:
            raise ValueError("stage 'signround' needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
        for fqn, scheme in ctx.plan.items():
            if scheme.weights is not None and (why := check_args(scheme.weights)) is not None:
                raise ValueError(f"signround cannot learn the rounding of {fqn}: {why}; use stage rtn or gptq for it")
        for fqn, scheme in ctx.plan.items():
            to_sim(model, fqn, scheme)
        n_layers = len(ctx.arch.decoder_layers(model))
        todo, fallback = GPTQ.targets(model, ctx, n_layers)
        t0 = time.perf_counter()
        float_hidden = None  # the float model's inputs of the current layer (reference float_model), one per batch
        for step in LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=ctx.batch_size, device=ctx.device):
            kwargs = layer_kwargs(step)
            if self.reference == "float_model":
                float_in = float_hidden if float_hidden is not None else step.inputs
                float_hidden = run_layer(step.layer, float_in, kwargs)  # the float layer (nothing installed yet)
                targets = float_hidden
            else:
                targets = step.forward() if step.index in todo else None
            if step.index in todo:
                self.learn_layer(step, ctx, todo[step.index], targets, kwargs)
        log.info("signround: %d layers in %.0f s", len(todo), time.perf_counter() - t0)
        rtn_modules(model, ctx, fallback, note="not in a decoder layer: no layer inputs to learn on (RTN)")

    def learn_layer(self, step, ctx, mine: dict, targets: list[torch.Tensor], kwargs: list[dict]) -> None:
        """Learn and install the rounding of the modules `mine` ({path in the layer: (fqn, scheme)})
        against `targets` (one (B, T, hidden) per batch), the layer called with `kwargs` per batch."""
        layer = step.layer
        dev = next(layer.parameters()).device
        inputs = [x.to(dev) for x in step.inputs]
        sims = {rel: get_module(layer, rel) for rel in mine}
        params = {rel: init_params(sim.weight, sim.scheme.weights) for rel, sim in sims.items()}
        start = {rel: {k: t.clone() for k, t in p.items()} for rel, p in params.items()}
        frozen = [(p, p.requires_grad) for p in layer.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        for rel, sim in sims.items():
            set_module(layer, rel, _Learning(sim, params[rel], self.zero_grad))

        def error(x: torch.Tensor, target: torch.Tensor, kw: dict, amp: bool = False) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = layer_output(layer(x, **kw))
            return output_error(out.float(), target.to(dev).float(), self.loss)

        def loss(j: int, amp: bool = False) -> torch.Tensor:
            return error(inputs[j], targets[j], kwargs[j], amp)

        if self.sampler == "random":  # AutoRound's "rand": each step a random draw of a batch's worth of sequences
            X, Y = torch.cat(inputs), torch.cat([t.to(dev) for t in targets])  # (n, T, hidden) each
            B, gen = inputs[0].shape[0], torch.Generator().manual_seed(self.seed + step.index)

            def step_loss(_it: int) -> torch.Tensor:  # the first batch's kwargs: a full batch, the same positions
                idx = torch.randperm(X.shape[0], generator=gen)[:B].to(dev)
                return error(X[idx], Y[idx], kwargs[0], self.amp)
        else:
            def step_loss(it: int) -> torch.Tensor:
                return loss(it % len(inputs), self.amp)

        def total() -> float:
            with torch.no_grad():
                return sum(loss(j).item() for j in range(len(inputs))) / len(inputs)
        t0 = time.perf_counter()
        try:
            rtn = total()
            for p in params.values():
                for t in p.values():
                    t.requires_grad_(True)
            lr = self.lr if self.lr is not None else 1.0 / self.iters
            best, best_at = float("inf"), None
            with torch.enable_grad():
                for it in range(self.iters):
                    batch_loss = step_loss(it)
                    if self.keep_best and batch_loss.item() < best:  # the parameters that gave it, before this step
                        best, best_at = batch_loss.item(), {rel: {k: t.detach().clone() for k, t in p.items()} for rel, p in params.items()}
                    batch_loss.backward()
                    sign_step(list(params.values()), lr * (1 - it / self.iters))
            for p in params.values():
                for t in p.values():
                    t.requires_grad_(False)
            learned = total()
            if best_at is not None:  # the least-loss step's parameters, where they beat the last step's over all batches
                last = {rel: dict(p) for rel, p in params.items()}
                for rel in params:
                    params[rel].update(best_at[rel])
                if not (at_best := total()) < learned:
                    for rel in params:
                        params[rel].update(last[rel])
                learned = min(learned, at_best)
            if not learned < rtn:  # never worse than the starting point on the calibration data
                for rel in params:
                    params[rel].update(start[rel])
        finally:
            for rel, sim in sims.items():
                set_module(layer, rel, sim)
            for p, flag in frozen:
                p.requires_grad_(flag)
        for rel, sim in sims.items():
            W = sim.weight.detach().float().clone()
            q, scale, zero = codes(W, params[rel], sim.scheme.weights)
            sim.set_quantized(q, scale, zero)
            if ctx.report is not None:
                ctx.report.record_module(mine[rel][0], scheme=sim.scheme.name, method="signround", **quant_error(W, sim.weight),
                                         layer_loss=learned, layer_loss_rtn=rtn, iters=self.iters, amp=self.amp, loss=self.loss)
        log.info("signround: %s: layer output error %.4g (RTN %.4g, %.3f of it%s) in %.1f s", step.name, min(learned, rtn), rtn,
                 min(learned, rtn) / rtn if rtn > 0 else 1.0, "" if learned < rtn else "; kept RTN", time.perf_counter() - t0)
