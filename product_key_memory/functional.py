"""Stateless core of a product-key memory (Lample et al. 2019, arXiv 1907.05242).

Two pieces, each an op of :mod:`product_key_memory.ops` (a custom op ``torch.ops.pkm.*`` with
a plain reference beside it), called through its entry function:

* the product-key search: queries and sub-keys -> the ``topk`` best slots of a
  ``num_keys ** 2`` table and their scores (:func:`product_key_search`);
* the value read: value table, slot indices and weights -> weighted sum of rows (:func:`value_read`);

and the scoring between them (:func:`rescore`, :func:`qk_normalize`).

Layouts used throughout (``...`` is any number of leading token dims):

* queries     ``(..., heads, 2, dim_key)``   the two half-queries of each head
* keys        ``(heads, 2, num_keys, dim_key)``
* sub-scores  ``(..., heads, 2, num_keys)``
* slots       ``(..., heads, topk)``, slot ``i1 * num_keys + i2``

Ties: on equal scores the lower index wins, in every function and on every backend.
The backend (``reference``, ``torch``, ``triton``) is chosen by device and forced with
:func:`~product_key_memory.ops.use_backend`; :func:`reference_path` is
``use_backend("reference")``. ``torch.export`` traces plain ops (no custom ops in exported
graphs, so ONNX and other exporters translate them).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import backend as _backend
from .ops.search import candidate_pairs, gumbel_noise_like
from .ops.search import product_topk as _product_topk
from .ops.search import reference as _search_ref
from .ops.search import search as _search
from .ops.search import subkey_scores as _subkey_scores
from .ops.search.reference import brute_force_search
from .ops.value_read import reference as _read_ref
from .ops.value_read import value_read as _value_read

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
    "gumbel_noise_like",
    "rescore",
    "qk_normalize",
]

TopkFn = Callable[[Tensor, int], Tuple[Tensor, Tensor]]


@contextlib.contextmanager
def reference_path(enabled: bool = True) -> Iterator[None]:
    """Within this block, the ops run on the ``reference`` backend (``enabled=False``: chosen by device).

    For debugging a suspected fast-path problem: ``with reference_path(): model(x)``.
    Same as ``ops.use_backend("reference")``.
    """
    with _backend.use_backend("reference" if enabled else None):
        yield


def fast_path_enabled(device: Optional[torch.device] = None) -> bool:
    """``False`` inside :func:`reference_path` (or ``use_backend("reference")``) and while
    ``torch.export`` traces; otherwise the ops run a fast backend."""
    if torch.compiler.is_exporting():
        return False
    return _backend.backend_for(torch.device("cpu") if device is None else torch.device(device)) != "reference"


def subkey_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Dot products of every half-query with every sub-key of its head and half.

    Args:
        queries: ``(..., heads, 2, dim_key)``.
        keys: ``(heads, 2, num_keys, dim_key)``.

    Returns:
        ``(..., heads, 2, num_keys)`` in float32 (or float64 for float64 input),
        computed outside autocast so mixed precision never lowers score precision.
    """
    return _subkey_scores(queries, keys)


def product_topk(
    sub_scores: Tensor, topk: int, *, subkey_topk: Optional[TopkFn] = None
) -> Tuple[Tensor, Tensor]:
    """Best ``topk`` slots from sub-key scores, scoring only the candidates that can win.

    Args:
        sub_scores: ``(..., heads, 2, num_keys)``.
        topk: slots to return per head, ``1 <= topk <= num_keys``.
        subkey_topk: replaces the per-half selection (e.g. a differentiable top-k); it
            must return values sorted best first.

    Returns:
        ``scores, indices``, both ``(..., heads, topk)``, sorted by descending score, the
        lower slot first on ties; ``indices`` are slots ``i1 * num_keys + i2``.
    """
    return _product_topk(sub_scores, topk, subkey_topk=subkey_topk)


def product_topk_reference(
    sub_scores: Tensor, topk: int, *, subkey_topk: Optional[TopkFn] = None
) -> Tuple[Tensor, Tensor]:
    """The paper's two-stage search: all ``topk ** 2`` sums of the two top-k lists."""
    return _search_ref.product_topk(sub_scores, topk, subkey_topk=subkey_topk)


def product_key_search(
    queries: Tensor,
    keys: Tensor,
    topk: int,
    *,
    subkey_topk: Optional[TopkFn] = None,
    gumbel_noise_scale: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """Queries ``(..., heads, 2, dim_key)`` and keys ``(heads, 2, num_keys, dim_key)``
    -> ``scores, indices`` of the ``topk`` best slots per head, ``(..., heads, topk)``.

    :func:`product_key_memory.ops.search.search` (``torch.ops.pkm.search`` when a gradient is
    wanted): it reads the keys in place and never builds the stacked sub-score tensor, unless
    a custom ``subkey_topk`` or Gumbel noise (added to the sub-key scores) needs it.
    """
    lead, (heads, _, dim_key) = queries.shape[:-3], queries.shape[-3:]
    scores, slots = _search(
        queries.reshape(-1, heads, 2, dim_key), keys, topk, subkey_topk=subkey_topk,
        gumbel_noise_scale=gumbel_noise_scale,
    )
    return scores.reshape(*lead, heads, topk), slots.reshape(*lead, heads, topk)


def _check_read_args(values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor]):
    if values.dim() != 2:
        raise ValueError(f"values must be a (num_slots, dim) table, got shape {tuple(values.shape)}")
    if indices.dim() < 1:
        raise ValueError("indices must have at least one dim (the slots read per output row)")
    if indices.dtype not in (torch.long, torch.int):
        raise TypeError(f"indices must be an int64 or int32 tensor, got {indices.dtype}")
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
    """Weighted sum of value rows, written as plainly as possible (differentiable by autograd).

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
    return _read_ref.value_read(values, indices, weights, trainable)


def value_read(
    values: Tensor,
    indices: Tensor,
    weights: Optional[Tensor] = None,
    *,
    trainable: Optional[Tensor] = None,
    sparse: bool = False,
) -> Tensor:
    """Same result and gradients as :func:`value_read_reference`:
    :func:`product_key_memory.ops.value_read.value_read` (``torch.ops.pkm.value_read``).

    The backward touches only the rows read: ``sparse=True`` makes the gradient of
    ``values`` a sparse tensor holding just those rows (for ``SparseRowAdam`` or
    ``torch.optim.SparseAdam``; compiled code gets a dense gradient), skipping rows read
    only with weight 0 (padding) or outside ``trainable``. It is coalesced on the torch and
    reference backends; the triton backend gives one entry per read, repeats holding zeros,
    so that nothing waits for the GPU (``SparseRowAdam`` takes it as it is; ``coalesce()``
    gives the compact form at the cost of a sync).
    The weights may have any float dtype; their gradient comes back in it.
    """
    _check_read_args(values, indices, weights, trainable)
    if indices.dim() == 2:  # (bags, m) already, as a memory layer reads
        return _value_read(values, indices, weights, trainable, sparse)
    lead, m = indices.shape[:-1], indices.shape[-1]
    flat_w = None if weights is None else weights.reshape(-1, m)
    out = _value_read(values, indices.reshape(-1, m), flat_w, trainable, sparse)
    return out.view(*lead, values.shape[1])


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
    s = scores if scores.dtype in (torch.float32, torch.float64) else scores.to(torch.float32)
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
    dtype = _search_ref.score_dtype(queries, keys)
    scale = keys.shape[-1] ** 0.5
    return F.normalize(queries.to(dtype), dim=-1), F.normalize(keys.to(dtype), dim=-1) * scale
