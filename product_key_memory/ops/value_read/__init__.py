"""The value read, ``torch.ops.pkm.value_read`` (and its backward ops), and :func:`value_read`,
the one entry that routes it.

``value_read(values, indices, weights)``: ``values (num_slots, dim)``, ``indices (bags, m)``
long or int, ``weights (bags, m)`` float or ``None`` -> ``out[b] = sum_j weights[b, j] *
values[indices[b, j]]``, ``(bags, dim)`` in the dtype of ``values``.

Implementations: :mod:`.reference` (the specification), :mod:`.torch_impl`, :mod:`.triton_impl`.
:func:`value_read` decides, in this order:

1. while ``torch.export`` traces, and under a ``torch.func`` transform: :func:`.reference.value_read`
   (plain, differentiable ops; the table's gradient is dense there);
2. when a gradient is wanted, or under ``torch.compile``: the custom op, whose backward calls
   ``pkm::value_read_backward`` (a dense table gradient) or, with ``sparse`` in eager mode,
   ``pkm::value_read_backward_rows`` (the touched rows, returned as a sparse gradient: coalesced
   from the torch and reference backends; from the triton backend one entry per read, sorted, the
   repeats holding zero rows, so its size never depends on the data and nothing syncs);
3. otherwise (no gradient, eager): the implementation directly, without the dispatcher.

The implementation is the backend's (:func:`~product_key_memory.ops.backend.backend_for`),
asked at run time inside the ops; the ``triton`` backend hands float64 to ``torch``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..backend import backend_for, functorch_active
from . import reference
from . import torch_impl

__all__ = ["value_read"]


def _implementation(*tensors: Optional[Tensor]):
    name = backend_for(tensors[0].device)
    if name == "torch":
        return torch_impl
    if name == "reference":
        return reference
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch_impl
    from . import triton_impl  # imports Triton only when used

    return triton_impl


@torch.library.custom_op("pkm::value_read", mutates_args=())
def _value_read_op(
    values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor], sparse: bool
) -> Tensor:
    return _implementation(values, weights).value_read(values, indices, weights)


@_value_read_op.register_fake
def _value_read_fake(values, indices, weights, trainable, sparse):
    return values.new_empty(indices.shape[0], values.shape[1])


@torch.library.custom_op("pkm::value_read_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_values_grad: bool, need_weights_grad: bool,
) -> List[Tensor]:
    grads = _implementation(values, weights, grad_out).value_read_backward(
        grad_out, values, indices, weights, trainable, need_values_grad, need_weights_grad
    )
    return [g if g is not None else values.new_empty(0) for g in grads]


@_backward_op.register_fake
def _backward_fake(grad_out, values, indices, weights, trainable, need_values_grad, need_weights_grad):
    grad_values = torch.empty_like(values) if need_values_grad else values.new_empty(0)
    with_weights = need_weights_grad and weights is not None
    return [grad_values, torch.empty_like(weights) if with_weights else values.new_empty(0)]


@torch.library.custom_op("pkm::value_read_backward_rows", mutates_args=())
def _backward_rows_op(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_weights_grad: bool,
) -> List[Tensor]:
    rows_idx, rows, grad_weights = _implementation(values, weights, grad_out).value_read_backward_rows(
        grad_out, values, indices, weights, trainable, need_weights_grad
    )
    return [rows_idx, rows, grad_weights if grad_weights is not None else values.new_empty(0)]


@_backward_rows_op.register_fake
def _backward_rows_fake(grad_out, values, indices, weights, trainable, need_weights_grad):
    touched = torch.library.get_ctx().new_dynamic_size()
    with_weights = need_weights_grad and weights is not None
    return [
        indices.new_empty(touched, dtype=torch.long),
        values.new_empty(touched, values.shape[1]),
        torch.empty_like(weights) if with_weights else values.new_empty(0),
    ]


def _setup(ctx, inputs, output) -> None:
    values, indices, weights, trainable, sparse = inputs
    ctx.save_for_backward(values, indices, weights, trainable)
    ctx.sparse = sparse


def _autograd(ctx, grad_out: Tensor):
    values, indices, weights, trainable = ctx.saved_tensors
    need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_values = grad_weights = None
    if need_values and ctx.sparse and not torch.compiler.is_compiling():
        # compiled graphs take the dense gradient: a sparse tensor of data-dependent size does not trace
        rows_idx, rows, grad_weights = _backward_rows_op(grad_out, values, indices, weights, trainable, need_weights)
        # the triton backend gives one entry per read (a fixed size, no host sync): repeated rows, uncoalesced
        unique = getattr(_implementation(values, weights, grad_out), "ROWS_UNIQUE", True)
        grad_values = torch.sparse_coo_tensor(
            rows_idx.unsqueeze(0), rows, values.shape, is_coalesced=unique, check_invariants=False
        )
    elif need_values or need_weights:
        grad_values, grad_weights = _backward_op(
            grad_out, values, indices, weights, trainable, need_values, need_weights
        )
    return (
        grad_values if need_values else None,
        None,
        grad_weights if need_weights and weights is not None else None,
        None,
        None,
    )


_value_read_op.register_autograd(_autograd, setup_context=_setup)


def value_read(
    values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor] = None, sparse: bool = False
) -> Tensor:
    """``(bags, dim)`` weighted sums of rows of ``values`` (see the module docstring).

    The gradient of ``values`` touches only the rows read with a non-zero weight that are
    ``trainable`` (bool ``(num_slots,)``); with ``sparse`` (eager mode) it is a sparse tensor of
    just those rows: coalesced on the torch and reference backends; on the triton backend one entry
    per read, uncoalesced (a row's repeats hold zeros), so that no size depends on the data and
    nothing waits for the GPU (``SparseRowAdam`` merges the repeats without a sync; ``coalesce()``
    gives the compact form at the cost of one). The weights' gradient comes back in their own dtype.
    """
    if torch.compiler.is_exporting() or functorch_active():
        return reference.value_read(values, indices, weights, trainable)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (values.requires_grad or (weights is not None and weights.requires_grad))
    ):
        return _value_read_op(values, indices, weights, trainable, sparse)
    return _implementation(values, weights).value_read(values, indices, weights)
