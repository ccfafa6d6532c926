"""Fast paths of the functional core, each checked against a reference in ``functional``.

PyTorch ops only (no compiler at install time; on Linux one ``madvise`` hint through
ctypes, a no-op elsewhere). What each one saves, measured with
``benchmarks/bench_pkm.py``:

* :func:`search_fast`: sub-key scores by one batched GEMM per query half straight
  from the stored ``(heads, num_keys, 2, dim_key)`` keys (no re-layout copy, which
  dominates a decoding step), top-k of each half, and only the
  ``(a + 1) * (b + 1) <= topk`` candidate pairs instead of the ``topk ** 2`` grid.
* :class:`ValueRead`: forward is one ``embedding_bag``. The backward sorts the reads
  by slot once: the weight gradient then walks the table front to back (each row
  fetched once), and the value gradient is built from the touched rows only,
  optionally as a sparse tensor of just those rows, so a training step does not
  zero or scan the whole table. Its buffer is hinted to huge pages (Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["half_scores", "search_fast", "ValueRead", "value_read_fast", "empty_hugepage"]


def half_scores(queries: Tensor, keys: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Sub-key scores of each query half, ``(heads, N, num_keys)`` each.

    ``queries`` is ``(N, heads, 2, dim_key)`` and ``keys`` ``(heads, 2, num_keys, dim_key)``,
    both in any strides with a unit last stride (the module's keys are a transposed
    view of its ``(heads, num_keys, 2, dim_key)`` parameter): each half is a strided
    matrix BLAS reads in place, so nothing is copied.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q, k = queries.to(dtype), keys.to(dtype)
        return tuple(torch.bmm(q[:, :, p].transpose(0, 1), k[:, p].transpose(1, 2)) for p in (0, 1))


def search_fast(queries: Tensor, keys: Tensor, topk: int, pairs: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(N, heads, 2, dim_key)`` queries -> ``scores, slots`` ``(N, heads, topk)``, best first.

    Same selection as ``product_topk(subkey_scores(...))``: the same sub-score
    values (:func:`half_scores` is also what ``subkey_scores`` stacks), the same
    candidate sums, the same ``topk`` calls.
    """
    num_keys = keys.shape[-2]
    s1, s2 = half_scores(queries, keys, dtype)  # (H, N, num_keys) each
    v1, i1 = s1.topk(topk, dim=-1)  # (H, N, topk), descending
    v2, i2 = s2.topk(topk, dim=-1)
    a, b = pairs[0], pairs[1]
    cand = v1.index_select(-1, a) + v2.index_select(-1, b)  # (H, N, P)
    cand_slots = i1.index_select(-1, a) * num_keys + i2.index_select(-1, b)
    scores, pos = cand.topk(topk, dim=-1)
    slots = cand_slots.gather(-1, pos)
    return scores.transpose(0, 1), slots.transpose(0, 1)  # (N, H, topk)


