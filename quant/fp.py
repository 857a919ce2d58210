"""Floating-point quantization grids: FP8 (E4M3, E5M2), FP6 (E3M2, E2M3), FP4 (E2M1), and the
block-scaled FP4 formats NVFP4 and MXFP4, as pure tensor functions (exact in float32).

A minifloat with `e` exponent bits, `m` mantissa bits and bias 2^(e-1) - 1 holds, for exponents
E in [1 - bias, emax], the values ±2^E·(1 + k/2^m) and the subnormals ±2^(1-bias)·k/2^m. The
OCP formats used here have no infinities; E4M3 ("fn") reserves only S.1111.111 for NaN, so its
largest value is 448; E5M2 keeps IEEE's inf/NaN exponent, largest 57344; E2M1 / E3M2 / E2M3 use
every code for numbers (largest 6, 28, 7.5). `round_to_grid` rounds to nearest, ties to even
mantissa, and saturates at the largest value (the behaviour of the OCP conversions with
saturation, and of torch's float8 casts, which the tests use as the reference for FP8).

Block formats (scales along the last dimension, in groups):
- **MXFP4** (OCP Microscaling v1.0): groups of 32, a shared power-of-two scale (E8M0)
  2^(E - emax_elem), emax_elem = floor(log2(element max)) (2 for E2M1, 8 for E4M3). E is the
  exponent of the group's amax rounded to a power of two the way compressed-tensors and vLLM do
  (`generate_mx_scales` / `round_to_power_2` in compressed-tensors 0.20, after vLLM's
  tests/quantization/reference_mxfp4.py): floor(log2 amax), plus one when amax's mantissa is at
  least 2 - 2^-(m+1) with m the element's mantissa bits taken as 3 for E2M3 and 1 otherwise
  (E2M1: 1.75). OCP's own example conversion takes the floor alone; this rule is the one the
  engines apply to dynamic activations, so an artifact's activations quantize here as they do
  there. Elements saturate at the element max.
- **NVFP4** (NVIDIA): groups of 16, an E4M3 scale per group and one float32 scale per tensor:
  the group scale is amax_group / 6 expressed relative to the tensor scale s_t, i.e.
  s_g = E4M3(amax_group / 6 / s_t); the dequantized value is element · s_g · s_t. NVIDIA and
  compressed-tensors take s_t = amax_tensor / (448·6), so the largest group scale is 448.
  lmpress rounds that s_t up to a power of two, so the largest group scale lies in (224, 448]:
  s_g · s_t is then exact in float32 (the runtime keeps the product as one scale) and the two
  levels are recovered from the product exactly at export (`split_nvfp4`). It costs less than
  one of E4M3's 17 binades at the bottom of the range and none of its precision.
  (compressed-tensors stores the reciprocal 1 / s_t as `weight_global_scale`.)

Sources: OCP 8-bit Floating Point Specification (OFP8) rev 1.0 and OCP Microscaling Formats (MX)
v1.0 (grids, saturation, the shared-exponent rule); NVIDIA's NVFP4 description (TensorRT Model
Optimizer docs and the Blackwell blog "Introducing NVFP4", 2025) for the two-level scale.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FPFormat:
    """A minifloat element format: `exp` and `man` bits, bias 2^(exp-1) - 1, largest value `max`."""

    name: str
    exp: int
    man: int
    max: float

    @property
    def bias(self) -> int:
        return (1 << (self.exp - 1)) - 1

    @property
    def emin(self) -> int:
        """The smallest normal exponent (subnormals share its step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """The exponent of the largest value."""
        return int(torch.tensor(self.max).log2().floor())

    def grid(self) -> torch.Tensor:
        """Every non-negative value of the format, ascending (float64)."""
        sub = [k / (1 << self.man) * 2.0 ** self.emin for k in range(1 << self.man)]
        norm = [2.0 ** e * (1 + k / (1 << self.man)) for e in range(self.emin, self.emax + 1) for k in range(1 << self.man)]
        return torch.tensor(sorted({v for v in sub + norm if v <= self.max}), dtype=torch.float64)


E4M3 = FPFormat("e4m3", 4, 3, 448.0)
E5M2 = FPFormat("e5m2", 5, 2, 57344.0)
E3M2 = FPFormat("e3m2", 3, 2, 28.0)
E2M3 = FPFormat("e2m3", 2, 3, 7.5)
E2M1 = FPFormat("e2m1", 2, 1, 6.0)
FORMATS = {f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1)}


