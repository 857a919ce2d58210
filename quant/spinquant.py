"""Learned rotations (SpinQuant-style): R1 and per-layer R2 trained on the Stiefel manifold.

The model (norms fused, not yet rotated, not yet quantized) stays frozen. Each step builds the
rotated weights from the current R1 / R2 — the same fusion `rotate_model` applies offline:

    readers of the residual (q, k, v, gate, up):  W ← W R1
    writers (o, down):                           W ← R1ᵀ W
    v (writer of the per-head value space):      W_h ← R2ᵀ W_h          (rows of KV head h)
    o (reader of it):                            W_j ← W_j R2           (columns of query head j)
    down with the online R4 = H:                 W ← R1ᵀ W H, input x ← x H

fake-quantizes them (unless `weights: false`: SpinQuant learns against activation quantization
only when GPTQ quantizes the weights afterwards, since GPTQ corrects the weight error that RTN
would leave) and every linear input with the recipe's schemes (round-to-nearest, with a
straight-through estimator), runs the model (`torch.func.functional_call`; the embedding output
is rotated by a hook, lm_head's input un-rotated by one, both cheap) and takes the loss: next-
token cross entropy, or KL divergence to the float model's own logits. R1 and R2 are updated by
Cayley SGD: with the (momentum) gradient G at X, A = G Xᵀ − X Gᵀ is skew-symmetric and

    X ← (I + τ/2 A)⁻¹ (I − τ/2 A) X

is orthogonal again exactly (a Cayley retraction), a descent direction for small τ
(Li, Li, Todorovic, ICLR 2020; SpinQuant, Liu et al. 2024, uses it with lr 1.5). τ is capped at
`max_step / ‖A‖_F` so that one step never turns the rotation by much, and both decay linearly to
0 over the steps. (Measured on SmolLM2: with a cap of 1, 32 steps raised the W4A4 loss on the
first batch from 5.20 to 5.63 — the steps overshoot; the default cap is 0.05.)

On SmolLM2-135M at W16A4KV4 from a randomized Hadamard start, 32 steps of 256 tokens (KL or CE,
max_step 0.01 or 0.05) raised the loss. Our reading: a step leaves the Hadamard's flat ±1/√n
entries at once, while so few noisy steps learn little. Hence `keep_best`: the initial rotations
are kept unless held-out sequences say the learned ones are better. The KV cache is not quantized
during learning (R3 is a fixed Hadamard and does not depend on R1/R2).

`loss: layer` learns them on a layer-local objective instead (`lmpress.quant.spinquant_local`):
minutes where end to end takes hours, and on SmolLM2 the first to beat the Hadamard.

`learn_rotations(model, arch, plan, tokens, args)` returns the learned float64 R1 and R2s and
a log of the losses; `rotate_model(..., r1_matrix=R1, r2_matrices=R2s)` then fuses them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmpress.kernels.online import OnlineHadamard

from .primitives import fake_quantize_ste
from .rotate import rotation_matrix, sub_seed
from .scheme import QuantArgs, QuantScheme

log = logging.getLogger(__name__)

LOSSES = ("ce", "kl", "layer")


@dataclass(frozen=True)
class LearnArgs:
    steps: int = 100
    lr: float = 1.5
    momentum: float = 0.9
    max_step: float = 0.05  # largest ‖τA‖_F a step may take (the cap that keeps a step a small turn)
    batch_size: int = 1
    samples: int | None = None  # calibration sequences used (None: all), cycled over the steps
    seqlen: int | None = None  # tokens of each sequence used (None: all): a step's cost is linear in it
    loss: str = "ce"
    weights: bool = True  # fake-quantize weights (RTN) while learning; false: activations only
    r2: bool = True
    init: str = "hadamard"  # R1 / R2 initialisation: "hadamard" | "random" (seeded)
    seed: int = 0
    keep_best: bool = True  # keep the initial rotations when learning did not lower the held-out loss
    holdout: int = 4  # calibration sequences (the last ones, not trained on when there are enough) that judge it
    rows: int = 1024  # loss "layer": input tokens kept per site
    row_batch: int = 256  # loss "layer": of them, drawn per step

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rows", "row_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"learn_rotation.{name}={v!r} must be a positive integer")
        for name in ("samples", "seqlen"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 2):
                raise ValueError(f"learn_rotation.{name}={v!r} must be an integer >= 2 or null (all)")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"learn_rotation.lr={self.lr!r} must be a positive number (SpinQuant uses 1.5)")
        if not isinstance(self.max_step, (int, float)) or not self.max_step > 0:
            raise ValueError(f"learn_rotation.max_step={self.max_step!r} must be a positive number (e.g. 0.05)")
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"learn_rotation.momentum={self.momentum!r} must be in [0, 1)")
        if self.loss not in LOSSES:
            raise ValueError(f"learn_rotation.loss={self.loss!r}: use one of {list(LOSSES)}")
        for name in ("weights", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"learn_rotation.{name}={getattr(self, name)!r} must be true or false")
        if not isinstance(self.holdout, int) or isinstance(self.holdout, bool) or self.holdout < 1:
            raise ValueError(f"learn_rotation.holdout={self.holdout!r} must be a positive integer (sequences)")
        if self.init not in ("hadamard", "random"):
            raise ValueError(f"learn_rotation.init={self.init!r}: use 'hadamard' or 'random'")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"learn_rotation.seed={self.seed!r} must be a non-negative integer")


# --------------------------------------------------------------------------- Cayley SGD


def cayley_retract(X: torch.Tensor, G: torch.Tensor, lr: float, max_step: float = 1.0) -> torch.Tensor:
    """One Cayley step on the orthogonal group from X (n, n) along the gradient G, float64,
    with τ = min(lr, max_step / ‖A‖_F). The result is orthogonal to rounding whatever the step."""
    X64, G64 = X.double(), G.double()
    A = G64 @ X64.T - X64 @ G64.T  # (n, n) skew-symmetric
    norm = torch.linalg.matrix_norm(A).item()
    tau = min(lr, max_step / (norm + 1e-12))
    eye = torch.eye(X.shape[0], dtype=torch.float64, device=X.device)
    return torch.linalg.solve(eye + 0.5 * tau * A, (eye - 0.5 * tau * A) @ X64)


class CayleySGD:
    """SGD with momentum on a list of orthogonal matrices (float64 leaves with .grad)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.9, max_step: float = 1.0):
        self.params, self.lr, self.momentum, self.max_step = params, lr, momentum, max_step
        self.buf: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        for k, X in enumerate(self.params):
            if X.grad is None:
                continue
            G = X.grad
            if self.momentum:
                self.buf[k] = G.clone() if self.buf[k] is None else self.momentum * self.buf[k] + G
                G = self.buf[k]
            X.copy_(cayley_retract(X, G, self.lr, self.max_step))
            X.grad = None


