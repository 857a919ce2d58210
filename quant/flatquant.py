"""Affine flattening (FlatQuant-style): learnable Kronecker transforms with learnable clipping.

Notation: activations are row vectors, a linear is y = x Wᵀ + b with W (out, in).

- Transform of a group of linears that share an input x (q/k/v: the input norm's output;
  gate/up: the post-attention norm's output; o_proj's input; down_proj's input):

      T = diag(1/s) (P1 ⊗ P2),   x → x T,   W → W T⁻ᵀ = W diag(s) (P1⁻ᵀ ⊗ P2⁻ᵀ)

  so (x T)(W T⁻ᵀ)ᵀ = x Wᵀ: the float product is unchanged. P1 (m, m) and P2 (p, p) are free
  matrices with n = m·p the closest factor pair (`closest_factors`: 576 = 24·24,
  1536 = 32·48, 4096 = 64·64), initialised to seeded randomized Hadamards (a random orthogonal
  matrix where no Hadamard exists), so training starts from a QuaRot-like incoherent basis; their
  inverses are computed directly (float64 `linalg.inv` of a matrix of at most a few dozen rows:
  cheap, and stable while the factors stay well conditioned, which they do from an orthogonal
  start at FlatQuant's small learning rates). s = exp(log s) > 0 is a per-channel scale
  initialised SmoothQuant-style from the calibration activations (s_j = a_j^α / w_j^(1−α),
  normalised to geometric mean 1).
- A row x viewed as X (m, p) row-major gives x (P1 ⊗ P2) = P1ᵀ X P2 (`kron_matmul`): two small
  matmuls instead of a dense n x n one.
- Value heads (optional, `v_transform`): one learnable Pv (head_dim) per layer, shared by its KV
  heads: v_proj rows of head h, W_h ← Pvᵀ W_h (b_h ← b_h Pv), o_proj columns of query head j,
  W_j ← W_j Pv⁻ᵀ; the KV cache then holds v Pv. Folded offline, nothing at run time.
- Learnable clipping, in the fake-quant forward, with straight-through rounding: activations per
  group (one ratio c = sigmoid(θ) per transform, per-token symmetric: scale = c·absmax/qmax,
  initialised at the scheme's clip_ratio); weights per output channel (c_r = sigmoid(θ_r),
  initialised by the MSE clip search on the initially transformed weight: W is clamped to ±c_r·max|W_r| and quantized
  with scale c_r·max|W_r|/qmax, which is exactly what min-max RTN gives once the clamp is folded
  into the weight, `fold_weight_clip`).

`calibrate_layer` trains one decoder layer: the float layer's outputs on the float stream are the
targets, the transformed + fake-quantized layer (KV cache too) runs on the quantized stream, and
AdamW with a cosine schedule minimises their distance (`layer_loss`: per-token relative error by
default, FlatQuant's plain MSE as an option). `FlatLayer.finalize` materialises everything in
float64: P⁻¹ folded into the weights, (P1, P2, 1/s) kept as a runtime `KronTransform`
(`lmpress.kernels.online`), the learned activation clip returned for the scheme map.

Published figures this follows (facts only): FlatQuant (Sun et al., 2024, arXiv:2410.09426)
trains per layer with AdamW, lr 5e-3, 15 epochs, 128 x 2048 calibration tokens.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmpress.kernels.online import KronTransform, RotatedInput, TransformedOutput

from lmpress.kernels.attention import SETTINGS_ATTR, LmpressAttention
from .kv_cache import fake_quantize_kv
from .primitives import fake_quantize_ste, mse_clip_qparams, round_ste
from .rotate import rotation_matrix, sub_seed
from .scheme import KVCacheArgs, QuantArgs, QuantScheme

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- maths


def closest_factors(n: int) -> tuple[int, int]:
    """(m, p) with m·p = n, m <= p and m the largest divisor of n not above sqrt(n)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"closest_factors: n must be a positive integer, got {n!r}")
    m = math.isqrt(n)
    while n % m:
        m -= 1
    return m, n // m


