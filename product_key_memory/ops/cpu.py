"""The ``torch`` backend: PyTorch ops arranged for speed on the CPU (and any device).

Checked against ``ops.reference`` in the tests. What each piece saves, measured with
``benchmarks/bench_pkm.py``:

* :func:`search` (and :func:`search_heads_first`, the same from a layer's own layouts): sub-key
  scores by one batched GEMM per query half straight from the stored
  ``(heads, num_keys, 2, dim_key)`` keys (no re-layout copy, which dominates a decoding step;
  for one token, one GEMM per head over both halves), one top-k for both halves, and only the
  ``(a + 1) * (b + 1) <= topk`` candidate pairs instead of the ``topk ** 2`` grid, gathered
  (2-3x faster than indexing from 16 rows up).
* :func:`value_read_backward`: sorts the reads by slot once: the weight gradient then
  walks the table front to back (each row fetched once), and the value gradient is
  built from the touched rows only (or returned as those rows alone, for a sparse
  gradient), so a training step does not scan the whole table. Its buffer is hinted
  to huge pages (Linux).

Ties: :func:`topk_lower_index` selects like a stable sort (on equal scores the lower
index wins), the rule of every backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._routes import choose_read_backward

__all__ = [
    "topk_lower_index",
    "candidate_pairs",
    "half_scores",
    "search",
    "search_heads_first",
    "value_read",
    "value_read_backward",
    "value_read_backward_rows",
    "value_read_backward_bag",
    "value_read_backward_sorted",
    "empty_hugepage",
    "zeros_hugepage",
]

_LOW32 = (1 << 32) - 1


def _order_code(x: Tensor) -> Tensor:
    """int64 codes of float32 ``x`` that order like the values (``-0.0`` equals ``+0.0``)."""
    bits = ((x if x.dtype == torch.float32 else x.float()) + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # negative floats: flip the magnitude bits


def _from_order_code(code: Tensor) -> Tensor:
    bits = code.int()
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)  # the map is its own inverse


def topk_lower_index(x: Tensor, k: int, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``x.topk(k)`` along the last dim, best first, where equal values go to the lower index.

    ``index`` (the shape of ``x``, values in ``[0, 2 ** 32)``) is what is returned and
    compared on ties instead of the position. A float32 code of each value and its index
    share one int64 key, so a single ``topk`` selects both and the values come back
    exactly from the key; float64 input (gradcheck) takes a stable sort instead.

    On CPU in eager mode, float32 rows whose ``k + 1`` best values are strictly decreasing have
    one answer whatever the tie rule, so a plain ``topk`` gives it (1.6x faster on 256 scores,
    5x fewer ops); only the rows with a tie (or a NaN) near the top take the keyed top-k.
    """
    return _topk_tie_ruled(x, k, index)


