"""Module swaps: find linears, replace them by name, wrap them in their simulated form."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from lmpress.quant.scheme import QuantScheme
from lmpress.quant.sim import SimQuantLinear, follow_sequence_position


def get_module(model: nn.Module, fqn: str) -> nn.Module:
    return model.get_submodule(fqn)


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    model.set_submodule(fqn, new)


@contextmanager
def plain_linears(module: nn.Module):
    """While active, every not-yet-quantized SimQuantLinear under `module` is a plain nn.Linear
    holding the same weight and bias (no input fake-quant, no copy): a stage placed before the
    quantizers sees the float linears it sees in memory. On exit the linear at each such path (the
    same one, or one a stage put there, e.g. a pruned smaller one) is simulated again, same scheme."""
    swapped = {}
    for name, m in list(module.named_modules()):
        if isinstance(m, SimQuantLinear) and not m.quantized:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight, lin.bias = m.weight, m.bias
            module.set_submodule(name, lin)
            swapped[name] = (lin, m.scheme)
    try:
        yield
    finally:
        for name, (_, scheme) in swapped.items():  # the linear there now (a stage may have replaced it)
            module.set_submodule(name, SimQuantLinear(module.get_submodule(name), scheme, copy=False))


def linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear (or already-simulated linear) in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SimQuantLinear))]


def to_sim(model: nn.Module, fqn: str, scheme: QuantScheme) -> SimQuantLinear:
    """The module at `fqn` as a SimQuantLinear with `scheme` (wrapping it on first use)."""
    mod = get_module(model, fqn)
    if isinstance(mod, SimQuantLinear):
        if mod.scheme != scheme:
            raise ValueError(f"{fqn} is already quantized with {mod.scheme.name}; cannot re-quantize as {scheme.name}")
        return mod
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"{fqn} is a {type(mod).__name__}, not a linear layer")
    sim = SimQuantLinear(mod, scheme, copy=False)  # it replaces `mod`: no second copy of the weights
    set_module(model, fqn, sim)
    if scheme.inputs is not None and scheme.inputs.sink_tokens:
        follow_sequence_position(model)  # a decode step's rows are no sequence's first positions
    return sim


def untie_embeddings(model: nn.Module, arch) -> bool:
    """Give lm_head its own weight when it shares the embedding's (needed to quantize the head
    or rotate the residual stream). Returns True if it was tied."""
    head = model.get_submodule(arch.lm_head)
    embed = model.get_submodule(arch.embed)
    if isinstance(head, nn.Linear) and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
        return True
    return False
