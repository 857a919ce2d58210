"""Stage `rotate`: QuaRot-style rotations (R1 residual, R2 per head, online R3 on Q/K and R4
on down_proj's input), fused offline in float64; see `lmpress.quant.rotate`.

```yaml
- fuse_norms: {}
- rotate: {kind: hadamard, seed: 0, online: [down_proj, qk], r2: true, block: null}
```
`block` (16, 32, 64, 128): R1, R2 and the online input transforms rotate within blocks of that
many channels (block-diagonal randomized Hadamards) instead of the whole width: a rotation that
mixes no two scale groups suits the block-scaled formats (MXFP4 groups of 32 with power-of-two
scales, NVFP4 groups of 16; BRQ, arXiv 2511.04214). R3 (Q/K) stays full-size.
`kind`: "hadamard" (seeded randomized Hadamard; a seeded random orthogonal matrix for orders
with no construction) or "random" (seeded Haar-random orthogonal) for R1 and R2; the online
transforms are always (seeded, randomized) Hadamards, rebuilt from their seed at load time.
The rotation needs fused norms: when the model's norms are not fused yet the stage fuses them
first (and says so in the log). It must run before any quantization stage.

`online` may also name `o_proj`: an online Hadamard of o_proj's input (size hidden), mixing
the heads that R2 leaves apart (QuaRot's H_heads ⊗ H_head_dim, for head counts with no
Hadamard such as SmolLM2's 9).

An input transform (`down_proj`, `o_proj`) wraps the linear in a `RotatedInput`, so the linear
itself moves to `<fqn>.linear`; the stage renames the plan entries and points
`ctx.arch.down_proj` / `ctx.arch.o_proj` there, so later stages (rtn, gptq) find and quantize
it with the rotated input.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from lmpress.kernels.linear import PackedLinear
from lmpress.quant.rotate import DEFAULT_ONLINE, KINDS, ONLINE, norms_fused, rotate_model

from lmpress.quant.sim import SimQuantLinear

from ..stage import OPTIONAL, register_stage
from .fuse_norms import fuse_model_norms

log = logging.getLogger(__name__)


@register_stage("rotate")
@dataclass(frozen=True)
class Rotate:
    kind: str = "hadamard"
    seed: int = 0
    online: tuple[str, ...] = DEFAULT_ONLINE
    r2: bool = True
    block: int | None = dataclasses.field(default=None, metadata=OPTIONAL)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rotate.kind={self.kind!r}: use one of {list(KINDS)}")
        if self.block is not None and (not isinstance(self.block, int) or isinstance(self.block, bool)
                                       or self.block < 2 or self.block & (self.block - 1)):
            raise ValueError(f"rotate.block={self.block!r}: a power of two (16, 32, 64, 128: the block format's group "
                             "size, e.g. 32 for MXFP4, 16 for NVFP4), or null for full-size rotations")
        if self.block is not None and self.kind != "hadamard":
            raise ValueError("rotate.block applies to kind: hadamard (block-diagonal randomized Hadamards)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"rotate.seed={self.seed!r} must be a non-negative integer")
        object.__setattr__(self, "online", check_online("rotate", self.online, ONLINE))
        if not isinstance(self.r2, bool):
            raise ValueError(f"rotate.r2={self.r2!r} must be true or false")

    def apply(self, model, ctx) -> None:
        check_unquantized(model, "rotate")
        prepare_norms(model, ctx, "rotate")
        check_block_sizes(model, ctx.arch, self.block)
        summary = rotate_model(model, ctx.arch, kind=self.kind, seed=self.seed, online=self.online, r2=self.r2, block=self.block)
        record_rotation(ctx, summary, self.online)
        log.info("rotate: R1 %s(%d%s), R2 %s, online %s", self.kind, summary["r1"]["size"],
                 f", blocks of {self.block}" if self.block else "", bool(self.r2), list(self.online))


def check_block_sizes(model, arch, block: int | None) -> None:
    """The block must divide the residual width and every rotated linear's input width."""
    if block is None:
        return
    layer = arch.decoder_layers(model)[0]
    widths = {"hidden_size": model.config.hidden_size,
              "down_proj inputs": layer.get_submodule(arch.down_proj).in_features}
    bad = {k: v for k, v in widths.items() if v % block}
    if bad:
        raise ValueError(f"rotate.block={block} does not divide {bad}; use a block that divides them (16 or 32 for "
                         "most models)")


def check_online(stage: str, online, allowed) -> tuple[str, ...]:
    if online is None:
        online = ()
    if isinstance(online, str) or not isinstance(online, (list, tuple)):
        raise ValueError(f"{stage}.online={online!r} must be a list drawn from {list(allowed)} (e.g. [down_proj, qk]) or []")
    bad = [o for o in online if o not in allowed]
    if bad:
        raise ValueError(f"{stage}.online: unknown entr(y/ies) {bad}; allowed: {list(allowed)}")
    if len(set(online)) != len(online):
        raise ValueError(f"{stage}.online={list(online)} lists an entry twice")
    return tuple(online)


def check_unquantized(model, stage: str) -> None:
    quantized = [n for n, m in model.named_modules() if isinstance(m, (SimQuantLinear, PackedLinear))]
    if quantized:
        raise ValueError(
            f"{stage} must run before quantization: {quantized[0]} is already a {type(model.get_submodule(quantized[0])).__name__}; "
            f"put `- {stage}: {{...}}` before rtn/gptq in the recipe's stages"
        )


def prepare_norms(model, ctx, stage: str) -> None:
    if not norms_fused(model, ctx.arch):
        log.info("%s: norms not fused yet; running fuse_norms first", stage)
        fuse_model_norms(model, ctx)


def record_rotation(ctx, summary: dict, online) -> None:
    """Point the plan and ctx.arch at the linears that moved into RotatedInput wrappers, and
    record the rotation in the report."""
    wrapped = set(summary["wrapped"])
    if wrapped:
        ctx.plan = {(f"{k}.linear" if k in wrapped else k): v for k, v in ctx.plan.items()}
        moved = {f: f"{getattr(ctx.arch, f)}.linear" for f in ("down_proj", "o_proj") if f in online}
        ctx.arch = dataclasses.replace(ctx.arch, **moved)
    if ctx.report is not None:
        ctx.report.extra["rotation"] = {k: v for k, v in summary.items() if k != "wrapped"}
