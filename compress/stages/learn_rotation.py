"""Stage `learn_rotation`: SpinQuant-style learned R1 (residual) and per-layer R2 (per head),
trained with Cayley SGD on the calibration data under the recipe's own weight and activation
fake-quant, then fused offline exactly like `rotate` (with the same online R3/R4 Hadamards);
see `lmpress.quant.spinquant`.

```yaml
- learn_rotation: {steps: 100, lr: 1.5, momentum: 0.9, batch_size: 1, samples: null, seqlen: null,
                   loss: ce, r2: true, init: hadamard, seed: 0, keep_best: true, holdout: 4,
                   rows: 1024, row_batch: 256, online: [down_proj, qk]}
```
`samples`: calibration sequences used (null: all of them, cycled over the steps); `seqlen`: the
first tokens of each sequence used (null: all; a step costs about one forward and backward of
`batch_size x seqlen` tokens plus the rotation of every weight); `loss`: `ce`
(next-token cross entropy) or `kl` (to the float model's logits), both end to end, or `layer`:
the output error under activation (and, with `weights`, weight) fake-quant at each linear group
whose input a rotation turns, on `rows` float input tokens per group collected once, `row_batch`
of them a step (`lmpress.quant.spinquant_local`; far cheaper per step); `init`: the seeded starting
point (a randomized Hadamard, as in SpinQuant, or a random orthogonal matrix); `keep_best`: judge
the learned rotations on the last `holdout` calibration sequences (left out of training when
there are more) and keep the initial ones, with a warning, if the loss there did not go down
(a short, noisy run can leave a Hadamard start worse off: see the module doc). It takes the
place of `rotate` in a recipe: before `kv_cache` and the quantization stages.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from lmpress.quant.rotate import DEFAULT_ONLINE, rotate_model
from lmpress.quant.spinquant import LearnArgs, learn_rotations, orthogonality_error

from ..stage import register_stage
from .rotate import check_online, check_unquantized, prepare_norms, record_rotation

log = logging.getLogger(__name__)

LEARN_ONLINE = ("down_proj", "qk")


@register_stage("learn_rotation", needs_calibration=True)
@dataclass(frozen=True)
class LearnRotation(LearnArgs):
    """The learning options are `LearnArgs`' fields (validated there), plus the online transforms."""

    online: tuple[str, ...] = DEFAULT_ONLINE

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "online", check_online("learn_rotation", self.online, LEARN_ONLINE))

    def apply(self, model, ctx) -> None:
        check_unquantized(model, "learn_rotation")
        if ctx.calib is None:
            raise ValueError("learn_rotation needs calibration data (pass calib=sample_calibration(...))")
        prepare_norms(model, ctx, "learn_rotation")
        learned = learn_rotations(model, ctx.arch, ctx.plan, ctx.calib.tokens, self,
                                  online_down="down_proj" in self.online)
        err = max([orthogonality_error(learned["r1"])] + [orthogonality_error(r) for r in learned["r2"] or []])
        summary = rotate_model(model, ctx.arch, kind=self.init, seed=self.seed, online=self.online, r2=self.r2,
                               r1_matrix=learned["r1"], r2_matrices=learned["r2"])
        summary["r1"] = {"kind": "learned", "size": summary["r1"]["size"], "init": self.init, "seed": self.seed}
        record_rotation(ctx, summary, self.online)
        if ctx.report is not None:
            ctx.report.extra["learn_rotation"] = {
                "steps": self.steps, "seconds": round(learned["seconds"], 1), "init_loss": learned["init_loss"],
                "final_loss": learned["final_loss"], "orthogonality_error": err, "kept": learned["kept"],
                "heldout_init": learned["heldout_init"], "heldout_final": learned["heldout_final"],
                "losses": [round(x, 4) for x in learned["losses"]],
            }
        log.info("learn_rotation: loss %.4f -> %.4f in %d steps (%.0f s), max |R Rt - I| %.1e",
                 learned["init_loss"], learned["final_loss"], self.steps, learned["seconds"], err)
