"""The tie-ruled top-k (``x.topk(k)`` where equal values go to the lower index), used by the
search and the KNN memory. :func:`topk_lower_index` is the one entry; it routes:

* values that need a gradient, float64 without one, and under a ``torch.func`` transform:
  :mod:`.reference` (a stable sort);
* while ``torch.export`` traces: :mod:`.export` (ops the ONNX exporter translates);
* under ``torch.compile``: :func:`.torch_impl.topk_keyed` (score code and index in one int64 key;
  no data-dependent branch);
* an ``index`` outside ``[0, 2 ** 32)`` (eager): :mod:`.reference` (the keyed top-k holds an index
  in 32 bits; one ``aminmax`` of ``index`` asks);
* float32 on CPU: :func:`.torch_impl.topk_distinct_first` (a plain ``topk`` for rows without a tie
  near the top, the keyed top-k for the rest);
* otherwise: :func:`.torch_impl.topk_keyed`.

Every route returns the same values and indices as :mod:`.reference`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backend import functorch_active
from . import export, reference
from .torch_impl import topk_distinct_first, topk_keyed

__all__ = ["topk_lower_index"]


def topk_lower_index(
    x: Tensor, k: int, index: Optional[Tensor] = None, *, wide: bool = False, index_bound: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """``x.topk(k)`` along the last dim, best first, where equal values go to the lower index.

    Args:
        x: ``(..., n)`` float scores.
        k: how many to keep, ``<= n``.
        index: ``(..., n)`` ints, returned and compared on ties instead of the position (distinct
            within a row). Under ``torch.compile`` they must lie in ``[0, 2 ** 32)`` (a search's
            slots do: ``num_keys <= 65536``); eager calls take any int64.
        wide: the answer may hold ``k + 1`` columns (the first ``k`` are the answer), saving two
            slices for a caller that reads only the first ``k``.
        index_bound: a bound the caller guarantees, ``0 <= index < index_bound`` (a search's
            ``num_keys ** 2``); at most ``2 ** 32`` it spares the check of ``index``'s range (a read
            back to the host).

    Returns:
        ``values, indices``, both ``(..., k)`` (or ``k + 1`` with ``wide``). ``values`` carry a
        gradient when ``x`` does.
    """
    if torch.compiler.is_exporting():
        return export.topk_lower_index(x, k, index)
    if x.dtype == torch.float64 or (x.requires_grad and torch.is_grad_enabled()) or functorch_active():
        return reference.topk_lower_index(x, k, index)
    if torch.compiler.is_compiling():
        # no data-dependent branch in a graph, and positions made here: the cached ones are built
        # outside inference mode, which tracing cannot follow
        return topk_keyed(x, k, torch.arange(x.shape[-1], device=x.device) if index is None else index)
    unbounded = index_bound is None or index_bound > 2**32
    if index is not None and index.numel() > 0 and unbounded and not _fits_32_bits(index):
        return reference.topk_lower_index(x, k, index)
    if x.dtype == torch.float32 and x.device.type == "cpu" and k < x.shape[-1] and x.numel() > 0:
        return topk_distinct_first(x, k, index, wide)
    return topk_keyed(x, k, index)


def _fits_32_bits(index: Tensor) -> bool:
    lo, hi = index.aminmax()
    return bool((lo >= 0) & (hi < 2**32))  # one read back
