"""Stage `awq`: activation-aware weight scaling and clipping (AWQ, `lmpress.quant.awq`), layer by
layer on the calibration data, before the stage that quantizes (`rtn` or `gptq`).

Per decoder layer, one pass over its calibration inputs records what each group of linears reads
(q/k/v the input norm's output, o_proj v_proj's, gate/up the post-attention norm's, down_proj
up_proj's) and the float output of the block that reads it (the attention, the MLP, o_proj,
down_proj). For each group with a weight-quantized linear the scale exponent is searched on that
block's output error (`quant.awq.search_scales`, with each linear's own weight scheme) and the
scales are folded into the producer (the norm's gain, Gemma's 1 + w included, or the producing
linear's rows: exact in float); v_proj -> o_proj is skipped when their widths differ (grouped-query
attention), as in AutoAWQ. Then every quantized linear but q_proj and k_proj gets its clipping
search on 512 of its (scaled) input tokens. The weights stay float: the next stage quantizes them.

    stages: [{awq: {grid: 20, duo_scaling: true, clip: true}}, {rtn: {}}]      # recipe w4a16-awq
    stages: [{awq: {}}, {gptq: {...}}]                                          # recipe w4a16-awq-gptq

The report (`report.extra["awq"]`) keeps, per layer and group, the chosen alpha (null: no scaling
beat plain rounding) and the block error relative to plain rounding's, and the share of weights
each clip changed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.quant.awq import apply_clip, search_clip, search_scales
from lmpress.quant.smooth import fold_smoothing

from ..stage import register_stage

log = logging.getLogger(__name__)

CLIP_TOKENS = 512  # AutoAWQ's n_sample_token


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@register_stage("awq", needs_calibration=True)
@dataclass(frozen=True)
class AWQ:
    grid: int = 20  # scale exponents 0, 1/grid, ..., (grid-1)/grid
    duo_scaling: bool = True  # s = x^a / w^(1-a) (AutoAWQ's default); false: the paper's s = x^a
    clip: bool = True  # the clipping search after the scales
    clip_grid: int = 20
    max_shrink: float = 0.5  # the clip bound goes down to (1 - max_shrink) of each group's absmax
    max_tokens: int | None = None  # calibration tokens the scale search scores on (None: all)

    def __post_init__(self) -> None:
        for key in ("grid", "clip_grid"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"awq.{key}={v!r} must be a positive integer (AutoAWQ uses 20)")
        for key in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"awq.{key}={getattr(self, key)!r} must be true or false")
        if not isinstance(self.max_shrink, (int, float)) or not 0 < self.max_shrink < 1:
            raise ValueError(f"awq.max_shrink={self.max_shrink!r} must be in (0, 1) (AutoAWQ uses 0.5)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"awq.max_tokens={self.max_tokens!r} must be a positive integer or null (all)")

    def apply(self, model, ctx) -> None:
        if ctx.calib is None:
            raise ValueError("stage 'awq' needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
        quantized = [f for f, s in ctx.plan.items() if s is not None and s.weights is not None]
        if not quantized:
            log.info("awq: no module quantizes weights; nothing to scale")
            return
        for f in quantized:
            if type(model.get_submodule(f)) is not torch.nn.Linear:
                raise ValueError(f"awq must run before quantization stages: {f} is already {type(model.get_submodule(f)).__name__}")
        tokens = ctx.calib.tokens
        if self.max_tokens is not None:
            tokens = tokens[: max(1, self.max_tokens // tokens.shape[1])]  # (n, seqlen): whole sequences
        t0 = time.perf_counter()
        rows = {}
        for step in LayerwiseRunner(model, ctx.arch, tokens, batch_size=ctx.batch_size, device=ctx.device):
            args = {rel: ctx.plan[f].weights for rel in ctx.arch.linears
                    if (f := f"{step.name}.{rel}") in ctx.plan and ctx.plan[f] is not None}
            rows[str(step.index)] = self.awq_layer(step, ctx.arch, args)
        if ctx.report is not None:
            ctx.report.extra["awq"] = {"grid": self.grid, "duo_scaling": self.duo_scaling, "clip": self.clip,
                                       "tokens": int(tokens.numel()), "seconds": round(time.perf_counter() - t0, 1),
                                       "layers": rows}

    def groups(self, arch, layer) -> list[tuple[str, tuple[str, ...], str]]:
        """(producer, readers, the block whose output scores the scales) of one decoder layer."""
        out = [(arch.input_norm, (arch.q_proj, arch.k_proj, arch.v_proj), arch.attention)]
        v, o = layer.get_submodule(arch.v_proj), layer.get_submodule(arch.o_proj)
        if v.out_features == o.in_features:
            out.append((arch.v_proj, (arch.o_proj,), arch.o_proj))
        out.append((arch.post_attn_norm, (arch.gate_proj, arch.up_proj), arch.mlp))
        out.append((arch.up_proj, (arch.down_proj,), arch.down_proj))
        return out

    @torch.no_grad()
    def awq_layer(self, step, arch, args: dict) -> dict:
        """Scales and clips of one decoder layer (`args`: {linear path: its weight QuantArgs or None})."""
        layer = step.layer
        groups = [g for g in self.groups(arch, layer) if any(args.get(r) is not None for r in g[1])]
        xs: dict[str, list[torch.Tensor]] = {g[1][0]: [] for g in groups}  # what each group reads, per batch
        calls: dict[str, list[tuple[tuple, dict]]] = {g[2]: [] for g in groups}  # the scoring blocks' calls
        outs: dict[str, list[torch.Tensor]] = {g[2]: [] for g in groups}  # and their float outputs
        hooks = []
        for _, readers, block in groups:
            hooks.append(layer.get_submodule(readers[0]).register_forward_pre_hook(
                lambda _m, a, key=readers[0]: xs[key].append(a[0].detach())))
            hooks.append(layer.get_submodule(block).register_forward_pre_hook(
                lambda _m, a, kw, key=block: calls[key].append((a, kw)), with_kwargs=True))
            hooks.append(layer.get_submodule(block).register_forward_hook(
                lambda _m, _a, o, key=block: outs[key].append(_out(o).detach())))
        try:
            step.forward()
        finally:
            for h in hooks:
                h.remove()
        figures = {}
        for producer, readers, block in groups:
            mods = [layer.get_submodule(r) for r in readers]
            x = xs[readers[0]]
            x_mean = torch.cat([t.reshape(-1, t.shape[-1]) for t in x]).abs().float().mean(dim=0)  # (in,)
            module = layer.get_submodule(block)

            def block_error(cands, mods=mods, module=module, block=block):
                saved = [m.weight.data for m in mods]
                try:
                    for m, c in zip(mods, cands):
                        m.weight.data = c
                    err = n = 0.0
                    for (a, kw), ref in zip(calls[block], outs[block]):
                        err += (_out(module(*a, **kw)).float() - ref.float()).pow(2).sum().item()
                        n += ref.numel()
                    return err / n
                finally:
                    for m, w in zip(mods, saved):
                        m.weight.data = w
            s, alpha, rtn, errors = search_scales(x_mean, [m.weight for m in mods], [args.get(r) for r in readers],
                                                  block_error, self.grid, self.duo_scaling)
            prod = layer.get_submodule(producer)
            offset = arch.norm_offset if producer in arch.norm_readers else 0.0
            fold_smoothing(s.to(torch.float64), prod.weight, mods, getattr(prod, "bias", None), offset)
            xs[readers[0]] = [t / s.to(t.dtype) for t in x]  # what the readers read now
            figures[readers[0].rpartition(".")[2] if len(readers) == 1 else "+".join(r.rpartition(".")[2] for r in readers)] = {
                "alpha": alpha, "error_vs_rtn": round(min([rtn, *errors]) / rtn, 4) if rtn > 0 else 1.0}
        if self.clip:
            for _, readers, _ in groups:
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[readers[0]]])  # (tokens, in)
                sample = x[torch.linspace(0, x.shape[0] - 1, min(CLIP_TOKENS, x.shape[0])).long()]
                for r in readers:
                    if args.get(r) is None or r in (arch.q_proj, arch.k_proj):
                        continue
                    m = layer.get_submodule(r)
                    bound = search_clip(m.weight.data, sample, args[r], self.clip_grid, self.max_shrink)
                    clipped = apply_clip(m.weight.data, bound)
                    figures.setdefault("clipped", {})[r.rpartition(".")[2]] = round(
                        (clipped != m.weight.data).float().mean().item(), 4)
                    m.weight.data.copy_(clipped)
        log.info("awq: %s: %s", step.name, ", ".join(
            f"{k} alpha {'-' if v['alpha'] is None else format(v['alpha'], '.2f')} ({v['error_vs_rtn']:.3f} of RTN's error)"
            for k, v in figures.items() if k != "clipped"))
        return figures
