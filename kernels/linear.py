"""The runtime form of a quantized linear: packed integer weights plus qparams, as on disk.

Buffer names follow compressed-tensors `pack-quantized`: `weight_packed` (int32
[out, packed_cols(in, bits)]), `weight_scale` / `weight_zero_point` (float32 (out|1, n_groups);
no zero point for symmetric schemes), `weight_shape` (int64 [2] = (out, in)), and `bias`.
The forward is the reference path (unpack + dequantize + F.linear). By default it keeps the
dequantized weight after the first forward (keyed on the buffers' identity and version, so a
reload invalidates it): speed of fp32 at the memory cost of fp32. `cache_weight = False`
dequantizes on every call instead. Triton GEMMs plug in later behind the same buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmpress.quant.primitives import dequantize, fake_quantize, n_groups
from lmpress.quant.scheme import QuantScheme
from lmpress.quant.sim import SimQuantLinear

from .formats import pack, packed_cols, unpack


class PackedLinear(nn.Module):
    """y = fq_in(x) @ dequant(unpack(weight_packed))^T + b, bit-identical to SimQuantLinear.

    Build it from a quantized SimQuantLinear with `from_sim`, or construct it on the meta device
    and fill it with `load_state_dict(state, assign=True)`. Sparsity in the scheme is not
    expressed here (the weight codes already carry the zeros).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        args = scheme.weights
        if args is None:
            raise ValueError(f"PackedLinear needs a scheme that quantizes weights; {scheme.name} does not (keep a SimQuantLinear)")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        qrows = 1 if args.granularity == "tensor" else out_features
        qshape = (qrows, n_groups(in_features, args))
        words = packed_cols(in_features, args.bits)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(qshape, dtype=torch.float32, device=device))
        zero = None if args.symmetric else torch.zeros(qshape, dtype=torch.float32, device=device)
        self.register_buffer("weight_zero_point", zero)
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.cache_weight = True
        self._cached: tuple | None = None

    @classmethod
    def from_sim(cls, sim: SimQuantLinear) -> "PackedLinear":
        """Pack a quantized SimQuantLinear's integer codes and copy its qparams and bias."""
        if not sim.quantized:
            raise ValueError("from_sim needs a quantized SimQuantLinear; call set_quantized (e.g. after rtn_quantize) first")
        args = sim.scheme.weights
        if args.symmetric and bool((sim.weight_zero_point != 0).any()):
            raise ValueError("symmetric scheme with a non-zero zero point: the packed form stores no zero point")
        out = cls(sim.in_features, sim.out_features, sim.scheme, sim.bias is not None,
                  dtype=sim.weight.dtype, device=sim.weight.device)
        out.weight_packed = pack(sim.weight_codes, args.bits)
        out.weight_scale = sim.weight_scale.detach().float().clone()
        if not args.symmetric:
            out.weight_zero_point = sim.weight_zero_point.detach().float().clone()
        if sim.bias is not None:
            out.bias = sim.bias.detach().clone()
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight in `dtype`, through the same `dequantize` every form uses."""
        args = self.scheme.weights
        q = unpack(self.weight_packed, args.bits, self.in_features)  # (out, in) int8
        zero = self.weight_zero_point if self.weight_zero_point is not None else torch.zeros_like(self.weight_scale)
        return dequantize(q, self.weight_scale, zero, args, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.inputs is not None:
            x = fake_quantize(x, self.scheme.inputs)
        return F.linear(x, self._weight_for(x.dtype), self.bias)

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_weight:
            return self.dequantized_weight(dtype)
        bufs = (self.weight_packed, self.weight_scale, self.weight_zero_point)
        key = (dtype,) + tuple((b.data_ptr(), b._version, b.device) for b in bufs if b is not None)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.dequantized_weight(dtype))
        return self._cached[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"
