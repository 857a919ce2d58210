"""Mixture-of-experts experts as one pair of linears per expert, so every expert is quantized,
calibrated and packed like any other linear.

transformers 5 stores a sparse MoE block's experts fused: `gate_up_proj` (E, 2F, H) and
`down_proj` (E, H, F) parameters (Mixtral, Qwen3-MoE, Qwen2-MoE, ...), run by

    gate, up = (x_e @ gate_up_proj[e].T).chunk(2, -1);  y_e = (act(gate) * up) @ down_proj[e].T

on the tokens x_e routed to expert e, each result weighted by its routing weight and added into
place. `ExpertLinears` holds the same weights as `gate_up.e` (nn.Linear H -> 2F) and `down.e`
(F -> H) and computes the same sums in the same order. `split_experts(model)` replaces every fused
experts module; the router (`mlp.gate`) is untouched and stays in high precision.

Calibration reaches every expert: with `all_tokens` set (stage-time), each expert's linears also
run on the tokens not routed to it, so their inputs (Hessians, ranges) come from every calibration
token, as llm-compressor's MoE calibration does; those results are dropped, so the block's output
is exactly the routed one. `routed` counts the routing slots each expert received (reported: an
expert that few tokens reach is calibrated on all of them, not on its three).
"""
from __future__ import annotations

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers-5 fused experts module this file can split (no biases)."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
            and gu.shape[0] == dn.shape[0] and gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]
            and getattr(module, "gate_up_proj_bias", None) is None and getattr(module, "down_proj_bias", None) is None
            and hasattr(module, "act_fn"))


class ExpertLinears(nn.Module):
    """E experts, each `gate_up.e` (H -> 2F) and `down.e` (F -> H), computing what transformers'
    fused experts compute: forward(hidden (tokens, H), top_k_index (tokens, k), top_k_weights
    (tokens, k)) -> (tokens, H)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        E, two_f, H = gate_up.shape  # (experts, 2F, H); down (experts, H, F)
        self.num_experts, self.act_fn = E, act_fn
        self.gate_up = nn.ModuleList(nn.Linear(H, two_f, bias=False, device=gate_up.device, dtype=gate_up.dtype) for _ in range(E))
        self.down = nn.ModuleList(nn.Linear(two_f // 2, H, bias=False, device=down.device, dtype=down.dtype) for _ in range(E))
        with torch.no_grad():
            for e in range(E):
                self.gate_up[e].weight = nn.Parameter(gate_up[e].detach().clone(), requires_grad=False)
                self.down[e].weight = nn.Parameter(down[e].detach().clone(), requires_grad=False)
        self.all_tokens = False
        self.register_buffer("routed", torch.zeros(E, dtype=torch.long), persistent=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, tokens)
        if not self.routed.is_meta:
            self.routed += hit.sum(dim=(1, 2)).to(self.routed.device)
        for e in range(self.num_experts):
            top_k_pos, token_idx = torch.where(hit[e])
            if self.all_tokens:  # every token through the expert (its inputs see them all); the routed rows kept
                y = self._expert(e, hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                y = self._expert(e, hidden_states[token_idx])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e](x).chunk(2, dim=-1)
        return self.down[e](self.act_fn(gate) * up)


def split_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by an `ExpertLinears` holding the same
    weights (on their device and dtype, meta included); returns the replaced modules' names."""
    done = []
    for name, module in list(model.named_modules()):
        if is_fused_experts(module):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, ExpertLinears(module.gate_up_proj, module.down_proj, module.act_fn))
            done.append(name)
    if done:
        model.__dict__.pop("_lmpress_arch", None)  # a discovered ArchMap cached before the split is stale
    return done


def expert_modules(model: nn.Module) -> dict[str, ExpertLinears]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}


__all__ = ["ExpertLinears", "expert_modules", "is_fused_experts", "split_experts"]