# --------------------------------------------------------------------------- the rotated, quantized forward


def _ste(x: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
    """Fake-quantize with a straight-through rounding and gradients through the min-max qparams
    (`fake_quantize_ste`: without them a rotation would learn nothing from the quantization error)."""
    if args is None:
        return x
    return fake_quantize_ste(x, args)


def train_weight_args(args: QuantArgs | None) -> QuantArgs | None:
    """RTN during learning: the MSE clip search is too slow to redo at every step."""
    if args is None or not args.mse_clip:
        return args
    return QuantArgs(**{**args.to_dict(), "mse_clip": False})


@dataclass
class _Linear:
    fqn: str
    module: nn.Linear
    role: str  # q k v o gate up down
    layer: int
    scheme: QuantScheme | None
    W: torch.Tensor  # float32 base weight (down: W H4 already)
    online: OnlineHadamard | None = None


class RotatedForward:
    """Hooks + weight overrides that run the model as if R1/R2 were fused and it were quantized."""

    def __init__(self, model: nn.Module, arch, plan: dict[str, QuantScheme], online_down: bool, seed: int,
                 weights: bool = True):
        cfg = model.config
        self.weights = weights  # fake-quantize the rotated weights (else only the activations)
        self.model, self.arch = model, arch
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.hidden = cfg.hidden_size
        self.dtype = next(model.parameters()).dtype  # learning runs in the model's dtype (use fp32 or fp64)
        self.linears: list[_Linear] = []
        roles = {arch.q_proj: "q", arch.k_proj: "k", arch.v_proj: "v", arch.o_proj: "o",
                 arch.gate_proj: "gate", arch.up_proj: "up", arch.down_proj: "down"}
        for i, layer in enumerate(arch.decoder_layers(model)):
            for path, role in roles.items():
                fqn = f"{arch.layers}.{i}.{path}"
                mod = layer.get_submodule(path)
                if type(mod) is not nn.Linear:
                    raise TypeError(f"{fqn} is a {type(mod).__name__}; learn_rotation needs the plain float model "
                                    "(run it after fuse_norms and before rotate / rtn / gptq)")
                W = mod.weight.detach().to(self.dtype)
                T = None
                if role == "down" and online_down:
                    T = OnlineHadamard(mod.in_features, sub_seed(seed, "r4", i)).to(W.device)
                    W = (mod.weight.detach().double() @ T.matrix()).to(self.dtype)  # W H4, fixed
                self.linears.append(_Linear(fqn, mod, role, i, plan.get(fqn), W, T))
        attn = arch.decoder_layers(model)[0].get_submodule(arch.attention)
        self.head_dim = getattr(attn, "head_dim", None) or self.hidden // self.n_heads
        self.lm_head = model.get_submodule(arch.lm_head)
        self.head_scheme = plan.get(arch.lm_head)
        self.embed = model.get_submodule(arch.embed)
        self.R1: torch.Tensor | None = None
        self.R2: list[torch.Tensor] | None = None
        self.quantize = True
        self._handles: list[Any] = []

    # weights -------------------------------------------------------------------------------

    def effective(self, lin: _Linear, R1: torch.Tensor, R2: torch.Tensor | None) -> torch.Tensor:
        W = lin.W
        if lin.role in ("q", "k", "gate", "up"):
            return W @ R1
        if lin.role == "v":
            W = W @ R1
            if R2 is not None:
                W = torch.matmul(R2.T, W.reshape(self.n_kv, self.head_dim, -1)).reshape(W.shape)  # (kv, d, hidden)
            return W
        if lin.role == "o":
            if R2 is not None:
                W = torch.matmul(W.reshape(W.shape[0], self.n_heads, self.head_dim), R2).reshape(W.shape)  # (hidden, heads, d)
            return R1.T @ W
        return R1.T @ W  # down (H4 already fused into lin.W)

    def overrides(self) -> dict[str, torch.Tensor]:
        R1 = self.R1.to(self.dtype)
        out = {}
        for lin in self.linears:
            R2 = None if self.R2 is None else self.R2[lin.layer].to(self.dtype)
            W = self.effective(lin, R1, R2)
            if self.quantize and self.weights and lin.scheme is not None:
                W = _ste(W, train_weight_args(lin.scheme.weights))
            out[f"{lin.fqn}.weight"] = W
            b = lin.module.bias
            if b is not None and lin.role in ("v", "o", "down"):
                b = b.detach().to(self.dtype)
                if lin.role == "v" and R2 is not None:
                    b = (b.reshape(self.n_kv, 1, self.head_dim) @ R2).reshape(-1)
                elif lin.role in ("o", "down"):
                    b = b @ R1
                out[f"{lin.fqn}.bias"] = b
        if self.head_scheme is not None and self.quantize:  # the head reads the rotated stream: W R1
            Wh = self.lm_head.weight.detach() @ R1
            out[f"{self.arch.lm_head}.weight"] = _ste(Wh, train_weight_args(self.head_scheme.weights)) if self.weights else Wh
        return out

    # hooks ---------------------------------------------------------------------------------

    def __enter__(self) -> "RotatedForward":
        def embed_hook(mod, inp, out):
            return out @ self.R1.to(out.dtype)  # (B, T, hidden): the residual stream becomes h R1

        def head_pre(mod, args):
            x = args[0]
            if self.head_scheme is not None and self.quantize:  # weight override holds W R1
                return (_ste(x, self.head_scheme.inputs),)
            return (x @ self.R1.to(x.dtype).T,)  # un-rotate for the untouched float head

        self._handles.append(self.embed.register_forward_hook(embed_hook))
        self._handles.append(self.lm_head.register_forward_pre_hook(head_pre))
        for lin in self.linears:
            self._handles.append(lin.module.register_forward_pre_hook(self._input_hook(lin)))
        return self

    def _input_hook(self, lin: _Linear) -> Callable:
        def hook(mod, args):
            x = args[0]
            if lin.online is not None:
                x = lin.online(x)
            if self.quantize and lin.scheme is not None:
                x = _ste(x, lin.scheme.inputs)
            return (x,)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, self.overrides(), (ids,), {"use_cache": False}, strict=False).logits


