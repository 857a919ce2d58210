"""Learned rotations on a layer-local objective (`learn_rotation` with `loss: layer`).

End to end (`ce` / `kl`), every Cayley step needs a forward and backward of the whole model, and
on SmolLM2-135M with the few hundred steps a CPU allows it never beat the randomized Hadamard
(`lmpress.quant.spinquant`). Here each rotation is judged by the output error it leaves at the
linears whose inputs it rotates, on float inputs collected once:

    R1 (readers of the residual: the q/k/v group, the gate/up group of every layer)
        site input x (the norm's output; norms are fused), readers stacked as W (out, hidden):
        y = Q(x R1) (W R1)ᵀ − x Wᵀ
    R2 (per layer: o_proj's input, the value heads)
        x̃ = x B,  B = blockdiag(R2, ..., R2) over the query heads:   y = Q(x̃) (W_o B)ᵀ − x W_oᵀ

with Q the input's own fake-quant (`fake_quantize_ste`: straight-through rounding, gradient
through the min-max scale). The loss is the mean over sites of the mean over tokens of ‖y‖².
With `weights: false` (GPTQ follows) the weights stay float and ‖y‖² = e G eᵀ with
e = (Q(x R) − x R) Rᵀ (the activation error back in the input basis) and G = Wᵀ W, computed once:
one (rows, n) x (n, n) product per site instead of (rows, n) x (n, out). With `weights: true`
the weights are fake-quantized too (RTN, straight-through) and y is formed directly (o_proj's
weight as W_o B: R1's turn of its output rows is left out; down_proj, whose input no learned
rotation turns, is not a site).

Every step draws `row_batch` of the `rows` tokens kept per site; Cayley SGD as end to end.
`keep_best` compares the loss on tokens of the held-out sequences before and after.

On SmolLM2-135M (W16A4KV4 proxy, 16 eval windows, base 17.83; R1 sites only, 500 steps of 256
rows from 1024 per site): the local loss fell 38.9 -> 23.6 and the proxy perplexity 32.87
(randomized Hadamard) -> 31.67, the first learned rotation in this project to beat the Hadamard.
Recipe w4a4kv4-spinquant-gptq (R1 + R2 sites, 400 steps, then GPTQ; 64 x 512 wiki windows):
perplexity 34.69 against QuaRot-GPTQ's 38.18; the loss on the training rows fell 44.2 -> 27.3,
on held-out tokens 43.7 -> 35.2, so more `rows` should generalise better.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .primitives import fake_quantize_ste
from .rotate import rotation_matrix, sub_seed
from .scheme import QuantArgs, QuantScheme
from .spinquant import CayleySGD, train_weight_args

log = logging.getLogger(__name__)


@dataclass
class Site:
    """A group of linears sharing an input, with the float inputs collected there."""

    kind: str  # "r1" (readers of the residual) | "r2" (o_proj: the value heads of `layer`)
    layer: int
    act: QuantArgs  # the input's fake-quant
    W: torch.Tensor  # (out, n) float32, the readers stacked (original basis)
    wargs: list[tuple[int, QuantArgs | None]]  # (rows of W, weight args) per reader, in W's order
    G: torch.Tensor | None = None  # (n, n) = Wᵀ W (weights: false)
    X: torch.Tensor | None = None  # (rows, n) training inputs
    H: torch.Tensor | None = None  # (rows', n) held-out inputs


class _Collected(Exception):
    pass


def collect_sites(model: nn.Module, arch, plan: dict[str, QuantScheme], train: torch.Tensor, held: torch.Tensor | None,
                  rows: int, r2: bool, weights: bool, seed: int) -> list[Site]:
    """Sites whose inputs are quantized, with up to `rows` float input tokens each from `train`
    (n, seqlen) and rows // 4 from `held`, drawn at random (seeded)."""
    sites, hooks = [], []
    device = next(model.parameters()).device
    groups = [("r1", (arch.q_proj, arch.k_proj, arch.v_proj)), ("r1", (arch.gate_proj, arch.up_proj))]
    if r2:
        groups.append(("r2", (arch.o_proj,)))
    buf: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(arch.decoder_layers(model)):
        for kind, group in groups:
            scheme = plan.get(f"{arch.layers}.{i}.{group[0]}")
            if scheme is None or scheme.inputs is None:
                continue
            mods = [layer.get_submodule(p) for p in group]
            W = torch.cat([m.weight.detach().float() for m in mods], 0)  # (out, n)
            wargs = [(m.out_features, train_weight_args(s.weights) if (s := plan.get(f"{arch.layers}.{i}.{p}")) else None)
                     for p, m in zip(group, mods)]
            site = Site(kind, i, scheme.inputs, W, wargs, G=None if weights else W.double().T.mm(W.double()).float())
            sites.append(site)
            buf[id(site)] = []
            hooks.append(mods[0].register_forward_pre_hook(lambda m, a, k=id(site): keep(k, a[0])))

    g = torch.Generator().manual_seed(seed)
    per_seq = [0]

    def keep(k: int, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])  # (tokens, n)
        buf[k].append(x[torch.randperm(x.shape[0], generator=g)[:per_seq[0]]].float())

    def stop(mod, args):
        raise _Collected  # the head's logits (tokens x vocab) are not needed: stop the forward there

    def run(tokens: torch.Tensor, n_rows: int, field: str) -> None:
        for k in buf:
            buf[k].clear()
        per_seq[0] = -(-n_rows // tokens.shape[0])  # a random share of every sequence's tokens
        with torch.no_grad():
            for j in range(tokens.shape[0]):
                try:
                    model(tokens[j:j + 1].to(device), use_cache=False)
                except _Collected:
                    pass
        for s in sites:
            X = torch.cat(buf[id(s)])  # (tokens, n)
            setattr(s, field, X[torch.randperm(X.shape[0], generator=g)[:n_rows]].contiguous())

    hooks.append(model.get_submodule(arch.lm_head).register_forward_pre_hook(stop))
    try:
        run(train, rows, "X")
        if held is not None:
            run(held, max(rows // 4, 16), "H")
    finally:
        for h in hooks:
            h.remove()
    return sites


def _rotate(x: torch.Tensor, site: Site, R: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x R (R1 sites) or x B (R2 sites, R per head); with `inverse`, by the transpose."""
    R = R.T if inverse else R
    if site.kind == "r1":
        return x @ R
    d = R.shape[0]
    return (x.reshape(x.shape[0], -1, d) @ R).reshape(x.shape)  # (rows, heads, d) per head


def site_loss(site: Site, X: torch.Tensor, R: torch.Tensor, weights: bool) -> torch.Tensor:
    """Mean over the rows of X of the squared output error at the site under rotation R."""
    Y = _rotate(X, site, R)
    Yq = fake_quantize_ste(Y, site.act)
    if not weights:
        E = _rotate(Yq - Y, site, R, inverse=True)  # (rows, n): the activation error, original basis
        return ((E @ site.G) * E).sum(-1).mean()
    Wr = _rotate(site.W, site, R)  # (out, n): the readers' weights in the rotated basis
    parts, r0 = [], 0
    for n_out, wa in site.wargs:
        parts.append(Wr[r0:r0 + n_out] if wa is None else fake_quantize_ste(Wr[r0:r0 + n_out], wa))
        r0 += n_out
    out = Yq @ torch.cat(parts, 0).T - X @ site.W.T  # (rows, out)
    return out.pow(2).sum(-1).mean()


def learn_rotations_local(model: nn.Module, arch, plan: dict[str, QuantScheme], train: torch.Tensor,
                          held: torch.Tensor | None, args, progress: Callable[[int, float], None] | None = None
                          ) -> dict[str, Any]:
    """`learn_rotations` for `loss: layer` (same arguments and result; see the module doc)."""
    cfg = model.config
    hidden = cfg.hidden_size
    n_layers = len(arch.decoder_layers(model))
    attn = arch.decoder_layers(model)[0].get_submodule(arch.attention)
    head_dim = getattr(attn, "head_dim", None) or hidden // cfg.num_attention_heads
    t0 = time.perf_counter()
    sites = collect_sites(model, arch, plan, train, held if args.keep_best else None, args.rows, args.r2, args.weights,
                          sub_seed(args.seed, "layer-loss"))
    if not sites:
        raise ValueError("learn_rotation with loss: layer found no quantized activations to learn against; "
                         "give the readers of the residual an `inputs` scheme (e.g. preset W4A4)")
    # float64 masters (orthogonal to rounding after every Cayley step), float32 in the loss
    dev = next(model.parameters()).device
    R1 = rotation_matrix(hidden, args.init, args.seed).to(dev).requires_grad_(True)
    R2 = ([rotation_matrix(head_dim, args.init, sub_seed(args.seed, "r2", i, 0)).to(dev).requires_grad_(True)
           for i in range(n_layers)] if args.r2 else None)

    def total(field: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        r1 = R1.float()  # cast once per evaluation, not per site
        r2 = [r.float() for r in R2] if R2 is not None else None
        parts = []
        for s in sites:
            X = getattr(s, field)
            R = r1 if s.kind == "r1" else r2[s.layer]
            parts.append(site_loss(s, X if idx is None else X[idx % X.shape[0]], R, args.weights))
        return torch.stack(parts).mean()

    params = [R1] + (R2 or [])
    opt = CayleySGD(params, args.lr, args.momentum, args.max_step)
    g = torch.Generator().manual_seed(sub_seed(args.seed, "layer-batches"))
    with torch.no_grad():
        init_loss = total("X").item()
        init_held = total("H").item() if args.keep_best else float("nan")
    start = [p.detach().clone() for p in params]
    losses: list[float] = []
    for step in range(args.steps):
        idx = torch.randint(0, args.rows, (args.row_batch,), generator=g).to(dev)
        with torch.enable_grad():
            loss = total("X", idx)
            loss.backward()
        losses.append(loss.item())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"learn_rotation: layer loss became {losses[-1]} at step {step}; lower max_step")
        decay = 1.0 - step / args.steps  # the step and its cap decay linearly to 0, as end to end
        opt.lr, opt.max_step = args.lr * decay, args.max_step * decay
        opt.step()
        if progress is not None:
            progress(step, losses[-1])
        if step % max(1, args.steps // 8) == 0:
            log.info("learn_rotation (layer loss): step %d/%d, batch loss %.4g", step, args.steps, losses[-1])
    with torch.no_grad():
        final_loss = total("X").item()
        final_held, kept = float("nan"), "learned"
        if args.keep_best:
            final_held = total("H").item()
            if not final_held < init_held:
                kept = "initial"
                for p, p0 in zip(params, start):
                    p.copy_(p0)
                log.warning("learn_rotation: held-out layer loss %.4g -> %.4g did not improve; keeping the initial (%s) "
                            "rotations", init_held, final_held, args.init)
    secs = time.perf_counter() - t0
    log.info("learn_rotation (layer loss, %d sites): %d steps in %.1f s; loss %.4g -> %.4g", len(sites), args.steps,
             secs, init_loss, final_loss)
    return {"r1": R1.detach(), "r2": None if R2 is None else [r.detach() for r in R2],
            "losses": losses, "init_loss": init_loss, "final_loss": final_loss, "heldout_init": init_held,
            "heldout_final": final_held, "kept": kept, "seconds": secs}


__all__ = ["Site", "collect_sites", "learn_rotations_local", "site_loss"]
