"""Batch-invariant arithmetic for the reference MoE model (`moe.py`).

On CPU a BLAS matmul's result for one row depends on how many rows are in the
batch (MKL picks other kernels and blockings: with torch 2.13 on AVX512, row 0
of ``X[:n] @ W`` differs in the last bits from ``X[:1] @ W`` for almost every
n). After a rebalance an expert's replica receives a different batch, so a
BLAS-based model would change its outputs whenever the placement changes. So
every product here is computed as an element-wise multiply followed by a sum
over the contraction axis in a fixed pairwise tree (`tree_sum`) made of
element-wise adds. IEEE multiply, add, divide and sqrt are correctly rounded
whatever the vector width, so each row's result depends on that row alone:
not on the batch size, on the row's position, on which replica computed it or
on the rank. The softmax's exponentials are computed with Python's `math.exp`
on float64 (vectorised and scalar `exp` kernels may differ in the last bit,
and which elements take which path depends on the batch size). Activations
are ReLU, not SiLU, for the same reason (ReGLU: ``relu(x Wg) * (x Wu) Wd``).
The model's combine (`moe._moe_stack`) sums the top-k expert outputs in the
order of the routing, one element-wise step per k, for the same reason. The
cost is memory ([rows, in, out] products, computed in chunks of rows) and
speed, which is fine for the small default sizes this model is for.

`expert_rows` also holds the fast path (``exact=False``): plain matmuls
grouped by expert, for the model sizes a GPU benchmark needs.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RMS_EPS", "ROW_CHUNK", "expert_rows", "rms_norm", "row_matmul", "softmax_rows",
           "tree_sum"]

ROW_CHUNK = 512  # rows per product chunk: bounds the [rows, in, out] temporary
RMS_EPS = 1e-6


def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over `dim` in a fixed pairwise order built from element-wise adds only."""
    while x.shape[dim] > 1:
        size = x.shape[dim]
        half = size // 2
        head = x.narrow(dim, 0, half) + x.narrow(dim, half, half)
        if size % 2:
            head = torch.cat([head, x.narrow(dim, 2 * half, 1)], dim)
        x = head
    return x.squeeze(dim)


def row_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [n, a] @ w`` per row, where w is [a, b] (shared) or [n, a, b] (per row)."""
    return tree_sum(x.unsqueeze(-1) * w, dim=-2)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    mean_square = tree_sum(x * x, dim=-1) / x.shape[-1]
    return x / torch.sqrt(mean_square + RMS_EPS).unsqueeze(-1)


def expert_rows(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, index: torch.Tensor,
    compute_dtype: torch.dtype, exact: bool = True,
) -> torch.Tensor:
    """ReGLU expert MLP for each row of `x` with the weights ``gate_up[index[row]]``."""
    out = x.new_empty(x.shape)
    inter = down.shape[1]
    if not exact:  # one matmul pair per expert present: fast, batch-dependent rounding
        order = torch.sort(index, stable=True).indices
        experts, counts = torch.unique_consecutive(index[order], return_counts=True)
        start = 0
        for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
            picked = order[start:start + count]
            start += count
            gu = x[picked] @ gate_up[expert].to(compute_dtype)
            act = torch.relu(gu[:, :inter]) * gu[:, inter:]
            out[picked] = act @ down[expert].to(compute_dtype)
        return out
    for start in range(0, x.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        idx = index[rows]
        gu = row_matmul(x[rows], gate_up.index_select(0, idx).to(compute_dtype))
        act = torch.relu(gu[:, :inter]) * gu[:, inter:]
        out[rows] = row_matmul(act, down.index_select(0, idx).to(compute_dtype))
    return out


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of [n, k], in float64 with `math.exp` (exactly per element)."""
    z = logits.double()
    z = z - z.max(dim=-1, keepdim=True).values
    flat = z.flatten().tolist()
    e = torch.tensor([math.exp(v) for v in flat], dtype=torch.float64).view(z.shape)
    e = e.to(logits.device)
    total = e[:, 0]
    for j in range(1, e.shape[1]):
        total = total + e[:, j]
    return (e / total.unsqueeze(-1)).to(logits.dtype)
