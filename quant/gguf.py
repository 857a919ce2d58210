"""GGUF block types as quantization grids: the exact numbers llama.cpp reads, and their bytes.

One owner for the bit layout of every block type lmpress writes. Each type is a grid: codes u
(unsigned, per element), a value table v(u), and per sub-block an effective scale S and offset M
made from the stored fields, so that

    w = S * v(u) - M        (float32, in this order: what ggml's dequantization computes)

| type   | block | sub | v(u)           | stored per block                                 | bytes |
|--------|------:|----:|----------------|--------------------------------------------------|------:|
| Q8_0   |    32 |  32 | u, u in -128..127 | d fp16                                        |    34 |
| Q4_0   |    32 |  32 | u - 8          | d fp16                                           |    18 |
| Q4_1   |    32 |  32 | u              | d fp16, m fp16 (M = -m)                          |    20 |
| Q5_0   |    32 |  32 | u - 16         | d fp16                                           |    22 |
| Q5_1   |    32 |  32 | u              | d fp16, m fp16 (M = -m)                          |    24 |
| IQ4_NL |    32 |  32 | kvalues[u]     | d fp16 (non-uniform table, 16 entries)           |    18 |
| Q2_K   |   256 |  16 | u (0..3)       | d, dmin fp16; 4-bit sc, mn (S = d sc, M = dmin mn) |  84 |
| Q3_K   |   256 |  16 | u - 4          | d fp16; signed 6-bit sc (S = d sc)               |   110 |
| Q4_K   |   256 |  32 | u (0..15)      | d, dmin fp16; 6-bit sc, mn                       |   144 |
| Q5_K   |   256 |  32 | u (0..31)      | d, dmin fp16; 6-bit sc, mn                       |   176 |
| Q6_K   |   256 |  16 | u - 32         | d fp16; int8 sc                                  |   210 |

Blocks run along a weight's input dimension (GGUF's ne0), as GPTQ groups do, so a linear (out, in)
is `out` rows of in/block blocks; `in` must be a multiple of the block (llama.cpp itself falls back
to a 32-block type for such tensors: `LLAMA_FALLBACK`).

Layouts: ggml-common.h (block_q4_K etc.) and ggml-quants.c's dequantize_row_* in llama.cpp; the
`gguf` package's `gguf.quants` dequantizes every type here and is the inverse the tests check
against (`pack` -> gguf.quants.dequantize equals `dequantize`, bit for bit). The IQ4_NL table is
`kvalues_iq4nl` of ggml-common.h.

Fitting (`fit`) chooses the stored fields of one block from weights and per-column importances
(the diagonal of the input Hessian: llama.cpp's importance matrix is the same quantity): a
weighted-error search over clipped ranges, a weighted least-squares refinement, then the K-types'
sub-scales quantized against their fp16 super-scales. `rtn` is fit + round; `gptq` is GPTQ
(quant/gptq.py's solver) on the grid: each block's fields are fitted when the solver reaches the
block, from the error-compensated weights, and every column is rounded on them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .gptq import inverse_hessian_factor, layer_objective, single_thread

QK_K = 256
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int  # elements per block
    sub: int  # elements per effective scale
    n_codes: int  # codes u are 0..n_codes-1 (Q8_0: stored as int8, v = u - 128)
    zero: int  # v(u) = u - zero for uniform types
    affine: bool  # has an offset M (mins)
    type_size: int  # bytes per block
    sub_bits: int | None = None  # K-types: bits of the stored sub-scales (and mins)
    signed_sub: bool = False  # Q3_K, Q6_K: signed sub-scales
    table: tuple[int, ...] | None = None  # non-uniform values (IQ4_NL)

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    def levels(self) -> torch.Tensor:
        """v(u) for u = 0..n_codes-1, float32."""
        if self.table is not None:
            return torch.tensor(self.table, dtype=torch.float32)
        return torch.arange(self.n_codes, dtype=torch.float32) - self.zero


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", 32, 32, 256, 128, False, 34),
    BlockType("Q4_0", 32, 32, 16, 8, False, 18),
    BlockType("Q4_1", 32, 32, 16, 0, True, 20),
    BlockType("Q5_0", 32, 32, 32, 16, False, 22),
    BlockType("Q5_1", 32, 32, 32, 0, True, 24),
    BlockType("IQ4_NL", 32, 32, 16, 0, False, 18, table=IQ4_NL_VALUES),
    BlockType("Q2_K", QK_K, 16, 4, 0, True, 84, sub_bits=4),
    BlockType("Q3_K", QK_K, 16, 8, 4, False, 110, sub_bits=6, signed_sub=True),
    BlockType("Q4_K", QK_K, 32, 16, 0, True, 144, sub_bits=6),
    BlockType("Q5_K", QK_K, 32, 32, 0, True, 176, sub_bits=6),
    BlockType("Q6_K", QK_K, 16, 64, 32, False, 210, sub_bits=8, signed_sub=True),
)}

# llama.cpp (llama-quant.cpp) quantizes a tensor whose row length is not a multiple of 256 with
# a 32-block type instead of a K-type: this table.
LLAMA_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def block_type(name: str) -> BlockType:
    t = TYPES.get(str(name).upper())
    if t is None:
        raise ValueError(f"GGUF type {name!r} is not one lmpress writes; use one of {list(TYPES)}")
    return t


def _check_cols(t: BlockType, cols: int) -> None:
    if cols % t.block:
        hint = f" ({LLAMA_FALLBACK[t.name]} is what llama.cpp uses for such tensors)" if t.name in LLAMA_FALLBACK else ""
        raise ValueError(f"GGUF {t.name}: rows of {cols} elements are not a multiple of its block of {t.block}; "
                         f"choose a type with a block that divides {cols}{hint}")


# ---------------------------------------------------------------------------------------- fields

@dataclass
class Fields:
    """The stored fields of (rows, n_blocks) blocks: d (and m or dmin) float16 (rows, nb); K-types'
    sub-scales sc (and mins mn) int16 (rows, nb, n_sub)."""

    d: torch.Tensor
    m: torch.Tensor | None = None  # Q4_1/Q5_1: the block minimum; K-types: dmin
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    def cat(self, other: "Fields") -> "Fields":
        """Blocks of `other` appended after these (along the block dimension)."""
        join = lambda a, b: None if a is None else torch.cat([a, b], 1)  # noqa: E731
        return Fields(join(self.d, other.d), join(self.m, other.m), join(self.sc, other.sc), join(self.mn, other.mn))


def effective(t: BlockType, f: Fields) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, M) float32 (rows, nb * n_sub): the per-sub-block scale and offset ggml computes."""
    d = f.d.float()
    if t.sub_bits is None:
        S = d
        M = -f.m.float() if t.affine else torch.zeros_like(d)
    else:
        S = (d.unsqueeze(2) * f.sc.float()).flatten(1)  # (rows, nb, n_sub) -> (rows, nb*n_sub)
        M = (f.m.float().unsqueeze(2) * f.mn.float()).flatten(1) if t.affine else torch.zeros_like(S)
    return S, M


