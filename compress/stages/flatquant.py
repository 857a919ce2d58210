"""Stage `flatquant`: FlatQuant-style learnable Kronecker transforms with learnable clipping,
trained block by block on the calibration data, then folded; see `lmpress.quant.flatquant`.

```yaml
- flatquant: {epochs: 2, lr: 0.01, clip_lr: 0.01, samples: 32, seqlen: null, batch_size: 2,
              smooth_alpha: 0.5, weight_clip_init: 0.98, v_transform: true, qk_hadamard: true,
              fold_weight_clip: true, train_inputs: quantized, loss: relative, seed: 0}
```
Walks the decoder layers with the `LayerwiseRunner` (`batch_size` sequences a batch, one
optimiser step per batch): for each layer the float layer's outputs on the float stream are the
targets, the transformed, fake-quantized layer (weights, activations with the recipe's schemes;
KV cache with the recipe's top-level `kv_cache` when it is the per-token form) is trained on the
quantized stream (`train_inputs: quantized`: it also learns to absorb earlier layers' errors)
or on the float stream (`train_inputs: float`: the loss is then the layer's own
quantization error alone), and the runner then propagates the layer's quantized outputs. `loss`:
`relative` (each token's squared error over its float target's: what the next RMSNorm sees) or
`mse` (FlatQuant's plain MSE, which a model's few massive-activation tokens dominate).

Afterwards the norms that feed q/k/v and gate/up are wrapped in `TransformedOutput` (the norm
moves to `<norm>.module`), o_proj and down_proj in `RotatedInput` (moved to `<fqn>.linear`;
the stage points the plan and `ctx.arch` there), each with a `KronTransform` whose tensors the
checkpoint stores; the learned activation clip becomes the `clip_ratio` of each linear's input
scheme in the plan (so the simulated, packed and Triton forms all apply it), and with
`fold_weight_clip` the weights are clamped to their learned per-channel clip, which min-max RTN
then reproduces (leave `mse_clip` off in the recipe's weights for RTN). With `qk_hadamard` an
online Hadamard (QuaRot's R3) rotates Q and K after RoPE. Takes the place of `fuse_norms` +
`rotate`: before `kv_cache` and the quantization stages.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.kernels.online import OnlineHadamard
from lmpress.kernels.attention import attach_attention, use_lmpress_attention
from lmpress.quant.flatquant import FlatArgs, FlatLayer, calibrate_layer
from lmpress.quant.rotate import sub_seed

from ..stage import register_stage
from .rotate import check_unquantized

log = logging.getLogger(__name__)


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@register_stage("flatquant", needs_calibration=True)
@dataclass(frozen=True)
class FlatQuant(FlatArgs):
    """The options are `FlatArgs`' fields (validated there)."""

    def apply(self, model, ctx) -> None:
        check_unquantized(model, "flatquant")
        if ctx.calib is None:
            raise ValueError("flatquant needs calibration data (pass calib=sample_calibration(...))")
        arch = ctx.arch
        tokens = ctx.calib.tokens[: self.samples] if self.samples else ctx.calib.tokens
        tokens = tokens[:, : self.seqlen] if self.seqlen else tokens  # (n, seqlen)
        layers = arch.decoder_layers(model)
        cfg = model.config
        if self.qk_hadamard:
            attn0 = layers[0].get_submodule(arch.attention)
            head_dim = getattr(attn0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            attach_attention(model, arch, qk={i: OnlineHadamard(head_dim, sub_seed(self.seed, "r3", i)).to(ctx.device)
                                              for i in range(len(layers))})
        elif ctx.kv_cache is not None:
            use_lmpress_attention(model)
        kv = ctx.kv_cache
        if kv is not None and not kv.per_token_only:
            log.info("flatquant: the KIVI cache settings are not simulated during training (per-token form only)")
        dev = ctx.device
        runner = LayerwiseRunner(model, arch, tokens, batch_size=self.batch_size, device=dev)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        t_all = time.perf_counter()
        rows, kwargs, fstream, pending = [], None, None, None
        summary = {"act_clip": {}, "wrapped": []}

        def finish(flat: FlatLayer) -> None:
            res = flat.finalize()
            for rel, c in res["act_clip"].items():
                fqn = f"{flat.prefix}.{rel}"
                s = ctx.plan.get(fqn)
                if s is not None and s.inputs is not None:
                    ctx.plan[fqn] = dataclasses.replace(s, inputs=dataclasses.replace(s.inputs, clip_ratio=c))
                summary["act_clip"][fqn] = round(c, 4)
            summary["wrapped"] += [f"{flat.prefix}.{rel}" for rel in res["wrapped"]]

        try:
            for step in runner:
                if pending is not None:
                    finish(pending)
                    pending = None
                layer = step.layer
                if kwargs is None:  # layer 0: its keyword arguments per batch, and the float stream starts here
                    kwargs = []
                    h = layer.register_forward_pre_hook(lambda m, a, kw: kwargs.append(kw), with_kwargs=True)
                    try:
                        step.forward()
                    finally:
                        h.remove()
                    fstream = [x.to(dev) for x in step.inputs]
                flat = FlatLayer(layer, step.index, arch, ctx.plan, step.name, cfg, kv, self)
                flat.install()
                for g in flat.gq.values():
                    g.collect = True
                with torch.no_grad():  # float targets on the float stream (+ the smoothing statistics)
                    targets = [_out(layer(x, **kw)) for x, kw in zip(fstream, kwargs)]
                flat.init_from_stats(self.smooth_alpha)
                inputs = fstream if self.train_inputs == "float" else [x.to(dev) for x in step.inputs]
                st = calibrate_layer(flat, inputs, kwargs, targets, self)
                fstream = targets
                pending = flat  # the runner now propagates the quantized layer's outputs
                rows.append({k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in st.items()})
                log.info("flatquant: layer %d/%d: mse %.4g -> %.4g (%d steps, %.1fs)", step.index + 1, len(layers),
                         st["init_loss"], st["final_loss"], st["steps"], st["seconds"])
            if pending is not None:
                finish(pending)
        finally:
            for p, f in flags:
                p.requires_grad_(f)
        wrapped = set(summary["wrapped"])
        ctx.plan = {(f"{k}.linear" if k in wrapped else k): v for k, v in ctx.plan.items()}
        ctx.arch = dataclasses.replace(arch, o_proj=f"{arch.o_proj}.linear", down_proj=f"{arch.down_proj}.linear")
        seconds = time.perf_counter() - t_all
        if ctx.report is not None:
            ctx.report.extra["flatquant"] = {
                "options": dataclasses.asdict(self), "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
                "seconds": round(seconds, 1), "layers": rows, "act_clip": summary["act_clip"],
            }
        log.info("flatquant: %d layers in %.0f s (%d x %d tokens, %d epochs)", len(layers), seconds,
                 tokens.shape[0], tokens.shape[1], self.epochs)
