"""Online transforms: rotations applied to activations at run time (QuaRot's R3 and R4).

An online transform is rebuilt from its spec `(kind, size, seed)`, never stored as a matrix:
`OnlineHadamard(size, seed)` computes ``x @ Q`` over the last dimension with
``Q = diag(s) · H_n / sqrt(n)`` (s = seeded random signs, or all ones when `seed is None`),
through the fast transform (`hadamard_transform`: a Walsh–Hadamard transform of the 2^k factor
times a small dense factor, e.g. 1536 = 12 · 128). When no Hadamard of order n is known here it
falls back to a seeded random orthogonal matrix (still rebuilt from the seed; a plain dense
matmul). `matrix()` returns the same Q in float64, for fusing its inverse offline.

`RotatedInput(transform, linear)` applies a transform to a linear's input, so that a quantized
linear's own input fake-quant (SimQuantLinear / PackedLinear) sees the rotated activation; the
inverse of the transform must already be fused into the linear's weight (W · Q).
A PackedLinear receives the untransformed input and the transform (`linear(x, transform=T)`):
its Triton path fuses T into the activation quantization (`kron_factors()`), other paths apply T first.

`KronTransform` is FlatQuant's learned online transform (x ∘ c)(A ⊗ B): its factors are stored
tensors, not rebuilt from a seed. `TransformedOutput(module, transform)` applies a transform to a
module's output (a norm feeding q/k/v or gate/up: one transform for all its readers).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from lmpress.quant.hadamard import (
    DENSE_ROWS, check_block, hadamard_factors, hadamard_matrix, hadamard_transform, has_hadamard, random_block_hadamard,
    random_hadamard, random_orthogonal, random_signs,
)

KINDS = ("hadamard", "kron")
SMALL_DENSE = 256  # transforms up to this size (a head: R3) run as one dense matmul at decode (64 KiB of fp32 at 128)


class OnlineHadamard(nn.Module):
    """y = x @ Q over the last dim, Q = diag(s) H_n / sqrt(n), orthogonal (Qᵀ = Q⁻¹).

    Buffers are non-persistent (nothing reaches a state dict): the checkpoint records
    `spec()` = {"kind", "size", "seed"} and `transform_from_spec` rebuilds the identical transform.
    """

    kind = "hadamard"

    def __init__(self, size: int, seed: int | None = None, block: int | None = None):
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"OnlineHadamard: size must be a positive integer, got {size!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"OnlineHadamard: seed must be an integer or None, got {seed!r}")
        if block is not None:
            check_block(size, block)
            block = None if block == size else block
        self.size, self.seed, self.block = size, seed, block  # block: Q = diag(s) (I ⊗ H_block) / sqrt(block)
        self.fast = has_hadamard(size if block is None else block)
        self._kron: dict = {}  # device -> kron_factors(); ("q", dtype, device) -> Q (`_small_q`): built on first use
        if self.fast:
            Hm, p = hadamard_factors(size if block is None else block)
            self.p = p
            self.register_buffer("Hm", Hm.to(torch.float64), persistent=False)  # (m, m) ±1
            signs = random_signs(size, seed) if seed is not None else None
            self.register_buffer("signs", signs, persistent=False)  # (n,) ±1 or None
            self.register_buffer("dense", None, persistent=False)
        else:  # no construction of this order: a seeded random orthogonal matrix
            self.p = None
            self.register_buffer("Hm", None, persistent=False)
            self.register_buffer("signs", None, persistent=False)
            self.register_buffer("dense", random_orthogonal(size, 0 if seed is None else seed), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"OnlineHadamard of size {self.size} got an input whose last dim is {x.shape[-1]}")
        if self.dense is not None:
            return torch.matmul(x, self.dense.to(x.dtype))
        if self.block is None and self.size <= SMALL_DENSE and x.numel() <= DENSE_ROWS * self.size:
            return torch.matmul(x, self._small_q(x.dtype, x.device)) / math.sqrt(self.size)  # decode rows of R3
        if self.signs is not None:
            x = x * self.signs.to(x.dtype)
        if self.block is not None:  # (..., n) -> (..., n / b, b): each block on its own
            return hadamard_transform(x.reshape(*x.shape[:-1], -1, self.block), self.Hm, self.p).reshape(x.shape)
        return hadamard_transform(x, self.Hm, self.p)  # fwht over 2^k, a small matmul for H_m

    def _small_q(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """diag(s) H_n (n, n), entries ±1, in `dtype` on `device`, kept: for up to `DENSE_ROWS` rows a transform
        of at most `SMALL_DENSE` channels is one matmul and the normalisation, instead of the signs, the two
        factors and the normalisation (integer inputs sum exactly, as in the fused kernel's reference)."""
        key = ("q", dtype, device)
        if key not in self._kron:
            H = hadamard_matrix(self.size).to(torch.float64)
            if self.signs is not None:
                H = self.signs.to(torch.float64).cpu()[:, None] * H
            self._kron[key] = H.to(device=device, dtype=dtype)
        return self._kron[key]

    @torch.no_grad()
    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The (n, n) orthogonal Q with forward(x) == x @ Q (for fusing offline: W ← W Q).
        Equal to `random_hadamard(size, seed)` when seeded."""
        if self.dense is not None:
            return self.dense.to(dtype=dtype, copy=True)
        if self.block is not None:
            Q = (random_block_hadamard(self.size, self.seed, self.block) if self.seed is not None else
                 torch.kron(torch.eye(self.size // self.block, dtype=torch.float64),
                            hadamard_matrix(self.block).to(torch.float64) / math.sqrt(self.block)))
            return Q.to(device=self._device(), dtype=dtype)
        if self.seed is not None:
            Q = random_hadamard(self.size, self.seed)
        else:
            Q = hadamard_matrix(self.size).to(torch.float64) / math.sqrt(self.size)
        return Q.to(device=self._device(), dtype=dtype)

    @torch.no_grad()
    def kron_factors(self, device: torch.device | str | None = None):
        """(A, B, signs, norm) in float32 with forward(x) == ((x ∘ signs)(A ⊗ B)) / norm, for the
        fused transform + quantization kernel (`kernels.transform_act_quant`); None for the dense
        fallback. H_n = H_m ⊗ H_p = (H_m ⊗ H_{p/b}) ⊗ H_b, since Sylvester's H_p = H_{p/b} ⊗ H_b;
        b is the power of two dividing p that makes A (m·p/b) and B (b) closest in size, so the
        kernel's (m·p/b, b) tile and both factors stay small (576: 36 x 16, 1536: 48 x 32, 4096: 64 x 64).
        Cached per device."""
        if not self.fast:
            return None
        dev = torch.device(device) if device is not None else self._device()
        cache = self._kron
        if dev not in cache and self.block is not None:  # A = I: the blocks are independent
            signs = self.signs.to(dev, torch.float32) if self.signs is not None else None
            cache[dev] = (torch.eye(self.size // self.block, device=dev), hadamard_matrix(self.block).to(dev, torch.float32),
                          signs, math.sqrt(self.block))
        if dev not in cache:
            m, p = self.Hm.shape[0], self.p
            b = min((1 << j for j in range(p.bit_length())), key=lambda b: (abs(math.log(m * p / (b * b))), b))
            A = torch.kron(self.Hm.cpu(), hadamard_matrix(p // b).to(torch.float64))  # (m p/b, m p/b) ±1
            B = hadamard_matrix(b)  # (b, b) ±1
            signs = self.signs.to(dev, torch.float32) if self.signs is not None else None
            cache[dev] = (A.to(dev, torch.float32), B.to(dev, torch.float32), signs, math.sqrt(self.size))
        return cache[dev]

    def _device(self) -> torch.device:
        for b in (self.Hm, self.dense):
            if b is not None:
                return b.device
        return torch.device("cpu")

    def spec(self) -> dict[str, Any]:
        spec = {"kind": self.kind, "size": self.size, "seed": self.seed}
        return spec if self.block is None else {**spec, "block": self.block}

    def extra_repr(self) -> str:
        how = f"fast {self.Hm.shape[0]}x{self.p}" if self.fast else "dense random orthogonal"
        return f"size={self.size}, seed={self.seed}, {how}" + (f", blocks of {self.block}" if self.block else "")


class KronTransform(nn.Module):
    """y = (x ∘ c) (A ⊗ B) over the last dim (FlatQuant's online transform: two learned
    Kronecker factors A (m, m), B (p, p) and a per-channel scale c (n,), n = m·p; not orthogonal:
    its inverse was folded into the reading linears offline). A row x viewed as X (m, p)
    row-major gives x (A ⊗ B) = Aᵀ X B.

    Unlike OnlineHadamard the factors are learned, so they are persistent buffers
    (`kron_left`, `kron_right`, `kron_scale`: the state dict, hence the checkpoint, holds them);
    `spec()` records only the shapes, and `transform_from_spec` builds an identity of those shapes
    for the checkpoint's tensors to be assigned into."""

    kind = "kron"
    TENSORS = ("kron_left", "kron_right", "kron_scale")

    def __init__(self, m: int, p: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (m, p)):
            raise ValueError(f"KronTransform: factor sizes must be positive integers, got {m!r}, {p!r}")
        self.m, self.p, self.size = m, p, m * p
        self.register_buffer("kron_left", torch.eye(m, dtype=dtype))  # A (m, m)
        self.register_buffer("kron_right", torch.eye(p, dtype=dtype))  # B (p, p)
        self.register_buffer("kron_scale", torch.ones(m * p, dtype=dtype))  # c (n,)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> "KronTransform":
        T = cls(A.shape[0], B.shape[0], dtype)
        if tuple(A.shape) != (T.m, T.m) or tuple(B.shape) != (T.p, T.p):
            raise ValueError(f"KronTransform: factors must be square, got {tuple(A.shape)} and {tuple(B.shape)}")
        T.kron_left = A.detach().to(dtype).clone()
        T.kron_right = B.detach().to(dtype).clone()
        if scale is not None:
            if tuple(scale.shape) != (T.size,):
                raise ValueError(f"KronTransform: scale must have shape ({T.size},), got {tuple(scale.shape)}")
            T.kron_scale = scale.detach().to(dtype).clone()
        return T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"KronTransform of size {self.size} got an input whose last dim is {x.shape[-1]}")
        X = (x * self.kron_scale.to(x.dtype)).reshape(*x.shape[:-1], self.m, self.p)  # (..., m, p)
        Z = torch.matmul(self.kron_left.to(x.dtype).t(), torch.matmul(X, self.kron_right.to(x.dtype)))  # Aᵀ X B
        return Z.reshape(x.shape)

    @torch.no_grad()
    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense (n, n) diag(c) (A ⊗ B) with forward(x) == x @ matrix()."""
        K = torch.kron(self.kron_left.to(dtype), self.kron_right.to(dtype))
        return self.kron_scale.to(dtype)[:, None] * K

    @torch.no_grad()
    def kron_factors(self, device: torch.device | str | None = None):
        """(A, B, c, 1.0) in float32 for `kernels.transform_act_quant`, whose per-channel
        multiplier (`signs`) takes c."""
        dev = torch.device(device) if device is not None else self.kron_left.device
        return (self.kron_left.to(dev, torch.float32), self.kron_right.to(dev, torch.float32),
                self.kron_scale.to(dev, torch.float32), 1.0)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "factors": [self.m, self.p], "tensors": list(self.TENSORS)}

    def extra_repr(self) -> str:
        return f"size={self.size}, factors={self.m}x{self.p}"


def transform_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild an online transform from its recorded spec: {"kind": "hadamard", "size", "seed"},
    or {"kind": "kron", "size", "factors": [m, p]} (an identity whose tensors the checkpoint assigns)."""
    kind = spec.get("kind")
    if kind == "hadamard":
        seed, block = spec.get("seed"), spec.get("block")
        return OnlineHadamard(int(spec["size"]), None if seed is None else int(seed), None if block is None else int(block))
    if kind == "kron":
        m, p = (int(v) for v in spec["factors"])
        if m * p != int(spec["size"]):
            raise ValueError(f"kron transform spec {dict(spec)!r}: factors do not multiply to size")
        return KronTransform(m, p)
    raise ValueError(f"unknown online transform kind {kind!r}; known kinds: {list(KINDS)}")