def dequantize(t: BlockType, u: torch.Tensor, f: Fields) -> torch.Tensor:
    """codes u (rows, cols) and fields -> float32 (rows, cols), exactly as ggml dequantizes."""
    S, M = effective(t, f)
    rows, cols = u.shape
    v = t.levels()[u.long()].reshape(rows, -1, t.sub)  # (rows, n_subs, sub)
    return (S.unsqueeze(2) * v - M.unsqueeze(2)).reshape(rows, cols)


@functools.lru_cache(maxsize=None)
def _half_step_lut(t: BlockType) -> tuple[torch.Tensor, int]:
    """(lut, lo): lut[k] is the code nearest to any x with floor(2x) = k + lo (ties to the lower)."""
    lv = t.levels()
    lo, hi = int(2 * lv.min()) - 1, int(2 * lv.max()) + 1
    centers = (torch.arange(lo, hi + 1, dtype=torch.float32) + 0.5) / 2  # (k + 0.5) / 2
    return (centers[:, None] - lv[None, :]).abs().argmin(1).float(), lo


def round_to(t: BlockType, w: torch.Tensor, S: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Nearest codes of w (..., ) on the grid S * v - M (S, M broadcastable to w): uint8 / int16."""
    safe = torch.where(S == 0, torch.ones_like(S), S)
    x = (w + M) / safe
    if t.table is None:
        u = torch.clamp(torch.round(x) + t.zero, 0, t.n_codes - 1)
    else:  # nearest table entry: the table's midpoints are multiples of 1/2, so floor(2x) decides
        lut, lo = _half_step_lut(t)
        u = lut[(torch.floor(x * 2) - lo).clamp_(0, lut.numel() - 1).long()]
    zero_code = float(t.zero) if t.table is None else float(int(torch.argmin(t.levels().abs())))
    return torch.where(S == 0, torch.full_like(u, zero_code), u)


# ---------------------------------------------------------------------------------------- activations

# llama.cpp's CPU matmul does not dequantize a quantized weight: it quantizes the activations to
# the weight type's `vec_dot_type` and takes integer dot products (ggml-cpu's type traits): Q8_0
# (blocks of 32, fp16 scale amax/127; Q8_1 holds the same values) for the 32-block types, Q8_K
# (blocks of 256, fp32 scale) for the K-types. The simulation of a file includes it.
VEC_DOT = {"Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q4_1": "Q8_0", "Q5_0": "Q8_0", "Q5_1": "Q8_0", "IQ4_NL": "Q8_0",
           "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K"}


def vec_dot_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """x (..., k) as llama.cpp's CPU matmul sees it next to a `weight_type` weight: Q8_0 or Q8_K
    quantize-dequantize along k (ggml's quantize_row_q8_0 / quantize_row_q8_K: q = round(x * 127 /
    amax), scale amax / 127, fp16 for Q8_0). F16 weights see fp16 activations; F32 the input."""
    if weight_type == "F32":
        return x
    if weight_type == "F16":
        return x.to(torch.float16).to(x.dtype)
    block = 32 if VEC_DOT[weight_type] == "Q8_0" else QK_K
    shape = x.shape
    xb = x.float().reshape(-1, shape[-1] // block, block)  # (rows, blocks, block)
    amax = xb.abs().amax(2, keepdim=True)
    d = amax / 127
    if block == 32:
        d = d.to(torch.float16).float()
    q = torch.round(xb * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))).clamp_(-127, 127)
    return (q * d).reshape(shape).to(x.dtype)


# ---------------------------------------------------------------------------------------- fitting

_RATIOS = torch.linspace(1.0, 0.6, 15).tolist()
FIT_ROWS = 512  # rows fitted at a time: the candidates' temporaries stay in cache


def _values(t: BlockType, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The grid values nearest to x (R, n, sub) for sub-block scales/offsets s, m (R, n, 1)."""
    if t.table is not None:
        return s * t.levels()[round_to(t, x, s, m).long()] - m
    safe = torch.where(s == 0, torch.ones_like(s), s)
    v = torch.round((x + m) / safe).clamp_(-t.zero, t.n_codes - 1 - t.zero)
    return torch.where(s == 0, -m, s * v - m)


