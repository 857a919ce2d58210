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

    def calib_tokens(self, calib):
        """The training sequences: the first `samples`, cut to `seqlen` tokens."""
        tokens = calib.tokens[: self.samples] if self.samples else calib.tokens
        return tokens[:, : self.seqlen] if self.seqlen else tokens  # (n, seqlen)

    def attach_qk(self, model, arch, device) -> None:
        """QuaRot's R3 on Q and K after RoPE (`qk_hadamard`), else the lmpress attention function."""
        layers = arch.decoder_layers(model)
        if self.qk_hadamard:
            head_dim = arch.head_dim(layers[0], model.config)
            attach_attention(model, arch, qk={i: OnlineHadamard(head_dim, sub_seed(self.seed, "r3", i)).to(device)
                                              for i in range(len(layers))})

    def train_layer(self, layer, index: int, name: str, arch, plan: dict, cfg, kv, fstream, qstream, kwargs):
        """Install the training structure on one decoder layer, take the float targets on the float
        stream `fstream`, train on `qstream` (or the float stream, `train_inputs: float`). Returns
        (the FlatLayer, still installed and quantizing: propagate the quantized stream through it,
        then `finish_layer`), the targets (the next layer's float stream), the layer's figures."""
        flat = FlatLayer(layer, index, arch, plan, name, cfg, kv, self)
        flat.install()
        for g in flat.gq.values():
            g.collect = True
        with torch.no_grad():  # float targets on the float stream (+ the smoothing statistics)
            targets = [_out(layer(x, **kw)) for x, kw in zip(fstream, kwargs)]
        flat.init_from_stats(self.smooth_alpha)
        st = calibrate_layer(flat, fstream if self.train_inputs == "float" else qstream, kwargs, targets, self)
        log.info("flatquant: layer %d: mse %.4g -> %.4g (%d steps, %.1fs)", index + 1,
                 st["init_loss"], st["final_loss"], st["steps"], st["seconds"])
        return flat, targets, {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in st.items()}

    @staticmethod
    def finish_layer(flat: FlatLayer, plan: dict, summary: dict) -> None:
        """Fold the trained layer (`FlatLayer.finalize`): its learned activation clips become the
        `clip_ratio` of the input schemes in `plan` (plain module names); `summary` collects them."""
        res = flat.finalize()
        for rel, c in res["act_clip"].items():
            fqn = f"{flat.prefix}.{rel}"
            s = plan.get(fqn)
            if s is not None and s.inputs is not None:
                plan[fqn] = dataclasses.replace(s, inputs=dataclasses.replace(s.inputs, clip_ratio=c))
            summary["act_clip"][fqn] = round(c, 4)
        summary["wrapped"] += [f"{flat.prefix}.{rel}" for rel in res["wrapped"]]

    @staticmethod
    def wrap_names(ctx, wrapped) -> None:
        """Plan entries and `ctx.arch` point inside the RotatedInput wrappers (`wrapped`: their fqns)."""
        wrapped = set(wrapped)
        ctx.plan = {(f"{k}.linear" if k in wrapped else k): v for k, v in ctx.plan.items()}
        arch = ctx.arch
        ctx.arch = dataclasses.replace(arch, o_proj=f"{arch.o_proj}.linear", down_proj=f"{arch.down_proj}.linear")

    def record(self, ctx, tokens, rows: list, summary: dict, seconds: float) -> None:
        """The report's figures."""
        if ctx.report is not None:
            ctx.report.extra["flatquant"] = {
                "options": dataclasses.asdict(self), "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
                "seconds": round(seconds, 1), "layers": rows, "act_clip": summary["act_clip"],
            }

    def apply(self, model, ctx) -> None:
        check_unquantized(model, "flatquant")
        if ctx.calib is None:
            raise ValueError("flatquant needs calibration data (pass calib=sample_calibration(...))")
        arch = ctx.arch
        tokens = self.calib_tokens(ctx.calib)
        self.attach_qk(model, arch, ctx.device)
        if not self.qk_hadamard and ctx.kv_cache is not None:
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
        try:
            for step in runner:
                if pending is not None:  # the runner has propagated the quantized layer's outputs
                    self.finish_layer(pending, ctx.plan, summary)
                    pending = None
                layer = step.layer
                kwargs = []  # this layer's keyword arguments per batch (layer types may differ), on the device
                h = layer.register_forward_pre_hook(lambda m, a, kw: kwargs.append(kw), with_kwargs=True)
                try:
                    step.forward(until=[layer])  # stops as the layer is entered
                finally:
                    h.remove()
                if fstream is None:  # layer 0: the float stream starts here
                    fstream = [x.to(dev) for x in step.inputs]
                pending, fstream, row = self.train_layer(layer, step.index, step.name, arch, ctx.plan, model.config, kv,
                                                         fstream, [x.to(dev) for x in step.inputs], kwargs)
                rows.append(row)
            if pending is not None:
                self.finish_layer(pending, ctx.plan, summary)
        finally:
            for p, f in flags:
                p.requires_grad_(f)
        seconds = time.perf_counter() - t_all
        self.wrap_names(ctx, summary["wrapped"])
        self.record(ctx, tokens, rows, summary, seconds)
        log.info("flatquant: %d layers in %.0f s (%d x %d tokens, %d epochs)", len(rows), seconds,
                 tokens.shape[0], tokens.shape[1], self.epochs)
