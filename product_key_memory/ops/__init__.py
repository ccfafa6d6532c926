"""The custom ops of the memory layers (``torch.ops.pkm.*``) and the one place a backend is chosen.

Ops, each a ``torch.library.custom_op`` with a fake (meta) implementation and an
autograd formula, so ``torch.compile`` keeps them in one graph:

* ``pkm::search(queries, keys, topk) -> (scores, slots)``: the product-key search.
* ``pkm::value_read(values, indices, weights, trainable, sparse) -> out``: weighted sums
  of value rows; its backward calls ``pkm::value_read_backward`` (a dense table gradient)
  or, in eager mode with ``sparse``, ``pkm::value_read_backward_rows`` (the touched rows
  only, returned as a sparse gradient).

Backends, each a module of plain functions with the same names:

* ``reference`` (:mod:`.reference`): plain PyTorch, the specification;
* ``torch`` (:mod:`.cpu`): PyTorch ops arranged for speed, the default off CUDA;
* ``triton`` (:mod:`.triton`): fused kernels, the default for CUDA tensors when Triton imports.

:func:`backend_for` picks one per call from the device; :func:`use_backend` forces one
within a block. Every backend selects the same slots: on equal scores the lower index wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import cpu, reference
from .cpu import candidate_pairs, empty_hugepage, topk_lower_index

__all__ = [
    "BACKENDS",
    "use_backend",
    "backend_for",
    "triton_available",
    "search",
    "value_read",
    "candidate_pairs",
    "empty_hugepage",
    "topk_lower_index",
]

BACKENDS = ("reference", "torch", "triton")

# set only by use_backend, which restores it; a ContextVar is per thread and per task. It is read
# inside the ops' implementations, never in traced code, so it costs compiled graphs nothing.
_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("product_key_memory_backend", default=None)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (it ships with PyTorch's CUDA wheels)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Within this block, every op runs on backend ``name`` (``None``: chosen by device again).

    ``"reference"`` debugs a suspected fast-path problem; ``"triton"`` on CPU tensors runs
    the kernels under Triton's interpreter (set ``TRITON_INTERPRET=1`` before importing
    :mod:`product_key_memory`), so the kernels can be checked without a GPU.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("the triton backend needs Triton: pip install triton (it ships with CUDA builds of torch)")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def backend_for(device: torch.device) -> str:
    """The backend an op runs on for tensors on ``device``: the forced one, else ``triton``
    for CUDA when Triton imports, else ``torch``."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def _backend(device: torch.device):
    name = backend_for(device)
    if name == "torch":
        return cpu
    if name == "reference":
        return reference
    from .triton import backend as triton_backend  # imports Triton only when used

    return triton_backend


# -- pkm::search -----------------------------------------------------------------------------


@torch.library.custom_op("pkm::search", mutates_args=())
def _search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    if queries.shape[0] == 0:
        return _search_fake(queries, keys, topk)
    return _backend(queries.device).search(queries, keys, topk)  # contiguous, as the fake says


@_search.register_fake
def _search_fake(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    shape = (queries.shape[0], queries.shape[1], topk)
    dtype = reference.score_dtype(queries, keys)
    return queries.new_empty(shape, dtype=dtype), queries.new_empty(shape, dtype=torch.long)


def _search_setup(ctx, inputs, output) -> None:
    queries, keys, _ = inputs
    ctx.save_for_backward(queries, keys, output[1])
    ctx.mark_non_differentiable(output[1])


def _search_backward(ctx, grad_scores: Tensor, _grad_slots) -> Tuple[Optional[Tensor], Optional[Tensor], None]:
    # score = q1 . k1[slot // K] + q2 . k2[slot % K]: scatter the score gradients onto the
    # (N, heads, K) sub-scores of each half, then the two matrix products of their backward
    queries, keys, slots = ctx.saved_tensors
    num_keys = keys.shape[-2]
    dtype = grad_scores.dtype
    grad_q = grad_k = None
    halves = (slots.div(num_keys, rounding_mode="floor"), slots.remainder(num_keys))
    sub_grads = [
        grad_scores.new_zeros(*slots.shape[:2], num_keys).scatter_add_(-1, idx, grad_scores) for idx in halves
    ]  # (N, H, K) each
    if ctx.needs_input_grad[0]:
        grad_q = torch.stack(
            [torch.einsum("nhk,hkd->nhd", g, keys[:, p].to(dtype)) for p, g in enumerate(sub_grads)], dim=2
        ).to(queries.dtype)  # (N, H, 2, d)
    if ctx.needs_input_grad[1]:
        grad_k = torch.stack(
            [torch.einsum("nhk,nhd->hkd", g, queries[:, :, p].to(dtype)) for p, g in enumerate(sub_grads)], dim=1
        ).to(keys.dtype)  # (H, 2, K, d)
    return grad_q, grad_k, None


_search.register_autograd(_search_backward, setup_context=_search_setup)


def search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """``pkm::search``: queries ``(N, heads, 2, dim_key)`` and keys ``(heads, 2, num_keys, dim_key)``
    (any strides with a unit last stride) -> ``scores`` ``(N, heads, topk)`` in float32 (float64
    for float64 input), differentiable, and ``slots`` ``(N, heads, topk)`` long, best first.

    Calls needing no gradient skip the custom op's dispatch (the lean inference path; at a
    decoding step that dispatch cost more than the search itself); compiled code keeps the op.
    """
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad)
    ):
        return search_no_grad(queries, keys, topk)
    return _search(queries, keys, topk)


