"""The read of a quantized value table, ``torch.ops.pkm.quantized_read``, and :func:`quantized_read`,
the one entry that routes it.

``quantized_read(store, fmt, dim, indices, weights, out_dtype)``: a stored table (``store``, the
``(num_slots, dim)`` half table or the ``(num_slots, row_bytes)`` packed uint8 rows of ``fmt``,
see :mod:`.reference`), ``indices (bags, m)``, ``weights (bags, m)`` float or ``None`` ->
``(bags, dim)`` in ``out_dtype``. The table gets no gradient; the weights do (dot products of the
output gradient with the dequantized rows, ``pkm::quantized_read_backward``).

Implementations: :mod:`.reference` (the specification), :mod:`.torch_impl` (fbgemm's kernels on
CPU). :func:`quantized_read` decides, in this order:

1. while ``torch.export`` traces, under a ``torch.func`` transform, and for float64 weights
   (gradcheck): :func:`.reference.read`,
   differentiable by autograd;
2. when the weights' gradient is wanted, or under ``torch.compile``: the custom op (its fake
   function lets compiled graphs hold the fbgemm kernels, which have none of their own);
3. otherwise (no gradient, eager): the implementation directly.

``use_backend("reference")`` runs :mod:`.reference` inside the op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import backend_for, functorch_active
from . import reference
from . import torch_impl
from .reference import FORMATS, HALF_DTYPES, dequantize_rows, quantize_rows, row_bytes

__all__ = ["quantized_read", "FORMATS", "HALF_DTYPES", "row_bytes", "quantize_rows", "dequantize_rows"]

# reads dequantized at a time in the weights' backward: the gathered rows are never all held at once
_BACKWARD_CHUNK_ELEMENTS = 1 << 23


def _implementation(device: torch.device):
    return reference if backend_for(device) == "reference" else torch_impl


@torch.library.custom_op("pkm::quantized_read", mutates_args=())
def _read_op(
    store: Tensor, indices: Tensor, weights: Optional[Tensor], fmt: str, dim: int, out_dtype: torch.dtype
) -> Tensor:
    return _implementation(store.device).read(store, fmt, dim, indices, weights, out_dtype)


@_read_op.register_fake
def _read_fake(store, indices, weights, fmt, dim, out_dtype):
    return store.new_empty(indices.shape[0], dim, dtype=out_dtype)


@torch.library.custom_op("pkm::quantized_read_backward", mutates_args=())
def _backward_op(grad_out: Tensor, store: Tensor, indices: Tensor, fmt: str, dim: int, w_dtype: torch.dtype) -> Tensor:
    dtype = torch.promote_types(w_dtype, torch.float32)
    g = grad_out.to(dtype)
    grad_w = torch.empty(indices.shape, dtype=dtype, device=indices.device)
    step = max(1, _BACKWARD_CHUNK_ELEMENTS // max(1, indices.shape[1] * dim))
    for s in range(0, indices.shape[0], step):
        rows = reference.rows(store, fmt, dim, indices[s : s + step], dtype)  # (b, m, dim)
        grad_w[s : s + step] = torch.bmm(rows, g[s : s + step].unsqueeze(-1)).squeeze(-1)
    return grad_w.to(w_dtype)


@_backward_op.register_fake
def _backward_fake(grad_out, store, indices, fmt, dim, w_dtype):
    return grad_out.new_empty(indices.shape, dtype=w_dtype)


def _setup(ctx, inputs, output) -> None:
    store, indices, weights, fmt, dim, _ = inputs
    ctx.save_for_backward(store, indices)
    ctx.fmt, ctx.dim = fmt, dim
    ctx.w_dtype = None if weights is None else weights.dtype


def _autograd(ctx, grad_out: Tensor):
    store, indices = ctx.saved_tensors
    grad_w = None
    if ctx.needs_input_grad[2]:
        grad_w = _backward_op(grad_out, store, indices, ctx.fmt, ctx.dim, ctx.w_dtype)
    return None, None, grad_w, None, None, None


_read_op.register_autograd(_autograd, setup_context=_setup)


def quantized_read(
    store: Tensor, fmt: str, dim: int, indices: Tensor, weights: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """``(bags, dim)`` weighted sums of the dequantized rows ``indices (bags, m)`` (module docstring)."""
    if torch.compiler.is_exporting() or functorch_active() or (
        weights is not None and weights.dtype == torch.float64
    ):
        return reference.read(store, fmt, dim, indices, weights, out_dtype)
    if torch.compiler.is_compiling() or (weights is not None and weights.requires_grad and torch.is_grad_enabled()):
        return _read_op(store, indices, weights, fmt, dim, out_dtype)
    return _implementation(store.device).read(store, fmt, dim, indices, weights, out_dtype)
