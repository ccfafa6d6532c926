"""The product-key search, ``torch.ops.pkm.search``, and :func:`search`, the one entry that routes it.

``search(queries, keys, topk)``: half-queries ``(N, heads, 2, dim_key)`` and sub-keys
``(heads, 2, num_keys, dim_key)`` -> the ``topk`` best of the ``num_keys ** 2`` slots per head,
``scores`` (float32, float64 for float64 input) and ``slots`` (long) ``(N, heads, topk)``, best
first, the lower slot first on equal scores; non-finite sub-key scores are bounded first, on every
backend (:func:`.reference.bounded_scores`).

Implementations: :mod:`.reference` (the specification), :mod:`.torch_impl`, :mod:`.triton_impl`.
:func:`search` decides, in this order:

0. under a ``torch.func`` transform (``grad``, ``vmap``, ...): :mod:`.reference` in plain ops, which
   the transforms differentiate and batch;
1. while ``torch.export`` traces: the sub-key scores and the pruned two-stage search in
   plain ops (:func:`product_topk` with the exportable top-k), so exported graphs hold no
   custom op and the ONNX exporter translates them;
2. with a ``subkey_topk`` (a differentiable top-k) or Gumbel noise: sub-key scores as a
   differentiable tensor (:func:`subkey_scores`), then :func:`product_topk` (in eager mode under
   ``use_backend("reference")``, both are :mod:`.reference`'s);
3. when a gradient is wanted, or under ``torch.compile``: the custom op, whose implementation
   asks the backend switch at run time (never in traced code);
4. otherwise (no gradient, eager): the implementation directly, without the dispatcher.

The implementation is the backend's (:func:`~product_key_memory.ops.backend.backend_for`);
the ``triton`` backend hands float64 (gradcheck) and ``topk`` past ``triton_impl.MAX_TOPK`` (256) to
``torch`` (:func:`.triton_impl.fits`).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..backend import backend_for, functorch_active
from ..topk import topk_lower_index
from . import reference
from . import torch_impl
from .reference import MAX_NUM_KEYS, check_num_keys

__all__ = [
    "MAX_NUM_KEYS", "check_num_keys", "search", "subkey_scores", "product_topk", "candidate_pairs", "gumbel_noise_like"
]

TopkFn = Callable[[Tensor, int], Tuple[Tensor, Tensor]]


def _implementation(queries: Tensor, keys: Tensor, topk: int):
    name = backend_for(queries.device)
    if name == "torch":
        return torch_impl
    if name == "reference":
        return reference
    if torch.float64 in (queries.dtype, keys.dtype):
        return torch_impl
    from . import triton_impl  # imports Triton only when used

    # past triton_impl.MAX_TOPK the kernel's candidate list would not fit in registers
    return triton_impl if triton_impl.fits(keys.shape[-2], topk) else torch_impl


def _reference_backend(device: torch.device) -> bool:
    # the switch is a ContextVar, which traced code cannot read: compiled graphs hold the fast ops
    return not torch.compiler.is_compiling() and backend_for(device) == "reference"


def _run(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    if queries.shape[0] == 0:
        return _search_fake(queries, keys, topk)
    return _implementation(queries, keys, topk).search(queries, keys, topk)


@torch.library.custom_op("pkm::search", mutates_args=())
def _search_op(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    scores, slots = _run(queries, keys, topk)
    return scores.contiguous(), slots.contiguous()  # an implementation may return views in another layout


@_search_op.register_fake
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


_search_op.register_autograd(_search_backward, setup_context=_search_setup)


def search(
    queries: Tensor,
    keys: Tensor,
    topk: int,
    *,
    subkey_topk: Optional[TopkFn] = None,
    gumbel_noise_scale: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """The ``topk`` best slots of each head: ``scores, slots`` ``(N, heads, topk)``.

    Args:
        queries: ``(N, heads, 2, dim_key)``, any strides with a unit last stride.
        keys: ``(heads, 2, num_keys, dim_key)``, the same (a layer's keys are a transposed view).
        topk: slots per head, ``1 <= topk <= num_keys``; ``num_keys <= MAX_NUM_KEYS`` (65536,
            ``ValueError`` past it) on every backend.
        subkey_topk: replaces the per-half selection (e.g. a differentiable top-k); it must
            return values sorted best first.
        gumbel_noise_scale: standard Gumbel noise times this is added to the sub-key scores.

    Returns:
        ``scores`` differentiable w.r.t. ``queries`` and ``keys``, and ``slots``
        ``i1 * num_keys + i2``, best first, the lower slot first on ties.
    """
    reference.check_num_keys(keys.shape[-2])
    # routes that build the sub-key scores as a tensor, then select from them
    if functorch_active():  # plain ops only; vmap needs randomness="different" or "same" for the noise
        return _select(reference.subkey_scores(queries, keys), topk, subkey_topk, gumbel_noise_scale,
                       reference.product_topk)
    if torch.compiler.is_exporting():
        return _select(reference.subkey_scores(queries, keys), topk, subkey_topk, gumbel_noise_scale, product_topk)
    if subkey_topk is not None or gumbel_noise_scale > 0.0:
        return _select(subkey_scores(queries, keys), topk, subkey_topk, gumbel_noise_scale, product_topk)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad)):
        return _search_op(queries, keys, topk)
    return _run(queries, keys, topk)


def _select(sub: Tensor, topk: int, subkey_topk: Optional[TopkFn], gumbel_noise_scale: float, product_topk_fn):
    if gumbel_noise_scale > 0.0:
        sub = sub + gumbel_noise_like(sub) * gumbel_noise_scale
    return product_topk_fn(sub, topk, subkey_topk=subkey_topk)


def subkey_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Dot products of every half-query with every sub-key of its head and half, differentiable.

    Args:
        queries: ``(..., heads, 2, dim_key)``.
        keys: ``(heads, 2, num_keys, dim_key)``.

    Returns:
        ``(..., heads, 2, num_keys)`` in float32 (float64 for float64 input), computed outside
        autocast so mixed precision never lowers score precision.
    """
    if _reference_backend(queries.device):
        return reference.subkey_scores(queries, keys)
    dtype = reference.score_dtype(queries, keys)
    lead, (heads, _, dim_key) = queries.shape[:-3], queries.shape[-3:]
    s1, s2 = torch_impl.half_scores(queries.reshape(-1, heads, 2, dim_key), keys, dtype)  # (H, N, K) each
    return torch.stack((s1, s2), dim=2).transpose(0, 1).reshape(*lead, heads, 2, keys.shape[-2])


def product_topk(sub_scores: Tensor, topk: int, *, subkey_topk: Optional[TopkFn] = None) -> Tuple[Tensor, Tensor]:
    """Best ``topk`` slots from sub-key scores ``(..., heads, 2, num_keys)``, scoring only the
    candidate pairs that can win (:func:`candidate_pairs`); the same answer as
    :func:`.reference.product_topk`, which scores the whole ``topk ** 2`` grid.

    Returns ``scores, slots`` ``(..., heads, topk)``; ``scores`` carry the gradient of ``sub_scores``.
    """
    if _reference_backend(sub_scores.device):
        return reference.product_topk(sub_scores, topk, subkey_topk=subkey_topk)
    num_keys = sub_scores.shape[-1]
    sub_scores = reference.bounded_scores(sub_scores)  # the rule for non-finite inputs (reference.py)
    best, best_idx = (topk_lower_index if subkey_topk is None else subkey_topk)(sub_scores, topk)
    (s1, s2), (i1, i2) = best.unbind(-2), best_idx.unbind(-2)
    # a graph holds the pairs as a constant; eager code reads the cache
    pairs = torch_impl.candidate_pairs if torch.compiler.is_compiling() else torch_impl.cached_candidate_pairs
    a, b = pairs(topk, sub_scores.device)
    cand_scores = s1.index_select(-1, a) + s2.index_select(-1, b)  # (..., heads, P)
    cand_slots = i1.index_select(-1, a) * num_keys + i2.index_select(-1, b)
    return topk_lower_index(cand_scores, topk, cand_slots, index_bound=num_keys * num_keys)


def candidate_pairs(topk: int, device: Optional[torch.device] = None) -> Tensor:
    """Positions ``(a, b)`` in two descending top-k lists whose sum can reach the top-k.

    The pair ``(a, b)`` is beaten, or tied and preceded by a lower slot, by every
    ``(a', b') != (a, b)`` with ``a' <= a, b' <= b``: ``(a + 1) * (b + 1) - 1`` others. So
    only pairs with ``(a + 1) * (b + 1) <= topk`` can be among the ``topk`` best: about
    ``topk * ln(topk)`` of the ``topk ** 2`` grid.

    Returns:
        a new long tensor ``(2, num_pairs)``: row 0 the positions in the first list, row 1 in
        the second (a copy: writing to it changes no search).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    return torch_impl.cached_candidate_pairs(topk, device).clone()


def gumbel_noise_like(t: Tensor) -> Tensor:
    """Standard Gumbel noise with the shape, dtype and device of ``t``."""
    u = torch.rand_like(t).clamp_(min=1e-20, max=1.0 - 1e-7)
    return -torch.log(-torch.log(u))