def search_no_grad(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """What ``pkm::search`` computes, called on the backend directly: no autograd, no dispatch."""
    if queries.shape[0] == 0:
        return _search_fake(queries, keys, topk)
    return _backend(queries.device).search(queries, keys, topk)


# -- pkm::value_read -------------------------------------------------------------------------


@torch.library.custom_op("pkm::value_read", mutates_args=())
def _value_read(
    values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor], sparse: bool
) -> Tensor:
    return _backend(values.device).value_read(values, indices, weights)


@_value_read.register_fake
def _value_read_fake(values, indices, weights, trainable, sparse):
    return values.new_empty(indices.shape[0], values.shape[1])


@torch.library.custom_op("pkm::value_read_backward", mutates_args=())
def _value_read_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_values_grad: bool, need_weights_grad: bool,
) -> List[Tensor]:
    grads = _backend(values.device).value_read_backward(
        grad_out, values, indices, weights, trainable, need_values_grad, need_weights_grad
    )
    return [g if g is not None else values.new_empty(0) for g in grads]


@_value_read_backward.register_fake
def _value_read_backward_fake(grad_out, values, indices, weights, trainable, need_values_grad, need_weights_grad):
    grad_values = torch.empty_like(values) if need_values_grad else values.new_empty(0)
    with_weights = need_weights_grad and weights is not None
    return [grad_values, torch.empty_like(weights) if with_weights else values.new_empty(0)]


@torch.library.custom_op("pkm::value_read_backward_rows", mutates_args=())
def _value_read_backward_rows(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_weights_grad: bool,
) -> List[Tensor]:
    rows_idx, rows, grad_weights = _backend(values.device).value_read_backward_rows(
        grad_out, values, indices, weights, trainable, need_weights_grad
    )
    return [rows_idx, rows, grad_weights if grad_weights is not None else values.new_empty(0)]


@_value_read_backward_rows.register_fake
def _value_read_backward_rows_fake(grad_out, values, indices, weights, trainable, need_weights_grad):
    touched = torch.library.get_ctx().new_dynamic_size()
    with_weights = need_weights_grad and weights is not None
    return [
        indices.new_empty(touched, dtype=torch.long),
        values.new_empty(touched, values.shape[1]),
        torch.empty_like(weights) if with_weights else values.new_empty(0),
    ]


def _value_read_setup(ctx, inputs, output) -> None:
    values, indices, weights, trainable, sparse = inputs
    ctx.save_for_backward(values, indices, weights, trainable)
    ctx.sparse = sparse


def _value_read_autograd(ctx, grad_out: Tensor):
    values, indices, weights, trainable = ctx.saved_tensors
    need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_values = grad_weights = None
    if need_values and ctx.sparse and not torch.compiler.is_compiling():
        # compiled graphs take the dense gradient: a sparse tensor of data-dependent size does not trace
        rows_idx, rows, grad_weights = _value_read_backward_rows(
            grad_out, values, indices, weights, trainable, need_weights
        )
        grad_values = torch.sparse_coo_tensor(
            rows_idx.unsqueeze(0), rows, values.shape, is_coalesced=True, check_invariants=False
        )
    elif need_values or need_weights:
        grad_values, grad_weights = _value_read_backward(
            grad_out, values, indices, weights, trainable, need_values, need_weights
        )
    return (
        grad_values if need_values else None,
        None,
        grad_weights if need_weights and weights is not None else None,
        None,
        None,
    )


_value_read.register_autograd(_value_read_autograd, setup_context=_value_read_setup)


def value_read(
    values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor] = None, sparse: bool = False
) -> Tensor:
    """``pkm::value_read``: ``values (num_slots, dim)``, ``indices (bags, m)`` long or int,
    ``weights (bags, m)`` float or ``None`` -> ``(bags, dim)`` in the dtype of ``values``.

    The gradient of ``values`` touches only the rows read with a non-zero weight that are
    ``trainable`` (bool ``(num_slots,)``); with ``sparse`` (eager mode) it is a coalesced
    sparse tensor of just those rows. The weights' gradient is in their own dtype.
    Calls needing no gradient skip autograd (the lean inference path).
    """
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (values.requires_grad or (weights is not None and weights.requires_grad))
    ):
        return _backend(values.device).value_read(values, indices, weights)
    return _value_read(values, indices, weights, trainable, sparse)
