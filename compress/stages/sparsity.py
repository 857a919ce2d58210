"""Stages `sparsegpt`, `wanda`, `magnitude`: N:M or unstructured pruning of the plan's linears.

Options (all three):
- `structure`: "2:4" | "4:8" | any "N:M" with M in {4, 8, 16} | "unstructured" (default "2:4");
- `sparsity`: the fraction pruned where the structure is unstructured (default 0.5);
- `targets`: per-module overrides, an ordered map {name | name suffix | "re:<regex>": "N:M" |
  "unstructured" | a fraction (unstructured at that sparsity) | null (leave dense)}; first match
  wins, unmatched modules take `structure`;
- `owl_lambda`, `owl_m`: outlier-weighed layerwise sparsity (OWL, Yin et al., 2023): a dense pass
  measures, per decoder layer, the fraction D_l of Wanda scores above `owl_m` × their layer mean;
  each layer's sparsity becomes target - (D_l - mean D) scaled into [-λ, +λ] (λ = `owl_lambda`),
  so layers with more outliers are pruned less, the mean staying the target. Unstructured only;
- `true_sequential` (wanda, sparsegpt): prune q/k/v, then o, then gate/up, then down, each group
  seeing the pruned earlier ones (as stage `gptq` does); `batch_size`.
`sparsegpt` adds `block_size`, `damp` and `refit` (see `lmpress.prune.sparsegpt`): with `refit`
(default true) a float-weight module's kept weights are then re-solved exactly by least squares
given the mask; modules quantized jointly keep the sweep's values (they must stay on the grid).

Modules whose scheme quantizes weights are quantized here too, so the zeros survive (a later
GPTQ would move them): `sparsegpt` jointly inside its sweep, `wanda`/`magnitude` by RTN of the
pruned weight; a later `rtn`/`gptq` stage leaves them as already quantized. An N:M structure is
written into the module's scheme (`sparsity: "2:4"`), so `save` packs 2:4 modules in the
sparse format. Runs before any quantization stage; modules outside the decoder layers fall back
to magnitude scores.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from functools import partial

import torch

from lmpress.calibration.layerwise import LayerwiseRunner, group_passes
from lmpress.calibration.stats import capture_input_stats
from lmpress.prune.masks import (
    magnitude_scores, nm_mask, outlier_ratio, owl_shifts, parse_structure, sparsity_of, unstructured_mask, wanda_scores,
)
from lmpress.prune.sparsegpt import sparsegpt_prune
from lmpress.quant.primitives import fake_quantize, quant_error
from lmpress.quant.rtn import rtn_quantize
from lmpress.quant.sim import SimQuantLinear

from ..recipe import matches
from ..stage import register_stage
from ..surgery import get_module, to_sim
from .gptq import stubbed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Spec:
    nm: tuple[int, int] | None
    sparsity: float  # unstructured fraction (for N:M: 1 - n/m)

    @property
    def label(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"unstructured {self.sparsity:.3f}"


@dataclass(frozen=True)
class _Pruning:
    structure: str = "2:4"
    sparsity: float = 0.5
    targets: dict | None = None
    owl_lambda: float | None = None
    owl_m: float = 5.0
    true_sequential: bool = True
    batch_size: int | None = None

    def __post_init__(self) -> None:
        n = self.name
        try:
            parse_structure(self.structure)
        except ValueError as e:
            raise ValueError(f"{n}: option structure: {e}") from None
        self._fraction("sparsity", self.sparsity)
        if self.targets is not None:
            if not isinstance(self.targets, dict):
                raise ValueError(f"{n}: option targets must be a mapping {{name | 're:<regex>': 'N:M' | 'unstructured' | fraction | null}}")
            for pat, value in self.targets.items():
                if isinstance(pat, str) and pat.startswith("re:"):
                    try:
                        re.compile(pat[3:])
                    except re.error as e:
                        raise ValueError(f"{n}: targets key {pat!r} is not a valid regex ({e})") from None
                if value is None or isinstance(value, float) and not isinstance(value, bool):
                    if value is not None:
                        self._fraction(f"targets[{pat!r}]", value)
                    continue
                try:
                    parse_structure(value)
                except ValueError as e:
                    raise ValueError(f"{n}: targets[{pat!r}]: {e}") from None
        if self.owl_lambda is not None:
            if isinstance(self.owl_lambda, bool) or not isinstance(self.owl_lambda, (int, float)) or not 0 < self.owl_lambda < 0.5:
                raise ValueError(f"{n}: option owl_lambda={self.owl_lambda!r} must be a number in (0, 0.5) (e.g. 0.08) or null")
            if isinstance(self.owl_m, bool) or not isinstance(self.owl_m, (int, float)) or self.owl_m <= 1:
                raise ValueError(f"{n}: option owl_m={self.owl_m!r} must be a number > 1 (e.g. 5)")
        for key in ("true_sequential",):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{n}: option {key}={getattr(self, key)!r} must be true or false")
        b = self.batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"{n}: option batch_size={b!r} must be a positive integer or null")

    def _fraction(self, key: str, v) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{self.name}: option {key}={v!r} must be a fraction in [0, 1) (e.g. 0.5)")

    # ------------------------------------------------------------------ planning
    def spec_for(self, fqn: str) -> _Spec | None:
        value = self.structure
        for pat, v in (self.targets or {}).items():
            if matches(pat, fqn):
                value = v
                break
        if value is None:
            return None
        if isinstance(value, float):
            return _Spec(None, float(value))
        nm = parse_structure(value)
        return _Spec(nm, 1 - nm[0] / nm[1]) if nm else _Spec(None, float(self.sparsity))

    def plan(self, model, ctx) -> tuple[dict[int, dict[str, tuple[str, _Spec]]], list[tuple[str, _Spec]]]:
        """The structural half of `apply`: every planned module becomes a SimQuantLinear whose scheme
        carries the stage's N:M (ctx.plan too). Returns ({layer: {path in the layer: (fqn, spec)}},
        [(fqn, spec) outside the decoder layers' known linears]). Works on a meta-device skeleton
        (the larger-than-memory path plans before any weight is read)."""
        arch = ctx.arch
        n_layers = len(arch.decoder_layers(model))
        known = set(arch.linears)
        todo: dict[int, dict[str, tuple[str, _Spec]]] = {}
        outside: list[tuple[str, _Spec]] = []
        for fqn, scheme in list(ctx.plan.items()):
            spec = self.spec_for(fqn)
            if spec is None:
                if scheme.sparsity is not None:
                    raise ValueError(f"{self.name}: targets leave {fqn} dense but its scheme says sparsity {scheme.sparsity!r}; make them agree")
                to_sim(model, fqn, scheme)
                continue
            want = f"{spec.nm[0]}:{spec.nm[1]}" if spec.nm else None
            if scheme.sparsity is not None and scheme.sparsity != want:
                raise ValueError(f"{self.name}: {fqn} has scheme sparsity {scheme.sparsity!r} but the stage prunes it as {spec.label}; make them agree")
            new = replace(scheme, sparsity=want) if want else scheme
            mod = get_module(model, fqn)
            if isinstance(mod, SimQuantLinear):
                if mod.quantized:
                    raise ValueError(f"{self.name}: {fqn} is already quantized; put the sparsity stage before rtn/gptq")
                mod.scheme = new
            else:
                to_sim(model, fqn, new)
            ctx.plan[fqn] = new
            idx, rel = arch.layer_of(fqn, n_layers)
            if idx is not None and rel in known:
                todo.setdefault(idx, {})[rel] = (fqn, spec)
            else:
                outside.append((fqn, spec))
        return todo, outside

    def apply(self, model, ctx) -> None:
        todo, outside = self.plan(model, ctx)
        if self.owl_lambda is not None:
            if any(s.nm for mods in todo.values() for _, s in mods.values()):
                raise ValueError(f"{self.name}: owl_lambda allocates unstructured sparsity; set structure: unstructured")
            todo = self._owl(model, ctx, todo)
        t0 = time.perf_counter()
        self.walk(model, ctx, todo)
        self.prune_outside(model, ctx, outside)
        log.info("%s: done in %.1fs", self.name, time.perf_counter() - t0)

    def prune_outside(self, model, ctx, outside: list[tuple[str, _Spec]]) -> None:
        """Magnitude pruning of the planned modules outside the decoder layers (no layer inputs)."""
        for fqn, spec in outside:
            log.info("%s: %s is outside the decoder layers' known linears: magnitude pruning", self.name, fqn)
            sim = get_module(model, fqn)
            self.install(ctx, fqn, sim, spec, self.mask(sim.weight.detach().float(), spec, None), method="magnitude")

    # ------------------------------------------------------------------ OWL
    def _owl(self, model, ctx, todo):
        if ctx.calib is None:
            raise ValueError(f"{self.name}: owl_lambda needs calibration data (Wanda scores)")
        runner = LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=self.batch_size or ctx.batch_size, device=ctx.device)
        ratios: dict[int, float] = {}
        for step in runner:
            mine = todo.get(step.index)
            if not mine:
                continue
            mods = {rel: step.layer.get_submodule(rel) for rel in mine}
            with capture_input_stats(mods, hessian=False, norms=True) as stats:
                step.forward()
            scores = torch.cat([wanda_scores(m.weight, stats[rel].col_norms).flatten() for rel, m in mods.items()])
            ratios[step.index] = outlier_ratio(scores, self.owl_m)
        shift = owl_shifts([ratios[i] for i in sorted(ratios)], self.owl_lambda)
        out = {}
        for (i, mine), delta in zip(sorted(todo.items()), shift):
            out[i] = {rel: (fqn, _Spec(None, min(max(spec.sparsity - delta, 0.0), 0.99))) for rel, (fqn, spec) in mine.items()}
            log.info("%s: OWL layer %d: outlier ratio %.4f, sparsity %+.4f", self.name, i, ratios[i], -delta)
        return out

    # ------------------------------------------------------------------ walking
    def walk(self, model, ctx, todo) -> None:
        if ctx.calib is None:
            raise ValueError(f"stage {self.name!r} needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
        runner = LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=self.batch_size or ctx.batch_size, device=ctx.device)
        n_layers = len(runner)
        for step in runner:
            mine = todo.get(step.index)
            if not mine:
                continue
            t0 = time.perf_counter()
            self.prune_layer(ctx, step.layer, mine, step)
            log.info("%s: layer %d/%d pruned in %.1fs", self.name, step.index + 1, n_layers, time.perf_counter() - t0)

    def prune_layer(self, ctx, layer, mine: dict[str, tuple[str, _Spec]], step=None) -> None:
        """Prune the modules `mine` ({path in `layer`: (fqn, spec)}) of one decoder layer, group by
        group on the statistics of `step` (its calibration inputs). The in-memory walk and the
        larger-than-memory path both call it."""
        for targets, later in group_passes(ctx.arch.sequential_groups, mine, self.true_sequential):
            self._collect_and_prune(step, ctx, mine, targets, later)

    def _collect_and_prune(self, step, ctx, mine, targets, later) -> None:
        layer = step.layer
        sims = {rel: layer.get_submodule(rel) for rel in targets}
        transforms = {rel: partial(fake_quantize, args=s.scheme.inputs) for rel, s in sims.items() if s.scheme.inputs is not None}
        with stubbed(layer, later), capture_input_stats(sims, transforms=transforms, **self.stats_options) as stats:
            step.forward()
        for rel in targets:
            fqn, spec = mine[rel]
            self.prune_one(ctx, fqn, sims[rel], spec, stats[rel])
            stats[rel].release()

    stats_options = {"hessian": False, "norms": True}

    def prune_one(self, ctx, fqn, sim, spec, acc) -> None:
        W = sim.weight.detach().float()
        self.install(ctx, fqn, sim, spec, self.mask(W, spec, acc), method=self.name)

    def mask(self, W, spec: _Spec, acc) -> torch.Tensor:
        if acc is None or self.name == "magnitude":
            scores, per_row = magnitude_scores(W), False
        else:
            scores, per_row = wanda_scores(W, acc.col_norms.to(W.device)), True
        return nm_mask(scores, *spec.nm) if spec.nm else unstructured_mask(scores, spec.sparsity, per_row=per_row)

    def install(self, ctx, fqn, sim, spec, mask, method, result=None) -> None:
        W = sim.weight.detach().clone()
        args = sim.scheme.weights
        extra = {}
        if result is not None:  # sparsegpt: weight (and codes) from the sweep
            if args is not None:
                sim.set_quantized(result["codes"].to(W.device), result["scale"].to(W.device), result["zero"].to(W.device))
            else:
                sim.weight.data = result["weight"].to(W.device, W.dtype)
            extra = {"sparsegpt_loss": result["loss"]}
            if "sweep_loss" in result:  # refit: the sweep's own objective, before the least squares
                extra["sweep_loss"] = result["sweep_loss"]
            if result["dead"]:
                extra["dead_inputs"] = result["dead"]
        else:
            pruned = torch.where(mask.to(W.device), W.float(), torch.zeros((), device=W.device))
            if args is not None:
                sim.set_quantized(*rtn_quantize(pruned, args))
            else:
                sim.weight.data = pruned.to(W.dtype)
        if ctx.report is not None:
            ctx.report.record_module(fqn, scheme=sim.scheme.name, method=method + ("+quant" if args is not None else ""),
                                     structure=spec.label, sparsity=round(sparsity_of(sim.weight), 5),
                                     **quant_error(W, sim.weight), **extra)


@register_stage("magnitude", needs_calibration=False)
@dataclass(frozen=True)
class Magnitude(_Pruning):
    def walk(self, model, ctx, todo) -> None:
        layers = ctx.arch.decoder_layers(model)
        for i, mine in todo.items():
            self.prune_layer(ctx, layers[i], mine)

    def prune_layer(self, ctx, layer, mine, step=None) -> None:
        for rel, (fqn, spec) in mine.items():
            sim = layer.get_submodule(rel)
            self.install(ctx, fqn, sim, spec, self.mask(sim.weight.detach().float(), spec, None), method="magnitude")


@register_stage("wanda", needs_calibration=True)
@dataclass(frozen=True)
class Wanda(_Pruning):
    pass


@register_stage("sparsegpt", needs_calibration=True)
@dataclass(frozen=True)
class SparseGPT(_Pruning):
    block_size: int = 128
    damp: float = 0.01
    refit: bool = True

    stats_options = {"hessian": True, "norms": False}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size % 16:
            raise ValueError(f"sparsegpt: option block_size={self.block_size!r} must be a positive multiple of 16 (e.g. 128)")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"sparsegpt: option damp={d!r} must be a number in (0, 1] (e.g. 0.01)")
        if not isinstance(self.refit, bool):
            raise ValueError(f"sparsegpt: option refit={self.refit!r} must be true or false")

    def prune_one(self, ctx, fqn, sim, spec, acc) -> None:
        W = sim.weight.detach().float()
        H = acc.hessian
        res = sparsegpt_prune(W.to(H.device), H, nm=spec.nm, sparsity=None if spec.nm else spec.sparsity,
                              quant=sim.scheme.weights, block_size=self.block_size, damp=self.damp,
                              refit=self.refit and sim.scheme.weights is None)
        self.install(ctx, fqn, sim, spec, res["mask"], method="sparsegpt", result=res)


@register_stage("structured", needs_calibration=True)
@dataclass(frozen=True)
class Structured:
    """Remove whole FFN channels (`ffn_keep`: fraction kept, rounded down to a multiple of
    `multiple_of`) and query heads (`heads_keep`: fraction of each KV group's heads kept), ranked
    per layer by calibration importance (`lmpress.prune.structured`), the same counts in every
    layer (a Hugging Face config holds one intermediate_size and one head count). The matrices
    shrink in place and `model.config` records the new sizes, so `save`/`load` rebuild them.
    Runs first, on plain nn.Linear modules (before fuse_norms/rotate/quantization stages)."""

    ffn_keep: float = 1.0
    heads_keep: float = 1.0
    multiple_of: int = 8
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("ffn_keep", "heads_keep"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"structured: option {key}={v!r} must be a fraction in (0, 1] (kept share; 1 = no pruning)")
        m = self.multiple_of
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"structured: option multiple_of={m!r} must be a positive integer (e.g. 8)")
        b = self.batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"structured: option batch_size={b!r} must be a positive integer or null")

    def sizes(self, cfg) -> dict | None:
        """The FFN width and query heads per KV group before and after (None: nothing to remove)."""
        inter = cfg.intermediate_size
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        group = n_heads // n_kv
        new_inter = max(self.multiple_of, int(inter * self.ffn_keep) // self.multiple_of * self.multiple_of)
        new_inter = min(new_inter, inter)
        new_group = max(1, round(group * self.heads_keep))
        if new_inter == inter and new_group == group:
            return None
        return {"inter": inter, "new_inter": new_inter, "n_heads": n_heads, "n_kv": n_kv, "head_dim": head_dim,
                "group": group, "new_group": new_group}

    def shrinks(self, arch, sz: dict) -> dict[str, tuple[int, int]]:
        """{linear path in a layer: its (out, in) after}: the linears this stage cuts."""
        hidden_q = sz["n_kv"] * sz["new_group"] * sz["head_dim"]
        out = {}
        if sz["new_inter"] < sz["inter"]:
            out.update({arch.gate_proj: (sz["new_inter"], None), arch.up_proj: (sz["new_inter"], None),
                        arch.down_proj: (None, sz["new_inter"])})
        if sz["new_group"] < sz["group"]:
            out.update({arch.q_proj: (hidden_q, None), arch.o_proj: (None, hidden_q)})
        return out

    def shrink_layer(self, step, arch, sz: dict) -> None:
        """Rank one decoder layer's FFN channels and query heads on its calibration inputs
        (`step.forward()`) and cut the lowest: the per-layer body, which `--lazy` calls too."""
        from lmpress.prune.structured import (ffn_channel_scores, head_columns, head_scores, keep_heads, keep_top,
                                              shrink_linear)
        from torch import nn

        from ..surgery import set_module

        layer = step.layer
        mods = {rel: layer.get_submodule(rel) for rel in arch.linears}
        odd = [rel for rel, m in mods.items() if type(m) is not nn.Linear]
        if odd:
            raise ValueError(f"structured: {step.name}.{odd[0]} is a {type(mods[odd[0]]).__name__}; run stage "
                             f"'structured' first, on the plain model")
        hooked = {arch.o_proj: mods[arch.o_proj], arch.down_proj: mods[arch.down_proj]}
        with capture_input_stats(hooked, hessian=False, norms=True) as stats:
            step.forward()
        if sz["new_inter"] < sz["inter"]:
            keep = keep_top(ffn_channel_scores(mods[arch.down_proj].weight, stats[arch.down_proj].col_norms), sz["new_inter"])
            for rel in (arch.gate_proj, arch.up_proj):
                set_module(layer, rel, shrink_linear(mods[rel], rows=keep))
            set_module(layer, arch.down_proj, shrink_linear(mods[arch.down_proj], cols=keep))
        if sz["new_group"] < sz["group"]:
            heads = keep_heads(head_scores(mods[arch.o_proj].weight, stats[arch.o_proj].col_norms, sz["head_dim"]),
                               sz["n_kv"], sz["new_group"])
            cols = head_columns(heads, sz["head_dim"])
            set_module(layer, arch.q_proj, shrink_linear(mods[arch.q_proj], rows=cols))
            set_module(layer, arch.o_proj, shrink_linear(mods[arch.o_proj], cols=cols))
            attn = layer.get_submodule(arch.attention)
            attn.num_key_value_groups = sz["new_group"]
            if hasattr(attn, "num_heads"):
                attn.num_heads = sz["n_kv"] * sz["new_group"]
        log.info("structured: layer %d: FFN %d -> %d channels, %d -> %d query heads", step.index, sz["inter"],
                 sz["new_inter"], sz["n_heads"], sz["n_kv"] * sz["new_group"])

    def finish(self, cfg, sz: dict, ctx) -> None:
        """The new sizes in `model.config` (so `save`/`load` rebuild the shapes) and the report."""
        cfg.intermediate_size = sz["new_inter"]
        cfg.num_attention_heads = sz["n_kv"] * sz["new_group"]
        cfg.head_dim = sz["head_dim"]  # explicit: hidden_size // num_attention_heads no longer gives it
        if ctx.report is not None:
            ctx.report.extra["structured"] = {"intermediate_size": [sz["inter"], sz["new_inter"]],
                                              "num_attention_heads": [sz["n_heads"], cfg.num_attention_heads],
                                              "head_dim": sz["head_dim"]}

    def apply(self, model, ctx) -> None:
        if ctx.calib is None:
            raise ValueError("stage 'structured' needs calibration data: pass calib=sample_calibration(tokenizer, ...)")
        sz = self.sizes(model.config)
        if sz is None:
            log.info("structured: nothing to remove (ffn_keep=%s, heads_keep=%s)", self.ffn_keep, self.heads_keep)
            return
        runner = LayerwiseRunner(model, ctx.arch, ctx.calib.tokens, batch_size=self.batch_size or ctx.batch_size,
                                 device=ctx.device)
        for step in runner:
            self.shrink_layer(step, ctx.arch, sz)
        self.finish(model.config, sz, ctx)
