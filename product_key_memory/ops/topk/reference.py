"""The tie-ruled top-k, written as plainly as PyTorch allows: the specification.

On equal values the lower index wins (a stable sort), in every op and on every backend.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

__all__ = ["topk_lower_index"]


def topk_lower_index(x: Tensor, k: int, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` largest of the last dim, best first; on equal values the lower ``index``
    (default: the position) comes first. Differentiable in ``x`` (a gather)."""
    if index is None:
        values, pos = x.sort(dim=-1, descending=True, stable=True)
        return values[..., :k], pos[..., :k]
    index, order = index.sort(dim=-1, stable=True)
    values, pos = x.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return values[..., :k], index.gather(-1, pos[..., :k])
