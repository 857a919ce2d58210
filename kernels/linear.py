"""The runtime form of a quantized linear: packed integer weights plus qparams, as on disk.

Buffer names follow compressed-tensors `pack-quantized`: `weight_packed` (int32
[out, packed_cols(in, bits)]), `weight_scale` / `weight_zero_point` (float32 (out|1, n_groups);
no zero point for symmetric schemes), `weight_shape` (int64 [2] = (out, in)), and `bias`; a static
activation scheme adds `input_scale` (float32 (1, 1)), COMET's 4/8-bit groups `input_perm` (int64
(in,), the calibrated channel order, `quant.fmpq`).

The forward dispatches (`lmpress.kernels.dispatch`, ``LMPRESS_KERNELS``):

- CUDA -> Triton: weight-only schemes through `w4a16_gemm` (2/4/8-bit, any group size);
  per-token activation schemes with per-channel/per-tensor symmetric 4/8-bit weights through
  `act_quant` + the integer GEMM (`w4a4_gemm`: W4A4, W4A8, W8A8); other activation schemes
  through `act_quant` (fake-quant) + `w4a16_gemm`; COMET's 4/8-bit activation groups
  (`inputs.outliers`, with symmetric per-channel weights) through `quant.fmpq.fmpq_quantize` +
  `w4ax_gemm` on a copy of the weight codes with the columns in `input_perm` order, made once and
  kept like `_int8_container`; floating-point weights (FP8, NVFP4, MXFP4) through `fp_gemm`, their activations (if quantized) fake-quantized in torch first; 3-bit weights
  through the reference.
  Inside a RotatedInput, an online Hadamard before a per-token activation quantization is fused
  into it (`transform_act_quant`; path kinds ``triton-rot+...``).
- CPU -> `lmpress.kernels.cpu`, for layers of at least `cpu.MIN_FAST_WEIGHTS` weights under
  ``auto`` (smaller ones take the cached reference unless they take ``cpu-int8mm``): per-token
  activation schemes with symmetric per-channel weights (`quant.primitives.int_factored`: W8A8, W4A8,
  W4A4...) run an int8 GEMM on the codes (`cpu-int8mm`: fbgemm's up to `cpu.gemv_rows()` rows, oneDNN's above; every size, bit-identical to the
  simulation's `int_linear`; ``LMPRESS_INT8_GEMM=0`` turns it off, see `cpu`); weight-only 4/8-bit
  schemes run torch's int4/int8 ops in bfloat16 on a repacked copy for up to `cpu.SMALL_M` rows
  (decode); larger calls and whatever the ops cannot serve dequantize on the fly and run F.linear
  (exact, nothing kept). Linears that read one input (a layer's q/k/v, gate/up; `link_siblings`,
  which `compress.load` calls) run as one GEMM over their stacked weights on those op paths
  (`SiblingGroup`, bit-identical to separate calls).
- the reference (``LMPRESS_KERNELS=ref``, small layers under ``auto``, autograd, and Triton's
  fallbacks): unpack + dequantize + F.linear (`int_factored` schemes: `int_linear` on the codes),
  bit-identical to SimQuantLinear. By default it keeps the dequantized weight after the first
  forward (keyed on the buffers' identity and version, so a reload invalidates it): speed of
  fp32 at the memory cost of fp32. `cache_weight = False` dequantizes on every call instead.

`kernel_path` records what the last forward ran and, for a fallback, why.
"""
from __future__ import annotations

import os
import threading
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmpress.quant.primitives import (dequantize, fake_quantize, fake_quantize_input, float_rows, int_factored, int_linear,
                                      n_groups, qparam_rows, sink_rows)
from lmpress.quant.scheme import QuantScheme

from . import cpu
from .dispatch import Path, requested_backend, triton_available
from .formats import pack, packed_cols, unpack