def _loss(logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
    if teacher is None:  # next-token cross entropy
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, 1), F.log_softmax(teacher.float(), -1).flatten(0, 1),
                    log_target=True, reduction="batchmean")


def learn_rotations(model: nn.Module, arch, plan: dict[str, QuantScheme], tokens: torch.Tensor, args: LearnArgs,
                    online_down: bool = True, progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Learn R1 (hidden) and, if `args.r2`, one R2 (head_dim) per layer on `tokens` (n, seqlen).

    Returns {"r1": (hidden, hidden) float64, "r2": [(head_dim, head_dim) float64] | None,
    "losses": [per-step loss], "init_loss", "final_loss" (mean quantized loss over the first
    batch before and after), "heldout_init", "heldout_final" (mean loss over the `holdout` last
    sequences, left out of training under keep_best when there are more), "kept" ("learned", or "initial" when
    `keep_best` found no held-out improvement and restored the initial rotations), "seconds"}.
    The model's weights are not changed."""
    device = next(model.parameters()).device
    tokens = tokens[:, : args.seqlen] if args.seqlen else tokens  # (n, seqlen)
    held = tokens[-args.holdout:]  # (h, seqlen): judges learned against initial rotations (keep_best)
    train = tokens[: -args.holdout] if args.keep_best and tokens.shape[0] > args.holdout else tokens
    tokens = train[: args.samples] if args.samples else train
    if args.loss == "layer":
        from .spinquant_local import learn_rotations_local

        return learn_rotations_local(model, arch, plan, tokens, held, args, progress)
    rf = RotatedForward(model, arch, plan, online_down, args.seed, weights=args.weights)
    R1 = rotation_matrix(rf.hidden, args.init, args.seed).to(device).requires_grad_(True)
    R2 = None
    if args.r2:
        R2 = [rotation_matrix(rf.head_dim, args.init, sub_seed(args.seed, "r2", i, 0)).to(device).requires_grad_(True)
              for i in range(len(arch.decoder_layers(model)))]
    params = [R1] + (R2 or [])
    opt = CayleySGD(params, args.lr, args.momentum, args.max_step)
    n = tokens.shape[0]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with rf, torch.enable_grad():
            rf.R1, rf.R2 = R1, R2

            def batch(k: int) -> torch.Tensor:
                idx = [(k * args.batch_size + j) % n for j in range(args.batch_size)]
                return tokens[idx].to(device)  # (B, seqlen)

            def teacher(ids):
                if args.loss != "kl":
                    return None
                with torch.no_grad():
                    rf.__exit__()
                    t = model(ids, use_cache=False).logits
                    rf.__enter__()
                return t

            def evaluate(ids) -> float:
                with torch.no_grad():
                    return _loss(rf.logits(ids), ids, teacher(ids)).item()

            def held_loss() -> float:
                return sum(evaluate(held[j:j + 1].to(device)) for j in range(held.shape[0])) / held.shape[0]

            probe = batch(0)
            init_loss = evaluate(probe)
            init_held = held_loss() if args.keep_best else float("nan")
            R1_0 = R1.detach().clone() if args.keep_best else None
            R2_0 = [r.detach().clone() for r in R2] if args.keep_best and R2 is not None else None
            for step in range(args.steps):
                ids = batch(step)
                loss = _loss(rf.logits(ids), ids, teacher(ids))
                loss.backward()
                decay = 1.0 - step / args.steps  # linear decay of the step to 0
                opt.lr, opt.max_step = args.lr * decay, args.max_step * decay
                opt.step()
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"learn_rotation: loss became {losses[-1]} at step {step}; lower lr")
                if progress is not None:
                    progress(step, losses[-1])
                log.debug("learn_rotation step %d loss %.4f", step, losses[-1])
            final_loss = evaluate(probe)
            final_held, kept = float("nan"), "learned"
            if args.keep_best:
                final_held = held_loss()
                if not final_held < init_held:
                    kept = "initial"
                    with torch.no_grad():
                        R1.copy_(R1_0)
                        for r, r0 in zip(R2 or [], R2_0 or []):
                            r.copy_(r0)
                    log.warning("learn_rotation: held-out loss %.4f -> %.4f did not improve; keeping the initial (%s) "
                                "rotations (more steps / samples, a smaller max_step, or the kl loss may help)",
                                init_held, final_held, args.init)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    secs = time.perf_counter() - t0
    log.info("learn_rotation: %d steps in %.1f s; loss on the first batch %.4f -> %.4f", args.steps, secs, init_loss, final_loss)
    return {"r1": R1.detach(), "r2": None if R2 is None else [r.detach() for r in R2], "losses": losses,
            "init_loss": init_loss, "final_loss": final_loss, "heldout_init": init_held, "heldout_final": final_held,
            "kept": kept, "seconds": secs}


def orthogonality_error(X: torch.Tensor) -> float:
    """max |X Xᵀ − I|."""
    X = X.double()
    return (X @ X.T - torch.eye(X.shape[0], dtype=torch.float64, device=X.device)).abs().max().item()
