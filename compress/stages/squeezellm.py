"""Stage `squeezellm`: dense-and-sparse codebook quantization of the weights (SqueezeLLM,
`lmpress.quant.squeezellm`), replacing each weight-quantized linear of the plan with a `LUTLinear`.

The codebook width is the scheme's weight `bits` (2, 3 or 4); the scheme's grid settings (group
size, symmetry) do not apply, since each output channel gets its own non-uniform table. Schemes
that quantize activations are refused: this is a weight-only method. The sensitivity is the
empirical Fisher diagonal of the calibration loss (`quant.mixed.empirical_fisher`: one forward and
backward pass of the float model per calibration sequence, every linear at once, as SqueezeLLM
computes it once on the original model); `fisher: false` gives plain k-means.

    schemes: {lm_head: null, "re:.*": {preset: W3A16}}
    stages: [{squeezellm: {outliers: 0.004, sensitive: 0.0005}}]     # recipe w3a16-squeezellm

`gptq: true` (lmpress's extension, not the paper's) keeps the codebooks and sparse positions but
chooses the codes with GPTQ's error compensation (`quant.squeezellm.gptq_assign`): the decoder layers
are walked on the calibration set as stage `gptq` walks them (true-sequential groups, each group's
Hessian on the inputs the already-quantized modules give), with `damp`, `act_order` and `token_cap`
as there.
Modules outside the decoder layers' linears keep the nearest-centroid codes.

The report records per module the bits per weight stored (codes, codebooks, CSR) and the sparse
entries, and in `report.extra["squeezellm"]` the weighted average bits and the seconds spent.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lmpress.calibration.layerwise import LayerwiseRunner, group_passes
from lmpress.calibration.stats import capture_input_stats, check_token_cap
from lmpress.kernels.linear import LUTLinear
from lmpress.quant.mixed import empirical_fisher
from lmpress.quant.primitives import quant_error
from lmpress.quant.squeezellm import KMEANS_ITERS, fit_codebook, gptq_assign, squeeze

from ..stage import register_stage
from ..surgery import set_module
from .gptq import stubbed

log = logging.getLogger(__name__)


@register_stage("squeezellm", needs_calibration=True)
@dataclass(frozen=True)
class SqueezeLLM:
    outliers: float = 0.004  # share of entries kept exactly for their magnitude (the paper's 0.40%)
    sensitive: float = 0.0005  # share kept exactly for their Fisher weight (the paper's 0.05%)
    fisher: bool = True  # weight the k-means by the Fisher diagonal; false: plain k-means
    iters: int = KMEANS_ITERS  # Lloyd iterations at most
    max_sequences: int | None = None  # calibration sequences for the Fisher pass (None: all)
    gptq: bool = False  # choose the codes with GPTQ's error compensation (see the module doc)
    damp: float = 0.01  # with gptq: GPTQ's dampening, a fraction of the mean Hessian diagonal
    act_order: bool = True  # with gptq: columns by decreasing Hessian diagonal
    token_cap: float | None = None  # with gptq: cap each token's share of H (stage gptq's option)

    def __post_init__(self) -> None:
        for key in ("outliers", "sensitive"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 0.5:
                raise ValueError(f"squeezellm.{key}={v!r} must be a share in [0, 0.5), e.g. 0.004 for 0.4%")
        for key in ("fisher", "gptq", "act_order"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"squeezellm.{key}={getattr(self, key)!r} must be true or false")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"squeezellm.damp={d!r} must be a number in (0, 1] (a fraction of the mean Hessian diagonal, e.g. 0.01)")
        check_token_cap(self.token_cap, "squeezellm.token_cap")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ValueError(f"squeezellm.iters={self.iters!r} must be a positive integer")
        if self.max_sequences is not None and (not isinstance(self.max_sequences, int) or self.max_sequences < 1):
            raise ValueError(f"squeezellm.max_sequences={self.max_sequences!r} must be a positive integer or null (all)")

    def apply(self, model, ctx) -> None:
        quantized = [f for f, s in ctx.plan.items() if s is not None and s.weights is not None]
        for f in quantized:
            s = ctx.plan[f]
            if s.inputs is not None or s.weights.type != "int" or s.weights.bits not in (2, 3, 4) or s.sparsity is not None:
                raise ValueError(f"squeezellm is weight-only with 2-, 3- or 4-bit codebooks; {f} has scheme {s.name}: "
                                 "use a W2A16/W3A16/W4A16 preset")
            if type(model.get_submodule(f)) is not torch.nn.Linear:
                raise ValueError(f"squeezellm quantizes float linears: {f} is already {type(model.get_submodule(f)).__name__}; "
                                 "run it instead of rtn/gptq, not after")
        if not quantized:
            log.info("squeezellm: no module quantizes weights")
            return
        if (self.fisher or self.gptq) and ctx.calib is None:
            what = "its Fisher weights" if self.fisher else "gptq's Hessians"
            raise ValueError(f"stage 'squeezellm' needs calibration data for {what}: pass "
                             "calib=sample_calibration(tokenizer, ...), or set fisher: false and gptq: false")
        t0 = time.perf_counter()
        fisher = {}
        if self.fisher:
            tokens = ctx.calib.tokens[: self.max_sequences]  # (n, seqlen)
            mods = [model.get_submodule(f) for f in quantized]
            embed = model.get_submodule(ctx.arch.embed).weight
            fisher = dict(zip(quantized, empirical_fisher(model, [m.weight for m in mods], embed, tokens, ctx.device)))
            log.info("squeezellm: Fisher diagonal of %d linears over %d sequences in %.1f s", len(mods), tokens.shape[0],
                     time.perf_counter() - t0)
        t_fisher = time.perf_counter() - t0
        totals = [0.0, 0]  # (bits stored, weights) over the modules done
        n_layers = len(ctx.arch.decoder_layers(model))
        todo: dict[int, dict[str, str]] = {}  # layer -> {path in the layer: fqn}
        nearest = []
        for f in quantized:
            idx, rel = ctx.arch.layer_of(f, n_layers)
            if self.gptq and idx is not None and rel in ctx.arch.linears:
                todo.setdefault(idx, {})[rel] = f
            else:
                nearest.append(f)
        for f in nearest:
            W = model.get_submodule(f).weight.detach()
            t1 = time.perf_counter()
            parts = squeeze(W, fisher.pop(f, None), ctx.plan[f].weights.bits, self.outliers, self.sensitive, self.iters)
            self._install(model, ctx, f, parts, t1, totals)
        if todo:
            self._walk(model, ctx, todo, fisher, totals)
        if ctx.report is not None:
            bits_sum, weights = totals
            ctx.report.extra["squeezellm"] = {"bits_per_weight": round(bits_sum / weights, 4), "modules": len(quantized),
                                              "fisher_seconds": round(t_fisher, 2), "gptq": self.gptq,
                                              "codes_seconds": round(time.perf_counter() - t0 - t_fisher, 2)}

    def _walk(self, model, ctx, todo: dict[int, dict[str, str]], fisher: dict, totals: list) -> None:
        """gptq: each decoder layer's groups in order; one Hessian per group (its linears read one
        input), one `gptq_assign` over the group's stacked rows, then the LUTLinears go in."""
        runner = LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=ctx.batch_size, device=ctx.device)
        for step in runner:
            mine = todo.get(step.index)
            if not mine:
                continue
            t0 = time.perf_counter()
            for targets, later in group_passes(ctx.arch.sequential_groups, mine, True):
                first = {targets[0]: step.layer.get_submodule(targets[0])}
                with stubbed(step.layer, later), capture_input_stats(first, norms=False, token_cap=self.token_cap) as stats:
                    step.forward(until=list(first.values()))
                H = stats[targets[0]].hessian
                t1 = time.perf_counter()
                by_bits: dict[int, list[str]] = {}
                for rel in targets:
                    by_bits.setdefault(ctx.plan[mine[rel]].weights.bits, []).append(rel)
                for bits, rels in by_bits.items():
                    Ws = [step.layer.get_submodule(rel).weight.detach().float() for rel in rels]
                    fitted = [fit_codebook(W, fisher.pop(mine[rel], None), bits, self.outliers, self.sensitive, self.iters)
                              for rel, W in zip(rels, Ws)]
                    parts, st = gptq_assign(torch.cat(Ws), H, torch.cat([m for m, _ in fitted]),  # rows stacked: (sum out, in)
                                            torch.cat([c for _, c in fitted]), self.damp, act_order=self.act_order)
                    sizes = [W.shape[0] for W in Ws]
                    split = {k: v.split(sizes) for k, v in parts.items()}
                    for n, rel in enumerate(rels):
                        self._install(model, ctx, mine[rel], {k: v[n].contiguous() for k, v in split.items()}, t1,
                                      totals, gptq_loss=st["loss"], nearest_loss=st["nearest_loss"])
                stats[targets[0]].release()
            log.info("squeezellm: layer %d/%d: %d modules in %.1fs", step.index + 1, len(runner), len(mine),
                     time.perf_counter() - t0)

    def _install(self, model, ctx, fqn: str, parts: dict, t1: float, totals: list, **figures) -> None:
        """`parts` (as `squeeze`'s) into a LUTLinear at `fqn`; its bits and weights added to `totals`."""
        lin = model.get_submodule(fqn)
        W = lin.weight.detach()
        bits = ctx.plan[fqn].weights.bits
        new = LUTLinear.from_parts(lin, parts["codes"], parts["codebook"], parts["sparse"], bits)
        set_module(model, fqn, new)
        bpw = new.bits_per_weight()
        totals[0] += bpw * W.numel()
        totals[1] += W.numel()
        if ctx.report is not None:
            group = {f"group_{k}": float(f"{v:.6g}") for k, v in figures.items()}  # of the group's stacked rows
            ctx.report.record_module(fqn, scheme=f"SqueezeLLM-{bits}bit", method="squeezellm-gptq" if figures else "squeezellm",
                                     **quant_error(W, new.dense_weight(W.dtype)), bits_per_weight=round(bpw, 4),
                                     sparse_entries=new.nnz, seconds=round(time.perf_counter() - t1, 4), **group)