def _version(t: torch.Tensor) -> int:
    """A buffer's version counter, for the keys of the copies made from it; -1 for an inference tensor, which keeps
    none (a checkpoint loaded under torch.inference_mode: every forward raised until 2026-12-08). Such a buffer can
    change in place only inside inference mode, which these keys then do not see."""
    return -1 if t.is_inference() else t._version


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
        qshape = (qparam_rows(out_features, args), n_groups(in_features, args))
        words = packed_cols(in_features, args.bits)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(qshape, dtype=torch.float32, device=device))
        zero = None if args.symmetric else torch.zeros(qshape, dtype=torch.float32, device=device)
        self.register_buffer("weight_zero_point", zero)
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        static = scheme.inputs is not None and not scheme.inputs.dynamic  # a calibrated activation scale
        self.register_buffer("input_scale", torch.ones(1, 1, dtype=torch.float32, device=device) if static else None)
        fmpq = scheme.inputs is not None and bool(scheme.inputs.outliers)  # COMET's channel order (quant.fmpq)
        self.register_buffer("input_perm", torch.arange(in_features, device=device) if fmpq else None)
        self.cache_weight = True
        self._cached: tuple | None = None  # (key, dequantized weight): reference path only
        self._fast: tuple | None = None  # (key, cpu.Int4Pack | cpu.Int8Pack | cpu.Int8MM): CPU fast paths only
        self._plan: tuple | None = None  # (x dtype, INT8MM_ENV's value, cpu.plan's answer): asked ~200 times a token
        self._group: SiblingGroup | None = None  # the linears reading the same input (`link_siblings`)
        self.kernel_path: Path | None = None

    @classmethod
    def from_sim(cls, sim: nn.Module) -> "PackedLinear":
        """Pack a quantized SimQuantLinear's integer codes and copy its qparams and bias."""
        if not sim.quantized:
            raise ValueError("from_sim needs a quantized SimQuantLinear; call set_quantized (e.g. after rtn_quantize) first")
        args = sim.scheme.weights
        if args.symmetric and bool((sim.weight_zero_point != 0).any()):
            raise ValueError("symmetric scheme with a non-zero zero point: the packed form stores no zero point")
        out = cls(sim.in_features, sim.out_features, sim.scheme, sim.bias is not None,
                  dtype=sim.weight.dtype, device=sim.weight.device)
        out.weight_packed = sim.weight_codes_packed.detach().clone()  # the same layout (kernels.formats.pack)
        out.weight_scale = sim.weight_scale.detach().float().clone()
        if not args.symmetric:
            out.weight_zero_point = sim.weight_zero_point.detach().float().clone()
        if sim.bias is not None:
            out.bias = sim.bias.detach().clone()
        if out.input_scale is not None:
            if sim.input_scale is None:
                raise ValueError(f"{sim.scheme.name} has static activation scales that were never calibrated: "
                                 "add stage `act_scales` (or use `gptq`) to the recipe")
            out.input_scale = sim.input_scale.detach().float().clone()
        if out.input_perm is not None and sim.input_perm is not None:
            out.input_perm = sim.input_perm.detach().clone()
        return out

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The scheme's activation fake-quant (dynamic, or with the calibrated `input_scale`)."""
        return fake_quantize_input(x, self.scheme.inputs, self.input_scale, self.input_perm)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight in `dtype`, through the same `dequantize` every form uses."""
        args = self.scheme.weights
        q = unpack(self.weight_packed, args.bits, self.in_features)  # (out, in) int8
        zero = self.weight_zero_point if self.weight_zero_point is not None else torch.zeros_like(self.weight_scale)
        return dequantize(q, self.weight_scale, zero, args, dtype=dtype)

    fuses_online_transform = True  # RotatedInput passes its transform to forward

    def forward(self, x: torch.Tensor, transform: nn.Module | None = None) -> torch.Tensor:
        """`transform`: an online transform of the input (RotatedInput's). The Triton path fuses it
        into the per-token activation quantization when it can (`transform_act_quant`); every other
        path applies it first and runs as without one."""
        if transform is not None:
            if self._runs_triton(x):
                return self._forward_triton(x, transform)
            return self._dispatch(transform(x), grouped=False)  # a new tensor for each reader: nothing to share
        return self._dispatch(x)

    def _runs_triton(self, x: torch.Tensor) -> bool:  # the choice _dispatch makes
        if x.requires_grad and torch.is_grad_enabled():
            return False
        backend = requested_backend()
        return backend == "triton" or (backend == "auto" and x.is_cuda and triton_available())

    def _dispatch(self, x: torch.Tensor, grouped: bool = True) -> torch.Tensor:
        backend = requested_backend()
        if grouped and self._group is not None and backend in ("auto", "cpu") and not (x.requires_grad and torch.is_grad_enabled()):
            y = self._group.forward(self, x, small_to_ref=backend == "auto")
            if y is not None:
                return y
        if backend == "auto":
            if x.is_cuda:
                if not triton_available():
                    return self._forward_ref(x, "triton is not installed")
                backend = "triton"
            elif x.device.type == "cpu" and (self.out_features * self.in_features >= cpu.MIN_FAST_WEIGHTS or (
                    # a small layer on the int8 GEMM still beats the reference's `int_linear` (generic qparams +
                    # fp32 GEMM of the codes), as k/v reuse q's codes (`cpu.shared_token_codes`): 192 x 576, one
                    # row, one thread, 40 us against 65 us
                    self.scheme.inputs is not None and self.cpu_plan(x.dtype)[0] == "int8mm")):
                backend = "cpu"
            else:
                return self._forward_ref(x, "small layer: the cached fp32 weight is cheap and faster" if x.device.type == "cpu" else "")
        if x.requires_grad and torch.is_grad_enabled():
            return self._forward_ref(x, "autograd: only the reference is differentiable")
        if backend == "triton":
            return self._forward_triton(x)
        if backend == "cpu":
            return self._forward_cpu(x)
        return self._forward_ref(x, "")

    def _note(self, kind: str, reason: str = "") -> None:
        p = self.kernel_path
        if p is None or p.kind != kind or p.reason != reason:
            self.kernel_path = Path(kind, reason)

    # ---- reference: the oracle -------------------------------------------------------------
    def _forward_ref(self, x: torch.Tensor, reason: str) -> torch.Tensor:
        self._note("ref", reason)
        if int_factored(self.scheme.weights, self.scheme.inputs):  # the simulation's integer GEMM + epilogue
            return int_linear(x, self._weight_for(torch.float32, codes=True), self.weight_scale, self.scheme.inputs, self.bias,
                              self.input_scale)
        if self.scheme.inputs is not None:
            x = self.quantize_input(x)
        return F.linear(x, self._weight_for(x.dtype), self.bias)

    # ---- CPU fast path -------------------------------------------------------------------
    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self._forward_ref(x, f"the CPU path needs CPU tensors, got {x.device}")
        K, N = self.in_features, self.out_features
        x2 = x.view(-1, K) if x.is_contiguous() else x.reshape(-1, K)
        M = x2.shape[0]
        if M == 0:
            return self._forward_ref(x, "no rows")
        inputs = self.scheme.inputs
        kind, why = self.cpu_plan(x.dtype)
        if kind == "dequant" or (M > cpu.SMALL_M and kind != "int8mm"):  # exact: the simulation's operations
            self._note("cpu-dequant", why or f"{M} rows > {cpu.SMALL_M}")
            if int_factored(self.scheme.weights, inputs):  # the simulation's integer GEMM + epilogue
                return cpu.linear_int_dequant(x, self.weight_packed, self.weight_scale, self.scheme.weights, inputs, K,
                                              self.bias, self.input_scale)
            xin = self.quantize_input(x) if inputs is not None else x
            return cpu.linear_dequant(xin, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                      self.scheme.weights, K, self.bias)
        self._note("cpu-" + kind, why)
        prep = self._cpu_prep(kind)
        if kind == "int8mm" and self.input_scale is not None:  # static codes; sink positions stay float (exact path)
            n = sink_rows(x, inputs)
            y = cpu.linear_int8mm(x[..., n:, :], prep, self.bias, x.dtype, self.input_scale)
            if n:  # (..., T, K): the first n positions of each sequence in float, the rest on the int8 GEMM
                head = float_rows(x[..., :n, :], unpack(self.weight_packed, self.scheme.weights.bits, K), self.weight_scale,
                                  self.bias)  # as the simulation's `int_linear` computes them
                return torch.cat([head, y.to(x.dtype).view(*x.shape[:-2], -1, N)], dim=-2)
        elif kind == "int8mm":
            y = cpu.linear_int8mm(x, prep, self.bias, x.dtype)  # x itself: q/k/v (gate/up) share its codes
        else:
            y = cpu.linear_small_m(x2, prep, self.bias, x.dtype)
        return y.view(*x.shape[:-1], N)

    def _buffers_key(self) -> tuple:
        b = self._buffers  # direct: nn.Module.__getattr__ costs microseconds, ~200 calls a token
        return tuple((t.data_ptr(), _version(t), t.device) for t in
                     (b["weight_packed"], b["weight_scale"], b["weight_zero_point"]) if t is not None)

    def _cpu_prep(self, kind: str):
        key = (kind,) + self._buffers_key()
        if self._fast is None or self._fast[0] != key:
            self._fast = (key, _cpu_pack(kind, self.weight_packed, self.weight_scale, self.weight_zero_point, self.scheme,
                                         self.in_features))
        return self._fast[1]

    def cpu_plan(self, dtype: torch.dtype) -> tuple[str, str]:
        """`cpu.plan` for this scheme and an activation dtype, kept until the dtype or `cpu.INT8MM_ENV` changes."""
        env = os.environ.get(cpu.INT8MM_ENV, "")
        p = self._plan
        if p is None or p[0] is not dtype or p[1] != env:
            p = self._plan = (dtype, env, cpu.plan(self.scheme.weights, self.scheme.inputs, dtype))
        return p[2]

    # ---- Triton ----------------------------------------------------------------------------
    def _forward_triton(self, x: torch.Tensor, transform: nn.Module | None = None) -> torch.Tensor:
        from .act_quant import ACT_BITS, act_dequant, act_quant
        from .fp_gemm import fp_format_name, fp_gemm
        from .transform_act_quant import online_act_quant
        from .w4a4_gemm import int_gemm
        from .w4a16_gemm import KERNEL_BITS, w4a16_gemm

        w, a = self.scheme.weights, self.scheme.inputs
        token = a is not None and a.type == "int" and a.granularity == "token" and a.symmetric and a.bits in ACT_BITS
        # symmetric per-channel weights under per-token codes: the integer GEMM, any width (int8 containers)
        int_path = token and w.type == "int" and w.symmetric and w.granularity in ("channel", "tensor")
        if transform is not None and not (token and w.type == "int" and (w.bits in KERNEL_BITS or int_path)
                                          and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
            x, transform = transform(x), None  # nothing to fuse it into
        rot, why = "", ""
        if w.bits not in KERNEL_BITS and not int_path:
            return self._forward_ref(x, f"{w.bits}-bit fields straddle int32 words; no Triton kernel")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return self._forward_ref(x, f"{x.dtype} activations")
        if w.granularity == "block":
            return self._forward_ref(x, "FP8 weight tiles (block scales): no Triton kernel (exact reference)")
        if w.type == "float":  # dequantize-then-dot; quantized activations are fake-quantized in torch first
            if a is not None:
                x = self.quantize_input(x)
                why = f"{fp_format_name(a) if a.type == 'float' else 'int' + str(a.bits)} activations fake-quantized in torch"
            self._note(f"triton-fp-{fp_format_name(w)}", why)
            return fp_gemm(x, self.weight_packed, self.weight_scale, args=w, in_features=self.in_features, bias=self.bias)
        gs = w.group_size if w.granularity == "group" else None
        kw = dict(in_features=self.in_features, group_size=gs, bits=w.bits, bias=self.bias)
        if a is not None and a.outliers:
            return self._forward_w4ax(x, int_path=w.type == "int" and w.symmetric and w.granularity in ("channel", "tensor"), **kw)
        if a is None:
            self._note(f"triton-w{w.bits}a16")
            return w4a16_gemm(x, self.weight_packed, self.weight_scale, self.weight_zero_point, **kw)
        if token:
            if transform is not None:  # "rot+": the online transform fused into act_quant, else `why` not
                codes, _, sx, why = online_act_quant(x, transform, a.bits, a.clip_ratio, full_range=a.full_range)
                rot, why = ("", "online transform in torch: " + why) if why else ("rot+", "")
            else:
                codes, _, sx = act_quant(x, a.bits, a.clip_ratio, full_range=a.full_range)
            if int_path:
                words, w_bits = (self.weight_packed, w.bits) if w.bits in (4, 8) else (self._int8_container(), 8)
                self._note(f"triton-{rot}w{w.bits}a{a.bits}", why)
                return int_gemm(codes, sx, words, self.weight_scale, in_features=self.in_features,
                                w_bits=w_bits, bias=self.bias, out_dtype=x.dtype)
            xq = act_dequant(codes, sx, a.bits, x.dtype)
            self._note(f"triton-{rot}actquant+w4a16", "; ".join(
                r for r in ("group-wise or asymmetric weights do not factor out of the integer sum", why) if r))
        else:
            xq = self.quantize_input(x)
            self._note("triton-w4a16", f"activation scheme {a.granularity}/{'sym' if a.symmetric else 'asym'} fake-quantized in torch")
        return w4a16_gemm(xq, self.weight_packed, self.weight_scale, self.weight_zero_point, **kw)

    def _forward_w4ax(self, x: torch.Tensor, int_path: bool, **kw) -> torch.Tensor:
        """COMET's 4/8-bit activation groups: codes and per-token-group scales over the reordered
        channels (`quant.fmpq`), then the W4Ax GEMM on the weight's columns in that order."""
        from lmpress.quant.fmpq import fmpq_quantize

        from .w4ax_gemm import w4ax_gemm
        from .w4a16_gemm import w4a16_gemm

        a, w = self.scheme.inputs, self.scheme.weights
        G = a.group_size
        if not int_path or G < 32 or G & (G - 1):
            self._note("triton-w4a16", "COMET groups fake-quantized in torch: " + (
                "group-wise or asymmetric weights do not factor out of the integer sum" if not int_path else
                f"activation groups of {G} (the W4Ax kernel takes a power of two >= 32)"))
            return w4a16_gemm(self.quantize_input(x), self.weight_packed, self.weight_scale, self.weight_zero_point, **kw)
        codes, sx = fmpq_quantize(x, a, self.input_perm)  # (M, K) int8 in perm order, (M, groups)
        words, w_bits = self._perm_weight()
        self._note(f"triton-w{w.bits}a{a.bits}/{a.outlier_bits}")
        y = w4ax_gemm(codes, sx, words, self.weight_scale, in_features=self.in_features, group_size=G, w_bits=w_bits,
                      bias=self.bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _perm_weight(self) -> tuple[torch.Tensor, int]:
        """The weight's codes with the columns in `input_perm` order (4- or 8-bit fields; other widths in
        8-bit containers), made once and kept with the buffers' identity and version, as `_int8_container`."""
        bits = self.scheme.weights.bits
        w_bits = bits if bits in (4, 8) else 8
        key = ("perm", self.weight_packed.data_ptr(), _version(self.weight_packed), self.input_perm.data_ptr(),
               _version(self.input_perm), self.weight_packed.device)
        if self._fast is None or self._fast[0] != key:
            q = unpack(self.weight_packed, bits, self.in_features)  # (out, in) int8
            self._fast = (key, pack(q.index_select(1, self.input_perm.to(q.device)).contiguous(), w_bits))
        return self._fast[1], w_bits

    def _int8_container(self) -> torch.Tensor:
        """The codes of a 2/3/5/6-bit weight repacked 8 bits a field (the integer GEMM's int8 containers),
        made once and kept with the buffers' identity and version (`_fast`, as the CPU path's copy)."""
        key = ("int8", self.weight_packed.data_ptr(), _version(self.weight_packed), self.weight_packed.device)
        if self._fast is None or self._fast[0] != key:
            self._fast = (key, pack(unpack(self.weight_packed, self.scheme.weights.bits, self.in_features), 8))
        return self._fast[1]

    # ---- memory --------------------------------------------------------------------------
    def weight_nbytes(self, shared: frozenset = frozenset()) -> int:
        """Bytes this module holds for its weight: packed words, qparams, and whatever runtime
        copy a path keeps (the reference's dequantized weight, the CPU path's repacked one).
        `shared`: data pointers of buffers another module already counts (Sparse24Linear's dense form)."""
        n = sum(t.numel() * t.element_size() for name, t in self.named_buffers(recurse=False)
                if t is not None and name != "bias" and t.data_ptr() not in shared)
        if self._cached is not None:
            n += self._cached[1].numel() * self._cached[1].element_size()
        if self._fast is not None:
            f = self._fast[1]  # a CPU pack (its nbytes()) or a repacked tensor (_int8_container, _perm_weight)
            n += f.nbytes if isinstance(f, torch.Tensor) else f.nbytes()
        if self._group is not None and self._group.members[0] is self:  # the group's stacked copy, counted once
            n += self._group.nbytes()
        return n

    def _weight_for(self, dtype: torch.dtype, codes: bool = False) -> torch.Tensor:
        """The dequantized weight in `dtype` or, with `codes`, the integer codes in `dtype` (`int_linear`'s operand),
        kept between calls unless `cache_weight` is off."""
        def make() -> torch.Tensor:
            if codes:
                return unpack(self.weight_packed, self.scheme.weights.bits, self.in_features).to(dtype)  # (out, in)
            return self.dequantized_weight(dtype)
        if not self.cache_weight:
            return make()
        key = (dtype, codes) + self._buffers_key()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, make())
        return self._cached[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def _cpu_pack(kind: str, packed, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
              in_features: int):
    """The CPU op's copy of a weight (`cpu.plan`'s kind): int4 tiles, int8 rows, or the int8 GEMMs' codes (each
    prepacked on first use; `packed` may then be a function returning the words)."""
    if kind == "int4pack":
        return cpu.prepare_int4(packed, scale, zero, scheme.weights, in_features)
    if kind == "int8mm":
        return cpu.prepare_int8mm(packed, scale, scheme.weights, in_features, scheme.inputs)
    return cpu.prepare_int8(packed, scale, scheme.weights, in_features)


class SiblingGroup:
    """PackedLinears that read one input tensor: a decoder layer's q/k/v, or gate/up (`link_siblings`).

    On the CPU op paths, the first member called on a tensor runs one GEMM over the members' weights
    stacked along the output dimension. It keeps the other members' slices of the output for their
    calls on that very tensor (the same object, unmodified since: `_version`), and drops each slice as
    it is taken. Every output column is computed on its own:
    - on the int8 GEMM from an exact integer sum and the same per-column epilogue;
    - on the bf16 weight-only ops in the same tiles.
    So this equals the separate calls on the same op bit for bit (tests/test_kernels.py). A decode step
    then issues 4 GEMMs a layer instead of 7. Under ``auto`` a k/v projection too small for the ops on
    its own (`cpu.MIN_FAST_WEIGHTS`) joins q's GEMM instead of taking the fp32 reference, and so takes
    that op's arithmetic: exact on the int8 GEMM, bfloat16 on the weight-only int4/int8 ops (as q's).

    Not used (the members run alone, as before):
    - under autograd, off the CPU, or for inference-mode tensors (they keep no version counter);
    - with an online transform (each reader gets a new tensor);
    - on the dequant path, i.e. weight-only schemes above `cpu.SMALL_M` rows: an fp32 GEMM's summation
      order may depend on N.
    """

    def __init__(self, members: Sequence["PackedLinear"]):
        self.members = tuple(members)
        self.sizes = [m.out_features for m in self.members]
        self._fast: tuple | None = None  # (key, CPU op's copy of the stacked weights, stacked bias or None)
        self._memo: dict[int, tuple] = {}  # thread id -> (x, x._version, {member index: output}, Path)

    def forward(self, member: "PackedLinear", x: torch.Tensor, small_to_ref: bool = False) -> torch.Tensor | None:
        """`member`'s output on x, from the group's GEMM; None when the group does not apply (see the class doc).
        `small_to_ref` (``auto``): a group smaller than `cpu.MIN_FAST_WEIGHTS` in all is left to the members'
        own choice, as a lone layer of that size would be, unless it takes the int8 GEMM."""
        if x.device.type != "cpu" or x.is_inference() or x.dtype not in cpu.FAST_DTYPES:
            return None
        i = next(j for j, m in enumerate(self.members) if m is member)
        tid = threading.get_ident()
        memo = self._memo.get(tid)
        if memo is not None and memo[0] is x and memo[1] == x._version:
            y = memo[2].pop(i, None)
            if y is not None:
                if not memo[2]:
                    del self._memo[tid]
                if member.kernel_path != memo[3]:
                    member.kernel_path = memo[3]
                return y
        K = x.shape[-1]
        M = x.numel() // max(K, 1)
        kind = self.members[0].cpu_plan(x.dtype)[0]
        if M == 0 or not (kind == "int8mm" or (kind in ("int4pack", "int8pack") and M <= cpu.SMALL_M)):
            return None
        if small_to_ref and kind != "int8mm" and sum(self.sizes) * K < cpu.MIN_FAST_WEIGHTS:
            return None
        prep, bias = self._prep(kind)
        if kind == "int8mm":
            y = cpu.linear_int8mm(x, prep, bias, x.dtype)  # (M, N_1 + ... + N_n)
        else:
            y = cpu.linear_small_m(x.reshape(M, K), prep, bias, x.dtype)  # (M, N_1 + ... + N_n)
        outs = {j: o.view(*x.shape[:-1], n) for j, (o, n) in enumerate(zip(y.split(self.sizes, dim=1), self.sizes))}
        path = Path("cpu-" + kind, f"one GEMM for the {len(self.members)} linears reading this input")
        mine = outs.pop(i)
        self._memo[tid] = (x, x._version, outs, path)
        if member.kernel_path != path:
            member.kernel_path = path
        return mine

    def _prep(self, kind: str) -> tuple:
        ms = self.members
        key = (kind,) + tuple(m._buffers_key() for m in ms) + tuple(
            (m.bias.data_ptr(), _version(m.bias)) for m in ms if m.bias is not None)
        if self._fast is None or self._fast[0] != key:
            self._fast = None  # free the old copy before building the new one

            def rows(t: torch.Tensor, m: PackedLinear) -> torch.Tensor:  # (1, g) per-tensor qparams -> (N_m, g)
                return t.expand(m.out_features, -1) if t.shape[0] == 1 else t

            def stacked() -> torch.Tensor:
                return torch.cat([m.weight_packed for m in ms])  # (sum N, words)

            packed = stacked if kind == "int8mm" else stacked()  # int8mm reads the words when it makes a copy
            scale = torch.cat([rows(m.weight_scale, m) for m in ms])  # (sum N, groups)
            zero = None if ms[0].weight_zero_point is None else torch.cat([rows(m.weight_zero_point, m) for m in ms])
            bias = None
            if any(m.bias is not None for m in ms):
                dt = next(m.bias.dtype for m in ms if m.bias is not None)
                bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dt) for m in ms])
            self._fast = (key, _cpu_pack(kind, packed, scale, zero, ms[0].scheme, ms[0].in_features), bias)
        return self._fast[1], self._fast[2]

    def nbytes(self) -> int:
        """Bytes of the stacked copy (0 before the first grouped call)."""
        if self._fast is None:
            return 0
        return self._fast[1].nbytes() + (self._fast[2].numel() * self._fast[2].element_size() if self._fast[2] is not None else 0)