def kron_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x (A ⊗ B) over the last dim of x (..., m·p), without forming A ⊗ B: Aᵀ X B, X = x as (m, p)."""
    m, p = A.shape[0], B.shape[0]
    if x.shape[-1] != m * p:
        raise ValueError(f"kron_matmul: last dim {x.shape[-1]} != {m}·{p}")
    X = x.reshape(*x.shape[:-1], m, p)  # (..., m, p): element a·p + b at [a, b]
    return torch.matmul(A.t(), torch.matmul(X, B)).reshape(x.shape)


def act_quant_ste(x: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric fake-quant with a learnable clip ratio (scalar tensor in (0, 1]); the
    forward equals `fake_quantize(x, QuantArgs(bits, "token", dynamic=True, clip_ratio=clip))`.
    The scale stays a function of the token's absmax (see `fake_quantize_ste`): the transform
    learns that a token's rounding error grows with its largest entry."""
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(-1, keepdim=True) * clip / qmax  # (..., 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale


def weight_quant_ste(W: torch.Tensor, clip: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Fake-quantized W (out, in), straight-through rounding, scale a function of the row's absmax.
    Per-channel symmetric weights use the learned per-row clip (out,): W clamped to ±c·max|W_r|,
    scale c·max|W_r|/qmax (what min-max RTN of the clamped weight gives); other weight schemes are
    fake-quantized as they are (no learned clip)."""
    if clip is None:
        return fake_quantize_ste(W, args)
    qmax = args.qmax
    bound = W.abs().amax(1, keepdim=True) * clip[:, None]  # (out, 1)
    bound = torch.where(bound > 0, bound, torch.ones_like(bound))
    Wc = torch.maximum(torch.minimum(W, bound), -bound)
    scale = bound / qmax
    return round_ste(Wc / scale) * scale


def learned_clip_ok(args: QuantArgs | None, weights: bool) -> bool:
    """Whether the learnable clip of `calibrate_layer` applies to these args."""
    if args is None or not args.symmetric:
        return False
    return args.granularity == "channel" if weights else args.granularity == "token"


def smooth_scale(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = a_j^α / w_j^(1−α), normalised to geometric mean 1 (float64)."""
    a = act_absmax.double().clamp_min(1e-5)
    w = w_absmax.double().clamp_min(1e-5)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s / torch.exp(torch.log(s).mean())


def layer_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """The layer objective over (..., T, hidden) outputs. "mse": plain MSE. "relative": mean over
    tokens of ‖e_t‖² / ‖y_t‖² (y the float target): the next RMSNorm divides each token by its
    RMS, so this is the error the following layers see. Plain MSE is dominated by the few
    massive-activation tokens (SmolLM2 from layer 12 on: the first token of a sequence holds 98%
    of the hidden state's sum of squares) and trains the transforms for them alone."""
    out, target = out.float(), target.float()
    if kind == "mse":
        return F.mse_loss(out, target)
    err = (out - target).pow(2).sum(-1)  # (..., T)
    ref = target.pow(2).sum(-1).clamp_min(1e-12)  # (..., T)
    return (err / ref).mean()


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FlatArgs:
    epochs: int = 2
    lr: float = 1e-2  # transforms (FlatQuant: 5e-3 over 15 epochs; fewer steps here)
    clip_lr: float = 1e-2  # clipping logits
    samples: int | None = 32  # calibration sequences used (null: all)
    seqlen: int | None = None  # tokens of each (null: all)
    batch_size: int = 2  # sequences per optimiser step
    smooth_alpha: float | None = 0.5  # SmoothQuant migration strength for the scale's init; null: s = 1
    weight_clip_init: float = 0.98  # where the MSE clip search does not apply (it does for channel-wise symmetric weights)
    v_transform: bool = True  # learnable per-layer value-head transform (KV cache holds v Pv)
    qk_hadamard: bool = True  # online Hadamard on Q and K after RoPE (QuaRot's R3) for the K cache
    fold_weight_clip: bool = True  # clamp the weights to the learned clip (RTN then reproduces it)
    train_inputs: str = "quantized"  # the stream the quantized layer is trained on: "quantized" | "float"
    loss: str = "relative"  # "mse" (FlatQuant's) | "relative" (each token's squared error over its target's mean square)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"flatquant.{name}={v!r} must be a {'non-negative' if name == 'epochs' else 'positive'} integer")
        for name in ("samples", "seqlen"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 2):
                raise ValueError(f"flatquant.{name}={v!r} must be an integer >= 2 or null (all)")
        for name in ("lr", "clip_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"flatquant.{name}={v!r} must be a positive number (FlatQuant uses 5e-3)")
        a = self.smooth_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1):
            raise ValueError(f"flatquant.smooth_alpha={a!r} must be in [0, 1] or null (no smoothing scale)")
        c = self.weight_clip_init
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 <= c < 1:
            raise ValueError(f"flatquant.weight_clip_init={c!r} must be in [0.5, 1)")
        for name in ("v_transform", "qk_hadamard", "fold_weight_clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"flatquant.{name}={getattr(self, name)!r} must be true or false")
        if self.train_inputs not in ("quantized", "float"):
            raise ValueError(f"flatquant.train_inputs={self.train_inputs!r}: use 'quantized' (the quantized layers' "
                             "outputs, errors of earlier layers included) or 'float' (the float stream: the layer's own error alone)")
        if self.loss not in ("mse", "relative"):
            raise ValueError(f"flatquant.loss={self.loss!r}: use 'relative' (each token's squared error divided by the "
                             "mean square of its float output, what the next RMSNorm sees) or 'mse' (plain MSE, FlatQuant's)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"flatquant.seed={self.seed!r} must be a non-negative integer")


# --------------------------------------------------------------------------- training modules


class LearnableTransform(nn.Module):
    """T = diag(1/s) (P1 ⊗ P2) with free P1, P2 and s = exp(log_s)."""

    def __init__(self, n: int, seed: int, dtype=torch.float32):
        super().__init__()
        m, p = closest_factors(n)
        self.n, self.m, self.p = n, m, p
        self.P1 = nn.Parameter(rotation_matrix(m, "hadamard", sub_seed(seed, "flat-p1")).to(dtype))
        self.P2 = nn.Parameter(rotation_matrix(p, "hadamard", sub_seed(seed, "flat-p2")).to(dtype))
        self.log_s = nn.Parameter(torch.zeros(n, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_matmul(x * torch.exp(-self.log_s.to(x.dtype)), self.P1.to(x.dtype), self.P2.to(x.dtype))

    def fold(self, W: torch.Tensor) -> torch.Tensor:
        """W T⁻ᵀ = (W diag(s)) (P1⁻ᵀ ⊗ P2⁻ᵀ), in W's dtype (inverses in float64)."""
        inv1 = torch.linalg.inv(self.P1.double()).t().to(W.dtype)
        inv2 = torch.linalg.inv(self.P2.double()).t().to(W.dtype)
        return kron_matmul(W * torch.exp(self.log_s.to(W.dtype)), inv1, inv2)

    @torch.no_grad()
    def runtime(self, dtype: torch.dtype) -> KronTransform:
        return KronTransform.from_factors(self.P1.double(), self.P2.double(), torch.exp(-self.log_s.double()), dtype=dtype)


class HeadTransform(nn.Module):
    """A learnable (head_dim, head_dim) Pv, shared by a layer's value heads."""

    def __init__(self, d: int, seed: int, dtype=torch.float32):
        super().__init__()
        self.P = nn.Parameter(rotation_matrix(d, "hadamard", seed).to(dtype))

    def inv_t(self, dtype) -> torch.Tensor:
        return torch.linalg.inv(self.P.double()).t().to(dtype)


class GroupQuant(nn.Module):
    """A group's input during training: x T, then per-token fake-quant with the learned clip."""

    def __init__(self, transform: LearnableTransform, act: QuantArgs | None, clip_init: float):
        super().__init__()
        self.transform, self.act = transform, act
        self.learn_clip = learned_clip_ok(act, weights=False)
        self.clip_logit = nn.Parameter(torch.tensor(_logit(min(clip_init, 0.999)))) if self.learn_clip else None
        self.quantize = False
        self.absmax: torch.Tensor | None = None  # per-channel input absmax, collected when `collect` is set
        self.collect = False

    def act_clip(self) -> float | None:
        return float(torch.sigmoid(self.clip_logit)) if self.learn_clip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collect:
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        y = self.transform(x)
        if not self.quantize or self.act is None:
            return y
        if self.learn_clip:
            return act_quant_ste(y, torch.sigmoid(self.clip_logit), self.act.bits)
        return fake_quantize_ste(y, self.act)


class TrainLinear(nn.Module):
    """A linear whose effective weight is built from the learnable transforms at every forward."""

    def __init__(self, linear: nn.Linear, role: str, group: GroupQuant, scheme: QuantScheme | None,
                 heads: HeadTransform | None, n_heads: int, n_kv: int, head_dim: int, clip_init: float):
        super().__init__()
        self.linear, self.role, self.group, self.heads = linear, role, group, heads
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.wargs = scheme.weights if scheme is not None else None
        learn = learned_clip_ok(self.wargs, weights=True)
        self.clip_logit = nn.Parameter(torch.full((linear.out_features,), _logit(clip_init))) if learn else None
        self.quantize = False

    def effective(self, dtype=torch.float32, transform: bool = True):
        """(W, b) of the wrapped float linear with the value-head transform and the group's T⁻ᵀ
        folded in, computed in `dtype` (float64 for the final fold)."""
        W = self.linear.weight.detach().to(dtype)
        b = None if self.linear.bias is None else self.linear.bias.detach().to(dtype)
        d = self.head_dim
        if self.heads is not None and self.role == "v":
            P = self.heads.P.to(dtype)
            W = torch.matmul(P.t(), W.reshape(self.n_kv, d, -1)).reshape(W.shape)  # (kv heads, d, in): Pvᵀ W_h
            if b is not None:
                b = torch.matmul(b.reshape(self.n_kv, 1, d), P).reshape(-1)
        elif self.heads is not None and self.role == "o":
            W = torch.matmul(W.reshape(W.shape[0], self.n_heads, d), self.heads.inv_t(dtype)).reshape(W.shape)  # W_j Pv⁻ᵀ
        if transform:
            W = self.group.transform.fold(W)
        return W, b

    def weight_clip(self) -> torch.Tensor | None:
        return None if self.clip_logit is None else torch.sigmoid(self.clip_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, b = self.effective(x.dtype)
        if self.quantize and self.wargs is not None:
            W = weight_quant_ste(W, self.weight_clip(), self.wargs)
        return F.linear(x, W, b)


class SteKVAttention(LmpressAttention):
    """The "lmpress" attention settings for training: Q/K transform, then (when `quantize`)
    per-token KV fake-quant with a straight-through gradient."""

    def __init__(self, qk: nn.Module | None, kv: KVCacheArgs | None):
        super().__init__(qk=qk, kv=kv if kv is not None and kv.per_token_only else None)
        self.quantize = False

    def forward(self, query, key, value):
        if self.qk is not None:
            query, key = self.qk(query), self.qk(key)
        if self.quantize and self.kv is not None:
            kv = self.kv
            with torch.no_grad():
                dk = fake_quantize_kv(key.detach(), kv.bits, kv.group_size, symmetric=kv.symmetric) - key.detach()
                dv = fake_quantize_kv(value.detach(), kv.bits, kv.group_size, symmetric=kv.symmetric) - value.detach()
            key, value = key + dk, value + dv
        return query, key, value


# --------------------------------------------------------------------------- one layer


def layer_groups(arch) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """The transform groups of a decoder layer: (name, the norm producing their input or None,
    the linears reading it); a group with a norm gets its transform on the norm's output, one
    without (o_proj, down_proj) on its single linear's input."""
    norm_of = {r: norm for norm, readers in arch.norm_readers.items() for r in readers}
    groups = []
    for g, group in enumerate(arch.sequential_groups):
        norms = {norm_of.get(r) for r in group}
        norm = norms.pop() if len(norms) == 1 else None
        if norm is None and len(group) > 1:
            raise ValueError(f"flatquant: linears {group} share an input but no single norm produces it")
        groups.append((f"g{g}", norm, tuple(group)))
    return groups


def runtime_specs(layer: nn.Module, arch, prefix: str) -> list[dict[str, Any]]:
    """The online-transform specs `FlatLayer.finalize` leaves on a decoder layer (shapes only, as
    `KronTransform.spec` records them): {"where": prefix + path, "apply": "output" | "input", ...}.
    `kernels.online.restore_transforms` places them, e.g. on a meta skeleton before training."""
    out = []
    for _, norm, group in layer_groups(arch):
        m, p = closest_factors(layer.get_submodule(group[0]).in_features)
        spec = KronTransform(m, p).spec()
        out.append({"where": prefix + (norm if norm is not None else group[0]), "apply": "output" if norm else "input", **spec})
    return out



class FlatLayer:
    """The training structure of one decoder layer, installed in place, and its fold."""

    def __init__(self, layer: nn.Module, index: int, arch, plan: dict[str, QuantScheme], prefix: str,
                 config, kv: KVCacheArgs | None, args: FlatArgs):
        self.layer, self.index, self.arch, self.args, self.prefix = layer, index, arch, args, prefix
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.attn_path = arch.attention
        attn = layer.get_submodule(self.attn_path)
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.n_heads
        seed = sub_seed(args.seed, "flatquant", index)
        self.heads = HeadTransform(self.head_dim, sub_seed(seed, "v")) if args.v_transform else None
        self.groups = layer_groups(arch)  # (name, norm path or None, reader paths)
        self.plain = {}
        for _, _, group in self.groups:
            for rel in group:
                mod = layer.get_submodule(rel)
                if type(mod) is not nn.Linear:
                    raise TypeError(f"{prefix}.{rel} is a {type(mod).__name__}; flatquant needs the plain float model "
                                    "(it replaces rotate / learn_rotation and must run before rtn / gptq)")
                self.plain[rel] = mod
        self.norms = {norm: layer.get_submodule(norm) for _, norm, _ in self.groups if norm is not None}
        self.gq: dict[str, GroupQuant] = {}
        self.train: dict[str, TrainLinear] = {}
        roles = {arch.v_proj: "v", arch.o_proj: "o"}
        for name, norm, group in self.groups:
            lin0 = self.plain[group[0]]
            scheme0 = plan.get(f"{prefix}.{group[0]}")
            act = scheme0.inputs if scheme0 is not None else None
            T = LearnableTransform(lin0.in_features, sub_seed(seed, name))
            self.gq[name] = GroupQuant(T, act, act.clip_ratio if act is not None else 1.0)
            for rel in group:
                self.train[rel] = TrainLinear(self.plain[rel], roles.get(rel, ""), self.gq[name], plan.get(f"{prefix}.{rel}"),
                                              self.heads, self.n_heads, self.n_kv, self.head_dim, args.weight_clip_init)
        self.attn = attn
        self.old_settings = getattr(attn, SETTINGS_ATTR, None)
        qk = self.old_settings.qk if self.old_settings is not None else None
        self.kv_settings = SteKVAttention(qk, kv)

    # ---- structure ------------------------------------------------------------------------

    def install(self) -> None:
        """Put the training modules in place (float: quantization off)."""
        for name, norm, group in self.groups:
            if norm is not None:
                self.layer.set_submodule(norm, TransformedOutput(self.norms[norm], self.gq[name]))
                for rel in group:
                    self.layer.set_submodule(rel, self.train[rel])
            else:
                (rel,) = group
                self.layer.set_submodule(rel, RotatedInput(self.gq[name], self.train[rel]))
        self.attn.add_module(SETTINGS_ATTR, self.kv_settings)

    def set_quantize(self, on: bool) -> None:
        for m in list(self.gq.values()) + list(self.train.values()) + [self.kv_settings]:
            m.quantize = on

    def parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(transform parameters, clipping logits)."""
        mats = [p for g in self.gq.values() for p in g.transform.parameters()]
        if self.heads is not None:
            mats.append(self.heads.P)
        clips = [g.clip_logit for g in self.gq.values() if g.clip_logit is not None]
        clips += [t.clip_logit for t in self.train.values() if t.clip_logit is not None]
        return mats, clips

    @torch.no_grad()
    def init_from_stats(self, alpha: float | None) -> None:
        """log s from the collected input absmax of every group and its readers' weights
        (SmoothQuant), then each weight clip from the per-channel MSE clip search on the
        transformed weight (`mse_clip_qparams`: ratio = scale·qmax / max|W_r|)."""
        for name, _, group in self.groups:
            g = self.gq[name]
            g.collect = False
            if alpha is not None and g.absmax is not None:
                w = torch.stack([self.train[rel].effective(transform=False)[0].abs().amax(0) for rel in group]).amax(0)
                g.transform.log_s.copy_(torch.log(smooth_scale(g.absmax, w, alpha)).float())
            g.absmax = None
            for rel in group:
                t = self.train[rel]
                if t.clip_logit is None:
                    continue
                W = t.effective()[0]
                args = QuantArgs(bits=t.wargs.bits, granularity="channel", symmetric=True)
                scale, _ = mse_clip_qparams(W, args, grid=12)  # (out, 1); a coarse grid: only the start point
                ratio = (scale[:, 0] * args.qmax / W.abs().amax(1).clamp_min(1e-12)).clamp(0.5, 0.995)
                t.clip_logit.copy_(torch.log(ratio / (1 - ratio)))

    @torch.no_grad()
    def finalize(self) -> dict[str, Any]:
        """Fold everything in float64 into the original linears, install the runtime structure
        (TransformedOutput / RotatedInput with KronTransforms), restore the attention settings.
        Returns {"act_clip": {rel: c}, "weight_clip_mean": {rel: mean c}, "wrapped": [rel...]}."""
        args = self.args
        folded = {}
        for rel, t in self.train.items():
            W, b = t.effective(torch.float64)
            clip = t.weight_clip()
            if args.fold_weight_clip and clip is not None:
                bound = W.abs().amax(1, keepdim=True) * clip.double()[:, None]  # (out, 1)
                W = torch.maximum(torch.minimum(W, bound), -bound)
            folded[rel] = (W, b)
        out: dict[str, Any] = {"act_clip": {}, "weight_clip_mean": {}, "wrapped": []}
        for name, norm, group in self.groups:
            dtype = self.plain[group[0]].weight.dtype
            T = self.gq[name].transform.runtime(dtype)
            c = self.gq[name].act_clip()
            for rel in group:
                lin = self.plain[rel]
                W, b = folded[rel]
                lin.weight.copy_(W.to(lin.weight.dtype))
                if b is not None:
                    lin.bias.copy_(b.to(lin.bias.dtype))
                if c is not None:
                    out["act_clip"][rel] = c
                wc = self.train[rel].weight_clip()
                if wc is not None:
                    out["weight_clip_mean"][rel] = float(wc.mean())
            if norm is not None:
                self.layer.set_submodule(norm, TransformedOutput(self.norms[norm], T))
                for rel in group:
                    self.layer.set_submodule(rel, self.plain[rel])
            else:
                (rel,) = group
                self.layer.set_submodule(rel, RotatedInput(T, self.plain[rel]))
                out["wrapped"].append(rel)
        if self.old_settings is not None:
            self.attn.add_module(SETTINGS_ATTR, self.old_settings)
        else:
            delattr(self.attn, SETTINGS_ATTR)
        return out


def calibrate_layer(flat: FlatLayer, q_inputs: list[torch.Tensor], kwargs: list[dict], targets: list[torch.Tensor],
                    args: FlatArgs) -> dict[str, Any]:
    """Train the installed FlatLayer: AdamW (transforms at `lr`, clipping at `clip_lr`), cosine
    schedule over epochs x batches, MSE between the quantized layer on `q_inputs` and `targets`.
    Leaves quantization on. Returns {"init_loss", "final_loss" (the first batch before and after
    training), "last_epoch_loss" (mean over the last epoch, while training), "seconds", "steps"}."""
    layer = flat.layer
    mats, clips = flat.parameters()
    flat.set_quantize(True)
    frozen = [p for p in layer.parameters() if p.requires_grad and not any(p is q for q in mats + clips)]
    for p in frozen:
        p.requires_grad_(False)

    def loss_of(b: int) -> torch.Tensor:
        out = layer(q_inputs[b], **kwargs[b])
        out = out[0] if isinstance(out, (tuple, list)) else out
        return layer_loss(out, targets[b], args.loss)

    t0 = time.perf_counter()
    with torch.no_grad():
        init = loss_of(0).item()  # the first batch, before and after: a cheap probe
    steps = args.epochs * len(q_inputs)
    final, last = init, float("nan")
    if steps:
        groups = [{"params": mats, "lr": args.lr}] + ([{"params": clips, "lr": args.clip_lr}] if clips else [])
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        g = torch.Generator().manual_seed(args.seed + flat.index)
        total = 0.0
        with torch.enable_grad():
            for epoch in range(args.epochs):
                total = 0.0
                for b in torch.randperm(len(q_inputs), generator=g).tolist():
                    loss = loss_of(b)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += loss.item()
                    if not math.isfinite(total):
                        raise FloatingPointError(f"flatquant: layer {flat.index}: loss became {total}; lower lr")
                log.debug("flatquant layer %d epoch %d loss %.4g", flat.index, epoch, total / len(q_inputs))
        last = total / len(q_inputs)
        with torch.no_grad():
            final = loss_of(0).item()
    for p in frozen:
        p.requires_grad_(True)
    return {"init_loss": init, "final_loss": final, "last_epoch_loss": last, "seconds": time.perf_counter() - t0,
            "steps": steps}


__all__ = [
    "FlatArgs", "FlatLayer", "layer_groups", "runtime_specs", "GroupQuant", "HeadTransform", "LearnableTransform", "SteKVAttention", "TrainLinear",
    "act_quant_ste", "calibrate_layer", "closest_factors", "kron_matmul", "layer_loss", "round_ste", "smooth_scale", "weight_quant_ste",
]
