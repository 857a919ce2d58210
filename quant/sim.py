"""The simulated form of a quantized linear: fake-quant weights (kept with their integer codes,
packed, and qparams, so packing is exact) and dynamic per-token activation fake-quant."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmpress.kernels.formats import pack, unpack

from .fmpq import channel_order
from .primitives import continuing_sequence, dequantize, fake_quantize_input, int_factored, int_linear, static_input_scale
from .scheme import QuantScheme


class SimQuantLinear(nn.Module):
    """y = fq_in(x) @ dequant(W_q)^T + b; for schemes that factor into an integer GEMM (`int_factored`:
    symmetric per-channel integer weights under dynamic symmetric per-token integer activations),
    y = (q_x @ q_w^T) * s_w * s_x + b in float32 (`int_linear`), as integer kernels compute it.

    Buffers: `weight` (the dequantized weight, in the original dtype), `weight_codes_packed` (the
    int8 codes (out, in) packed into int32 words by `kernels.formats.pack`: 8 to a word at 4 bits,
    so a model being compressed holds an eighth of a byte per weight for them, not a byte;
    `weight_codes` unpacks them), `weight_scale` / `weight_zero_point` (float32, (out|1,
    n_groups)). A scheme with no weight args keeps the float weight and only fake-quantizes the
    inputs. A scheme with static inputs (`inputs.dynamic: false`) gets `input_scale` (float32
    (1, 1)) from `set_input_scale` (calibration: stage `act_scales` or `gptq`); until then its
    inputs are quantized dynamically. A scheme with COMET's 4/8-bit input groups (`inputs.outliers`)
    gets `input_perm` (int64 (in,), the channels by calibration absmax, `quant.fmpq`) likewise;
    until then the channels keep their order.
    """

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, copy: bool = True):
        """`copy=False` takes the linear's tensors without copying them: for a linear this module
        replaces (`compress.surgery.to_sim`), so the model does not hold its weights twice."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        own = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        self.weight = nn.Parameter(own(linear.weight), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(own(linear.bias), requires_grad=False)
        self.register_buffer("weight_codes_packed", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("input_scale", None)
        self.register_buffer("input_perm", None)

    @property
    def static_inputs(self) -> bool:
        """The scheme quantizes inputs with a calibrated scale (`inputs.dynamic: false`)."""
        return self.scheme.inputs is not None and not self.scheme.inputs.dynamic

    @property
    def calibrated_inputs(self) -> bool:
        """The input quantization takes calibrated state: a static scale, or COMET's channel order."""
        return self.static_inputs or bool(self.scheme.inputs is not None and self.scheme.inputs.outliers)

    def calibrate_inputs(self, amax: torch.Tensor) -> None:
        """Calibrate from the inputs' per-channel absmax (in,) over the calibration set: the static
        scale (from its largest entry), or COMET's channel order."""
        if self.static_inputs:
            self.set_input_scale(amax.max())
        elif self.calibrated_inputs:
            self.input_perm = channel_order(amax.detach()).to(self.weight.device)
        else:
            raise ValueError(f"{self.scheme.name} quantizes inputs dynamically with nothing to calibrate")

    def set_input_scale(self, amax: torch.Tensor) -> None:
        """Calibrate a static input scale from the inputs' absmax over the calibration set."""
        if not self.static_inputs:
            raise ValueError(f"{self.scheme.name} quantizes inputs dynamically; there is no input scale to calibrate")
        self.input_scale = static_input_scale(amax.detach().float().to(self.weight.device), self.scheme.inputs)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The scheme's activation fake-quant (dynamic, or with the calibrated `input_scale`)."""
        return fake_quantize_input(x, self.scheme.inputs, self.input_scale, self.input_perm)

    @property
    def quantized(self) -> bool:
        return self.weight_codes_packed is not None

    @property
    def weight_codes(self) -> torch.Tensor | None:
        """The integer codes, int8 (out, in), or None before `set_quantized`."""
        if self.weight_codes_packed is None:
            return None
        return unpack(self.weight_codes_packed, self.scheme.weights.bits, self.in_features)

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Install integer codes (out, in) and qparams; `weight` becomes their dequantization,
        written into its own storage."""
        args = self.scheme.weights
        if args is None:
            raise ValueError("this SimQuantLinear's scheme quantizes no weights")
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"codes of shape {tuple(q.shape)} do not match weight ({self.out_features}, {self.in_features})")
        self.weight_codes_packed = pack(q.to(torch.int8).contiguous(), args.bits)
        self.weight_scale = scale.float().contiguous()
        self.weight_zero_point = zero.float().contiguous()
        deq = dequantize(q, scale, zero, args, dtype=self.weight.dtype)
        if self.weight.device == deq.device and self.weight.is_contiguous():
            # in place: the model holds one copy of its weights (pages of a memory-mapped checkpoint
            # are replaced, not added to); a caller keeping the old values must have copied them
            self.weight.data.copy_(deq)
        else:
            self.weight.data = deq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_codes_packed is not None and int_factored(self.scheme.weights, self.scheme.inputs) and (
                self.scheme.inputs.dynamic or self.input_scale is not None):
            # integer GEMM + scale epilogue, what the packed runtime's kernels compute
            return int_linear(x, self.weight_codes, self.weight_scale, self.scheme.inputs, self.bias, self.input_scale)
        if self.scheme.inputs is not None:
            x = self.quantize_input(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def _continues(kwargs: dict) -> bool:
    """Whether a causal LM's forward continues sequences already in a cache: a non-empty `cache`
    (`past_key_values` before transformers renamed it), or a `cache_position` that does not start at 0."""
    past = kwargs.get("cache", kwargs.get("past_key_values"))
    if past is not None:
        length = past.get_seq_length() if hasattr(past, "get_seq_length") else (past[0][0].shape[-2] if len(past) else 0)
        if length:
            return True
    pos = kwargs.get("cache_position")
    return pos is not None and pos.numel() > 0 and int(pos.reshape(-1)[0]) > 0


def follow_sequence_position(model: nn.Module) -> None:
    """Tell the static input quantizers of `model` (`QuantArgs.sink_tokens`) whether each forward
    starts its sequences at position 0: hooks on the top module set `primitives.continuing_sequence`
    for the forward's duration (a decode step over a KV cache continues; a prompt does not). Once per
    model; the hooks are not saved, so `compress.load` calls it again."""
    if getattr(model, "_lmpress_follows_position", False):
        return

    active: list = []  # the open contexts, innermost last (a forward inside a forward)

    def before(_m, _args, kwargs):
        ctx = continuing_sequence(_continues(kwargs))
        ctx.__enter__()
        active.append(ctx)

    def after(_m, _args, _kwargs, _out):
        if active:
            active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True, always_call=True)
    model._lmpress_follows_position = True


def uses_sink_tokens(model: nn.Module) -> bool:
    """Whether any linear of `model` keeps sink positions' inputs in float (`QuantArgs.sink_tokens`)."""
    return any(getattr(getattr(getattr(m, "scheme", None), "inputs", None), "sink_tokens", 0) for m in model.modules())
