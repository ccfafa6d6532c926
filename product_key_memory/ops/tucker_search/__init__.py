"""UltraMem's Tucker-decomposed search (TDQKR, arXiv 2411.12364 sec. 3.2): :func:`tucker_search`, the
one entry, with :func:`tucker_rank_one` and :func:`tucker_aux_loss` of the same cores.

``tucker_search(queries, keys, core, topk, candidates=..., first_stage=...)``: half-queries
``(..., heads, 2, dim_head)``, ``rank`` sets of sub-keys ``(heads, 2, rank, num_keys, dim_head)`` and the
cores ``(cores, heads, rank, rank)`` -> each core's score of the ``topk`` chosen slots
``(..., heads, topk, cores)`` (float32, float64 for float64 input) and the slots ``(..., heads, topk)``.

Implementations: :mod:`.reference` (the specification) and :mod:`.torch_impl`. The entry routes:

* under a ``torch.func`` transform, or under ``use_backend("reference")`` in eager mode: :mod:`.reference`;
* otherwise (eager, ``torch.compile``, ``torch.export``, any device): :mod:`.torch_impl`.

No custom op: both implementations are plain differentiable torch ops (``bmm``, ``topk``, ``gather``),
which autograd, ``torch.compile``, ``torch.export`` and the ``torch.func`` transforms follow as they
are; the gradient flows through the ``topk`` chosen pairs only, so a hand-written backward would save
nothing, and there is no kernel to hide behind an opaque op yet.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..backend import backend_for, functorch_active
from . import reference, torch_impl
from .reference import FIRST_STAGES, tucker_aux_loss, tucker_rank_one

__all__ = ["FIRST_STAGES", "tucker_search", "tucker_rank_one", "tucker_aux_loss"]


def _use_reference(device: torch.device) -> bool:
    if functorch_active():
        return True
    # the switch is a ContextVar, which traced code cannot read: compiled graphs hold the fast ops
    return not torch.compiler.is_compiling() and backend_for(device) == "reference"


def tucker_search(
    queries: Tensor, keys: Tensor, core: Tensor, topk: int, *, candidates: int, first_stage: str = "two_sided"
) -> Tuple[Tensor, Tensor]:
    """The TDQKR search of :class:`~product_key_memory.parts.tucker.TuckerKeys`, stateless.

    Args:
        queries: ``(..., heads, 2, dim_head)``; keys: ``(heads, 2, rank, num_keys, dim_head)`` (as used:
            normalise them first); core: ``(cores, heads, rank, rank)``.
        topk, candidates, first_stage: as :class:`~product_key_memory.parts.tucker.TuckerKeys`.

    Returns:
        ``scores`` ``(..., heads, topk, cores)`` (float32, float64 for float64 input) and ``slots``
        ``(..., heads, topk)``, slot ``i * num_keys + j``, best first by the summed score.
    """
    impl = reference if _use_reference(queries.device) else torch_impl
    return impl.tucker_search(queries, keys, core, topk, candidates=candidates, first_stage=first_stage)