def _sub_fit(t: BlockType, x: torch.Tensor, imp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ideal (s, m) float32 (R, n) for sub-blocks x (R, n, sub) with importances imp (1, n, sub):
    the weighted-error best of clipped ranges, then one weighted least-squares refinement."""
    lv = t.levels()
    best_err = torch.full(x.shape[:2], float("inf"))
    best_s = torch.zeros(x.shape[:2])
    best_m = torch.zeros(x.shape[:2])
    if t.affine:
        lo = x.amin(2)
        if t.sub_bits is not None:  # K-types store mins >= 0: the range includes 0
            lo = lo.clamp(max=0.0)
        hi = x.amax(2)
        span = (hi - lo) / (t.n_codes - 1)
        cands = [(span * r, -lo * r) for r in _RATIOS]
        cands += [(span * r, -lo) for r in _RATIOS[1::2]]  # clip the top only
        cands += [(span * r, -(hi - span * r * (t.n_codes - 1))) for r in _RATIOS[1::2]]  # the bottom only
    else:
        idx = x.abs().argmax(2, keepdim=True)
        xm = torch.gather(x, 2, idx).squeeze(2)  # signed extreme (R, n)
        lo_v, hi_v = float(lv.min()), float(lv.max())
        zero = torch.zeros_like(xm)
        cands = [(xm * r / lo_v, zero) for r in _RATIOS] + [(xm * r / hi_v, zero) for r in _RATIOS[::2]]
    for s, m in cands:
        if t.sub_bits is not None and t.affine:
            m = m.clamp(min=0.0)
        err = (x - _values(t, x, s.unsqueeze(2), m.unsqueeze(2))).square_().mul_(imp).sum(2)
        better = err < best_err
        best_err, best_s, best_m = torch.where(better, err, best_err), torch.where(better, s, best_s), torch.where(better, m, best_m)
    # weighted least squares on the chosen codes: min sum imp (x - s v + m)^2
    u = round_to(t, x, best_s.unsqueeze(2), best_m.unsqueeze(2))
    v = lv[u.long()]
    if t.affine:
        sw, sv, sx = imp.sum(2).expand_as(best_s), (imp * v).sum(2), (imp * x).sum(2)
        svv, svx = (imp * v * v).sum(2), (imp * v * x).sum(2)
        det = sw * svv - sv * sv
        ok = det.abs() > 1e-12 * (sw * svv).clamp(min=1e-30)
        s_ls = torch.where(ok, (sw * svx - sv * sx) / torch.where(ok, det, torch.ones_like(det)), best_s)
        m_ls = torch.where(ok, (sv * svx - svv * sx) / torch.where(ok, det, torch.ones_like(det)), best_m)  # = -(offset)
        if t.sub_bits is not None:
            m_ls = m_ls.clamp(min=0.0)
    else:
        svv = (imp * v * v).sum(2)
        s_ls = torch.where(svv > 0, (imp * v * x).sum(2) / svv.clamp(min=1e-30), best_s)
        m_ls = best_m
    err2 = (x - _values(t, x, s_ls.unsqueeze(2), m_ls.unsqueeze(2))).square_().mul_(imp).sum(2)
    better = err2 < best_err
    return torch.where(better, s_ls, best_s), torch.where(better, m_ls, best_m)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504.0, 65504.0).to(torch.float16)


def _super(values: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block values (R, n_sub) -> (fp16 super-scale (R,), integer sub-scales (R, n_sub)),
    llama.cpp's way: the extreme maps to the end of the integer range."""
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        idx = values.abs().argmax(1, keepdim=True)
        ext = torch.gather(values, 1, idx).squeeze(1)  # signed extreme
        d = _fp16(ext / lo)
    else:
        lo, hi = 0, (1 << bits) - 1
        d = _fp16(values.amax(1).clamp(min=0.0) / hi)
    df = d.float().unsqueeze(1)
    q = torch.where(df != 0, torch.round(values / torch.where(df != 0, df, torch.ones_like(df))), torch.zeros_like(values))
    return d, q.clamp(lo, hi).to(torch.int16)


def fit(t: BlockType, W: torch.Tensor, imp: torch.Tensor | None = None) -> Fields:
    """Stored fields for W (rows, k * block) with per-column importances imp (cols,) (ones if None)."""
    rows, cols = W.shape
    _check_cols(t, cols)
    W = W.float()
    imp = torch.ones(cols) if imp is None else imp.float().clamp(min=0.0)
    imp = imp + 1e-6 * (imp.mean() + 1e-30)  # a dead column still weighs a little
    nb = cols // t.block
    x = W.reshape(rows, nb * t.n_sub, t.sub)  # (rows, n_subs, sub)
    wi = imp.reshape(1, nb * t.n_sub, t.sub)
    if t.name == "Q8_0":  # ggml's reference: d = amax / 127, nothing to search at 8 bits
        return Fields(_fp16(x.abs().amax(2) / 127))
    parts = [_sub_fit(t, x[r:r + FIT_ROWS], wi) for r in range(0, rows, FIT_ROWS)]
    s, m = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # (rows, n_subs)
    if t.sub_bits is None:
        return Fields(_fp16(s), _fp16(-m) if t.affine else None)
    s3 = s.reshape(rows * nb, t.n_sub)
    d, sc = _super(s3, t.sub_bits, t.signed_sub)
    f = Fields(d.reshape(rows, nb), sc=sc.reshape(rows, nb, t.n_sub))
    if t.affine:
        dmin, mn = _super(m.reshape(rows * nb, t.n_sub), t.sub_bits, False)
        f.m, f.mn = dmin.reshape(rows, nb), mn.reshape(rows, nb, t.n_sub)
    return f


def quantize(t: BlockType, W: torch.Tensor, f: Fields) -> torch.Tensor:
    """Codes (rows, cols) uint8 of W on the fields' grid."""
    S, M = effective(t, f)
    rows, cols = W.shape
    x = W.float().reshape(rows, -1, t.sub)  # (rows, n_subs, sub)
    return round_to(t, x, S.unsqueeze(2), M.unsqueeze(2)).reshape(rows, cols).to(torch.uint8)


def rtn(t: BlockType | str, W: torch.Tensor, imp: torch.Tensor | None = None) -> tuple[torch.Tensor, Fields]:
    """Round to nearest on fitted fields: (codes (rows, cols) uint8, fields)."""
    t = block_type(t) if isinstance(t, str) else t
    f = fit(t, W, imp)
    return quantize(t, W, f), f


# ---------------------------------------------------------------------------------------- GPTQ

def _columns(t: BlockType, W1, E1, U1, i0: int, i1: int, S, M, Q, q0: int) -> None:
    """GPTQ's inner loop over columns i0..i1 of the block W1 (rows, b): round column i on the grid
    S[:, i - i0] * v - M[:, i - i0], write its codes to Q[:, q0 + i], spread its error over the
    block's later columns (U1: the block of the inverse-Hessian factor); E1 gets the scaled errors."""
    lv = t.levels()
    for k, i in enumerate(range(i0, i1)):
        s, m, w = S[:, k], M[:, k], W1[:, i]
        u = round_to(t, w, s, m)
        Q[:, q0 + i] = u.to(torch.uint8)
        e = (w - (s * lv[u.long()] - m)) / U1[i, i]
        W1[:, i:].addmm_(e[:, None], U1[i:i + 1, i:], alpha=-1.0)
        E1[:, i] = e


@torch.no_grad()
def gptq(t: BlockType | str, W: torch.Tensor, H: torch.Tensor, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False) -> tuple[torch.Tensor, Fields, dict]:
    """GPTQ on the grid of `t`: (codes (rows, cols) uint8, fields, stats {loss, rtn_loss, damp}).

    `act_order=False`: natural column order; each block's fields are fitted (importances = diag H)
    from the weights as updated when the solver reaches the block's first column, so the grid
    follows the error compensation (the classic GPTQ's lazy groups, with the GGUF block as the
    group). `act_order=True`: the fields are fitted once from the original weights (static
    groups), then the columns are solved in decreasing order of H_jj."""
    t = block_type(t) if isinstance(t, str) else t
    rows, cols = W.shape
    _check_cols(t, cols)
    with single_thread(H.device):
        W0 = W.detach().float()
        imp = H.diagonal().float().clamp(min=0.0)
        Q = torch.empty(rows, cols, dtype=torch.uint8)
        if act_order:
            fields = fit(t, W0, imp)
            S, M = effective(t, fields)  # (rows, n_subs)
            perm = torch.argsort(imp, descending=True, stable=True)
            Sc = S.repeat_interleave(t.sub, 1)[:, perm].contiguous()  # (rows, cols), processing order
            Mc = M.repeat_interleave(t.sub, 1)[:, perm].contiguous()
            U, damp_used = inverse_hessian_factor(H[perm][:, perm], damp)
            Wk = W0[:, perm].contiguous()
            Qp = torch.empty_like(Q)
            for i1 in range(0, cols, block_size):
                i2 = min(i1 + block_size, cols)
                W1, U1 = Wk[:, i1:i2].clone(), U[i1:i2, i1:i2]
                E1 = torch.zeros_like(W1)
                _columns(t, W1, E1, U1, 0, i2 - i1, Sc[:, i1:i2], Mc[:, i1:i2], Qp, i1)
                if i2 < cols:
                    Wk[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
            Q[:, perm] = Qp
        else:
            U, damp_used = inverse_hessian_factor(H, damp)  # (cols, cols) upper, float32
            Wk = W0.clone()
            parts: list[Fields] = []
            step = max(1, block_size // t.block) * t.block
            for i1 in range(0, cols, step):
                i2 = min(i1 + step, cols)
                W1, U1 = Wk[:, i1:i2].clone(), U[i1:i2, i1:i2]  # (rows, b), (b, b)
                E1 = torch.zeros_like(W1)
                for b0 in range(0, i2 - i1, t.block):
                    f = fit(t, W1[:, b0:b0 + t.block], imp[i1 + b0:i1 + b0 + t.block])
                    parts.append(f)
                    S, M = effective(t, f)  # (rows, n_sub) -> per column (rows, block)
                    _columns(t, W1, E1, U1, b0, b0 + t.block, S.repeat_interleave(t.sub, 1),
                             M.repeat_interleave(t.sub, 1), Q, i1)
                if i2 < cols:
                    Wk[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
            fields = parts[0]
            for p in parts[1:]:
                fields = fields.cat(p)
        qr, fr = rtn(t, W0, imp)
        stats = {"loss": layer_objective(W0, dequantize(t, Q, fields), H),
                 "rtn_loss": layer_objective(W0, dequantize(t, qr, fr), H), "damp": damp_used}
    return Q, fields, stats


# ---------------------------------------------------------------------------------------- bytes

def _pack_bits(u: np.ndarray, bits: int, L: int) -> np.ndarray:
    """(N, n) small ints -> (N, n*bits/8) bytes: byte h*L + l holds u[h*T*L + t*L + l] at bit t*bits
    (T = 8 / bits): the interleave every ggml layout here is made of."""
    N, n = u.shape
    T = 8 // bits
    u = (u.astype(np.uint8) & ((1 << bits) - 1)).reshape(N, n // (T * L), T, L)  # (N, H, T, L)
    out = np.zeros((N, n // (T * L), L), np.uint8)
    for k in range(T):
        out |= u[:, :, k, :] << np.uint8(k * bits)
    return out.reshape(N, -1)


def _unpack_bits(b: np.ndarray, bits: int, L: int) -> np.ndarray:
    """The inverse of `_pack_bits`: (N, nbytes) -> (N, nbytes*8/bits)."""
    N, nbytes = b.shape
    T = 8 // bits
    shifts = (np.arange(T, dtype=np.uint8) * bits).reshape(1, 1, T, 1)
    return ((b.reshape(N, nbytes // L, 1, L) >> shifts) & np.uint8((1 << bits) - 1)).reshape(N, -1)


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).reshape(-1, 1).numpy().view(np.uint8)  # (N, 2)


def _q4k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (N, 8) -> the 12 bytes of Q4_K/Q5_K (ggml's get_scale_min_k4)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _q4k_unscales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], 1)
    mn = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], 1)
    return sc, mn


def pack(t: BlockType | str, u: torch.Tensor, f: Fields) -> np.ndarray:
    """Codes (rows, cols) and fields -> GGUF bytes (rows, cols / block * type_size) uint8."""
    t = block_type(t) if isinstance(t, str) else t
    rows, cols = u.shape
    _check_cols(t, cols)
    N = rows * cols // t.block
    q = u.reshape(N, t.block).numpy().astype(np.uint8)  # (N blocks, block)
    d = _f16_bytes(f.d)
    if t.name == "Q8_0":
        body = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif t.name in ("Q4_0", "IQ4_NL"):
        body = [d, _pack_bits(q, 4, 16)]
    elif t.name == "Q4_1":
        body = [d, _f16_bytes(f.m), _pack_bits(q, 4, 16)]
    elif t.name in ("Q5_0", "Q5_1"):
        mid = [_f16_bytes(f.m)] if t.affine else []
        body = [d, *mid, _pack_bits(q >> 4, 1, 1), _pack_bits(q & 15, 4, 16)]
    else:
        sc = f.sc.reshape(N, t.n_sub).numpy()
        if t.name == "Q2_K":
            mn = f.mn.reshape(N, t.n_sub).numpy()
            body = [(sc.astype(np.uint8) & 15) | (mn.astype(np.uint8) << 4), _pack_bits(q, 2, 32), d, _f16_bytes(f.m)]
        elif t.name == "Q3_K":
            s6 = (sc + 32).astype(np.uint8)
            scales = np.concatenate([_pack_bits(s6 & 15, 4, 8), _pack_bits(s6 >> 4, 2, 4)], 1)
            body = [_pack_bits(q >> 2, 1, 32), _pack_bits(q & 3, 2, 32), scales, d]
        elif t.name in ("Q4_K", "Q5_K"):
            scales = _q4k_scales(sc, f.mn.reshape(N, t.n_sub).numpy())
            qh = [_pack_bits(q >> 4, 1, 32)] if t.name == "Q5_K" else []
            body = [d, _f16_bytes(f.m), scales, *qh, _pack_bits(q & 15, 4, 32)]
        elif t.name == "Q6_K":
            body = [_pack_bits(q & 15, 4, 64), _pack_bits(q >> 4, 2, 32), sc.astype(np.int8).view(np.uint8), d]
        else:  # pragma: no cover - TYPES and this table are written together
            raise AssertionError(t.name)
    out = np.concatenate(body, 1)
    assert out.shape[1] == t.type_size, (t.name, out.shape)
    return out.reshape(rows, -1)


def unpack(t: BlockType | str, data: np.ndarray, cols: int) -> tuple[torch.Tensor, Fields]:
    """The exact inverse of `pack`: bytes (rows, nbytes) -> (codes (rows, cols) uint8, fields)."""
    t = block_type(t) if isinstance(t, str) else t
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.shape[0]
    nb = cols // t.block
    b = data.reshape(rows * nb, t.type_size)
    f16 = lambda a: torch.from_numpy(np.ascontiguousarray(a).view(np.float16).copy()).reshape(rows, nb)  # noqa: E731

    def cut(*sizes):
        out, o = [], 0
        for s in sizes:
            out.append(b[:, o:o + s])
            o += s
        return out

    m = sc = mn = None
    if t.name == "Q8_0":
        d, qs = cut(2, 32)
        q = qs.view(np.int8).astype(np.int16) + 128
    elif t.name in ("Q4_0", "IQ4_NL"):
        d, qs = cut(2, 16)
        q = _unpack_bits(qs, 4, 16)
    elif t.name == "Q4_1":
        d, m, qs = cut(2, 2, 16)
        q = _unpack_bits(qs, 4, 16)
    elif t.name == "Q5_0":
        d, qh, qs = cut(2, 4, 16)
        q = _unpack_bits(qs, 4, 16) | (_unpack_bits(qh, 1, 1) << 4)
    elif t.name == "Q5_1":
        d, m, qh, qs = cut(2, 2, 4, 16)
        q = _unpack_bits(qs, 4, 16) | (_unpack_bits(qh, 1, 1) << 4)
    elif t.name == "Q2_K":
        s, qs, d, m = cut(16, 64, 2, 2)
        sc, mn, q = s & 15, s >> 4, _unpack_bits(qs, 2, 32)
    elif t.name == "Q3_K":
        hm, qs, s, d = cut(32, 64, 12, 2)
        s6 = _unpack_bits(s[:, :8], 4, 8) | (_unpack_bits(s[:, 8:], 2, 4) << 4)
        sc = s6.astype(np.int16) - 32
        q = _unpack_bits(qs, 2, 32) | (_unpack_bits(hm, 1, 32) << 2)
    elif t.name in ("Q4_K", "Q5_K"):
        if t.name == "Q5_K":
            d, m, s, qh, qs = cut(2, 2, 12, 32, 128)
            q = _unpack_bits(qs, 4, 32) | (_unpack_bits(qh, 1, 32) << 4)
        else:
            d, m, s, qs = cut(2, 2, 12, 128)
            q = _unpack_bits(qs, 4, 32)
        sc, mn = _q4k_unscales(s)
    elif t.name == "Q6_K":
        ql, qh, s, d = cut(128, 64, 16, 2)
        q = _unpack_bits(ql, 4, 64) | (_unpack_bits(qh, 2, 32) << 4)
        sc = s.view(np.int8).astype(np.int16)
    else:  # pragma: no cover
        raise AssertionError(t.name)
    tens = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a).astype(np.int16)).reshape(rows, nb, t.n_sub)  # noqa: E731
    f = Fields(f16(d), None if m is None else f16(m), tens(sc), tens(mn))
    codes = torch.from_numpy(np.ascontiguousarray(q).astype(np.uint8)).reshape(rows, cols)
    return codes, f


def nbytes(t: BlockType | str, n_elements: int) -> int:
    t = block_type(t) if isinstance(t, str) else t
    return math.ceil(n_elements / t.block) * t.type_size
