"""Tucker-decomposed query-key retrieval (TDQKR, UltraMem, arXiv 2411.12364 sec. 3.2).

Formulas from the official code, ZihaoHuang-notabot/Ultra-Sparse-Memory-Network at commit 041104b
(Apache-2.0), cited below as ``ultramem_layer.py:LINE`` for ``olmo/ultramem_layer.py`` (UltraMem)
and ``ultramem_layer_v2.py:LINE`` for ``olmo/ultramem_layer_v2.py`` (UltraMemV2, arXiv 2508.18756).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_positive_float, check_positive_int
from ..ops.tucker_search import FIRST_STAGES, tucker_aux_loss, tucker_rank_one, tucker_search

# the search and its cores' functions live in ops/tucker_search; their names stay importable from here
__all__ = ["TuckerKeys", "FIRST_STAGES", "tucker_search", "tucker_rank_one", "tucker_aux_loss"]


class TuckerKeys(nn.Module):
    r"""Sub-keys scored through a rank-``rank`` Tucker core, and their two-stage search.

    Each head has ``rank`` sets of ``num_keys`` row sub-keys and as many column sub-keys. A
    half-query gives every row ``i`` a score vector ``r_i`` of ``rank`` dot products (one per set),
    and every column ``j`` likewise ``c_j``; slot ``i * num_keys + j`` scores
    ``sum_c r_i^T C_c c_j`` over the ``cores`` cores ``C_c`` (``rank x rank``), the exact TDQKR score
    (``ultramem_layer.py:218-233``; per-core scores kept for the value read, ``:241``).

    The search (``ultramem_layer.py:221-239``):

    1. the rank-1 approximation ``sum_c C_c ~ s u v^T`` (first singular vectors of the summed
       cores, ``ultramem_layer.py:144-150``) reduces each row to the scalar ``r_i . u`` and each column
       to ``c_j . v``;
    2. ``candidates`` rows and columns are kept on those scalars: with ``first_stage="two_sided"``
       (default) the ``candidates`` highest *and* the ``candidates`` lowest, with ``"top"`` only the
       highest (the official code, ``ultramem_layer.py:224-225``);
    3. the exact core scores of the candidate grid, and its ``topk`` best slots
       (``ultramem_layer.py:227-242``).

    With a rank-1 core the approximation is exact, and ``"two_sided"`` then finds exactly the
    ``topk`` best of all ``num_keys ** 2`` slots whenever ``candidates >= topk``, whatever the signs of
    the scores (a product ``a_i b_j`` with ``b_j < 0`` is largest for the lowest ``a_i``); ``"top"`` is
    exact only where the projected scores are non-negative. With ``rank > 1`` the search is approximate
    (``benchmarks/ultramem_recall.py`` measures its recall).

    Args:
        heads, num_keys, dim_head: sizes; ``topk``: slots chosen per head (``<= candidates ** 2``).

    Keyword-only args:
        rank: the Tucker rank ``r`` (``tucker_rank``, 2 in the official code).
        cores: Tucker cores per head (``tucker_multihead``, 2 in the official code).
        candidates: rows and columns kept per end in stage 2 (``topk`` by default, as
            ``ultramem_layer.py:224`` and ``ultramem_layer_v2.py:376``).
        first_stage: ``"two_sided"`` or ``"top"`` (see above).
        aux_threshold: ``tau`` of :meth:`aux_loss` (0.15, ``ultramem_layer.py:152``).
        device, dtype: factory kwargs.

    Attributes:
        keys: ``(heads, 2, rank, num_keys, dim_head)``; row sub-keys ``[:, 0]``, column ``[:, 1]``.
        core: ``(cores, heads, rank, rank)``.
        key_norm: ``nn.LayerNorm(dim_head)`` over every sub-key before scoring (``ultramem_layer.py:181``).

    Shape:
        - queries: ``(..., heads, 2, dim_head)``.
        - output: ``scores`` ``(..., heads, topk, cores)`` (each core's score of a slot; float32,
          float64 for float64 input) and ``slots`` ``(..., heads, topk)`` (long), best first by the
          summed score, ties as ``torch.topk``.
    """

    def __init__(
        self,
        heads: int,
        num_keys: int,
        dim_head: int,
        topk: int,
        *,
        rank: int = 2,
        cores: int = 1,
        candidates: Optional[int] = None,
        first_stage: str = "two_sided",
        aux_threshold: float = 0.15,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("heads", heads), ("num_keys", num_keys), ("dim_head", dim_head), ("topk", topk),
                            ("rank", rank), ("cores", cores)):
            check_positive_int(name, value)
        candidates = topk if candidates is None else candidates
        check_positive_int("candidates", candidates)
        if candidates > num_keys:
            raise ValueError(f"candidates must be at most num_keys={num_keys}, got candidates={candidates}")
        if topk > candidates**2:
            raise ValueError(f"topk must be at most candidates ** 2={candidates ** 2}, got topk={topk}")
        check_choice("first_stage", first_stage, FIRST_STAGES)
        check_positive_float("aux_threshold", aux_threshold)
        self.heads, self.num_keys, self.dim_head, self.topk = heads, num_keys, dim_head, topk
        self.rank, self.cores, self.candidates, self.first_stage = rank, cores, candidates, first_stage
        self.aux_threshold = float(aux_threshold)
        factory = {"device": device, "dtype": dtype}
        self.keys = nn.Parameter(torch.empty(heads, 2, rank, num_keys, dim_head, **factory))
        self.core = nn.Parameter(torch.empty(cores, heads, rank, rank, **factory))
        self.key_norm = nn.LayerNorm(dim_head, **factory)
        self.reset_parameters()

    @property
    def num_slots(self) -> int:
        return self.num_keys**2

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As ``ultramem_layer.py:111-127``: sub-keys ``N(0, 1 / dim_head)``, cores ``U(0, 1)``,
        the key norm's weight ``dim_head ** -0.33`` (bias 0)."""
        nn.init.normal_(self.keys, std=1.0 / math.sqrt(self.dim_head))
        nn.init.uniform_(self.core, 0.0, 1.0)
        nn.init.constant_(self.key_norm.weight, self.dim_head**-0.33)
        nn.init.zeros_(self.key_norm.bias)

    @torch.no_grad()
    def rank_one(self) -> Tuple[Tensor, Tensor]:
        """``u, v`` ``(heads, rank)`` of :func:`tucker_rank_one` for this part's cores."""
        return tucker_rank_one(self.core)

    def aux_loss(self) -> Tensor:
        """:func:`tucker_aux_loss` of this part's cores at ``aux_threshold``: a scalar to add to the loss."""
        return tucker_aux_loss(self.core, self.aux_threshold)

    def forward(self, queries: Tensor) -> Tuple[Tensor, Tensor]:
        """Queries ``(..., heads, 2, dim_head)`` -> ``scores`` ``(..., heads, topk, cores)``,
        ``slots`` ``(..., heads, topk)`` (:func:`~product_key_memory.ops.tucker_search.tucker_search`
        with the normalised sub-keys)."""
        return tucker_search(queries, self.key_norm(self.keys), self.core, self.topk, candidates=self.candidates,
                             first_stage=self.first_stage)

    def extra_repr(self) -> str:
        s = f"heads={self.heads}, num_keys={self.num_keys}, dim_head={self.dim_head}, topk={self.topk}"
        s += f", rank={self.rank}, cores={self.cores}"
        for name, value, default in (("candidates", self.candidates, self.topk),
                                     ("first_stage", self.first_stage, "two_sided"),
                                     ("aux_threshold", self.aux_threshold, 0.15)):
            if value != default:
                s += f", {name}={value!r}"
        return s
