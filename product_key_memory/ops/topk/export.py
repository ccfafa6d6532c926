"""The tie-ruled top-k in ops that ``torch.export`` traces and the ONNX exporter translates.

PyTorch's ``topk`` alone breaks ties its own way, and ONNX has no stable sort, so the rule
(on equal values the lower index wins) is built from plain comparisons and ``topk`` calls
whose ties cannot matter. Finite values (and ``±inf``) only: NaN, which :mod:`.reference` ranks
last, is not ranked here (``topk`` puts it first and ``==`` never matches it); exported searches
bound their scores first, so none reaches this.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["topk_lower_index"]


def topk_lower_index(x: Tensor, k: int, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`..reference.topk_lower_index` in exportable ops. ``index`` values must be distinct
    within a row (the slots of a search are)."""
    if index is not None:
        # put the row in index order first, so the lower position is the lower index
        by_index = (-index).topk(index.shape[-1], dim=-1).indices  # ascending index (distinct: exact)
        x, index = x.gather(-1, by_index), index.gather(-1, by_index)
    values, pos = _by_position(x, k)
    return values, (pos if index is None else index.gather(-1, pos))


def _by_position(x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    n = x.shape[-1]
    kth = x.topk(k, dim=-1).values[..., -1:]  # the k-th best value, whatever the ties
    above, tied = x > kth, x == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied values fit, lowest index first
    chosen = above | (tied & (tied.cumsum(-1) <= room))  # exactly k per row
    position = torch.arange(n, 0, -1, device=x.device)  # n - i: larger for lower i, and distinct
    index = torch.where(chosen, position, 0).topk(k, dim=-1).indices  # the chosen, by ascending index
    values = x.gather(-1, index)
    # place each by the chosen that beat it: a higher value, or an equal one at a lower index (earlier here)
    v_i, v_j = values.unsqueeze(-1), values.unsqueeze(-2)
    earlier = torch.ones(k, k, dtype=torch.bool, device=x.device).tril(-1)  # [i, j]: j before i
    rank = ((v_j > v_i) | ((v_j == v_i) & earlier)).sum(-1)  # (..., k), a permutation of 0..k-1
    return values.scatter(-1, rank, values), index.scatter(-1, rank, index)
