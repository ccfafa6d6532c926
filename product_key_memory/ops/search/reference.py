"""The product-key search written as plainly as PyTorch allows: the specification.

Every other implementation is tested against these. Nothing here is tuned: the search scores
the ``topk x topk`` grid of the paper's two-stage search (arXiv 1907.05242, sec. 3.2), keeping
the candidate pairs ``(a + 1) * (b + 1) <= topk`` (see ``ops.search.candidate_pairs``): exactly
the whole grid's answer, except where two sums round to the same float (a sum absorbing a far
smaller score); keeping them here makes every backend pick the same slots then too.
On equal scores the lower slot wins (:func:`..topk.reference.topk_lower_index`).

Non-finite inputs (an inf sub-key, an inf half-query, NaN): the sub-key scores are bounded first,
:func:`bounded_scores`: ``+inf`` and finite scores past ``2 ** 125`` count as ``2 ** 125``, ``-inf``,
NaN and scores below ``-2 ** 125`` as ``-2 ** 125``. Every slot score is then the finite sum of two
bounded scores (no NaN from ``inf - inf``, no inf), and every backend ranks the same numbers. No
sensible input reaches the bound (``4.25e37``). A bounded score absorbs the other half's score in
the sum (``2 ** 125 + x == 2 ** 125``), so there the answer is the candidate pairs' (above), not
necessarily the brute force's.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..topk.reference import topk_lower_index as stable_topk

__all__ = [
    "MAX_NUM_KEYS", "check_num_keys", "SCORE_BOUND", "bounded_scores", "score_dtype", "subkey_scores", "product_topk",
    "search", "brute_force_search",
]

# slots i1 * num_keys + i2 lie below num_keys ** 2 <= 2 ** 32: the 32 index bits of the keyed top-k and
# of the Triton kernel's packed keys (which takes up to 46340, and hands larger tables to torch)
MAX_NUM_KEYS = 2**16


def check_num_keys(num_keys: int) -> None:
    """``ValueError`` for ``num_keys`` past :data:`MAX_NUM_KEYS`, the limit of every backend."""
    if num_keys > MAX_NUM_KEYS:
        raise ValueError(
            f"num_keys must be at most {MAX_NUM_KEYS} (num_keys ** 2 = {num_keys ** 2} slots; every backend "
            f"holds a slot in 32 bits), got num_keys={num_keys}"
        )

TopkFn = Callable[[Tensor, int], Tuple[Tensor, Tensor]]


def score_dtype(*tensors: Union[Tensor, torch.dtype]) -> torch.dtype:
    """The dtype scores are computed in, for queries and keys (tensors or dtypes): never below
    float32; float64 stays float64 (gradcheck). The one statement of the rule: every backend asks it."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t if isinstance(t, torch.dtype) else t.dtype)
    return dtype


SCORE_BOUND = 2.0**125  # twice it is still below float32's largest, 2 ** 128 - 2 ** 104


def bounded_scores(sub_scores: Tensor) -> Tensor:
    """Sub-key scores with NaN and ``-inf`` as ``-SCORE_BOUND``, ``+inf`` as ``SCORE_BOUND``, and every
    score clamped to ``[-SCORE_BOUND, SCORE_BOUND]``: the search's rule for non-finite inputs."""
    return sub_scores.clamp(-SCORE_BOUND, SCORE_BOUND).nan_to_num(nan=-SCORE_BOUND)


def subkey_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """``(..., heads, 2, dim_key)`` queries, ``(heads, 2, num_keys, dim_key)`` keys ->
    ``(..., heads, 2, num_keys)`` dot products, in float32 or float64, outside autocast."""
    dtype = score_dtype(queries, keys)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return torch.einsum("...hpd,hpkd->...hpk", queries.to(dtype), keys.to(dtype))


def product_topk(sub_scores: Tensor, topk: int, *, subkey_topk: Optional[TopkFn] = None) -> Tuple[Tensor, Tensor]:
    """The paper's two-stage search: the ``topk`` best sub-keys of each half, then the best
    ``topk`` of all ``topk ** 2`` sums. ``subkey_topk`` replaces the per-half selection
    (it must return values sorted best first)."""
    num_keys = sub_scores.shape[-1]
    select = stable_topk if subkey_topk is None else subkey_topk
    best, best_idx = select(bounded_scores(sub_scores), topk)
    (s1, s2), (i1, i2) = best.unbind(-2), best_idx.unbind(-2)
    grid = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., heads, topk * topk)
    grid_slots = (i1.unsqueeze(-1) * num_keys + i2.unsqueeze(-2)).flatten(-2)
    rank = torch.arange(1, topk + 1, device=grid.device)
    can_win = (rank.unsqueeze(-1) * rank.unsqueeze(-2) <= topk).flatten()  # (a + 1) * (b + 1) <= topk
    return stable_topk(grid[..., can_win], topk, grid_slots[..., can_win])


def search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """``pkm::search``: ``(N, heads, 2, dim_key)`` queries -> ``scores, slots`` ``(N, heads, topk)``."""
    return product_topk(subkey_scores(queries, keys), topk)


def brute_force_search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Scores every one of the ``num_keys ** 2`` slots and keeps the best ``topk``.

    What the two-stage search must equal; memory grows with ``num_keys ** 2``, so it is
    for tests and small tables only.
    """
    s1, s2 = bounded_scores(subkey_scores(queries, keys)).unbind(-2)  # (..., heads, num_keys)
    return stable_topk((s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2), topk)
