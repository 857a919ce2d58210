"""A fused linear (Phi-3's `qkv_proj`, `gate_up_proj`) as its parts, so the transforms that need
q, k, v or gate and up one by one (smoothing, rotations, KV-cache settings, AWQ) see them.

`SplitLinear` holds one nn.Linear per part, under the part's name (`qkv_proj.q`, `qkv_proj.k`,
`qkv_proj.v`; `gate_up_proj.gate`, `gate_up_proj.up`), and returns the concatenation of their
outputs along the last dimension: the fused output, the rows of the fused weight being the parts'
rows in order. `split_fused(model, layers, parts)` replaces the fused linears named in `parts`
({path in a decoder layer: ((part, rows), ...)}) in every decoder layer.
"""
from __future__ import annotations

import torch
from torch import nn


class SplitLinear(nn.Module):
    """Parts `names` of a fused linear, `rows` output rows each; forward = cat of their outputs."""

    def __init__(self, fused: nn.Linear, names: tuple[str, ...], rows: tuple[int, ...]):
        super().__init__()
        if sum(rows) != fused.out_features:
            raise ValueError(f"parts {dict(zip(names, rows))} do not add up to the fused linear's {fused.out_features} rows")
        self.names = tuple(names)
        start = 0
        for name, n in zip(names, rows):
            part = nn.Linear(fused.in_features, n, bias=fused.bias is not None, device=fused.weight.device, dtype=fused.weight.dtype)
            part.weight = nn.Parameter(fused.weight.detach()[start:start + n].clone(), requires_grad=False)
            if fused.bias is not None:
                part.bias = nn.Parameter(fused.bias.detach()[start:start + n].clone(), requires_grad=False)
            setattr(self, name, part)
            start += n
        self.in_features, self.out_features = fused.in_features, fused.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, n)(x) for n in self.names], dim=-1)


def split_fused(layers: nn.ModuleList, parts: dict[str, tuple[tuple[str, int], ...]]) -> list[str]:
    """Replace, in every decoder layer, the fused linears `parts` names ({path: ((part, rows), ...)})
    by a `SplitLinear`; returns the replaced paths (layer-relative, once each). Already split: no-op."""
    done = []
    for layer in layers:
        for path, spec in parts.items():
            module = layer.get_submodule(path)
            if isinstance(module, SplitLinear):
                continue
            layer.set_submodule(path, SplitLinear(module, tuple(n for n, _ in spec), tuple(r for _, r in spec)))
            if path not in done:
                done.append(path)
    return done


def is_split(layers: nn.ModuleList, parts: dict) -> bool:
    return bool(parts) and all(isinstance(layers[0].get_submodule(p), SplitLinear) for p in parts)


__all__ = ["SplitLinear", "is_split", "split_fused"]
