"""Stateless core of a product-key memory (Lample et al. 2019, arXiv 1907.05242).

Two pieces, each with a plain reference beside the path the modules use:

* the product-key search: queries and sub-keys -> the ``topk`` best slots of a
  ``num_keys ** 2`` table and their scores;
* the value read: value table, slot indices and weights -> weighted sum of rows.

Layouts used throughout (``...`` is any number of leading token dims):

* queries     ``(..., heads, 2, dim_key)``   the two half-queries of each head
* keys        ``(heads, 2, num_keys, dim_key)``
* sub-scores  ``(..., heads, 2, num_keys)``
* slots       ``(..., heads, topk)``, slot ``i1 * num_keys + i2``

Fast paths (``product_key_memory.ops``) are chosen automatically by
:func:`product_key_search` and :func:`value_read` and give the same selections,
outputs and gradients as the references. ``with reference_path():`` forces the
references (for debugging); options the fast paths do not cover (a custom
``subkey_topk``, e.g. ``differentiable_topk``) always take the reference path.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = [
    "reference_path",
    "fast_path_enabled",
    "subkey_scores",
    "candidate_pairs",
    "product_topk",
    "product_topk_reference",
    "product_key_search",
    "brute_force_search",
    "value_read",
    "value_read_reference",
    "rescore",
    "qk_normalize",
]

TopkFn = Callable[[Tensor, int], Tuple[Tensor, Tensor]]

# set only by ``reference_path``, which restores it; a ContextVar is per thread and per task
_FORCE_REFERENCE = contextvars.ContextVar("product_key_memory_force_reference", default=False)


@contextlib.contextmanager
def reference_path(enabled: bool = True) -> Iterator[None]:
    """Within this block, search and value reads take the plain reference paths.

    For debugging a suspected fast-path problem: ``with reference_path(): model(x)``.
    The reference value read always returns a dense value gradient.
    """
    token = _FORCE_REFERENCE.set(bool(enabled))
    try:
        yield
    finally:
        _FORCE_REFERENCE.reset(token)


def fast_path_enabled() -> bool:
    """``False`` inside :func:`reference_path`, and while ``torch.compile`` or ``torch.export`` traces.

    Traced code takes the reference paths: plain ops that compilers fuse and exporters
    translate (the fast backward's sorting and sparse tensors are neither), and no
    ContextVar read, which would break the graph. Their value gradient is dense.
    """
    if torch.compiler.is_compiling():
        return False
    return not _FORCE_REFERENCE.get()


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    # scores are never computed below float32; float64 stays float64 (gradcheck)
    return torch.promote_types(dtype, torch.float32)


def subkey_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Dot products of every half-query with every sub-key of its head and half.

    Args:
        queries: ``(..., heads, 2, dim_key)``.
        keys: ``(heads, 2, num_keys, dim_key)``.

    Returns:
        ``(..., heads, 2, num_keys)`` in float32 (or float64 for float64 input),
        computed outside autocast so mixed precision never lowers score precision.
    """
    dtype = _score_dtype(torch.promote_types(queries.dtype, keys.dtype))
    lead, (heads, _, dim_key) = queries.shape[:-3], queries.shape[-3:]
    s1, s2 = ops.half_scores(queries.reshape(-1, heads, 2, dim_key), keys, dtype)  # (H, N, num_keys) each
    return torch.stack((s1, s2), dim=2).transpose(0, 1).reshape(*lead, heads, 2, keys.shape[-2])


def candidate_pairs(topk: int, device: Optional[torch.device] = None) -> Tensor:
    """Positions ``(a, b)`` in two descending top-k lists whose sum can reach the top-k.

    The pair ``(a, b)`` is beaten by every ``(a', b')`` with ``a' <= a, b' <= b``,
    that is by ``(a + 1) * (b + 1) - 1`` others, so only pairs with
    ``(a + 1) * (b + 1) <= topk`` can be among the ``topk`` best sums:
    about ``topk * ln(topk)`` of the ``topk ** 2`` grid.

    Returns:
        long tensor ``(2, num_pairs)``: row 0 the positions in the first list, row 1 in the second.
    """
    pairs = [(a, b) for a in range(topk) for b in range(topk // (a + 1))]
    return torch.tensor(pairs, dtype=torch.long, device=device).t().contiguous()


def _halves_topk(sub_scores: Tensor, topk: int, subkey_topk: Optional[TopkFn]):
    """``((s1, s2), (i1, i2))``: each half's ``topk`` best sub-keys, best first."""
    if subkey_topk is None:
        best, best_idx = sub_scores.topk(topk, dim=-1)
    else:
        best, best_idx = subkey_topk(sub_scores, topk)
    return best.unbind(-2), best_idx.unbind(-2)


def product_topk(
    sub_scores: Tensor,
    topk: int,
    *,
    subkey_topk: Optional[TopkFn] = None,
    pairs: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Best ``topk`` slots from sub-key scores, scoring only the candidates that can win.

    Args:
        sub_scores: ``(..., heads, 2, num_keys)``.
        topk: slots to return per head, ``1 <= topk <= num_keys``.
        subkey_topk: replaces ``torch.topk`` for the per-half selection (e.g. a
            differentiable top-k); it must return values sorted in descending order.
        pairs: the output of :func:`candidate_pairs` for ``topk`` (pass it to avoid
            rebuilding it on every call).

    Returns:
        ``scores, indices``, both ``(..., heads, topk)``, sorted by descending score;
        ``indices`` are slots ``i1 * num_keys + i2``.
    """
    if not fast_path_enabled():
        return product_topk_reference(sub_scores, topk, subkey_topk=subkey_topk)
    num_keys = sub_scores.shape[-1]
    (s1, s2), (i1, i2) = _halves_topk(sub_scores, topk, subkey_topk)
    if pairs is None:
        pairs = candidate_pairs(topk, sub_scores.device)
    a, b = pairs[0], pairs[1]
    cand_scores = s1.index_select(-1, a) + s2.index_select(-1, b)  # (..., heads, P)
    cand_slots = i1.index_select(-1, a) * num_keys + i2.index_select(-1, b)
    scores, pos = cand_scores.topk(topk, dim=-1)
    return scores, cand_slots.gather(-1, pos)


def product_topk_reference(
    sub_scores: Tensor, topk: int, *, subkey_topk: Optional[TopkFn] = None
) -> Tuple[Tensor, Tensor]:
    """The paper's two-stage search: all ``topk ** 2`` sums of the two top-k lists."""
    num_keys = sub_scores.shape[-1]
    (s1, s2), (i1, i2) = _halves_topk(sub_scores, topk, subkey_topk)
    grid = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., heads, topk * topk)
    grid_slots = (i1.unsqueeze(-1) * num_keys + i2.unsqueeze(-2)).flatten(-2)
    scores, pos = grid.topk(topk, dim=-1)
    return scores, grid_slots.gather(-1, pos)


def product_key_search(
    queries: Tensor,
    keys: Tensor,
    topk: int,
    *,
    subkey_topk: Optional[TopkFn] = None,
    pairs: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Queries ``(..., heads, 2, dim_key)`` and keys ``(heads, 2, num_keys, dim_key)``
    -> ``scores, indices`` of the ``topk`` best slots per head, ``(..., heads, topk)``.

    Equals ``product_topk(subkey_scores(queries, keys), topk)``; without a custom
    ``subkey_topk`` (and outside :func:`reference_path`) it runs ``ops.search_fast``,
    which reads the keys in place and never builds the stacked sub-score tensor.
    """
    if subkey_topk is not None or not fast_path_enabled():
        return product_topk(subkey_scores(queries, keys), topk, subkey_topk=subkey_topk, pairs=pairs)
    lead, (heads, _, dim_key) = queries.shape[:-3], queries.shape[-3:]
    if pairs is None:
        pairs = candidate_pairs(topk, queries.device)
    dtype = _score_dtype(torch.promote_types(queries.dtype, keys.dtype))
    scores, slots = ops.search_fast(queries.reshape(-1, heads, 2, dim_key), keys, topk, pairs, dtype)
    return scores.reshape(*lead, heads, topk), slots.reshape(*lead, heads, topk)


def brute_force_search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Scores every one of the ``num_keys ** 2`` slots and keeps the best ``topk``.

    The specification the two-stage search must match; memory grows with
    ``num_keys ** 2``, so it is for tests and small tables only.
    """
    sub = subkey_scores(queries, keys)
    s1, s2 = sub.unbind(-2)  # (..., heads, num_keys)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., heads, num_keys ** 2)
    return full.topk(topk, dim=-1)


def _check_read_args(values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor]):
    if values.dim() != 2:
        raise ValueError(f"values must be a (num_slots, dim) table, got shape {tuple(values.shape)}")
    if indices.dim() < 1:
        raise ValueError("indices must have at least one dim (the slots read per output row)")
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(
            f"weights must have the shape of indices {tuple(indices.shape)}, got {tuple(weights.shape)}"
        )
    if trainable is not None and (trainable.dtype != torch.bool or trainable.shape != values.shape[:1]):
        raise ValueError(
            f"trainable must be a bool tensor of shape ({values.shape[0]},), "
            f"got {trainable.dtype} of shape {tuple(trainable.shape)}"
        )


def value_read_reference(
    values: Tensor, indices: Tensor, weights: Optional[Tensor] = None, *, trainable: Optional[Tensor] = None
) -> Tensor:
    """Weighted sum of value rows, written as plainly as possible.

    Args:
        values: ``(num_slots, dim)``.
        indices: ``(..., m)`` slots read for each output row.
        weights: ``(..., m)`` or ``None`` for an unweighted sum.
        trainable: optional bool ``(num_slots,)``; rows outside it get no gradient
            (sparse memory finetuning). The output and the gradient of ``weights`` are unchanged.

    Returns:
        ``(..., dim)``
    """
    _check_read_args(values, indices, weights, trainable)
    rows = F.embedding(indices, values)  # (..., m, dim)
    if trainable is not None:
        rows = torch.where(trainable[indices].unsqueeze(-1), rows, rows.detach())
    if weights is None:
        return rows.sum(-2)
    return (rows * weights.to(rows.dtype).unsqueeze(-1)).sum(-2)


def value_read(
    values: Tensor,
    indices: Tensor,
    weights: Optional[Tensor] = None,
    *,
    trainable: Optional[Tensor] = None,
    sparse: bool = False,
) -> Tensor:
    """Same result and gradients as :func:`value_read_reference`, faster.

    One ``embedding_bag`` forward; the backward (``ops.ValueRead``) touches only the
    rows read: ``sparse=True`` makes the gradient of ``values`` a coalesced sparse
    tensor holding just those rows (for ``optim.SparseRowAdam`` or
    ``torch.optim.SparseAdam``), skipping rows read only with weight 0 (padding) or
    outside ``trainable``. Inside :func:`reference_path` this is the reference.
    """
    _check_read_args(values, indices, weights, trainable)
    if not fast_path_enabled():
        return value_read_reference(values, indices, weights, trainable=trainable)
    lead, m = indices.shape[:-1], indices.shape[-1]
    flat_idx = indices.reshape(-1, m)
    flat_w = None if weights is None else weights.reshape(-1, m).to(values.dtype)
    out = ops.value_read_fast(values, flat_idx, flat_w, trainable, sparse)
    return out.view(*lead, values.shape[1])


def gumbel_noise_like(t: Tensor) -> Tensor:
    """Standard Gumbel noise with the shape, dtype and device of ``t``."""
    u = torch.rand_like(t).clamp_(min=1e-20, max=1.0 - 1e-7)
    return -torch.log(-torch.log(u))


SCORE_SUBTRACTS = ("min", "mean", "median")
SCORE_ACTIVATIONS = ("softmax", "relu", "none")


def rescore(
    scores: Tensor,
    *,
    temperature: float = 1.0,
    activation: str = "softmax",
    subtract: Optional[str] = None,
    normalize: bool = False,
) -> Tensor:
    """Slot scores ``(..., topk)`` -> slot weights, in float32 (float64 stays float64).

    In this order, as the reference implementation of arXiv 1907.05242 does:
    divide by ``temperature``; ``activation`` ``"softmax"`` (default), ``"relu"``
    (non-competitive gates, arXiv 2310.10837) or ``"none"``; ``subtract`` the
    ``"min"``, ``"mean"`` or ``"median"`` (the lower middle for even ``topk``, as
    ``torch.median``) of each row; ``normalize`` each row to unit L1 norm.
    """
    if activation not in SCORE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {SCORE_ACTIVATIONS}, got {activation!r}")
    if subtract is not None and subtract not in SCORE_SUBTRACTS:
        raise ValueError(f"subtract must be None or one of {SCORE_SUBTRACTS}, got {subtract!r}")
    s = scores.to(_score_dtype(scores.dtype))
    if temperature != 1.0:
        s = s / temperature
    if activation == "softmax":
        s = s.softmax(dim=-1)
    elif activation == "relu":
        s = torch.relu(s)
    if subtract == "min":
        s = s - s.amin(dim=-1, keepdim=True)
    elif subtract == "mean":
        s = s - s.mean(dim=-1, keepdim=True)
    elif subtract == "median":
        s = s - s.median(dim=-1, keepdim=True).values
    if normalize:
        s = F.normalize(s, p=1.0, dim=-1)
    return s


def qk_normalize(queries: Tensor, keys: Tensor) -> Tuple[Tensor, Tensor]:
    """Query/key normalisation ("qk-norm", as Memory+ uses it, arXiv 2412.09764).

    Both sides are scaled to unit RMS over ``dim_key`` and the dot product is divided by
    ``sqrt(dim_key)``, the scaled product of qk-norm attention (arXiv 2302.05442): a score is
    ``sqrt(dim_key) * cos(q, k)``, whose spread at random init matches the plain layer's.
    Parameter-free, computed in the score dtype (float32 or float64).

    Args:
        queries: ``(..., heads, 2, dim_key)``.
        keys: ``(heads, 2, num_keys, dim_key)``.

    Returns:
        ``queries, keys`` to pass to :func:`subkey_scores`.
    """
    dtype = _score_dtype(torch.promote_types(queries.dtype, keys.dtype))
    scale = keys.shape[-1] ** 0.5
    return F.normalize(queries.to(dtype), dim=-1), F.normalize(keys.to(dtype), dim=-1) * scale
