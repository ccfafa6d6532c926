"""The ``triton`` backend of :mod:`product_key_memory.ops`: the kernels under the names and
signatures every backend has. float64 (gradcheck) takes the ``torch`` backend."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import cpu
from . import search as _search
from . import value_read as _read

__all__ = ["search", "value_read", "value_read_backward", "value_read_backward_rows"]


def _float64(*tensors: Optional[Tensor]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    if _float64(queries, keys):
        return cpu.search(queries, keys, topk)
    return _search.product_key_search(queries, keys, topk)


def value_read(values: Tensor, indices: Tensor, weights: Optional[Tensor]) -> Tensor:
    if _float64(values, weights):
        return cpu.value_read(values, indices, weights)
    return _read.value_read(values, indices, weights)


def value_read_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_values_grad: bool, need_weights_grad: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if _float64(values, weights, grad_out):
        return cpu.value_read_backward(grad_out, values, indices, weights, trainable, need_values_grad, need_weights_grad)
    return _read.value_read_backward(
        grad_out, values, indices, weights, trainable,
        need_values_grad=need_values_grad, need_weights_grad=need_weights_grad, sparse=False,
    )


def value_read_backward_rows(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_weights_grad: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    if _float64(values, weights, grad_out):
        return cpu.value_read_backward_rows(grad_out, values, indices, weights, trainable, need_weights_grad)
    (rows_idx, rows), grad_weights = _read.value_read_backward(
        grad_out, values, indices, weights, trainable,
        need_values_grad=True, need_weights_grad=need_weights_grad, sparse=True,
    )
    return rows_idx, rows, grad_weights
