"""The quantization vocabulary: `QuantArgs`, `QuantScheme`, `KVCacheArgs` and the named presets.

Everything here is a small frozen dataclass validated in `__post_init__`, with messages that
say what was wrong and what is allowed. Presets carry the names used in the literature.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

GRANULARITIES = ("tensor", "channel", "group", "token", "head", "block")
WEIGHT_BITS = (2, 3, 4, 5, 6, 8)  # integer widths of weights and activations (codes in int8)
TYPES = ("int", "float")
KV_BITS = (2, 4, 8)


def _check_keys(kind: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{kind}: unknown key(s) {unknown}; allowed keys: {list(allowed)}")


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor is quantized to signed integers q in [-2^(b-1), 2^(b-1)-1].

    Dequantization is (q - zero_point) * scale; symmetric schemes have zero_point = 0.
    `group_size` applies along the last (input) dimension; a last group may be partial.
    `dynamic` means qparams are computed at run time from the tensor itself (activations).
    `clip_ratio` shrinks the observed range before qparams are computed; `mse_clip` searches
    the ratio per row/group that minimizes the quantization error (weights), or for static integer
    inputs the ratio of the calibrated scale with the least squared error over the calibration
    inputs (`quant.smooth.static_tensor_ratio`).
    `full_range` (symmetric only) spreads absmax over the whole signed range, scale = absmax /
    ((qmax - qmin) / 2) (int8: /127.5), as compressed-tensors' reference forward computes it, so a
    W8A8 artifact runs identically in stock transformers; the default is absmax / qmax (int8:
    /127, vLLM's kernels). The extreme value then rounds to qmax + 1 and is clamped: at most
    half a step of clipping, on one element per token.

    `outliers` (COMET's FMPQ, `lmpress.quant.fmpq`; dynamic symmetric integer inputs in groups):
    that share of the channel groups, after the channels are reordered by calibrated absmax
    (largest first), takes `outlier_bits` (8) instead of `bits`; each token's group has its own scale.

    `sink_tokens` (static inputs only; IntactKV's / PrefixQuant's pivot tokens): the first that many
    positions of every sequence keep float inputs, and static scales are calibrated without them.
    A causal LM's first token is its attention sink, whose hidden state carries "massive activations"
    (Sun et al. 2024, arXiv:2402.17762) that one static scale cannot hold beside the other tokens.
    Whether rows continue a sequence is told by `quant.primitives.continuing_sequence` (set per forward
    by `quant.sim.follow_sequence_position`). The positions are the input's first rows along its
    sequence axis: a left-padded batch would keep its pads in float instead (lmpress pads on the right).

    `granularity: block` (FP8 weights: DeepSeek-V3's and compressed-tensors' FP8_BLOCK) takes one
    scale per `group_size` x `group_size` tile of the weight (out and in), edge tiles partial.

    `type: float` puts the values on a minifloat grid instead (`lmpress.quant.fp`), symmetric,
    scale = absmax / the format's largest value: 8 bits is FP8 E4M3 (per tensor, channel or
    token, float32 scales; or groups of 32 with power-of-two E8M0 scales: MXFP8); 4 bits is E2M1
    in groups of 16 with E4M3 scales under a float32 per-tensor scale (`scale_format: e4m3`,
    NVFP4) or in groups of 32 with E8M0 scales (`scale_format: e8m0`, MXFP4). The codes are the
    format's bit patterns (sign and magnitude), held in int8 like the integer codes.
    """

    bits: int
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    clip_ratio: float = 1.0
    mse_clip: bool = False
    full_range: bool = False
    type: str = "int"
    scale_format: str | None = None
    outliers: float = 0.0
    outlier_bits: int = 8
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"QuantArgs.type={self.type!r} is not known; use one of {list(TYPES)}")
        if self.type == "float":
            self._check_float()
        elif self.scale_format is not None:
            raise ValueError(f"QuantArgs.scale_format={self.scale_format!r} belongs to type: float (NVFP4 e4m3, MX e8m0); drop it")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in WEIGHT_BITS:
            raise ValueError(f"QuantArgs.bits={self.bits!r} is not supported; use one of {list(WEIGHT_BITS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantArgs.granularity={self.granularity!r} is not known; use one of {list(GRANULARITIES)}"
            )
        if self.granularity in ("group", "block"):
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ValueError(
                    f"QuantArgs.group_size={self.group_size!r}: granularity '{self.granularity}' needs a positive integer "
                    "group_size (e.g. 64 or 128)"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"QuantArgs.group_size={self.group_size!r} is only meaningful with granularity 'group' (got {self.granularity!r}); drop it or set granularity: group"
            )
        if self.granularity == "block" and (self.type != "float" or self.bits != 8 or self.dynamic or self.mse_clip):
            raise ValueError("QuantArgs: granularity 'block' (group_size x group_size tiles) is for FP8 weights: type float, "
                             "bits 8, not dynamic, without mse_clip")
        if self.granularity == "token" and not self.dynamic:
            raise ValueError("QuantArgs: granularity 'token' is computed at run time; set dynamic: true")
        if not (0.0 < float(self.clip_ratio) <= 1.0):
            raise ValueError(f"QuantArgs.clip_ratio={self.clip_ratio!r} must lie in (0, 1]")
        if self.mse_clip and self.dynamic:
            raise ValueError("QuantArgs.mse_clip searches clipping offline; it cannot be combined with dynamic: true")
        if not isinstance(self.full_range, bool):
            raise ValueError(f"QuantArgs.full_range={self.full_range!r} must be true or false")
        if self.full_range and not self.symmetric:
            raise ValueError("QuantArgs.full_range sets the symmetric scale divisor; asymmetric schemes use the full range already")
        self._check_outliers()
        n = self.sink_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"QuantArgs.sink_tokens={n!r} must be a non-negative integer (1: the first token, the attention sink)")
        if n and self.dynamic:
            raise ValueError("QuantArgs.sink_tokens is for static inputs (dynamic: false): a dynamic scale already fits "
                             "each token; drop sink_tokens or set dynamic: false")

    def _check_outliers(self) -> None:
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers <= 1:
            raise ValueError(f"QuantArgs.outliers={self.outliers!r} must be a share of channel groups in [0, 1] (COMET: 0.1-0.25)")
        if not isinstance(self.outlier_bits, int) or isinstance(self.outlier_bits, bool) or self.outlier_bits not in WEIGHT_BITS \
                or (self.outliers and self.outlier_bits <= self.bits):
            raise ValueError(f"QuantArgs.outlier_bits={self.outlier_bits!r} must be one of {list(WEIGHT_BITS)} above bits={self.bits}")
        if self.outliers and not (self.type == "int" and self.symmetric and self.dynamic and self.granularity == "group"):
            raise ValueError("QuantArgs.outliers (COMET's 4/8-bit channel groups) is for activations: type int, symmetric, "
                             "dynamic: true, granularity group (e.g. group_size 64 or 128)")

    def _check_float(self) -> None:
        allowed = {8: "FP8 (E4M3; or MXFP8: group_size 32, scale_format e8m0)",
                   4: "FP4 (E2M1: NVFP4 = group_size 16 + scale_format e4m3, MXFP4 = group_size 32 + scale_format e8m0)"}
        if self.bits not in allowed:
            raise ValueError(f"QuantArgs: type float with bits={self.bits!r}; use bits 8 ({allowed[8]}) or 4 ({allowed[4]})")
        if not self.symmetric or self.full_range:
            raise ValueError("QuantArgs: type float is symmetric (scale = absmax / the format's largest value); "
                             "set symmetric: true and drop full_range")
        if self.scale_format not in (None, "e4m3", "e8m0"):
            raise ValueError(f"QuantArgs.scale_format={self.scale_format!r}: use e4m3 (NVFP4) or e8m0 (MX), or leave it out")
        block = {(4, 16, "e4m3"): "nvfp4", (4, 32, "e8m0"): "mxfp4", (8, 32, "e8m0"): "mxfp8"}
        fp8_groups = self.bits == 8 and self.scale_format is None  # FP8 with float32 scales per group / tile
        if (self.granularity == "group" and not fp8_groups) or self.scale_format is not None:
            key = (self.bits, self.group_size, self.scale_format)
            if self.granularity != "group" or key not in block:
                raise ValueError(
                    f"QuantArgs: type float, bits {self.bits}, granularity {self.granularity!r}, group_size "
                    f"{self.group_size!r}, scale_format {self.scale_format!r} is no format: the block formats are NVFP4 "
                    "(bits 4, group_size 16, scale_format e4m3), MXFP4 (bits 4, group_size 32, scale_format e8m0) and MXFP8 "
                    "(bits 8, group_size 32, scale_format e8m0)")
        elif self.bits == 4:
            raise ValueError("QuantArgs: FP4 needs block scales: NVFP4 (granularity group, group_size 16, scale_format e4m3) "
                             "or MXFP4 (group_size 32, scale_format e8m0)")

    @property
    def block_format(self) -> str | None:
        """"nvfp4", "mxfp4" or "mxfp8" for a block-scaled float format, else None."""
        if self.type != "float" or self.scale_format is None:
            return None
        return {("e4m3", 16): "nvfp4", ("e8m0", 32): "mxfp4" if self.bits == 4 else "mxfp8"}[(self.scale_format, self.group_size)]

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def sym_divisor(self) -> float:
        """absmax / scale of a symmetric scheme: qmax, or (qmax - qmin) / 2 with `full_range`."""
        return (self.qmax - self.qmin) / 2 if self.full_range else float(self.qmax)

    def to_dict(self) -> dict[str, Any]:
        # `full_range`, `type` and `scale_format` only when set, so manifests and recipes written
        # before they existed stay identical
        defaults = {"full_range": False, "type": "int", "scale_format": None, "outliers": 0.0, "outlier_bits": 8,
                    "sink_tokens": 0}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in defaults or getattr(self, f.name) != defaults[f.name]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "QuantArgs | None" = None) -> "QuantArgs":
        _check_keys("QuantArgs", data, tuple(f.name for f in fields(cls)))
        if base is not None:
            merged = {**base.to_dict(), **data}
            # switching away from 'group' drops an inherited group size
            if merged.get("granularity") != "group" and "group_size" not in data:
                merged["group_size"] = None
            return cls(**merged)
        if "bits" not in data:
            raise ValueError("QuantArgs needs 'bits' (one of %s)" % list(WEIGHT_BITS))
        return cls(**dict(data))


