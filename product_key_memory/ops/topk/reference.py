"""The tie-ruled top-k, written as plainly as PyTorch allows: the specification.

The order, in every op and on every backend:

* larger values first; ``+inf`` and ``-inf`` rank as the largest and smallest numbers, and
  ``-0.0`` equals ``+0.0``;
* NaN ranks below every number, ``-inf`` included (a NaN score is no evidence of a match), and
  all NaNs are equal whatever their sign and payload (``torch.topk`` ranks NaN first instead);
* on equal values the lower index wins (a stable sort).

The KNN memory's search follows this rule as it is; the product-key search bounds its sub-key
scores first (:func:`..search.reference.bounded_scores`), so no NaN or inf reaches its top-k.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["topk_lower_index"]


def topk_lower_index(x: Tensor, k: int, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` largest of the last dim, best first; on equal values the lower ``index``
    (default: the position) comes first; NaN last (module docstring). Differentiable in ``x`` (a gather)."""
    if index is not None:
        index, order = index.sort(dim=-1, stable=True)
        x = x.gather(-1, order)  # in index order: the lower position is the lower index
    nan = x.isnan()
    # a stable descending sort with NaN as -inf, then a stable sort that moves the NaNs after the rest
    pos = torch.where(nan, float("-inf"), x).sort(dim=-1, descending=True, stable=True).indices
    pos = pos.gather(-1, nan.gather(-1, pos).to(torch.uint8).sort(dim=-1, stable=True).indices)[..., :k]
    return x.gather(-1, pos), (pos if index is None else index.gather(-1, pos))
