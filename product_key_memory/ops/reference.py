"""The ``reference`` backend: each op written as plainly as PyTorch allows, the specification.

Every other backend is tested against these. Nothing here is tuned: the search scores
the whole ``topk x topk`` grid of the paper's two-stage search, and the value read
gathers every row it reads.

The tie rule of every backend: on equal scores the lower index wins (a stable sort).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "stable_topk",
    "score_dtype",
    "subkey_scores",
    "product_topk",
    "search",
    "brute_force_search",
    "value_read",
    "value_read_backward",
    "value_read_backward_rows",
]

TopkFn = Callable[[Tensor, int], Tuple[Tensor, Tensor]]


def stable_topk(x: Tensor, k: int, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` largest of the last dim, best first; on equal values the lower ``index``
    (default: the position) comes first."""
    if index is None:
        values, pos = x.sort(dim=-1, descending=True, stable=True)
        return values[..., :k], pos[..., :k]
    index, order = index.sort(dim=-1, stable=True)
    values, pos = x.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return values[..., :k], index.gather(-1, pos[..., :k])


def score_dtype(*tensors: Tensor) -> torch.dtype:
    """Scores are never computed below float32; float64 stays float64 (gradcheck)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def subkey_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """``(..., heads, 2, dim_key)`` queries, ``(heads, 2, num_keys, dim_key)`` keys ->
    ``(..., heads, 2, num_keys)`` dot products, in float32 or float64, outside autocast."""
    dtype = score_dtype(queries, keys)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return torch.einsum("...hpd,hpkd->...hpk", queries.to(dtype), keys.to(dtype))


def product_topk(sub_scores: Tensor, topk: int, *, subkey_topk: Optional[TopkFn] = None) -> Tuple[Tensor, Tensor]:
    """The paper's two-stage search: the ``topk`` best sub-keys of each half, then the best
    ``topk`` of all ``topk ** 2`` sums. ``subkey_topk`` replaces the per-half selection
    (it must return values sorted best first)."""
    num_keys = sub_scores.shape[-1]
    select = stable_topk if subkey_topk is None else subkey_topk
    best, best_idx = select(sub_scores, topk)
    (s1, s2), (i1, i2) = best.unbind(-2), best_idx.unbind(-2)
    grid = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., heads, topk * topk)
    grid_slots = (i1.unsqueeze(-1) * num_keys + i2.unsqueeze(-2)).flatten(-2)
    return stable_topk(grid, topk, grid_slots)


def search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """``pkm::search``: ``(N, heads, 2, dim_key)`` queries -> ``scores, slots`` ``(N, heads, topk)``."""
    return product_topk(subkey_scores(queries, keys), topk)


def brute_force_search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Scores every one of the ``num_keys ** 2`` slots and keeps the best ``topk``.

    What the two-stage search must equal; memory grows with ``num_keys ** 2``, so it is
    for tests and small tables only.
    """
    s1, s2 = subkey_scores(queries, keys).unbind(-2)  # (..., heads, num_keys)
    return stable_topk((s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2), topk)


def value_read(values: Tensor, indices: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``pkm::value_read``: ``out[b] = sum_j weights[b, j] * values[indices[b, j]]``."""
    rows = F.embedding(indices.long(), values)  # (B, m, dim)
    if weights is None:
        return rows.sum(-2)
    return (rows * weights.to(values.dtype).unsqueeze(-1)).sum(-2)


def _value_grad(grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable) -> Tensor:
    contrib = grad_out.to(values.dtype).unsqueeze(-2).expand(*indices.shape, values.shape[1])  # (B, m, dim)
    if weights is not None:
        contrib = contrib * weights.to(values.dtype).unsqueeze(-1)
    if trainable is not None:
        contrib = contrib * trainable[indices].unsqueeze(-1)
    grad = torch.zeros_like(values)
    return grad.index_add_(0, indices.reshape(-1), contrib.reshape(-1, values.shape[1]))


def value_read_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_values_grad: bool, need_weights_grad: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Dense ``(grad_values, grad_weights)``, ``None`` for a gradient not asked for."""
    indices = indices.long()
    grad_weights = None
    if need_weights_grad and weights is not None:
        rows = F.embedding(indices, values).to(grad_out.dtype)  # (B, m, dim)
        grad_weights = (rows * grad_out.unsqueeze(-2)).sum(-1).to(weights.dtype)
    grad_values = _value_grad(grad_out, values, indices, weights, trainable) if need_values_grad else None
    return grad_values, grad_weights


def value_read_backward_rows(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_weights_grad: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(rows_idx, rows, grad_weights)``: the rows of the value gradient read with a
    non-zero weight and trainable, sorted and unique, and the weights' gradient."""
    grad_values, grad_weights = value_read_backward(
        grad_out, values, indices, weights, trainable, True, need_weights_grad
    )
    touched = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    live = torch.ones_like(indices, dtype=torch.bool) if weights is None else weights != 0
    touched[indices.long()[live]] = True
    if trainable is not None:
        touched &= trainable
    rows_idx = touched.nonzero().squeeze(-1)
    return rows_idx, grad_values.index_select(0, rows_idx), grad_weights