class RotatedInput(nn.Module):
    """y = linear(transform(x)). The transform runs before the linear's own input fake-quant,
    so a W4A4 linear quantizes the rotated activation. Exposes the linear's shape."""

    def __init__(self, transform: nn.Module, linear: nn.Module):
        super().__init__()
        self.transform = transform
        self.linear = linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.linear, "fuses_online_transform", False):  # PackedLinear: fused into its activation quantization on Triton
            return self.linear(x, transform=self.transform)
        return self.linear(self.transform(x))


class TransformedOutput(nn.Module):
    """y = transform(module(x)): an online transform of a module's output, e.g. FlatQuant's
    transform of an RMSNorm's output, computed once for all the linears that read it (q/k/v,
    gate/up), whose weights hold its inverse. The module moves to `<fqn>.module`."""

    def __init__(self, module: nn.Module, transform: nn.Module):
        super().__init__()
        self.module = module
        self.transform = transform

    def forward(self, *args, **kwargs):
        return self.transform(self.module(*args, **kwargs))


def output_transform_specs(model: nn.Module) -> list[dict[str, Any]]:
    """{"where": fqn, "apply": "output", **spec} of every TransformedOutput in the model."""
    return [{"where": name, "apply": "output", **mod.transform.spec()}
            for name, mod in model.named_modules() if isinstance(mod, TransformedOutput)]


