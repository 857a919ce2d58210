"""Statistics of a linear layer's inputs, collected through forward pre-hooks.

`HessianAccumulator` accumulates, over every token a linear sees (not only the Hessian):

- the GPTQ/SparseGPT Hessian ``H = (2/N) · Σ_t x_tᵀ x_t`` (in, in), kept as a running mean so it
  never grows with N: after a batch of n tokens, ``H ← H·N/(N+n) + (2/(N+n))·XᵀX``;
- the per-column sum of squares ``Σ_t x_tj²`` and its square root ``‖X_j‖₂`` (Wanda's norms);
- optionally the per-column absolute maximum (for smoothing/clipping heuristics).

The batch product XᵀX is computed in `compute_dtype` (float32 by default: fast, and exact
enough for one batch of a few thousand tokens), and added into a running accumulator of
`dtype` (float64 by default), so rounding does not pile up across many batches.

`capture_input_stats(modules)` is a context manager that hooks a set of modules and yields
one `HessianAccumulator` per module; the hooks are removed on exit, also on error:

    with capture_input_stats({"q": layer.self_attn.q_proj}) as stats:
        step.forward()                 # every batch through the layer
    H = stats["q"].hessian             # (in, in)

`transforms` maps a module name to a function applied to the input before it is counted:
use it to count what the module really computes with (e.g. its activation fake-quant).

`token_cap` (Hessian only): a token whose squared norm exceeds `token_cap` times the median of its
batch counts with weight ``cap · median / ‖x_t‖²`` instead of 1 (`token_weights`), so its share of H
is that of a token at the cap. The reason is the attention sink: the first token of every
sequence carries "massive activations" (Sun et al. 2024, arXiv:2402.17762) into a few linears.
On SmolLM2-135M the first token holds 99.8% of the trace of layer 11's down_proj Hessian (its
squared norm is 245,000 times the median token's) and 78% of layer 28's (1,854 times). GPTQ on
such an H spends its error compensation on those few tokens. It also sets the dampening from
their inflated diagonal. On held-out text (Python's documentation) layer 28's down_proj output
error on the ordinary tokens was then 7 times RTN's. With a cap of 100 it was 0.85 times RTN's,
and the sink token's relative error stayed at RTN's level. Measured with /tmp probes in session
33, one layer at a time, W4 g64. In perplexity the cap did not pay on that model: W4 g64 GPTQ
with `token_cap: 100` gave wiki 19.359, canterbury 27.624 and pydoc 17.856, against 19.293,
27.674 and 18.010 without it, on the same machine (bench/results/weight_only-2fcd0fb.jsonl). That
is +0.3%, -0.2% and -0.9%, within the spread of GPTQ rows between runs. So it stays off by default.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn


class HessianAccumulator:
    """Running statistics of the inputs of one linear with `n_features` input columns."""

    def __init__(self, n_features: int, *, hessian: bool = True, norms: bool = True, absmax: bool = False,
                 dtype: torch.dtype = torch.float64, compute_dtype: torch.dtype = torch.float32,
                 token_cap: float | None = None):
        if not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
        if not (hessian or norms or absmax):
            raise ValueError("HessianAccumulator collects nothing: enable at least one of hessian, norms, absmax")
        if not (dtype.is_floating_point and compute_dtype.is_floating_point):
            raise ValueError(f"dtype and compute_dtype must be floating point, got {dtype} and {compute_dtype}")
        check_token_cap(token_cap)
        self.token_cap = token_cap
        self.n_features = n_features
        self.want_hessian, self.want_norms, self.want_absmax = hessian, norms, absmax
        self.dtype, self.compute_dtype = dtype, compute_dtype
        self.n_tokens = 0
        self._H: torch.Tensor | None = None  # (in, in) running mean of 2·xᵀx
        self._sq: torch.Tensor | None = None  # (in,) Σ x²
        self._absmax: torch.Tensor | None = None  # (in,) max |x|

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Count a batch of inputs `x` (..., n_features): every leading index is one token."""
        if x.shape[-1] != self.n_features:
            raise ValueError(f"input has {x.shape[-1]} features, this accumulator expects {self.n_features}")
        x = x.detach().reshape(-1, self.n_features).to(self.compute_dtype)  # (n, in)
        n = x.shape[0]
        if n == 0:
            return
        total = self.n_tokens + n
        if self.want_hessian:
            xw = x if self.token_cap is None else x * token_weights(x, self.token_cap)[:, None]  # (n, in)
            xtx = (xw.T @ x).to(self.dtype)  # (in, in)
            if self._H is None:
                self._H = xtx.mul_(2.0 / total)
            else:
                self._H.mul_(self.n_tokens / total).add_(xtx, alpha=2.0 / total)
        if self.want_norms:
            sq = x.pow(2).sum(dim=0).to(self.dtype)  # (in,)
            self._sq = sq if self._sq is None else self._sq.add_(sq)
        if self.want_absmax:
            am = x.abs().amax(dim=0).to(self.dtype)  # (in,)
            self._absmax = am if self._absmax is None else torch.maximum(self._absmax, am)
        self.n_tokens = total

    def _need(self, what: str, value: torch.Tensor | None, flag: bool) -> torch.Tensor:
        if not flag:
            raise ValueError(f"this HessianAccumulator was created with {what}=False")
        if value is None:
            raise ValueError(f"no inputs were counted yet ({what}): did the hooked module run?")
        return value

    @property
    def hessian(self) -> torch.Tensor:
        """H = (2/N) Σ xᵀx (Σ w_t x_tᵀx_t with `token_cap`), (in, in), in `dtype`."""
        return self._need("hessian", self._H, self.want_hessian)

    @property
    def sq_norms(self) -> torch.Tensor:
        """Σ_t x_tj² per input column j, (in,)."""
        return self._need("norms", self._sq, self.want_norms)

    @property
    def col_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all counted tokens, per input column, (in,) (Wanda's input norms)."""
        return self.sq_norms.sqrt()

    @property
    def absmax(self) -> torch.Tensor:
        """max_t |x_tj| per input column, (in,)."""
        return self._need("absmax", self._absmax, self.want_absmax)

    def release(self) -> None:
        """Drop the accumulated tensors (free the memory of a large H)."""
        self._H = self._sq = self._absmax = None
        self.n_tokens = 0


def check_token_cap(token_cap, where: str = "token_cap") -> None:
    """Refuse a `token_cap` that is not null or a number >= 1 (a multiple of the median token's squared norm)."""
    if token_cap is None:
        return
    if isinstance(token_cap, bool) or not isinstance(token_cap, (int, float)) or not 1 <= token_cap < float("inf"):
        raise ValueError(f"{where}={token_cap!r} must be null (off) or a number >= 1: the multiple of the median "
                         "token's squared input norm above which a token's share of the Hessian is capped, e.g. 100")


def token_weights(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token weights (n,) for the tokens x (n, in): ``min(1, cap · m / ‖x_t‖²)``, m the median
    ‖x_t‖² over the n tokens. Σ_t w_t x_tᵀx_t then counts every token above the cap as if its
    squared norm were cap · m (its direction kept)."""
    sq = x.double().pow(2).sum(dim=-1)  # (n,)
    limit = cap * sq.median()
    w = torch.where(sq > limit, limit / sq, torch.ones_like(sq))  # sq > limit >= 0 here: no division by 0
    return w.to(x.dtype)


def _in_features(name: str, module: nn.Module) -> int:
    n = getattr(module, "in_features", None)
    if n is None:
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            raise TypeError(f"{name}: cannot tell the input width of a {type(module).__name__}; hook linear layers")
        n = w.shape[1]
    return int(n)


@contextmanager
def capture_input_stats(
    modules: Mapping[str, nn.Module],
    *,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    **options,
) -> Iterator[dict[str, HessianAccumulator]]:
    """Hook every module of `modules` (name -> linear) and yield {name: HessianAccumulator}.

    `options` go to every `HessianAccumulator` (hessian, norms, absmax, dtype, compute_dtype, token_cap).
    `transforms[name]`, if given, maps the module's input to what should be counted.
    """
    transforms = dict(transforms or {})
    unknown = sorted(set(transforms) - set(modules))
    if unknown:
        raise ValueError(f"transforms for modules that are not hooked: {unknown}")
    stats: dict[str, HessianAccumulator] = {}
    handles = []
    try:
        for name, module in modules.items():
            acc = HessianAccumulator(_in_features(name, module), **options)
            fn = transforms.get(name)

            def hook(_module, args, acc=acc, fn=fn):
                x = args[0]
                acc.add(fn(x) if fn is not None else x)

            handles.append(module.register_forward_pre_hook(hook))
            stats[name] = acc
        yield stats
    finally:
        for h in handles:
            h.remove()