@functools.lru_cache(maxsize=None)
def _table(name: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid, boundaries) in float32: boundary k separates grid[k] and grid[k + 1]; at a tie the
    even code wins, so the boundary after an odd code is moved one ulp down (a value equal to
    the midpoint then lies above it and rounds up to the even code)."""
    grid = FORMATS[name].grid().float()
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float32: the grid values have few mantissa bits
    odd = torch.arange(len(mids)) % 2 == 1
    mids = torch.where(odd, torch.nextafter(mids, torch.full_like(mids, -1.0)), mids)
    return grid.to(device), mids.to(device)


def grid_values(fmt: FPFormat, device: torch.device | str = "cpu") -> torch.Tensor:
    """`fmt.grid()` in float32 on `device` (cached): index k is the magnitude of code k."""
    return _table(fmt.name, str(device))[0]


# the formats torch casts to natively: its casts round to nearest even (the table's rule, bit for
# bit: tests/test_fp_formats.py) and run far faster than a search; saturated first, as the table
NATIVE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def grid_index(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """The index in `fmt.grid()` of |x| rounded to nearest (ties to the even code), saturated."""
    native = NATIVE.get(fmt.name)
    if native is not None:  # the grid index is the bit pattern of the non-negative value
        return x.float().abs().clamp(max=fmt.max).to(native).view(torch.uint8).long()
    _, bounds = _table(fmt.name, str(x.device))
    return torch.bucketize(x.abs().float().contiguous(), bounds)  # |x| <= bounds[k] -> k


def round_to_grid(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """`x` rounded to the nearest value of `fmt` (ties to even mantissa), saturated at ±max;
    same dtype and shape. FP8 through torch's casts; the small formats by rounding float32's
    mantissa to `fmt.man` bits (ties to even, on the bits) above 2^emin and to multiples of the
    subnormal step below it: the table's values, without a search (tests compare with the grid)."""
    native = NATIVE.get(fmt.name)
    if native is not None:
        return x.float().clamp(-fmt.max, fmt.max).to(native).to(x.dtype)
    a = x.float().abs().clamp(max=fmt.max)
    step = 2.0 ** (fmt.emin - fmt.man)  # the subnormal spacing
    sub = torch.round(a / step) * step  # half to even, exact (powers of two)
    shift = 23 - fmt.man  # float32 mantissa bits dropped
    bits = a.view(torch.int32)
    bits = (bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)) & ~((1 << shift) - 1)  # round half to even
    r = torch.where(a < 2.0 ** fmt.emin, sub, bits.view(torch.float32)).clamp(max=fmt.max)
    return torch.copysign(r, x.float()).to(x.dtype)


# --------------------------------------------------------------------------- block formats


@dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: element format, group size, scale kind ("e8m0" | "e4m3")."""

    name: str
    element: FPFormat
    group_size: int
    scale: str


MXFP4 = BlockFormat("mxfp4", E2M1, 32, "e8m0")
MXFP6 = BlockFormat("mxfp6", E2M3, 32, "e8m0")
MXFP8 = BlockFormat("mxfp8", E4M3, 32, "e8m0")
NVFP4 = BlockFormat("nvfp4", E2M1, 16, "e4m3")
BLOCK_FORMATS = {f.name: f for f in (MXFP4, MXFP6, MXFP8, NVFP4)}


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.shape[-1] % group_size:
        raise ValueError(f"the last dimension ({x.shape[-1]}) must be a multiple of the format's group size {group_size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)  # (..., in) -> (..., groups, group)


def tensor_scale(x: torch.Tensor, fmt: BlockFormat = NVFP4) -> torch.Tensor:
    """NVFP4's float32 per-tensor scale: amax / (448·6) rounded up to a power of two (1 where the
    tensor is all zero)."""
    amax = x.detach().abs().amax().float()
    s = amax / (E4M3.max * fmt.element.max)
    return torch.where(s > 0, torch.exp2(torch.ceil(torch.log2(s))), torch.ones_like(s))


def nvfp4_scales(x: torch.Tensor, global_scale: torch.Tensor | None = None, fmt: BlockFormat = NVFP4):
    """NVFP4's two levels: (group scales, E4M3 values (..., groups); tensor scale s_t, float32);
    the group's scale is their product. A zero group gets E4M3's smallest value."""
    amax = _groups(x.detach().float(), fmt.group_size).abs().amax(-1)  # (..., groups)
    s_t = tensor_scale(x, fmt) if global_scale is None else global_scale.float()
    s_g = round_to_grid(amax / fmt.element.max / s_t, E4M3)
    return torch.where(s_g > 0, s_g, torch.full_like(s_g, 2.0 ** (E4M3.emin - E4M3.man))), s_t


def block_scales(x: torch.Tensor, fmt: BlockFormat, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The per-group scales of `x` (..., in) -> (..., in / group_size), float32 values that the
    scale format holds exactly: E8M0 powers of two (MX), or E4M3 values times `global_scale`
    (NVFP4; default `tensor_scale(x)`). A zero group gets the smallest scale."""
    g = _groups(x.detach().float(), fmt.group_size)
    amax = g.abs().amax(-1)  # (..., groups)
    if fmt.scale == "e8m0":
        frac, exp = torch.frexp(amax.clamp_min(torch.finfo(torch.float32).tiny))  # amax = frac · 2^exp, frac in [0.5, 1)
        man = 3 if fmt.element is E2M3 else 1  # compressed-tensors' rounding width (see the module doc)
        up = (2 * frac >= 2 - 2.0 ** -(man + 1)).int()  # the mantissa rounds up to the next power of two
        e = (exp - 1 + up).float() - fmt.element.emax  # round(log2 amax) - emax_elem
        return torch.exp2(e.clamp(-127, 127))
    if fmt.scale == "e4m3":
        s_g, s_t = nvfp4_scales(x, global_scale, fmt)
        return s_g * s_t
    raise ValueError(f"unknown scale kind {fmt.scale!r}; use 'e8m0' or 'e4m3'")


def split_nvfp4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 group scales s_g · s_t (as `block_scales` makes them, s_t a power of two) -> (s_g, E4M3
    values, same shape; s_t, float32 ()), exactly: s_t is the power of two that puts the largest
    product in (224, 448]."""
    top = scales.detach().float().amax()
    s_t = torch.exp2(torch.ceil(torch.log2(top / E4M3.max))) if top > 0 else torch.ones((), dtype=torch.float32)
    s_g = scales.float() / s_t
    if not torch.equal(round_to_grid(s_g, E4M3), s_g):
        raise ValueError("these scales are not NVFP4 scales with a power-of-two tensor scale (E4M3 values times 2^k); "
                         "re-quantize with this version of lmpress")
    return s_g, s_t


def quantize_block(x: torch.Tensor, fmt: BlockFormat, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(elements on `fmt.element`'s grid, float32 (..., in), scales (..., groups)): x ≈ elements · scale."""
    scales = block_scales(x, fmt) if scales is None else scales
    g = _groups(x.float(), fmt.group_size)
    q = round_to_grid(g / scales[..., None], fmt.element)
    return q.reshape(x.shape), scales


def dequantize_block(q: torch.Tensor, scales: torch.Tensor, fmt: BlockFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (_groups(q.float(), fmt.group_size) * scales[..., None]).reshape(q.shape).to(dtype)


def fake_quantize_block(x: torch.Tensor, fmt: BlockFormat, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x quantized to `fmt` and back, in x's dtype (dynamic: scales from x unless given)."""
    q, s = quantize_block(x, fmt, scales)
    return dequantize_block(q, s, fmt, x.dtype)


__all__ = ["BLOCK_FORMATS", "BlockFormat", "E2M1", "E2M3", "E3M2", "E4M3", "E5M2", "FORMATS", "FPFormat", "MXFP4", "MXFP6",
           "MXFP8", "NVFP4", "block_scales", "dequantize_block", "fake_quantize_block", "grid_index", "grid_values",
           "nvfp4_scales", "quantize_block", "round_to_grid", "split_nvfp4", "tensor_scale"]
