"""The tie-ruled top-k in fast PyTorch ops (no autograd through the values).

:func:`topk_keyed`: a float32 code of each value and its index share one int64 key, so a
single ``topk`` selects both and the values come back exactly from the key (float64 takes a
stable sort). :func:`topk_distinct_first`: rows whose ``k + 1`` best values are strictly
decreasing have one answer whatever the tie rule, so a plain ``topk`` gives it; only rows with
a tie (or a NaN) near the top take the keyed top-k (``topk`` ranks NaN first, so a row holding one is such a row).
Both equal :mod:`.reference`, NaN and inf included.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._buffers import outside_inference_mode

__all__ = ["topk_keyed", "topk_distinct_first"]

_LOW32 = (1 << 32) - 1
_NAN_CODE = -(2**31)  # the lowest int32, below -inf's code (-2**31 + 2**23 - 1); decodes to a NaN


def _order_code(x: Tensor) -> Tensor:
    """int64 codes of float32 ``x`` that order like the values (``-0.0`` equals ``+0.0``; every NaN
    one code below ``-inf``'s, :mod:`.reference`'s rule)."""
    x = (x if x.dtype == torch.float32 else x.float()) + 0.0  # + 0.0: -0.0 becomes +0.0
    bits = x.view(torch.int32)
    code = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return code.masked_fill_(x.isnan(), _NAN_CODE).long()


def _from_order_code(code: Tensor) -> Tensor:
    bits = code.int()
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)  # the map is its own inverse


def topk_distinct_first(x: Tensor, k: int, index: Optional[Tensor], wide: bool = False) -> Tuple[Tensor, Tensor]:
    """The tie-ruled top-k of float32 ``x`` ``(..., n)``, ``k < n``, ``x`` not empty: a plain ``topk``
    where no row has a tie near the top, :func:`topk_keyed` for the rows that have one. Returns
    ``values, indices`` ``(..., k)``; with ``wide`` they may hold one more column (the ``k + 1``-th
    best), for a caller that reads only the first ``k``: two slices fewer."""
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
    tied_values, tied_picked = topk_keyed(x.reshape(-1, n).index_select(0, rows), k, row_index)
    values = values.reshape(-1, k).index_copy(0, rows, tied_values).view(values.shape)
    picked = picked.reshape(-1, k).index_copy(0, rows, tied_picked).view(picked.shape)
    return values, picked


def topk_keyed(x: Tensor, k: int, index: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The tie-ruled top-k of float32 (or lower) ``x`` ``(..., n)`` by one ``topk`` over int64 keys:
    the order code of each value in the high word, the complement of its index in the low word.
    Returns ``values`` (in ``x``'s dtype) and ``indices``, ``(..., k)``."""
    low = _low_positions(x.shape[-1], x.device) if index is None else _LOW32 - index
    best = ((_order_code(x) << 32) | low).topk(k, dim=-1).values
    values = _from_order_code(best >> 32)  # float32, exactly the values picked
    return values if x.dtype == torch.float32 else values.to(x.dtype), _LOW32 - (best & _LOW32)


@functools.lru_cache(maxsize=64)
def _low_positions(n: int, device: torch.device) -> Tensor:
    # the low word of the key for index = position: three ops a call fewer in every sub-key top-k
    with outside_inference_mode():
        return _LOW32 - torch.arange(n, device=device)

