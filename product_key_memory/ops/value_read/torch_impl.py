"""The value read in fast PyTorch ops (the ``torch`` backend; any device, tuned on the CPU).

* :func:`value_read`: one ``embedding_bag`` without its Python wrapper, bag offsets cached.
* :func:`value_read_backward`: the reads sorted by slot once, so the weight gradient walks the
  table front to back (each row fetched once) and the value gradient is built from the touched
  rows only (:func:`value_read_backward_sorted`; :func:`value_read_backward_rows` returns those
  rows alone, for a sparse gradient), or each read added straight into the zeroed gradient
  (:func:`value_read_backward_bag`); :func:`.routes.choose_read_backward` picks by size.

Checked against :mod:`.reference` in the tests.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._buffers import outside_inference_mode, zeros_hugepage
from .routes import choose_read_backward

__all__ = [
    "value_read",
    "value_read_flat",
    "value_read_backward",
    "value_read_backward_rows",
    "value_read_backward_bag",
    "value_read_backward_sorted",
]


def _weight_grad(grad_out: Tensor, values: Tensor, m: int, slots: Tensor, order: Tensor) -> Tensor:
    """``d out / d weights``, ``(bags * m,)`` in read order: each read's dot product of its bag's
    output gradient ``grad_out (bags, dim)`` with its row.

    ``slots`` are the flat reads sorted (``order`` their read positions), so the table is walked
    front to back and a row read by several bags is fetched once from memory (faster than in read
    order on a table larger than the cache: measured in benchmarks/README.md); each dot product is
    the same.
    """
    offsets = torch.zeros(1, dtype=slots.dtype, device=slots.device)  # only checked, not used, by the kernel
    bag_of_read = order.div(m, rounding_mode="floor")
    g = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_out.contiguous(), values, slots, offsets, bag_of_read, 0, -1
    )
    return torch.empty_like(g).index_copy_(0, order, g)


def _sorted_weight_grad(grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """:func:`_weight_grad` for ``indices`` in any order, shaped and typed as ``weights``."""
    slots, order = indices.long().reshape(-1).sort()
    return _weight_grad(grad_out, values, indices.shape[-1], slots, order).view_as(weights).to(weights.dtype)


def _touched_reads(
    slots: Tensor, order: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The reads sorted by slot (``slots = indices.flatten()[order]``), less those that add
    nothing to a value gradient: weight 0 (padding, ReLU-gated zeros) or a row outside
    ``trainable``. Returns ``(slots, order, w)``, ``w`` their weights."""
    w = None if weights is None else weights.reshape(-1).index_select(0, order)
    keep = None if trainable is None else trainable.index_select(0, slots)
    if w is not None:
        keep = (w != 0) if keep is None else keep & (w != 0)
    if keep is not None:
        slots, order = slots[keep], order[keep]
        w = None if w is None else w[keep]
    return slots, order, w


def _rows_from_bags(g: Tensor, counts: Tensor, bag_of_read: Tensor, psw: Tensor) -> Tensor:
    """Row ``u`` = sum of ``psw[j] * g[bag_of_read[j]]`` over the ``counts[u]`` reads ``j`` of row ``u``.

    ``g (bags, dim)``, ``counts (U,)``, ``bag_of_read`` and ``psw`` ``(sum(counts),)`` ->
    ``(U, dim)``: one ``embedding_bag`` over the output gradient with a bag per touched row.
    """
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(bag_of_read, g, offsets, mode="sum", per_sample_weights=psw)