# -- large fresh buffers ----------------------------------------------------------------------

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty_hugepage(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` that asks Linux to back a large CPU buffer with transparent huge pages.

    A value gradient or an optimizer state is tens of MiB to GiB of freshly mapped
    memory; faulting it in 2 MiB pages instead of 4 KiB ones is several times
    faster and makes later random row accesses miss the TLB far less (what
    ``THP_MEM_ALLOC_ENABLE=1`` does for every torch allocation, here only for these
    buffers). A hint only: elsewhere, or if the kernel declines, this is ``torch.empty``.
    """
    t = torch.empty(*shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if t.device.type == "cpu" and nbytes >= 4 * _HUGE_PAGE else None
    if madvise is not None:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        madvise(start, end - start, _MADV_HUGEPAGE)  # failure leaves ordinary pages: nothing to handle
    return t


# -- value read -----------------------------------------------------------------------------


def _sorted_reads(indices: Tensor) -> Tuple[Tensor, Tensor]:
    """Flat reads sorted by slot: ``(slots, order)`` with ``slots = indices.flatten()[order]``."""
    return indices.reshape(-1).sort()


def _weight_grad(grad_out: Tensor, values: Tensor, m: int, slots: Tensor, order: Tensor) -> Tensor:
    """``d out / d weights``: each read's dot product of its bag's output gradient with its row.

    Computed in slot order, so the table is walked front to back and a row read by
    several bags is fetched once from memory: about 3x faster than in read order on
    a table larger than the cache (the same numbers, each dot product is unchanged).
    """
    offsets = torch.zeros(1, dtype=slots.dtype, device=slots.device)  # only checked, not used, by the kernel
    bag_of_read = order.div(m, rounding_mode="floor")
    g = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_out.contiguous(), values, slots, offsets, bag_of_read, 0, -1
    )
    return torch.empty_like(g).index_copy_(0, order, g)


def _sparse_value_grad(
    grad_out: Tensor,
    m: int,
    slots: Tensor,
    order: Tensor,
    weights: Optional[Tensor],
    trainable: Optional[Tensor],
    shape: torch.Size,
) -> Tensor:
    """``d out / d values`` as a coalesced sparse tensor of the rows read with a non-zero weight (and trainable).

    Each touched row is the weighted sum of the output gradients of the bags that
    read it: an ``embedding_bag`` over the small ``(bags, dim)`` output gradient,
    with one bag per touched row (the reads are already sorted by slot).
    """
    w = None if weights is None else weights.reshape(-1).index_select(0, order)
    keep = None if trainable is None else trainable.index_select(0, slots)
    if w is not None:
        keep = (w != 0) if keep is None else keep & (w != 0)  # padded tokens and ReLU-gated zeros add nothing
    if keep is not None:
        slots, order = slots[keep], order[keep]
        w = None if w is None else w[keep]
    rows_idx, counts = torch.unique_consecutive(slots, return_counts=True)
    bag_of_read = order.div(m, rounding_mode="floor")
    g = grad_out.contiguous()
    psw = torch.ones_like(order, dtype=g.dtype) if w is None else w.to(g.dtype)
    rows = _rows_from_bags(g, counts, bag_of_read, psw)
    return torch.sparse_coo_tensor(rows_idx.unsqueeze(0), rows, shape, is_coalesced=True, check_invariants=False)


def _rows_from_bags(g: Tensor, counts: Tensor, bag_of_read: Tensor, psw: Tensor) -> Tensor:
    """Row ``u`` = sum of ``psw[j] * g[bag_of_read[j]]`` over the ``counts[u]`` reads ``j`` of row ``u``.

    One ``embedding_bag`` over the output gradient with a bag per touched row. (An MKL
    CSR ``addmm`` was tried here: no faster when interleaved with this, and linked to
    an occasional SIGABRT at interpreter exit under torchrun.)
    """
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(bag_of_read, g, offsets, mode="sum", per_sample_weights=psw)


def _dense_value_grad(sparse_grad: Tensor) -> Tensor:
    """The dense table gradient: zeros (in huge pages) with the touched rows copied in."""
    rows_idx, rows = sparse_grad._indices()[0], sparse_grad._values()
    dense = empty_hugepage(*sparse_grad.shape, dtype=rows.dtype, device=rows.device).zero_()
    return dense.index_copy_(0, rows_idx, rows)


class ValueRead(torch.autograd.Function):
    """``out[b] = sum_j weights[b, j] * values[indices[b, j]]`` with a row-sparse backward.

    Inputs: ``values (num_slots, dim)``, ``indices (bags, m)`` long, ``weights (bags, m)``
    in the dtype of ``values`` or ``None``, ``trainable`` bool ``(num_slots,)`` or ``None``,
    ``sparse``: return the value gradient as a coalesced sparse tensor.
    Reference: ``functional.value_read_reference``.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor], sparse: bool):
        out = F.embedding_bag(indices, values, mode="sum", per_sample_weights=weights)
        ctx.save_for_backward(values, indices, weights, trainable)
        ctx.sparse = sparse
        ctx.shape = values.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        values, indices, weights, trainable = ctx.saved_tensors
        grad_values = grad_weights = None
        m = indices.shape[-1]
        slots, order = _sorted_reads(indices)
        if ctx.needs_input_grad[2]:
            grad_weights = _weight_grad(grad_out.to(values.dtype), values, m, slots, order).view_as(weights)
        if ctx.needs_input_grad[0]:
            grad_values = _sparse_value_grad(grad_out, m, slots, order, weights, trainable, ctx.shape)
            if not ctx.sparse:
                grad_values = _dense_value_grad(grad_values)
        return grad_values, None, grad_weights, None, None


def value_read_fast(
    values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor], sparse: bool
) -> Tensor:
    """``indices, weights (bags, m)`` -> ``(bags, dim)``; plain ``embedding_bag`` when no gradient is needed."""
    needs_grad = torch.is_grad_enabled() and (values.requires_grad or (weights is not None and weights.requires_grad))
    if not needs_grad:
        return F.embedding_bag(indices, values, mode="sum", per_sample_weights=weights)
    return ValueRead.apply(values, indices, weights, trainable, sparse)