@dataclass(frozen=True)
class QuantScheme:
    """What happens to one linear: weight quantization, input (activation) quantization, sparsity."""

    weights: QuantArgs | None = None
    inputs: QuantArgs | None = None
    sparsity: str | None = None

    def __post_init__(self) -> None:
        if self.weights is None and self.inputs is None and self.sparsity is None:
            raise ValueError("QuantScheme: nothing to do; give weights, inputs or sparsity (or map the module to null)")
        if self.weights is not None and self.weights.dynamic:
            raise ValueError("QuantScheme.weights cannot be dynamic; weights are quantized offline")
        if self.weights is not None and self.weights.sink_tokens:
            raise ValueError("QuantScheme.weights.sink_tokens: sink tokens keep float *inputs*; put it under inputs")
        a = self.inputs
        if a is not None and not a.dynamic:
            # static: one calibrated per-tensor scale (`input_scale`), or NVFP4's calibrated tensor
            # scale over group scales still computed at run time
            if not ((a.granularity == "tensor" and a.symmetric and (not a.mse_clip or a.type == "int"))
                    or (a.block_format == "nvfp4" and not a.mse_clip)):
                raise ValueError("QuantScheme.inputs with dynamic: false takes one calibrated scale: granularity tensor, symmetric "
                                 "(FP8 / INT8 static), or NVFP4 (its tensor scale calibrated, group scales at run time); "
                                 f"got {a.granularity} {'sym' if a.symmetric else 'asym'}{' ' + a.block_format if a.block_format else ''}; "
                                 "set dynamic: true for per-token or per-group scales")
            if self.sparsity is not None or self.weights is None:
                raise ValueError("QuantScheme: static activation scales go with quantized dense weights (not N:M sparsity, "
                                 "not activation-only schemes); set inputs.dynamic: true")
        if self.sparsity is not None:
            n, _, m = str(self.sparsity).partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ValueError(f"QuantScheme.sparsity={self.sparsity!r}: use 'N:M' with 0 < N < M, e.g. '2:4'")

    @property
    def name(self) -> str:
        for key, preset in PRESETS.items():
            if preset == self:
                return key
        w = f"W{self.weights.bits}" if self.weights else "W16"
        a = f"A{self.inputs.bits}" if self.inputs else "A16"
        return w + a + (f"-{self.sparsity}" if self.sparsity else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.to_dict() if self.weights else None,
            "inputs": self.inputs.to_dict() if self.inputs else None,
            "sparsity": self.sparsity,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantScheme":
        _check_keys("QuantScheme", data, ("preset", "weights", "inputs", "sparsity"))
        base = preset(data["preset"]) if data.get("preset") is not None else None

        def part(key: str) -> QuantArgs | None:
            if key not in data:
                return getattr(base, key) if base else None
            value = data[key]
            if value is None:
                return None
            if not isinstance(value, Mapping):
                raise ValueError(f"QuantScheme.{key} must be a mapping of QuantArgs fields or null, got {value!r}")
            return QuantArgs.from_dict(value, getattr(base, key) if base else None)

        sparsity = data.get("sparsity", base.sparsity if base else None)
        return cls(weights=part("weights"), inputs=part("inputs"), sparsity=sparsity)


@dataclass(frozen=True)
class KVCacheArgs:
    """KV-cache quantization: keys per channel, values per token, `group_size` elements a group
    (along the sequence for keys, along head_dim for values), asymmetric min-max by default, the
    most recent `residual` tokens kept in full precision.

    KIVI semantics (`lmpress.quant.kv_cache`) apply unless the settings are the plain per-token
    form QuaRot evaluates (key_granularity token, residual 0, no sinks, no clipping options):
    `sink_tokens` first tokens are never quantized (attention sinks); `clip_ratio` shrinks each
    group's [min, max] about its midpoint; `clip_search` picks per group the ratio in
    `KV_CLIP_GRID` with the least squared error.

    `type: float` (bits 8) is an FP8 E4M3 cache with static scales, as vLLM's fp8 KV cache and
    compressed-tensors' `kv_cache_scheme`: one calibrated scale per layer for K and one for V
    (`scale: tensor`) or one per KV head (`scale: head`), absmax / 448 over the calibration set
    (stage `act_scales`); K and V are rounded to E4M3 with saturation. `group_size` is unused.

    GEAR (Kang et al. 2024, arXiv:2403.05527) on a KIVI cache with per-channel keys: each block of
    `group_size` tokens of a head keeps its `gear_outliers` share of largest-magnitude entries exactly
    (fp16, a sparse part), is quantized without them, and the rest of the quantization error gets a
    rank-`gear_rank` approximation (power iteration, factors in fp16). Values are then flushed in
    whole blocks like keys, so a block's correction is computed once (`lmpress.quant.kv_cache`).

    ZipCache (He et al. 2024, arXiv:2405.14256) with `salient` > 0: keys and values are flushed in
    blocks of `group_size` tokens; in each block the `salient` share of tokens with the highest
    normalized accumulated attention (the attention a token received divided by the number of
    queries that saw it) is coded at `salient_bits`, the rest at `bits`; with key_granularity token
    in the paper's channel-separable token-wise form, with channel in KIVI's layout
    (`lmpress.quant.zipcache`)."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    residual: int = 0
    key_granularity: str = "channel"
    sink_tokens: int = 0
    clip_ratio: float = 1.0
    clip_search: bool = False
    type: str = "int"
    scale: str | None = None
    gear_rank: int = 0
    gear_outliers: float = 0.0
    salient: float = 0.0
    salient_bits: int = 4

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"KVCacheArgs.type={self.type!r} is not known; use one of {list(TYPES)}")
        if not isinstance(self.gear_rank, int) or isinstance(self.gear_rank, bool) or self.gear_rank < 0:
            raise ValueError(f"KVCacheArgs.gear_rank={self.gear_rank!r} must be a non-negative integer (GEAR uses 2 to 4)")
        if isinstance(self.gear_outliers, bool) or not isinstance(self.gear_outliers, (int, float)) or not 0 <= self.gear_outliers < 0.5:
            raise ValueError(f"KVCacheArgs.gear_outliers={self.gear_outliers!r} must be a share in [0, 0.5) (GEAR uses 0.01-0.02)")
        if self.gear and (self.type != "int" or self.key_granularity != "channel"):
            raise ValueError("KVCacheArgs: GEAR (gear_rank, gear_outliers) corrects blocks of group_size tokens of a KIVI cache: "
                             "use type int with key_granularity channel")
        if isinstance(self.salient, bool) or not isinstance(self.salient, (int, float)) or not 0 <= self.salient <= 1:
            raise ValueError(f"KVCacheArgs.salient={self.salient!r} must be a share in [0, 1] (ZipCache: e.g. 0.25 of tokens at salient_bits)")
        if self.zipcache:
            if self.type != "int" or self.gear:
                raise ValueError("KVCacheArgs: ZipCache (salient > 0) mixes 2/4-bit tokens of an integer cache: use type int "
                                 "and no GEAR options")
            if self.salient_bits not in KV_BITS or self.salient_bits <= self.bits:
                raise ValueError(f"KVCacheArgs.salient_bits={self.salient_bits!r} must be one of {list(KV_BITS)} above bits={self.bits}")
        if self.type == "float":
            if self.bits != 8 or self.scale not in ("tensor", "head") or not self.per_token_only or not self.symmetric:
                raise ValueError("KVCacheArgs: an FP8 cache is bits 8, type float, symmetric: true, key_granularity token, "
                                 "residual 0, no sinks or clipping, with scale: tensor (one per layer) or head (one per KV head)")
        elif self.scale is not None:
            raise ValueError(f"KVCacheArgs.scale={self.scale!r} belongs to the FP8 cache (type: float); integer caches "
                             "take their scales per group at run time")
        if self.bits not in KV_BITS:
            raise ValueError(f"KVCacheArgs.bits={self.bits!r}: use one of {list(KV_BITS)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"KVCacheArgs.group_size={self.group_size!r} must be a positive integer")
        if not isinstance(self.residual, int) or self.residual < 0 or self.residual % self.group_size:
            raise ValueError(
                f"KVCacheArgs.residual={self.residual!r} must be a non-negative multiple of group_size={self.group_size}"
            )
        if self.key_granularity not in ("channel", "token"):
            raise ValueError(f"KVCacheArgs.key_granularity={self.key_granularity!r}: use 'channel' (KIVI) or 'token'")
        if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or self.sink_tokens < 0:
            raise ValueError(f"KVCacheArgs.sink_tokens={self.sink_tokens!r} must be a non-negative integer (e.g. 0 or 4)")
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) or not (0.5 <= float(self.clip_ratio) <= 1.0):
            raise ValueError(f"KVCacheArgs.clip_ratio={self.clip_ratio!r} must lie in [0.5, 1]")
        if not isinstance(self.clip_search, bool):
            raise ValueError(f"KVCacheArgs.clip_search={self.clip_search!r} must be true or false")
        if self.clip_search and float(self.clip_ratio) != 1.0:
            raise ValueError("KVCacheArgs: clip_search chooses the ratio per group; leave clip_ratio at 1.0")
        if self.symmetric and not self.per_token_only:
            raise ValueError(
                "KVCacheArgs.symmetric: true is only supported for the plain per-token form "
                "(key_granularity: token, residual: 0, sink_tokens: 0, no clipping); KIVI uses asymmetric min-max"
            )

    @property
    def per_token_only(self) -> bool:
        """True for the plain per-token form (QuaRot): every token quantized as it arrives."""
        return (self.key_granularity == "token" and self.residual == 0 and self.sink_tokens == 0
                and float(self.clip_ratio) == 1.0 and not self.clip_search and not self.zipcache)

    @property
    def is_float(self) -> bool:
        return self.type == "float"

    @property
    def gear(self) -> bool:
        """GEAR's corrections are on: values are flushed in blocks of group_size tokens, like keys."""
        return self.gear_rank > 0 or self.gear_outliers > 0

    @property
    def zipcache(self) -> bool:
        """ZipCache's salient tokens are on: keys and values are flushed in blocks of group_size tokens."""
        return self.salient > 0

    @property
    def blockwise(self) -> bool:
        """Keys and values are flushed together in whole blocks of group_size tokens (GEAR, ZipCache)."""
        return self.gear or self.zipcache

    def to_dict(self) -> dict[str, Any]:
        # `type`, `scale` and GEAR's options only when set, so manifests and recipes written before them stay identical
        d = asdict(self)
        for key, default in (("type", "int"), ("scale", None), ("gear_rank", 0), ("gear_outliers", 0.0),
                             ("salient", 0.0), ("salient_bits", 4)):
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KVCacheArgs":
        if isinstance(data, str):
            return kv_preset(data)
        _check_keys("kv_cache", data, ("preset",) + tuple(f.name for f in fields(cls)))
        data = dict(data)
        base = kv_preset(data.pop("preset")) if "preset" in data else cls()
        return replace(base, **data)


KV_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


# ---- presets ---------------------------------------------------------------------------
def _w(bits: int, group: int | None = None, symmetric: bool = True) -> QuantArgs:
    return QuantArgs(bits=bits, granularity="group" if group else "channel", group_size=group, symmetric=symmetric)


def _a(bits: int, full_range: bool = False) -> QuantArgs:
    return QuantArgs(bits=bits, granularity="token", dynamic=True, symmetric=True, full_range=full_range)


def _fw(bits: int, group: int | None = None, scale_format: str | None = None, per_tensor: bool = False) -> QuantArgs:
    return QuantArgs(bits=bits, type="float", granularity="group" if group else "tensor" if per_tensor else "channel",
                     group_size=group, scale_format=scale_format)


def _fa(bits: int, group: int | None = None, scale_format: str | None = None) -> QuantArgs:
    return QuantArgs(bits=bits, type="float", granularity="group" if group else "token", group_size=group,
                     scale_format=scale_format, dynamic=True)


PRESETS: dict[str, QuantScheme] = {
    # W8A8 takes compressed-tensors' activation rule (absmax/127.5): its artifacts are exported in
    # that format and must run identically in stock transformers
    "W8A8": QuantScheme(weights=_w(8), inputs=_a(8, full_range=True)),
    "W8A16": QuantScheme(weights=_w(8)),
    "W4A16": QuantScheme(weights=_w(4, 128)),
    "W4A8": QuantScheme(weights=_w(4), inputs=_a(8)),
    "W4A4": QuantScheme(weights=_w(4), inputs=_a(4)),
    "W3A16": QuantScheme(weights=_w(3, 128)),
    "W2A16": QuantScheme(weights=_w(2, 64)),
    # the floating-point formats, named as compressed-tensors' presets (FP8_DYNAMIC: FP8 E4M3
    # per-channel weights, per-token dynamic activations; FP8: per-tensor weights and a calibrated
    # static per-tensor activation scale; NVFP4 / MXFP4: FP4 E2M1 block formats, NVFP4's activation
    # tensor scale calibrated (static) under group scales computed at run time)
    "FP8_DYNAMIC": QuantScheme(weights=_fw(8), inputs=_fa(8)),
    "NVFP4A16": QuantScheme(weights=_fw(4, 16, "e4m3")),
    "FP8": QuantScheme(weights=_fw(8, per_tensor=True), inputs=QuantArgs(bits=8, type="float", granularity="tensor")),
    # FP8 weights in 128 x 128 tiles, FP8 activations per token in groups of 128 (DeepSeek-V3's recipe)
    "FP8_BLOCK": QuantScheme(weights=QuantArgs(bits=8, type="float", granularity="block", group_size=128),
                             inputs=QuantArgs(bits=8, type="float", granularity="group", group_size=128, dynamic=True)),
    "NVFP4": QuantScheme(weights=_fw(4, 16, "e4m3"), inputs=QuantArgs(bits=4, type="float", granularity="group", group_size=16,
                                                                      scale_format="e4m3")),
    # INT4 x FP8 (compressed-tensors' W4AFP8; FireQ's linears): int4 symmetric weights in groups of
    # 128, FP8 E4M3 per-token dynamic activations
    "W4AFP8": QuantScheme(weights=_w(4, 128), inputs=_fa(8)),
    "MXFP4A16": QuantScheme(weights=_fw(4, 32, "e8m0")),
    "MXFP8A16": QuantScheme(weights=_fw(8, 32, "e8m0")),
    "MXFP8": QuantScheme(weights=_fw(8, 32, "e8m0"), inputs=_fa(8, 32, "e8m0")),
    "MXFP4": QuantScheme(weights=_fw(4, 32, "e8m0"), inputs=_fa(4, 32, "e8m0")),
    # arbitrary integer bit pairs (ABQ-LLM's W2A8, W3A8, W6A6; W5A5): symmetric per-channel weights and
    # dynamic symmetric per-token activations, so the integer GEMM runs them on codes in int8 containers;
    # activations on compressed-tensors' rule (absmax / ((qmax - qmin) / 2)), as W8A8, so they export
    "W6A6": QuantScheme(weights=_w(6), inputs=_a(6, full_range=True)),
    "W5A5": QuantScheme(weights=_w(5), inputs=_a(5, full_range=True)),
    "W3A8": QuantScheme(weights=_w(3), inputs=_a(8, full_range=True)),
    "W2A8": QuantScheme(weights=_w(2), inputs=_a(8, full_range=True)),
}

KV_PRESETS: dict[str, KVCacheArgs] = {
    "KV8": KVCacheArgs(bits=8, group_size=64),
    "KV4": KVCacheArgs(bits=4, group_size=64),
    "KV2": KVCacheArgs(bits=2, group_size=64, residual=128),
    # FP8 E4M3 with a calibrated scale per layer for K and for V (vLLM's fp8 KV cache)
    "FP8_KV": KVCacheArgs(bits=8, type="float", scale="tensor", symmetric=True, key_granularity="token"),
}

W8A8, W8A16, W4A16, W4A8, W4A4, W3A16, W2A16 = (PRESETS[k] for k in ("W8A8", "W8A16", "W4A16", "W4A8", "W4A4", "W3A16", "W2A16"))
KV8, KV4, KV2 = KV_PRESETS["KV8"], KV_PRESETS["KV4"], KV_PRESETS["KV2"]


def preset(name: str) -> QuantScheme:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown scheme preset {name!r}; known presets: {sorted(PRESETS)}") from None


def kv_preset(name: str) -> KVCacheArgs:
    try:
        return KV_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown KV-cache preset {name!r}; known presets: {sorted(KV_PRESETS)}") from None


def parse_scheme(spec: Any) -> QuantScheme | None:
    """A scheme-map value: null, a preset name, or a mapping (optionally with `preset:` plus overrides)."""
    if spec is None:
        return None
    if isinstance(spec, QuantScheme):
        return spec
    if isinstance(spec, str):
        return preset(spec)
    if isinstance(spec, Mapping):
        return QuantScheme.from_dict(spec)
    raise ValueError(f"scheme {spec!r}: use null, a preset name {sorted(PRESETS)}, or a mapping")