def value_read(values: Tensor, indices: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``values (num_slots, dim)``, ``indices (bags, m)``, ``weights (bags, m)`` or ``None`` ->
    ``out (bags, dim)``, ``out[b] = sum_j weights[b, j] * values[indices[b, j]]``, in ``values.dtype``.

    One ``embedding_bag`` without ``F.embedding_bag``'s Python wrapper (what it does for 2-D
    ``indices``), the bag offsets of CPU reads cached; the weights are cast to the table's dtype.
    """
    bags = indices.shape[0]
    return value_read_flat(values, indices.reshape(-1), None if weights is None else weights.reshape(-1), bags)


def value_read_flat(values: Tensor, indices: Tensor, weights: Optional[Tensor], bags: int) -> Tensor:
    """:func:`value_read` of ``indices`` and ``weights`` ``(bags * m,)``, bag after bag."""
    if weights is not None and weights.dtype != values.dtype:
        weights = weights.to(values.dtype)
    m = indices.shape[0] // bags if bags else 0
    if m == 0:  # empty bags sum to zero
        return values.new_zeros(bags, values.shape[1])
    # never traced: the entry hands compiled code the custom op, whose implementation runs eagerly
    if indices.device.type == "cpu" and bags <= _MAX_CACHED_BAGS:
        offsets = _bag_offsets(bags, m, indices.dtype)
    else:
        offsets = torch.arange(0, bags * m, m, dtype=indices.dtype, device=indices.device)
    return torch.embedding_bag(values, indices, offsets, False, 0, False, weights, False, None)[0]


_MAX_CACHED_BAGS = 1 << 16


@functools.lru_cache(maxsize=64)
def _bag_offsets(bags: int, m: int, dtype: torch.dtype) -> Tensor:
    # read, never written, by embedding_bag (and not by its backward, which this library replaces)
    with outside_inference_mode():
        return torch.arange(0, bags * m, m, dtype=dtype)


def value_read_backward_rows(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_weights_grad: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(rows_idx, rows, grad_weights)``: the value gradient as its touched rows alone
    (sorted, unique; a row read by several bags sums their output gradients), and the
    weights' gradient (``None`` unless asked for)."""
    m = indices.shape[-1]
    slots, order = indices.long().reshape(-1).sort()
    grad_weights = None
    if need_weights_grad and weights is not None:
        grad_weights = _weight_grad(grad_out.to(values.dtype), values, m, slots, order)
        grad_weights = grad_weights.view_as(weights).to(weights.dtype)
    slots, order, w = _touched_reads(slots, order, weights, trainable)
    rows_idx, counts = torch.unique_consecutive(slots, return_counts=True)
    g = grad_out.to(values.dtype).contiguous()
    psw = torch.ones_like(order, dtype=g.dtype) if w is None else w.to(g.dtype)
    rows = _rows_from_bags(g, counts, order.div(m, rounding_mode="floor"), psw)
    return rows_idx, rows, grad_weights


def value_read_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_values_grad: bool, need_weights_grad: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(grad_values, grad_weights)``, dense; ``None`` for a gradient not asked for.

    The route is chosen by size (:func:`.routes.choose_read_backward`):
    :func:`value_read_backward_sorted`, or :func:`value_read_backward_bag` (each read added straight
    into the zeroed gradient) for a small table on one thread and for wide rows read 1-8 times each.
    """
    if need_values_grad and indices.numel() > 0 and choose_read_backward(
        indices.numel(), values.shape[0], values.shape[1], values.dtype, torch.get_num_threads()
    ) == "embedding_bag":
        return value_read_backward_bag(grad_out, values, indices, weights, trainable, need_weights_grad)
    return value_read_backward_sorted(
        grad_out, values, indices, weights, trainable, need_values_grad, need_weights_grad
    )


def value_read_backward_sorted(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_values_grad: bool, need_weights_grad: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The slot-sorted route of :func:`value_read_backward`, whatever the sizes."""
    if not need_values_grad:
        if not need_weights_grad or weights is None:
            return None, None
        return None, _sorted_weight_grad(grad_out.to(values.dtype), values, indices, weights)
    rows_idx, rows, grad_weights = value_read_backward_rows(
        grad_out, values, indices, weights, trainable, need_weights_grad
    )
    dense = zeros_hugepage(*values.shape, dtype=values.dtype, device=values.device)
    return dense.index_copy_(0, rows_idx, rows), grad_weights


def value_read_backward_bag(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_weights_grad: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The dense ``(grad_values, grad_weights)``: the table gradient by the kernel autograd of
    ``F.embedding_bag`` runs (product-key-memory 0.3.0's route), which adds each read straight into
    the zeroed table gradient; the same sums as the sorted route, added in another order; rows
    outside ``trainable`` are zeroed afterwards. The weights' gradient is the sorted route's (the
    same dot products, walked in slot order: faster than the read-order kernel on a large table)."""
    bags, m = indices.shape
    flat = indices.long().reshape(-1)
    g = grad_out.to(values.dtype).contiguous()
    bag_of_read = torch.arange(bags, device=flat.device).repeat_interleave(m)
    psw = None if weights is None else weights.reshape(-1).to(values.dtype)
    bag_size = torch.full((bags,), m, dtype=torch.long, device=flat.device)
    grad_values = torch.ops.aten._embedding_bag_dense_backward(
        g, flat, bag_of_read, bag_size, flat.new_empty(0), values.shape[0], False, 0, psw, -1
    )
    if trainable is not None:
        grad_values = grad_values.masked_fill_(~trainable.unsqueeze(-1), 0.0)
    grad_weights = None
    if need_weights_grad and weights is not None:
        grad_weights = _sorted_weight_grad(g, values, indices, weights)
    return grad_values, grad_weights
