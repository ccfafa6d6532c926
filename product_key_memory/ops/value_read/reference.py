"""The value read and its backward written as plainly as PyTorch allows: the specification.

``out[b] = sum_j weights[b, j] * values[indices[b, j]]``. Every other implementation is tested
against these; the value gradient touches only rows read with a non-zero weight that are
``trainable``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["value_read", "value_read_backward", "value_read_backward_rows"]


def value_read(
    values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor] = None
) -> Tensor:
    """``out[..., :] = sum_j weights[..., j] * values[indices[..., j]]``, differentiable by autograd.

    ``indices`` and ``weights`` are ``(..., m)``; rows outside ``trainable`` (bool ``(num_slots,)``)
    are read detached, so they get no gradient (the output and the weights' gradient are unchanged).
    """
    rows = F.embedding(indices.long(), values)  # (..., m, dim)
    if trainable is not None:
        rows = torch.where(trainable[indices.long()].unsqueeze(-1), rows, rows.detach())
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