def link_siblings(model: nn.Module, groups: Iterable[Sequence[str]]) -> int:
    """Give each set of PackedLinears named in `groups` (module paths; each set reads one input tensor,
    e.g. a layer's q/k/v) a `SiblingGroup`; for a set of Sparse24Linears, their `dense_packed` forms. Sets
    that are not all PackedLinears of one scheme and input width (a RotatedInput, a mixed-precision plan,
    COMET's permuted or static activation scales) are left alone. Returns the number of groups linked."""
    n = 0
    for names in groups:
        try:
            mods = [model.get_submodule(p) for p in names]
        except AttributeError:
            continue
        if mods and all(type(m) is Sparse24Linear for m in mods):  # 2:4 layers: their dense codes' PackedLinears
            mods = [m.dense_packed() for m in mods]  # None where a scheme has none (`Sparse24Linear.dense_packed`)
        if len(mods) < 2 or not all(type(m) is PackedLinear for m in mods):
            continue
        first = mods[0]
        if any(m.scheme != first.scheme or m.in_features != first.in_features or m.input_perm is not None
               or m.input_scale is not None for m in mods) or first.scheme.weights.type != "int":
            continue
        group = SiblingGroup(mods)
        for m in mods:
            m._group = group
        n += 1
    return n


class Sparse24Linear(nn.Module):
    """The runtime form of a 2:4-sparse linear (scheme `sparsity: "2:4"`), weights quantized or not.

    Buffers (lmpress's own names; compressed-tensors has no 2:4 + pack-quantized layout):
    `weight_sparse24_values` (the 2 kept entries of every 4 input columns: int32 words of packed
    codes, `formats.pack` order, when the scheme quantizes weights; else floats (out, slots)),
    `weight_sparse24_meta` (int32, their 2-bit positions, `formats.sparse24_compress`),
    `weight_scale` / `weight_zero_point` (quantized only, as PackedLinear), `weight_shape`, `bias`.
    The forward runs `sparse24_gemm` (Triton) on CUDA. On the CPU, integer weights under no or dynamic activation
    quantization run as the PackedLinear of their dense codes (`dense_packed`: the pruned positions hold the zero
    point's code, as in the SimQuantLinear they came from, so it is `PackedLinear.from_sim` of it), on its CPU paths:
    the int4 / int8 ops or the int8 GEMMs, exact on-the-fly dequantization above `cpu.SMALL_M` rows (torch has no
    CPU 2:4 kernel; the dense codes cost 4 / bits x less than the dense fp32 weight cached until 2026-12-08).
    Otherwise the reference (dense weight cached, bit-identical to the SimQuantLinear it came from).
    `kernel_path` records which.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        from .formats import sparse24_slots

        if scheme.sparsity != "2:4":
            raise ValueError(f"Sparse24Linear stores 2:4 sparsity; scheme {scheme.name} has sparsity {scheme.sparsity!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        args = scheme.weights
        slots = sparse24_slots(in_features)
        if args is not None:
            qshape = (qparam_rows(out_features, args), n_groups(in_features, args))
            values = torch.zeros(out_features, packed_cols(slots, args.bits), dtype=torch.int32, device=device)
            self.register_buffer("weight_scale", torch.ones(qshape, dtype=torch.float32, device=device))
            zero = None if args.symmetric else torch.zeros(qshape, dtype=torch.float32, device=device)
            self.register_buffer("weight_zero_point", zero)
        else:
            values = torch.zeros(out_features, slots, dtype=dtype, device=device)
        self.register_buffer("weight_sparse24_values", values)
        self.register_buffer("weight_sparse24_meta", torch.zeros(out_features, packed_cols(slots, 2), dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._cached: tuple | None = None
        self._dense: tuple | None = None  # (buffers key, PackedLinear of the dense codes): the CPU paths only
        self.kernel_path: Path | None = None

    @classmethod
    def from_sim(cls, sim: nn.Module) -> "Sparse24Linear":
        """Compress a pruned SimQuantLinear (at most 2 nonzeros in every 4 input columns)."""
        from .formats import sparse24_compress

        args = sim.scheme.weights
        out = cls(sim.in_features, sim.out_features, sim.scheme, sim.bias is not None, dtype=sim.weight.dtype, device=sim.weight.device)
        keep = sim.weight.detach() != 0
        if args is not None:
            if not sim.quantized:
                raise ValueError("from_sim needs a quantized SimQuantLinear for a scheme that quantizes weights")
            # every zero weight has code == zero point, so the codes stored at filler positions dequantize to 0
            vals, meta = sparse24_compress(sim.weight_codes.float(), keep)
            out.weight_sparse24_values = pack(vals.to(torch.int8), args.bits)
            out.weight_scale = sim.weight_scale.detach().float().clone()
            if not args.symmetric:
                out.weight_zero_point = sim.weight_zero_point.detach().float().clone()
        else:
            vals, meta = sparse24_compress(sim.weight.detach(), keep)
            out.weight_sparse24_values = vals
        out.weight_sparse24_meta = meta
        if sim.bias is not None:
            out.bias = sim.bias.detach().clone()
        return out

    def _gemm_args(self) -> dict:
        w = self.scheme.weights
        return dict(in_features=self.in_features, bits=w.bits if w is not None else None,
                    group_size=w.group_size if w is not None and w.granularity == "group" else None)

    def _qparams(self) -> tuple:
        if self.scheme.weights is None:
            return None, None
        return self.weight_scale, self.weight_zero_point

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight in `dtype`, zeros where pruned."""
        from .sparse24_gemm import sparse24_dense_weight

        return sparse24_dense_weight(self.weight_sparse24_values, self.weight_sparse24_meta, *self._qparams(),
                                     dtype=dtype, **self._gemm_args())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = requested_backend()
        w, a = self.scheme.weights, self.scheme.inputs
        triton_ok = (x.is_cuda and triton_available() and backend in ("auto", "triton") and not (x.requires_grad and torch.is_grad_enabled())
                     and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                     and (w is None or (w.bits in (2, 4, 8) and (w.granularity != "group" or w.group_size % 4 == 0))))
        if triton_ok:
            from .sparse24_gemm import sparse24_gemm

            self.kernel_path = Path("triton-sparse24")
            return sparse24_gemm(fake_quantize(x, a) if a is not None else x, self.weight_sparse24_values,
                                 self.weight_sparse24_meta, *self._qparams(), bias=self.bias, **self._gemm_args())
        if (x.device.type == "cpu" and backend in ("auto", "cpu") and not (x.requires_grad and torch.is_grad_enabled())
                and self.dense_packed() is not None):
            y = self._dense[1]._dispatch(x)  # grouped with its siblings' dense forms where `link_siblings` linked them
            self.kernel_path = self._dense[1].kernel_path
            return y
        why = "" if not x.is_cuda else "no Triton kernel for this scheme"
        p = self.kernel_path
        if p is None or p.kind != "ref" or p.reason != why:
            self.kernel_path = Path("ref", why)
        factored = int_factored(w, a)  # the simulation's integer GEMM + epilogue on the dense codes (zeros where pruned)
        b = self._buffers  # direct: nn.Module.__getattr__ costs ~1 us, and decode runs ~200 of these a token
        vals, meta = b["weight_sparse24_values"], b["weight_sparse24_meta"]
        key = (torch.float32 if factored else x.dtype, factored, vals.data_ptr(), _version(vals), meta.data_ptr(), _version(meta),
               x.device)
        if self._cached is None or self._cached[0] != key:
            from .sparse24_gemm import sparse24_dense_weight

            dense = (sparse24_dense_weight(self.weight_sparse24_values, self.weight_sparse24_meta, torch.ones_like(self.weight_scale),
                                           None, dtype=torch.float32, **self._gemm_args()) if factored  # (out, in) codes
                     else self.dense_weight(x.dtype))
            self._cached = (key, dense)
        if factored:
            return int_linear(x, self._cached[1], b["weight_scale"], a, b["bias"])
        return F.linear(fake_quantize(x, a) if a is not None else x, self._cached[1], b["bias"])

    def dense_packed(self) -> "PackedLinear | None":
        """The PackedLinear of this weight's dense codes (kept while the buffers are unchanged), which the CPU
        runs; None where the scheme has no such form here: unquantized or floating-point weights, static or
        outlier-channel activations (a PackedLinear would need their `input_scale` / `input_perm`)."""
        w, a = self.scheme.weights, self.scheme.inputs
        if w is None or w.type != "int" or (a is not None and (not a.dynamic or a.outliers)):
            return None
        b = self._buffers
        key = tuple((t.data_ptr(), _version(t), t.device) for t in (b["weight_sparse24_values"], b["weight_sparse24_meta"],
                                                                   b["weight_scale"], b["weight_zero_point"], b["bias"])
                    if t is not None)
        if self._dense is None or self._dense[0] != key:
            from .formats import sparse24_decompress, sparse24_slots

            K, N = self.in_features, self.out_features
            kept = unpack(b["weight_sparse24_values"], w.bits, sparse24_slots(K)).float()  # (N, slots) codes
            z = b["weight_zero_point"]
            fill = 0.0
            if z is not None:  # every pruned weight's code is its group's zero point: it dequantizes to 0
                g = (torch.arange(K, device=z.device) // w.group_size if w.granularity == "group"
                     else torch.zeros(K, dtype=torch.int64, device=z.device)).clamp_(max=z.shape[1] - 1)  # (K,) group
                fill = z.float().expand(N, -1)[:, g]  # (N, K)
            codes = sparse24_decompress(kept, b["weight_sparse24_meta"], K, fill)  # (N, K)
            d = PackedLinear(K, N, self.scheme, b["bias"] is not None,
                             dtype=b["bias"].dtype if b["bias"] is not None else torch.float32, device="meta")
            d.weight_packed = pack(codes.to(torch.int8), w.bits)
            d.weight_scale, d.weight_zero_point, d.bias = b["weight_scale"], z, b["bias"]
            d.weight_shape = b["weight_shape"]
            self._dense = (key, d)
        return self._dense[1]

    def weight_nbytes(self) -> int:
        """Bytes this module holds for its weight: the 2:4 values and metadata, qparams, and the
        reference path's cached dense weight (or codes) once a forward made it, or the CPU's dense
        form (`dense_packed`: its codes and whatever copy its path keeps)."""
        mine = [t for name, t in self.named_buffers(recurse=False) if t is not None and name != "bias"]
        n = sum(t.numel() * t.element_size() for t in mine)
        if self._cached is not None:
            n += self._cached[1].numel() * self._cached[1].element_size()
        if self._dense is not None:
            n += self._dense[1].weight_nbytes(shared=frozenset(t.data_ptr() for t in mine))
        return n

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def sparse_col_dtype(in_features: int) -> torch.dtype:
    """The CSR column indices' dtype: int16 while every column fits (in_features <= 32767), else int32."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


class LUTLinear(nn.Module):
    """The runtime form of a dense-and-sparse codebook linear (SqueezeLLM, `lmpress.quant.squeezellm`).

    Buffers (lmpress's own names; compressed-tensors has no codebook format): `weight_codes` (int32
    words (out, packed_cols(in, bits)) of unsigned `bits`-bit codebook indices, `formats.pack_unsigned`
    order), `weight_codebook` (out, 2^bits) fp16, the sparse part as CSR over the output rows,
    `weight_sparse_rowptr` (out + 1) int32, `weight_sparse_cols` (nnz) int16 (int32 past 32767 columns) and
    `weight_sparse_values` (nnz) fp16 (corrections added to the codebook value there),
    `weight_shape` (int64 [2] = (out, in)) and `bias`. The weight is codebook[n, code] + sparse,
    in float32. The forward runs `lut_gemm` (Triton) plus a CSR product on CUDA, else the
    reference: the dequantized weight, kept after the first call (as PackedLinear's reference),
    and F.linear. `kernel_path` records which.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, nnz: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        from .formats import packed_cols

        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("weight_codes", torch.zeros(out_features, packed_cols(in_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_codebook", torch.zeros(out_features, 1 << bits, dtype=torch.float16, device=device))
        self.register_buffer("weight_sparse_rowptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("weight_sparse_cols", torch.zeros(nnz, dtype=sparse_col_dtype(in_features), device=device))
        self.register_buffer("weight_sparse_values", torch.zeros(nnz, dtype=torch.float16, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._cached: tuple | None = None
        self.kernel_path: Path | None = None

    @classmethod
    def from_parts(cls, linear: nn.Module, codes: torch.Tensor, codebook: torch.Tensor, sparse: torch.Tensor,
                   bits: int) -> "LUTLinear":
        """From `lmpress.quant.squeezellm.squeeze`'s result for `linear`: codes (out, in) uint8, codebook
        (out, 2^bits) fp16, sparse (out, in) fp16 corrections (zero off the sparse positions)."""
        from .formats import pack_unsigned

        nz = sparse != 0
        out = cls(linear.in_features, linear.out_features, bits, int(nz.sum()), linear.bias is not None,
                  dtype=linear.weight.dtype, device=linear.weight.device)
        out.weight_codes = pack_unsigned(codes, bits)
        out.weight_codebook = codebook.to(torch.float16).contiguous()
        out.weight_sparse_rowptr = torch.cat([nz.new_zeros(1, dtype=torch.int64), nz.sum(1).cumsum(0)]).to(torch.int32)
        out.weight_sparse_cols = nz.nonzero()[:, 1].to(sparse_col_dtype(linear.in_features))  # row-major: rows ascending
        out.weight_sparse_values = sparse[nz].to(torch.float16)
        if linear.bias is not None:
            out.bias = linear.bias.detach().clone()
        return out

    @property
    def nnz(self) -> int:
        return self.weight_sparse_values.numel()

    def bits_per_weight(self) -> float:
        """Stored bits over weights: codes (whole int32 words), codebooks, and the CSR part."""
        stored = sum(t.numel() * t.element_size() * 8 for t in (self.weight_codes, self.weight_codebook, self.weight_sparse_rowptr,
                                                               self.weight_sparse_cols, self.weight_sparse_values))
        return stored / (self.in_features * self.out_features)

    def _sparse_rows(self) -> torch.Tensor:
        counts = (self.weight_sparse_rowptr[1:] - self.weight_sparse_rowptr[:-1]).long()  # (out,)
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)  # (nnz,)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in): codebook[n, code] + the sparse corrections, summed in float32, then cast."""
        from .lut_gemm import lut_weight

        W = lut_weight(self.weight_codes, self.weight_codebook, self.in_features, self.bits)  # (out, in) float32
        W.index_put_((self._sparse_rows(), self.weight_sparse_cols.long()), self.weight_sparse_values.float(), accumulate=True)
        return W.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = requested_backend()
        triton_ok = ((backend == "triton" or (backend == "auto" and x.is_cuda and triton_available()))
                     and not (x.requires_grad and torch.is_grad_enabled()) and x.dtype in (torch.float16, torch.bfloat16, torch.float32))
        if triton_ok:
            from .lut_gemm import lut_gemm

            self.kernel_path = Path("triton-lut")
            y = lut_gemm(x, self.weight_codes, self.weight_codebook, bits=self.bits, in_features=self.in_features, bias=self.bias)
            if self.nnz:
                S = torch.sparse_csr_tensor(self.weight_sparse_rowptr, self.weight_sparse_cols.to(torch.int32),
                                            self.weight_sparse_values.to(x.dtype),
                                            (self.out_features, self.in_features))
                x2 = x.reshape(-1, self.in_features)  # (..., in) -> (M, in)
                y = y + (S @ x2.T).T.reshape(y.shape)  # (out, M) -> (M, out) -> (..., out)
            return y
        self.kernel_path = Path("ref", "" if not x.is_cuda else "Triton is not available")
        key = (x.dtype, x.device, *((t.data_ptr(), _version(t)) for t in (self.weight_codes, self.weight_codebook,
                                                                          self.weight_sparse_cols, self.weight_sparse_values)))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.dense_weight(x.dtype))
        return F.linear(x, self._cached[1], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, nnz={self.nnz}"
