"""SqueezeLLM's dense-and-sparse weight quantization, as pure tensor functions.

SqueezeLLM (Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization", ICML 2024) splits a weight
W (out, in) into
- a sparse part S: the largest-magnitude outliers (`outliers`, a share of the entries) and the
  most sensitive entries (`sensitive`, by Fisher information) of what is left, kept exactly; the
  paper's 3-bit rows use 0.45% in all (0.40% outliers + 0.05% sensitive);
- a dense part: every output channel (row) gets its own non-uniform codebook of 2^bits values,
  found by k-means on the row's entries weighted by the Fisher information F (the squared
  gradient of the calibration loss, `lmpress.quant.mixed.empirical_fisher`), so the clusters sit
  where an error costs the loss most. Each entry stores the index of its centroid.

Here the sparse part stores the correction w - codebook[code] (fp16) at its positions, so the
reconstruction is codebook[code] + S there: within fp16 rounding of w, and the codes stay one
dense grid the LUT kernel reads. The k-means ignores the sparse positions (weight 0).

`gptq_assign` (lmpress's extension, stage option `gptq: true`) keeps the codebooks and the sparse
positions but chooses the codes with GPTQ's error compensation on the layer's input Hessian, instead
of each entry's nearest centroid.

Layout (written by `lmpress.kernels.lut_gemm.LUTLinear`): codes as unsigned `bits`-bit fields
in int32 words per row (`kernels.formats.pack_unsigned`), the codebook (out, 2^bits) fp16, the
sparse part as CSR (int32 row pointers, int16 columns (int32 past 32767 inputs), fp16 values).
"""
from __future__ import annotations

import torch

from .gptq import inverse_hessian_factor, layer_objective, single_thread

KMEANS_ITERS = 30


def sparse_mask(W: torch.Tensor, fisher: torch.Tensor | None, outliers: float, sensitive: float) -> torch.Tensor:
    """Bool (out, in): the `outliers` share of entries with the largest |w - row mean| and, among the
    rest, the `sensitive` share with the largest Fisher weight (none without `fisher`)."""
    n = W.numel()
    mask = torch.zeros_like(W, dtype=torch.bool)
    k_out = int(round(outliers * n))
    if k_out:
        dev = (W - W.mean(dim=1, keepdim=True)).abs().flatten()  # (out*in,)
        mask.view(-1)[dev.topk(k_out).indices] = True
    k_sens = int(round(sensitive * n))
    if k_sens and fisher is not None:
        score = fisher.flatten().masked_fill(mask.view(-1), -1.0)  # (out*in,), chosen outliers last
        mask.view(-1)[score.topk(k_sens).indices] = True
    return mask