def online_specs(model: nn.Module) -> list[dict[str, Any]]:
    """{"where": fqn, "apply": "input", **spec} of every RotatedInput in the model."""
    return [{"where": name, "apply": "input", **mod.transform.spec()}
            for name, mod in model.named_modules() if isinstance(mod, RotatedInput)]


def restore_transforms(model: nn.Module, specs, apply: str = "input") -> list[str]:
    """Wrap each recorded module in a RotatedInput (`apply` "input") or a TransformedOutput
    ("output") with its transform rebuilt from the spec (at load time, before the quantized modules
    are swapped in). Returns the wrapped fqns."""
    wrapper = {"input": RotatedInput, "output": TransformedOutput}[apply]
    wrapped = []
    for spec in specs:
        if spec.get("apply") != apply:
            raise ValueError(f"online transform {spec!r}: only {apply!r} transforms are rebuilt here")
        where = spec["where"]
        inner = model.get_submodule(where)
        if isinstance(inner, wrapper):
            raise ValueError(f"{where} is already wrapped in a {wrapper.__name__}")
        T = transform_from_spec(spec)
        model.set_submodule(where, RotatedInput(T, inner) if apply == "input" else TransformedOutput(inner, T))
        wrapped.append(where)
    return wrapped


__all__ = ["KINDS", "KronTransform", "OnlineHadamard", "RotatedInput", "TransformedOutput", "online_specs", "output_transform_specs",
           "restore_transforms", "transform_from_spec"]