def _topk_tie_ruled(x: Tensor, k: int, index: Optional[Tensor], wide: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`topk_lower_index`; ``wide`` as :func:`_topk_distinct_first` (on the plain route only)."""
    if (
        x.dtype == torch.float32 and x.device.type == "cpu" and k < x.shape[-1] and x.numel() > 0
        and not torch.compiler.is_compiling()
    ):
        return _topk_distinct_first(x, k, index, wide)
    return _topk_keyed(x, k, index)


def _topk_distinct_first(x: Tensor, k: int, index: Optional[Tensor], wide: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`topk_lower_index` by a plain ``topk`` where no row has a tie near the top. With
    ``wide``, the answer may hold one more column (the ``k + 1``-th best), for a caller that
    reads only the first ``k``: two slices fewer."""
    v, pos = x.topk(k + 1, dim=-1)
    # strictly decreasing in every row: each step down is < 0, so the largest is (a tie gives 0,
    # a NaN gives NaN, and neither is < 0): one reduction and one read back for all rows
    if float(v.diff(dim=-1).max()) < 0.0:
        if not wide:
            v, pos = v[..., :k], pos[..., :k]
        return v, (pos if index is None else index.gather(-1, pos))
    values, pos = v[..., :k], pos[..., :k]
    picked = pos if index is None else index.gather(-1, pos)
    distinct = (values > v[..., 1:]).all(-1)
    n = x.shape[-1]
    rows = (~distinct).reshape(-1).nonzero().squeeze(1)
    row_index = None if index is None else index.reshape(-1, n).index_select(0, rows)
    tied_values, tied_picked = _topk_keyed(x.reshape(-1, n).index_select(0, rows), k, row_index)
    values = values.reshape(-1, k).index_copy(0, rows, tied_values).view(values.shape)
    picked = picked.reshape(-1, k).index_copy(0, rows, tied_picked).view(picked.shape)
    return values, picked


def _topk_keyed(x: Tensor, k: int, index: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if x.dtype == torch.float64:
        if index is None:
            index = torch.arange(x.shape[-1], device=x.device).expand_as(x)
        index, order = index.sort(dim=-1, stable=True)
        values, pos = x.gather(-1, order).sort(dim=-1, descending=True, stable=True)
        return values[..., :k], index.gather(-1, pos[..., :k])
    low = _low_positions(x.shape[-1], x.device) if index is None else _LOW32 - index
    best = ((_order_code(x) << 32) | low).topk(k, dim=-1).values
    return _from_order_code(best >> 32), _LOW32 - (best & _LOW32)


@functools.lru_cache(maxsize=64)
def _low_positions(n: int, device: torch.device) -> Tensor:
    # the low word of the key for index = position: three ops a call fewer in every sub-key top-k
    with _normal_tensors():
        return _LOW32 - torch.arange(n, device=device)


def _normal_tensors():
    """Where a cached tensor is made: outside inference mode, even when the first call is inside it.

    An inference tensor cannot be saved for backward, so a cache filled by a first call under
    ``torch.inference_mode()`` would fail every later training step that uses it.
    """
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def candidate_pairs(topk: int, device: Optional[torch.device] = None) -> Tensor:
    """Positions ``(a, b)`` in two descending top-k lists whose sum can reach the top-k.

    The pair ``(a, b)`` is beaten, or tied and preceded by a lower slot, by every
    ``(a', b') != (a, b)`` with ``a' <= a, b' <= b``: ``(a + 1) * (b + 1) - 1`` others. So
    only pairs with ``(a + 1) * (b + 1) <= topk`` can be among the ``topk`` best: about
    ``topk * ln(topk)`` of the ``topk ** 2`` grid.

    Returns:
        long tensor ``(2, num_pairs)``: row 0 the positions in the first list, row 1 in the second.
    """
    return _candidate_pairs(topk, torch.device("cpu") if device is None else torch.device(device))


@functools.lru_cache(maxsize=64)
def _candidate_pairs(topk: int, device: torch.device) -> Tensor:
    # derived from topk alone, so a cache (not a module buffer) holds it: nothing to rebuild after
    # meta-device construction, to_empty or loading
    pairs = [(a, b) for a in range(topk) for b in range(topk // (a + 1))]
    with _normal_tensors():
        return torch.tensor(pairs, dtype=torch.long, device=device).t().contiguous()


@functools.lru_cache(maxsize=None)
def _score_dtype(queries: torch.dtype, keys: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.promote_types(queries, keys), torch.float32)


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


def search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """``(N, heads, 2, dim_key)`` queries -> ``scores, slots`` ``(N, heads, topk)``, best first."""
    scores, slots = search_heads_first(queries.transpose(1, 2), keys.transpose(1, 2), topk)
    return scores.transpose(0, 1).contiguous(), slots.transpose(0, 1).contiguous()  # (N, H, topk), as the op promises


def search_heads_first(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """:func:`search` in the layouts a layer holds: queries ``(N, 2, heads, dim_key)`` (the query
    projection's output), keys ``(heads, num_keys, 2, dim_key)`` (the parameter) -> ``scores, slots``
    ``(heads, N, topk)``, best first. No autograd; any strides with a unit last stride."""
    num_keys = keys.shape[1]
    sub = _both_half_scores(queries, keys, _score_dtype(queries.dtype, keys.dtype))  # (2, H, N, num_keys)
    # (2, H, N, topk or topk + 1), best first: one top-k for both halves; only the first topk are read
    v, i = _topk_tie_ruled(sub, topk, None, wide=True)
    heads, n = v.shape[1:3]
    ab = _candidate_pair_stack(topk, queries.device).expand(2, heads, n, -1)  # (2, H, N, P): half p's positions
    # gather, not indexing or index_select: 2-3x faster from 16 rows up, and no slower on one
    if heads * n <= _FEW_ROWS:  # both halves in one gather each: fewer calls, which is what a decoding step costs
        cand = v.gather(-1, ab).sum(0)  # (H, N, P): the same sums (x + y, exactly)
        cand_slots = i.gather(-1, ab).mul_(_slot_strides(num_keys, queries.device)).sum(0)
    else:  # the same numbers; faster on many rows than one gather and a reduction over the halves
        (v1, v2), (i1, i2), (a, b) = v.unbind(0), i.unbind(0), ab.unbind(0)  # unbind, not iteration: one call each
        cand = v1.gather(-1, a).add_(v2.gather(-1, b))  # (H, N, P)
        cand_slots = i1.gather(-1, a).mul_(num_keys).add_(i2.gather(-1, b))
    return topk_lower_index(cand, topk, cand_slots)


_FEW_ROWS = 32  # heads * tokens up to which the search builds candidates in one gather per tensor


@functools.lru_cache(maxsize=64)
def _candidate_pair_stack(topk: int, device: torch.device) -> Tensor:
    # candidate_pairs as (2, 1, 1, P): row p the positions in half p's list
    with _normal_tensors():
        return _candidate_pairs(topk, device).view(2, 1, 1, -1)


@functools.lru_cache(maxsize=64)
def _slot_strides(num_keys: int, device: torch.device) -> Tensor:
    # slot = i1 * num_keys + i2, as a multiplier per half, (2, 1, 1, 1)
    with _normal_tensors():
        return torch.tensor([num_keys, 1], device=device).view(2, 1, 1, 1)


def _both_half_scores(queries: Tensor, keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Both halves' sub-key scores in one ``(2, heads, N, num_keys)`` buffer (no autograd), so a
    single top-k selects both halves; the GEMMs of :func:`half_scores` (for one token, one GEMM per
    head, whose sums come in another order). Queries ``(N, 2, heads, d)``, keys ``(heads, num_keys, 2, d)``."""
    q = queries if queries.dtype == dtype else queries.to(dtype)
    k = keys if keys.dtype == dtype else keys.to(dtype)
    heads, n, num_keys, d = k.shape[0], q.shape[0], k.shape[1], k.shape[-1]
    if n == 1 and k.stride(2) == d and k.stride(1) == 2 * d:
        # one token (a decoding step): each head's keys as one contiguous (num_keys, 2d) matrix times
        # both half-queries, each placed in its own half of a 2d-vector (zeros in the other). Twice
        # the multiply-adds, but a layout BLAS runs ~1.3x faster than the two strided products (the
        # zeros add nothing; the sums come in another order, as from any other GEMM shape)
        lhs = torch.empty(heads, 2, 2, d, dtype=dtype, device=q.device)
        torch.mul(q[0].transpose(0, 1).unsqueeze(2), _half_blocks(dtype, q.device), out=lhs)  # (H, 2, 2, d)
        scores = torch.bmm(lhs.view(heads, 2, 2 * d), k.view(heads, num_keys, 2 * d).transpose(1, 2))
        return scores.transpose(0, 1).unsqueeze(2)  # (2, H, 1, num_keys), a view
    out = torch.empty(2, heads, n, num_keys, dtype=dtype, device=q.device)
    # views (half, head, ...) of both, taken once: each half below is then one select
    q, k = q.permute(1, 2, 0, 3).unbind(0), k.permute(2, 0, 3, 1).unbind(0)  # (H, N, d), (H, d, num_keys) each
    # a call with out= is never autocast (the AMP rules), so no autocast block is needed to keep float32
    for qp, kp, op in zip(q, k, out.unbind(0)):
        torch.bmm(qp, kp, out=op)
    return out


@functools.lru_cache(maxsize=16)
def _half_blocks(dtype: torch.dtype, device: torch.device) -> Tensor:
    # (2, 2, 1): [p, p'] = 1 where p == p', broadcast over d: half p of a query into block p
    with _normal_tensors():
        return torch.eye(2, dtype=dtype, device=device).unsqueeze(-1)


# -- large fresh buffers ----------------------------------------------------------------------

_HUGE_PAGE = 2 << 20
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # glibc on 64-bit: larger allocations are always fresh mappings
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


def zeros_hugepage(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros`` for a large CPU gradient, without a pass that writes the zeros.

    On Linux a buffer over 32 MiB is fresh anonymous memory (``mmap``), which the kernel hands out
    zeroed page by page as it is first touched, hinted to huge pages: ``zeros`` would fault the pages
    in (the kernel zeroes each) and then write every byte again. glibc maps every allocation over
    32 MiB afresh anyway, so the faults are paid either way and the second pass is saved (a 512 MiB
    gradient with 100,000 of its 262,144 rows written, then read through once: 1.1-1.2x faster than
    ``empty_hugepage(...).zero_()``, 1.9-2.3x faster than ``torch.zeros``). Smaller buffers may come
    back from memory glibc already holds, where zeroing in place beats faulting fresh pages (a 32 MiB
    gradient ran 0.8x of 0.3.0 that way), so they are ``empty_hugepage(...).zero_()``. The memory is
    returned to the system when the tensor is freed. Off Linux, or off the CPU, ``torch.zeros``.
    """
    device = torch.device(device)
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return torch.zeros(*shape, dtype=dtype, device=device)
    if nbytes <= _GLIBC_MMAP_THRESHOLD_MAX:
        return empty_hugepage(*shape, dtype=dtype, device=device).zero_()
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return torch.zeros(*shape, dtype=dtype, device=device)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # a hint only
        pass
    # the tensor holds the mapping: it is unmapped when the tensor (and every view of it) is freed
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(*shape)


# -- value read -----------------------------------------------------------------------------


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

    One ``embedding_bag`` over the output gradient with a bag per touched row. (An MKL
    CSR ``addmm`` was tried here: no faster when interleaved with this, and linked to
    an occasional SIGABRT at interpreter exit under torchrun.)
    """
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(bag_of_read, g, offsets, mode="sum", per_sample_weights=psw)


def value_read(values: Tensor, indices: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``out[b] = sum_j weights[b, j] * values[indices[b, j]]``: one ``embedding_bag``.

    ``F.embedding_bag`` without its Python wrapper (what it does for 2-D ``indices``, with
    the bag offsets of CPU reads cached): at a decoding step the wrapper took longer than the read.
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
    if indices.device.type == "cpu" and bags <= _MAX_CACHED_BAGS and not torch.compiler.is_compiling():
        offsets = _bag_offsets(bags, m, indices.dtype)
    else:
        offsets = torch.arange(0, bags * m, m, dtype=indices.dtype, device=indices.device)
    return torch.embedding_bag(values, indices, offsets, False, 0, False, weights, False, None)[0]


_MAX_CACHED_BAGS = 1 << 16


@functools.lru_cache(maxsize=64)
def _bag_offsets(bags: int, m: int, dtype: torch.dtype) -> Tensor:
    # read, never written, by embedding_bag (and not by its backward, which this library replaces)
    with _normal_tensors():
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

    The route is chosen by size (:func:`~product_key_memory._routes.choose_read_backward`):
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
