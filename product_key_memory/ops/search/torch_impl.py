"""The product-key search in fast PyTorch ops (the ``torch`` backend; any device, tuned on the CPU).

Sub-key scores by one batched GEMM per query half straight from the stored
``(heads, num_keys, 2, dim_key)`` keys (no re-layout copy; for one token, one GEMM per head over
both halves), one tie-ruled top-k for both halves, and only the ``(a + 1) * (b + 1) <= topk``
candidate pairs instead of the ``topk ** 2`` grid, gathered. Checked against :mod:`.reference`.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from .._buffers import outside_inference_mode
from ..topk import topk_lower_index
from . import reference

__all__ = ["candidate_pairs", "cached_candidate_pairs", "half_scores", "search", "search_heads_first"]


def candidate_pairs(topk: int, device: torch.device) -> Tensor:
    """The candidate pairs of :func:`product_key_memory.ops.search.candidate_pairs`, ``(2, num_pairs)``,
    built afresh (what traced code takes: a constant of its graph)."""
    pairs = [(a, b) for a in range(topk) for b in range(topk // (a + 1))]
    return torch.tensor(pairs, dtype=torch.long, device=device).t().contiguous()


@functools.lru_cache(maxsize=64)
def cached_candidate_pairs(topk: int, device: torch.device) -> Tensor:
    """:func:`candidate_pairs`, cached per ``(topk, device)`` for eager code (made outside inference
    mode, which tracing cannot follow): never to be written to or handed out."""
    # derived from topk alone, so a cache (not a module buffer) holds it: nothing to rebuild after
    # meta-device construction, to_empty or loading
    with outside_inference_mode():
        return candidate_pairs(topk, device)


# reference.score_dtype per (queries, keys) dtype pair, cached: asked on every search
_score_dtype = functools.lru_cache(maxsize=None)(reference.score_dtype)


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
    """``(N, heads, 2, dim_key)`` queries -> ``scores, slots`` ``(N, heads, topk)``, best first: views of
    heads-first ``(heads, N, topk)`` results (the custom op makes them contiguous, as its fake says)."""
    scores, slots = search_heads_first(queries.transpose(1, 2), keys.transpose(1, 2), topk)
    return scores.transpose(0, 1), slots.transpose(0, 1)  # (N, H, topk)


def search_heads_first(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """:func:`search` in the layouts a layer holds: queries ``(N, 2, heads, dim_key)`` (the query
    projection's output), keys ``(heads, num_keys, 2, dim_key)`` (the parameter) -> ``scores, slots``
    ``(heads, N, topk)``, best first. No autograd; any strides with a unit last stride."""
    num_keys = keys.shape[1]
    sub = _both_half_scores(queries, keys, _score_dtype(queries.dtype, keys.dtype))  # (2, H, N, num_keys)
    # the rule for non-finite inputs (reference.bounded_scores), in place on the fresh buffer
    sub.clamp_(-reference.SCORE_BOUND, reference.SCORE_BOUND).nan_to_num_(nan=-reference.SCORE_BOUND)
    # (2, H, N, topk or topk + 1), best first: one top-k for both halves; only the first topk are read
    v, i = topk_lower_index(sub, topk, wide=True)
    heads, n = v.shape[1:3]
    ab = _candidate_pair_stack(topk, queries.device).expand(2, heads, n, -1)  # (2, H, N, P): half p's positions
    # gather, not indexing or index_select: faster from 16 rows up, no slower on one (benchmarks/README.md)
    if heads * n <= _FEW_ROWS:  # both halves in one gather each: fewer calls, which is what a decoding step costs
        cand = v.gather(-1, ab).sum(0)  # (H, N, P): the same sums (x + y, exactly)
        cand_slots = i.gather(-1, ab).mul_(_slot_strides(num_keys, queries.device)).sum(0)
    else:  # the same numbers; faster on many rows than one gather and a reduction over the halves
        (v1, v2), (i1, i2), (a, b) = v.unbind(0), i.unbind(0), ab.unbind(0)  # unbind, not iteration: one call each
        cand = v1.gather(-1, a).add_(v2.gather(-1, b))  # (H, N, P)
        cand_slots = i1.gather(-1, a).mul_(num_keys).add_(i2.gather(-1, b))
    return topk_lower_index(cand, topk, cand_slots, index_bound=num_keys * num_keys)


_FEW_ROWS = 32  # heads * tokens up to which the search builds candidates in one gather per tensor


@functools.lru_cache(maxsize=64)
def _candidate_pair_stack(topk: int, device: torch.device) -> Tensor:
    # candidate_pairs as (2, 1, 1, P): row p the positions in half p's list
    with outside_inference_mode():
        return cached_candidate_pairs(topk, device).view(2, 1, 1, -1)


@functools.lru_cache(maxsize=64)
def _slot_strides(num_keys: int, device: torch.device) -> Tensor:
    # slot = i1 * num_keys + i2, as a multiplier per half, (2, 1, 1, 1)
    with outside_inference_mode():
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
        # the multiply-adds, in a layout BLAS runs faster than the two strided products at one token
        # (benchmarks/README.md; the zeros add nothing; the sums come in another order, as from any
        # other GEMM shape)
        lhs = torch.empty(heads, 2, 2, d, dtype=dtype, device=q.device)
        torch.mul(q[0].transpose(0, 1).unsqueeze(2), _half_blocks(dtype, q.device), out=lhs)  # (H, 2, 2, d)
        scores = torch.empty(heads, 2, num_keys, dtype=dtype, device=q.device)
        # with out=, never autocast: under bf16 autocast the product would otherwise score in bf16
        torch.bmm(lhs.view(heads, 2, 2 * d), k.view(heads, num_keys, 2 * d).transpose(1, 2), out=scores)
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
    with outside_inference_mode():
        return torch.eye(2, dtype=dtype, device=device).unsqueeze(-1)
