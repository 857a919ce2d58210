"""Computational-invariance rotations (QuaRot / SpinQuant style), fused offline in float64.

Notation: activations are row vectors, a linear is y = x Wᵀ + b with W (out, in), every
rotation Q is orthogonal (Q Qᵀ = I).

- Norm fusion (`fuse_norms`): RMSNorm y = w ⊙ x / rms(x) feeds linears W; W ← W diag(w) and
  w ← 1. With unit gains the norm commutes with any orthogonal Q: rms(x Q) = rms(x).
- R1 (residual stream, size hidden): the residual becomes h Q1. Embedding E ← E Q1; every
  reader of the residual (q/k/v, gate/up, lm_head) W ← W Q1; every writer (o_proj, down_proj)
  W ← Q1ᵀ W, b ← b Q1.
- R2 (per head, size head_dim; one seeded rotation per KV head of each layer): values become
  v R2_h for KV head h: v_proj rows of KV head h, W_h ← R2_hᵀ W_h, b_h ← b_h R2_h; o_proj
  columns of query head j, W_j ← W_j R2_h with h = j's KV head (GQA: query head j reads KV
  head j // (n_heads / n_kv_heads)).
- R3 (online, head_dim): Q and K are multiplied by the same Hadamard after RoPE (in the
  "lmpress" attention function), so Q Kᵀ is unchanged and the K cache is quantized rotated.
- R4 (online, intermediate size): down_proj's input x becomes x H (a fast Hadamard, module
  `OnlineHadamard`), and W_down ← W_down H, so that W4A4 quantizes the rotated activation.
- optional online Hadamard on o_proj's input (size n_heads · head_dim), W_o ← W_o H: R2 only
  mixes within a head, so the attention output's per-head scales stay unequal; QuaRot mixes
  across heads with an online H_heads ⊗ H_head_dim, which does not exist for 9 heads
  (SmolLM2); a full Hadamard of 576 = 36 · 16 does the same job.

Every fusion converts the weights to float64, fuses, and casts back to the model's dtype.
`rotation_matrix(n, kind, seed)` gives R1/R2: "hadamard" = seeded randomized Hadamard (a seeded
random orthogonal matrix when no Hadamard of order n is constructible), "random" = seeded
Haar-random orthogonal.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch
from torch import nn

from lmpress.kernels.online import KronTransform, OnlineHadamard, RotatedInput

from .hadamard import has_hadamard, random_block_hadamard, random_hadamard, random_orthogonal

KINDS = ("hadamard", "random")
ONLINE = ("down_proj", "qk", "o_proj")  # every online transform the rotate stage knows
DEFAULT_ONLINE = ("down_proj", "qk")  # QuaRot's R4 and R3


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0, block: int | None = None) -> torch.Tensor:
    """An (n, n) float64 orthogonal matrix: randomized Hadamard (within blocks of `block`
    channels when given and smaller than n) or Haar-random orthogonal."""
    if kind == "hadamard":
        return random_block_hadamard(n, seed, block) if block is not None and block < n else random_hadamard(n, seed)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise ValueError(f"rotation kind {kind!r} is not known; use one of {list(KINDS)}")


class Rotation:
    """An offline rotation Q = `rotation_matrix(n, kind, seed)`, applied in float64.

    A randomized Hadamard of a constructible order is applied structurally: a sign flip, then
    the Kronecker product of two ±1 factors of about sqrt(n) each (`KronTransform`): n·(a + b)
    multiply-adds a row instead of a dense GEMM's n² (3072 = 48·64: 27× fewer). Any other
    rotation is one dense GEMM with Q."""

    def __init__(self, n: int, kind: str = "hadamard", seed: int = 0, device=None, block: int | None = None):
        self.n, self.kind, self.seed = n, kind, seed
        self.block = block if kind == "hadamard" and block is not None and block < n else None
        self._fast = None
        if kind == "hadamard" and (self.block is not None or has_hadamard(n)):  # Q = diag(s) (A ⊗ B) / norm
            A, B, s, norm = OnlineHadamard(n, seed, self.block).kron_factors("cpu")
            self._fast = KronTransform.from_factors(A.double(), B.double() / norm, s.double(), dtype=torch.float64).to(device)
        self.Q = None if self._fast is not None else rotation_matrix(n, kind, seed).to(device)

    def right(self, W: torch.Tensor) -> torch.Tensor:
        """W @ Q (a reader of this space: W ← W Q)."""
        if self._fast is not None:
            return self._fast(W)
        return W @ self.Q

    def left_t(self, W: torch.Tensor) -> torch.Tensor:
        """Qᵀ @ W (a writer into this space: W ← Qᵀ W), as (Wᵀ Q)ᵀ."""
        if self._fast is not None:
            return self._fast(W.T.contiguous()).T.contiguous()
        return self.Q.T @ W

    def spec(self) -> dict[str, Any]:
        spec = {"kind": self.kind, "size": self.n, "seed": self.seed}
        return spec if self.block is None else {**spec, "block": self.block}


def fuse_input_transform(W: torch.Tensor, T: nn.Module) -> torch.Tensor:
    """W @ T.matrix() (float64): the offline half of an online input transform x ↦ x Q, structured
    (as `Rotation`) for a seeded Hadamard, dense otherwise."""
    if isinstance(T, OnlineHadamard) and T.fast and T.seed is not None:
        return Rotation(T.size, "hadamard", T.seed, device=W.device, block=T.block).right(W)
    return W @ T.matrix().to(W.device)


class Given(Rotation):
    """An offline rotation from a given orthogonal matrix (e.g. a learned R1)."""

    def __init__(self, Q: torch.Tensor, device=None):
        if Q.dim() != 2 or Q.shape[0] != Q.shape[1]:
            raise ValueError(f"a rotation must be a square matrix, got shape {tuple(Q.shape)}")
        self.n, self.kind, self.seed, self.block, self._fast = Q.shape[0], "given", None, None, None
        self.Q = Q.detach().to(device=device, dtype=torch.float64)


def sub_seed(seed: int, tag: str, *index: int) -> int:
    """A stable per-use seed (e.g. R4 of layer i, R2 of layer i's KV head h) derived from the
    recipe's seed."""
    digest = hashlib.sha256(f"lmpress/{seed}/{tag}/{'/'.join(map(str, index))}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------- helpers


def _plain_linear(module: nn.Module, where: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"{where} is a {type(module).__name__}; norm fusion and rotations act on plain nn.Linear layers, so they "
            "must come before any quantization stage (rtn, gptq) and before the model is rotated twice"
        )
    return module


def fusable(module: nn.Module, where: str) -> nn.Module:
    """The module whose `weight` an offline transform is fused into: the linear itself, or the one
    inside a `RotatedInput` placed for this rotation; one holding quantized codes is refused."""
    inner = module.linear if isinstance(module, RotatedInput) else module
    if getattr(inner, "quantized", False):
        raise TypeError(f"{where} is already quantized; norm fusion and rotations must come before rtn/gptq")
    return inner


class _Fused:
    """float64 working copies of some weights; `commit()` casts them back in place."""

    def __init__(self) -> None:
        self._items: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, t: torch.Tensor) -> torch.Tensor:
        for orig, work in self._items:
            if orig is t:
                return work
        work = t.detach().to(torch.float64, copy=True)
        self._items.append((t, work))
        return work

    def set(self, t: torch.Tensor, value: torch.Tensor) -> None:
        for k, (orig, _) in enumerate(self._items):
            if orig is t:
                self._items[k] = (orig, value)
                return
        self._items.append((t, value))

    def commit(self) -> None:
        with torch.no_grad():
            for orig, work in self._items:
                orig.copy_(work.to(orig.dtype))
        self._items.clear()


def _is_tied(model: nn.Module, arch) -> bool:
    head = model.get_submodule(arch.lm_head)
    embed = model.get_submodule(arch.embed)
    return getattr(head, "weight", None) is embed.weight


def _norm_weight(norm: nn.Module, where: str) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise TypeError(f"{where} ({type(norm).__name__}) has no 1-D gain to fuse")
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError(f"{where} has a bias (LayerNorm); only RMSNorm-style norms are fused")
    return w


# --------------------------------------------------------------------------- norm fusion


@torch.no_grad()
def fold_gain(norm: nn.Module, readers: list[nn.Module], where: str, offset: float = 0.0) -> bool:
    """W ← W diag(g) for every reader, then g ← 1 (float64), where the norm's gain is g = offset + w
    (Gemma's norms compute x̂·(1 + w)). False when g is already 1."""
    w = _norm_weight(norm, where)
    if bool((w + offset == 1).all()):
        return False
    g64 = w.detach().to(torch.float64) + offset
    for lin in readers:
        lin.weight.copy_((lin.weight.detach().to(torch.float64) * g64[None, :]).to(lin.weight.dtype))
    w.fill_(1.0 - offset)
    return True


def fuse_layer_norms(layer: nn.Module, arch, prefix: str = "") -> list[str]:
    """Fold one decoder layer's norm gains into the linears that read them (`arch.norm_readers`);
    returns the folded norms' names (`prefix` + path). The per-layer body of `fuse_norms`, also run
    by the larger-than-memory path on each layer as it is read."""
    return [prefix + norm_path for norm_path, readers in arch.norm_readers.items()
            if fold_gain(layer.get_submodule(norm_path), [fusable(layer.get_submodule(r), prefix + r) for r in readers],
                         prefix + norm_path, arch.norm_offset)]


@torch.no_grad()
def fuse_norms(model: nn.Module, arch) -> list[str]:
    """Fold every RMSNorm gain into the linears that read it (`arch.norm_readers` per layer,
    the final norm into lm_head) and set the gains to 1. Returns the names of the norms that
    were folded (norms already at unit gain are skipped). The embeddings must be untied first."""
    if _is_tied(model, arch):
        raise ValueError(
            "lm_head shares its weight with the embeddings; untie them first "
            "(lmpress.compress.surgery.untie_embeddings) so folding the final norm does not change the embeddings"
        )
    layers = arch.decoder_layers(model)
    for i, layer in enumerate(layers):  # every module checked before anything changes
        for norm_path, readers in arch.norm_readers.items():
            _norm_weight(layer.get_submodule(norm_path), f"{arch.layers}.{i}.{norm_path}")
            for r in readers:
                _plain_linear(layer.get_submodule(r), f"{arch.layers}.{i}.{r}")
    head = _plain_linear(model.get_submodule(arch.lm_head), arch.lm_head)
    folded = [name for i, layer in enumerate(layers) for name in fuse_layer_norms(layer, arch, f"{arch.layers}.{i}.")]
    if fold_gain(model.get_submodule(arch.final_norm), [head], arch.final_norm, arch.norm_offset):
        folded.append(arch.final_norm)
    return folded


def norms_fused(model: nn.Module, arch) -> bool:
    """True when every norm that `fuse_norms` handles has unit gain and the head is untied."""
    if _is_tied(model, arch):
        return False
    norms = [model.get_submodule(arch.final_norm)]
    for layer in arch.decoder_layers(model):
        norms += [layer.get_submodule(p) for p in arch.norm_readers]
    return all(bool((n.weight + arch.norm_offset == 1).all()) for n in norms)


# --------------------------------------------------------------------------- rotations

INPUT_TRANSFORMS = (("down_proj", "r4"), ("o_proj", "ro"))  # online input transforms: (arch field, seed tag)


def place_online(model: nn.Module, arch, seed: int, online: Iterable[str], device=None,
                 block: int | None = None) -> dict[str, Any]:
    """The structural half of `rotate_model`: wrap down_proj / o_proj of every layer in a
    `RotatedInput` with its seeded online Hadamard (R4, the o_proj transform) and attach the Q/K
    Hadamard (R3) to the attention, as `online` asks. Works on a meta-device skeleton (the
    larger-than-memory path places them before any weight is read). `block`: R4 / the o_proj
    transform rotate within blocks of that many channels. Returns the summary's
    {"online": [...], "wrapped": [...]}."""
    from lmpress.kernels.attention import attach_attention  # registers the "lmpress" attention function

    out: dict[str, Any] = {"online": [], "wrapped": []}
    qk: dict[int, OnlineHadamard] = {}
    for i, layer in enumerate(arch.decoder_layers(model)):
        prefix = f"{arch.layers}.{i}"
        for key, tag in INPUT_TRANSFORMS:
            if key in online:
                path = getattr(arch, key)
                lin = layer.get_submodule(path)
                T = OnlineHadamard(lin.in_features, sub_seed(seed, tag, i), block).to(device)
                layer.set_submodule(path, RotatedInput(T, lin))
                out["online"].append({"where": f"{prefix}.{path}", "apply": "input", **T.spec()})
                out["wrapped"].append(f"{prefix}.{path}")
        if "qk" in online:
            qk[i] = OnlineHadamard(arch.head_dim(layer, model.config), sub_seed(seed, "r3", i)).to(device)
            out["online"].append({"where": f"{prefix}.{arch.attention}", "apply": "qk", **qk[i].spec()})
    if qk:
        attach_attention(model, arch, qk=qk)
    return out


@torch.no_grad()
def rotate_layer(layer: nn.Module, i: int, arch, config, R1: Rotation, kind: str = "hadamard", seed: int = 0,
                 r2: bool = True, r2_matrix: torch.Tensor | None = None, block: int | None = None) -> list[int]:
    """Fuse R1, R2 and the already placed online input transforms (`place_online`) into decoder
    layer `i`'s weights (float64, cast back once). The per-layer body of `rotate_model`, also run
    by the larger-than-memory path on each layer as it is read. Returns the R2 seeds (one per KV
    head; empty without R2)."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    prefix = f"{arch.layers}.{i}."

    def lin(path: str) -> nn.Module:
        return fusable(layer.get_submodule(path), prefix + path)

    o, down, v = lin(arch.o_proj), lin(arch.down_proj), lin(arch.v_proj)
    device = v.weight.device
    work = _Fused()
    for r in [lin(p) for p in (arch.q_proj, arch.k_proj, arch.v_proj, arch.gate_proj, arch.up_proj)]:
        work.set(r.weight, R1.right(work.get(r.weight)))
    for w in (o, down):
        work.set(w.weight, R1.left_t(work.get(w.weight)))
        if w.bias is not None:
            work.set(w.bias, R1.right(work.get(w.bias)))
    head_dim = arch.head_dim(layer, config)
    seeds: list[int] = []
    if r2:
        seeds = [sub_seed(seed, "r2", i, h) for h in range(n_kv)]
        if r2_matrix is not None:
            R2s = r2_matrix.detach().to(device, torch.float64).expand(n_kv, head_dim, head_dim)  # (kv heads, d, d)
        else:
            R2s = torch.stack([rotation_matrix(head_dim, kind, s2, block) for s2 in seeds]).to(device)  # (kv heads, d, d)
        Wv = work.get(v.weight).reshape(n_kv, head_dim, -1)  # (kv heads, d, hidden)
        work.set(v.weight, torch.matmul(R2s.transpose(1, 2), Wv).reshape(n_kv * head_dim, -1))
        if v.bias is not None:
            bv = work.get(v.bias).reshape(n_kv, 1, head_dim)
            work.set(v.bias, torch.matmul(bv, R2s).reshape(-1))
        R2q = R2s.repeat_interleave(n_heads // n_kv, dim=0)  # (heads, d, d): query head j uses KV head j // groups
        Wo = work.get(o.weight).reshape(-1, n_heads, head_dim).transpose(0, 1)  # (heads, hidden, d)
        work.set(o.weight, torch.matmul(Wo, R2q).transpose(0, 1).reshape(-1, n_heads * head_dim))
    for key, _ in INPUT_TRANSFORMS:
        wrapper = layer.get_submodule(getattr(arch, key))
        if isinstance(wrapper, RotatedInput):  # W ← W H: the input arrives as x H
            mod = wrapper.linear
            work.set(mod.weight, fuse_input_transform(work.get(mod.weight), wrapper.transform))
    work.commit()
    return seeds


@torch.no_grad()
def rotate_model(
    model: nn.Module,
    arch,
    kind: str = "hadamard",
    seed: int = 0,
    online: Iterable[str] = DEFAULT_ONLINE,
    r2: bool = True,
    r1_matrix: torch.Tensor | None = None,
    r2_matrices: list[torch.Tensor] | None = None,
    block: int | None = None,
) -> dict[str, Any]:
    """Apply R1 (+ R2, + online R3/R4 as asked) to a model whose norms are fused. In place.
    `block`: the Hadamard rotations (R1, R2, R4, the o_proj transform; not R3) act within blocks of
    that many channels (`rotation_matrix`), for block-scaled formats (MXFP4, NVFP4).

    `r1_matrix` (hidden, hidden) and `r2_matrices` (one (head_dim, head_dim) per layer, shared
    by its KV heads) replace the seeded R1/R2 with given orthogonal matrices (learned ones,
    `lmpress.quant.spinquant`); the online transforms still come from `seed`.

    Returns a summary: {"r1": spec, "r2": spec | None, "online": [{"where", "apply", spec...}],
    "wrapped": [fqn of every linear moved into a RotatedInput, now at fqn + ".linear"]}.
    """
    online = tuple(online)
    bad = sorted(set(online) - set(ONLINE))
    if bad:
        raise ValueError(f"online transform(s) {bad} are not known; use a subset of {list(ONLINE)}")
    if kind not in KINDS:
        raise ValueError(f"rotation kind {kind!r} is not known; use one of {list(KINDS)}")
    if not norms_fused(model, arch):
        raise ValueError("rotate_model needs fused norms (unit RMSNorm gains, untied lm_head): run fuse_norms first")
    layers = arch.decoder_layers(model)
    if r2_matrices is not None and (not r2 or len(r2_matrices) != len(layers)):
        raise ValueError(f"r2_matrices: one matrix per decoder layer is needed ({len(layers)}), and r2=True")
    for i, layer in enumerate(layers):  # every module checked before anything changes
        for path in arch.linears:
            _plain_linear(layer.get_submodule(path), f"{arch.layers}.{i}.{path}")
    embed = model.get_submodule(arch.embed)
    head = _plain_linear(model.get_submodule(arch.lm_head), arch.lm_head)
    device = embed.weight.device
    R1 = (Given(r1_matrix, device) if r1_matrix is not None
          else Rotation(model.config.hidden_size, kind, seed, device=device, block=block))

    work = _Fused()
    work.set(embed.weight, R1.right(work.get(embed.weight)))  # rows of E are residual vectors
    work.set(head.weight, R1.right(work.get(head.weight)))
    work.commit()

    summary: dict[str, Any] = {"r1": R1.spec(), "r2": None, **place_online(model, arch, seed, online, device, block)}
    r2_seeds = [rotate_layer(layer, i, arch, model.config, R1, kind, seed, r2,
                             r2_matrices[i] if r2_matrices is not None else None, block) for i, layer in enumerate(layers)]
    if r2:
        head_dim = arch.head_dim(layers[0], model.config)
        summary["r2"] = ({"kind": "given", "size": head_dim} if r2_matrices is not None
                         else {"kind": kind, "size": head_dim, "seeds": r2_seeds,
                               **({"block": block} if block is not None and block < head_dim else {})})
    return summary
