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

Layout (written by `lmpress.kernels.lut_gemm.LUTLinear`): codes as unsigned `bits`-bit fields
in int32 words per row (`kernels.formats.pack_unsigned`), the codebook (out, 2^bits) fp16, the
sparse part as CSR (int32 row pointers, int16 columns (int32 past 32767 inputs), fp16 values).
"""
from __future__ import annotations

import torch

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


def squeeze(W: torch.Tensor, fisher: torch.Tensor | None, bits: int, outliers: float = 0.004, sensitive: float = 0.0005,
            iters: int = KMEANS_ITERS) -> dict[str, torch.Tensor]:
    """Dense-and-sparse quantization of W (out, in): {"codes" (out, in) uint8, "codebook" (out, 2^bits)
    fp16, "sparse" (out, in) fp16 corrections (zero off the mask)}. `fisher`: same shape, the per-entry
    sensitivity (None: plain k-means). Reconstruction: `dequantize(codes, codebook, sparse)`."""
    if bits not in (2, 3, 4):
        raise ValueError(f"squeezellm: bits={bits}; codebooks of 2, 3 or 4 bits (4, 8 or 16 values a row)")
    Wf = W.detach().float()
    F = torch.ones_like(Wf) if fisher is None else fisher.detach().float().to(Wf.device)
    mask = sparse_mask(Wf, F if fisher is not None else None, outliers, sensitive)
    C, codes = weighted_kmeans(Wf, F.masked_fill(mask, 0.0), 1 << bits, iters)
    C16 = C.half()
    codes = assign(Wf, C16.float())  # nearest of the stored (fp16) centroids
    dense = C16.float().gather(1, codes)  # (out, in)
    sparse = torch.where(mask, Wf - dense, torch.zeros_like(Wf)).half()
    return {"codes": codes.to(torch.uint8), "codebook": C16, "sparse": sparse}


def dequantize(codes: torch.Tensor, codebook: torch.Tensor, sparse: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (out, in): codebook[row, code] (+ the sparse corrections)."""
    W = codebook.float().gather(1, codes.long())  # (out, k) at (out, in) -> (out, in)
    return W if sparse is None else W + sparse.float()