def weighted_quantiles(W: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """(out, k): per row, the values at weighted cumulative shares (j + 0.5) / k (the k-means start)."""
    order = W.argsort(dim=1)  # (out, in)
    w_sorted = W.gather(1, order)
    cum = weight.gather(1, order).cumsum(dim=1)  # (out, in)
    total = cum[:, -1:].clamp_min(1e-30)  # (out, 1)
    targets = (torch.arange(k, dtype=W.dtype, device=W.device) + 0.5) / k * total  # (out, k)
    idx = torch.searchsorted(cum.contiguous(), targets.contiguous()).clamp_max(W.shape[1] - 1)  # (out, k)
    return w_sorted.gather(1, idx)


def assign(W: torch.Tensor, codebook: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Index of the nearest centroid of each entry's row: (out, in) int64 for W (out, in), codebook (out, k);
    `rows` at a time, so the (rows, in, k) distances stay small."""
    return torch.cat([(w[:, :, None] - c[:, None, :]).abs().argmin(dim=2)  # (rows, in, k) -> (rows, in)
                      for w, c in zip(W.split(rows), codebook.split(rows))])


def weighted_kmeans(W: torch.Tensor, weight: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 1-D weighted k-means (Lloyd): (codebook (out, k), codes (out, in) int64), minimizing
    sum weight * (w - codebook[code])^2 row by row. A cluster that empties keeps its centroid."""
    W = W.float()
    weight = weight.float().clamp_min(0)
    C = weighted_quantiles(W, weight + 1e-12, k)  # (out, k); the epsilon keeps all-zero rows defined
    codes = assign(W, C)
    for _ in range(iters):
        num = torch.zeros_like(C).scatter_add_(1, codes, weight * W)  # (out, k)
        den = torch.zeros_like(C).scatter_add_(1, codes, weight)
        C = torch.where(den > 0, num / den.clamp_min(1e-30), C)
        C, _ = C.sort(dim=1)
        new = assign(W, C)
        if torch.equal(new, codes):
            break
        codes = new
    return C, codes


def fit_codebook(W: torch.Tensor, fisher: torch.Tensor | None, bits: int, outliers: float = 0.004,
                 sensitive: float = 0.0005, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse mask (out, in) bool, codebook (out, 2^bits) fp16) of W (out, in): the outliers and
    sensitive entries (`sparse_mask`), and per row the Fisher-weighted k-means of the rest. `fisher`:
    same shape as W, the per-entry sensitivity (None: plain k-means)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"squeezellm: bits={bits}; codebooks of 2, 3 or 4 bits (4, 8 or 16 values a row)")
    Wf = W.detach().float()
    F = torch.ones_like(Wf) if fisher is None else fisher.detach().float().to(Wf.device)
    mask = sparse_mask(Wf, F if fisher is not None else None, outliers, sensitive)
    C, _ = weighted_kmeans(Wf, F.masked_fill(mask, 0.0), 1 << bits, iters)
    return mask, C.half()


def squeeze(W: torch.Tensor, fisher: torch.Tensor | None, bits: int, outliers: float = 0.004, sensitive: float = 0.0005,
            iters: int = KMEANS_ITERS) -> dict[str, torch.Tensor]:
    """Dense-and-sparse quantization of W (out, in): {"codes" (out, in) uint8, "codebook" (out, 2^bits)
    fp16, "sparse" (out, in) fp16 corrections (zero off the mask)}. `fisher`: same shape, the per-entry
    sensitivity (None: plain k-means). Each entry takes its row's nearest centroid. Reconstruction:
    `dequantize(codes, codebook, sparse)`."""
    mask, C16 = fit_codebook(W, fisher, bits, outliers, sensitive, iters)
    Wf = W.detach().float()
    codes = assign(Wf, C16.float())  # nearest of the stored (fp16) centroids
    dense = C16.float().gather(1, codes)  # (out, in)
    sparse = torch.where(mask, Wf - dense, torch.zeros_like(Wf)).half()
    return {"codes": codes.to(torch.uint8), "codebook": C16, "sparse": sparse}


@torch.no_grad()
def gptq_assign(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor, damp: float = 0.01,
                block_size: int = 128, act_order: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """GPTQ's error-compensated rounding onto fixed per-row codebooks (lmpress's extension of
    SqueezeLLM, which takes each entry's nearest centroid): column by column, each entry takes its
    row's centroid nearest to its *updated* value, and the column's error is spread over the columns
    not yet done through the inverse-Hessian factor, as `quant.gptq` does on a uniform grid. Entries of
    `mask` are kept (their fp16 correction goes to the sparse part), so their only error is fp16's.
    Rows are independent given H, so the rows of several weights that read one input can be stacked.

    W (out, in), H (in, in) the input Hessian, mask (out, in) bool, codebook (out, k) fp16 (as from
    `fit_codebook`). `act_order`: columns by decreasing H_jj (free here: no qparams follow the order).
    Returns ({"codes", "codebook", "sparse"} as `squeeze`, stats {loss: tr((W-Ŵ) H (W-Ŵ)ᵀ),
    nearest_loss: the same for `squeeze`'s nearest-centroid codes, damp: the dampening used})."""
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols) or mask.shape != W.shape or codebook.shape[0] != rows:
        raise ValueError(f"gptq_assign: W (out, in), H (in, in), mask like W, codebook (out, k); got {tuple(W.shape)}, "
                         f"{tuple(H.shape)}, {tuple(mask.shape)}, {tuple(codebook.shape)}")
    dev = H.device
    W0 = W.detach().to(dev, torch.float32)
    C = codebook.to(dev).float()  # (out, k)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols, device=dev)
    U, damp_used = inverse_hessian_factor(H[perm][:, perm], damp)  # (in, in) upper, processing order
    Wk = W0[:, perm].contiguous()  # (out, in), processing order, receives the updates
    Mk = mask.to(dev)[:, perm]
    codes = torch.empty(rows, cols, dtype=torch.int64, device=dev)  # processing order
    R = torch.empty(rows, cols, dtype=torch.float32, device=dev)  # the reconstruction, processing order
    with single_thread(dev):
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = Wk[:, i1:i2].clone()  # (out, b)
            E1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                w = W1[:, i]  # (out,)
                c = (w[:, None] - C).abs().argmin(dim=1)  # (out, k) -> (out,)
                v = C.gather(1, c[:, None])[:, 0]  # (out,)
                v = torch.where(Mk[:, j], v + (w - v).half().float(), v)  # kept entries: exact to fp16
                codes[:, j], R[:, j] = c, v
                e = (w - v) / U1[i, i]
                W1[:, i:].addmm_(e[:, None], U1[i:i + 1, i:], alpha=-1.0)
                E1[:, i] = e
            if i2 < cols:
                Wk[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    inv = torch.argsort(perm)
    codes, R = codes[:, inv], R[:, inv]  # natural order
    dense = C.gather(1, codes)  # (out, in)
    sparse = torch.where(mask.to(dev), R - dense, torch.zeros_like(R)).half()
    near = C.gather(1, assign(W0, C))  # (out, in): squeeze's dense part
    near = torch.where(mask.to(dev), near + (W0 - near).half().float(), near)
    stats = {"loss": layer_objective(W0, dequantize(codes, codebook, sparse), H),
             "nearest_loss": layer_objective(W0, near, H), "damp": damp_used}
    out_dev = W.device
    return {"codes": codes.to(out_dev, torch.uint8), "codebook": codebook, "sparse": sparse.to(out_dev)}, stats


def dequantize(codes: torch.Tensor, codebook: torch.Tensor, sparse: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (out, in): codebook[row, code] (+ the sparse corrections)."""
    W = codebook.float().gather(1, codes.long())  # (out, k) at (out, in) -> (out, in)
    return W if sparse is None else W + sparse.float()
