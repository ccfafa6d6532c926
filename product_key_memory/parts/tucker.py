"""Tucker-decomposed query-key retrieval (TDQKR, UltraMem, arXiv 2411.12364 sec. 3.2).

Formulas from the official code, ZihaoHuang-notabot/Ultra-Sparse-Memory-Network at commit 041104b
(Apache-2.0), cited below as ``ultramem_layer.py:LINE`` for ``olmo/ultramem_layer.py`` (UltraMem)
and ``ultramem_layer_v2.py:LINE`` for ``olmo/ultramem_layer_v2.py`` (UltraMemV2, arXiv 2508.18756).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_positive_float, check_positive_int

__all__ = ["TuckerKeys", "FIRST_STAGES", "tucker_search", "tucker_rank_one", "tucker_aux_loss"]

FIRST_STAGES = ("two_sided", "top")


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
        ``slots`` ``(..., heads, topk)`` (:func:`tucker_search` with the normalised sub-keys)."""
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


def _summed_core(core: Tensor) -> Tensor:
    total = core.sum(0)  # (H, r, r)
    return total if total.dtype == torch.float64 else total.float()


@torch.no_grad()
def tucker_rank_one(core: Tensor) -> Tuple[Tensor, Tensor]:
    """``u, v`` ``(heads, rank)``: the first left and right singular vectors of the summed cores
    ``core.sum(0)`` (``core``: ``(cores, heads, rank, rank)``), float32 (float64 stays float64).

    The official code refreshes them once per training step and flips their sign to follow the
    previous step (``ultramem_layer.py:144-169``); here they are computed on every call (an SVD of
    ``heads`` ``rank x rank`` matrices). ``"two_sided"`` does not depend on their sign; for ``"top"``
    the sign makes ``u`` sum to ``>= 0``.
    """
    U, _, Vh = torch.linalg.svd(_summed_core(core))
    u, v = U[..., 0], Vh[..., 0, :]
    sign = torch.where(u.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, v * sign


def tucker_aux_loss(core: Tensor, threshold: float = 0.15) -> Tensor:
    r"""``mean over heads and i >= 2 of relu(s_i - threshold) ** 2``, ``s_i`` the singular values of the
    summed cores (``ultramem_layer.py:147-152``): keeps the cores close to rank 1, where the first
    stage's approximation is exact. A scalar (0 for rank 1), differentiable in ``core``."""
    if core.shape[-1] == 1:
        return core.sum() * 0.0
    s = torch.linalg.svdvals(_summed_core(core))  # (H, r), descending
    return F.relu(s[..., 1:] - threshold).square().mean()


def _kept(s: Tensor, m: int, first_stage: str) -> Tensor:
    """Row (or column) ids kept for stage 2, ``(N, H, M)``, from their projected scores ``(N, H, K)``."""
    k = s.shape[-1]
    if first_stage == "top":
        return s.topk(m, dim=-1).indices
    if 2 * m >= k:  # both ends cover every row
        return torch.arange(k, device=s.device).expand(*s.shape[:-1], k)
    return torch.cat([s.topk(m, dim=-1).indices, s.topk(m, dim=-1, largest=False).indices], dim=-1)


def tucker_search(
    queries: Tensor, keys: Tensor, core: Tensor, topk: int, *, candidates: int, first_stage: str = "two_sided"
) -> Tuple[Tensor, Tensor]:
    """The TDQKR search of :class:`TuckerKeys`, stateless.

    Args:
        queries: ``(..., heads, 2, dim_head)``; keys: ``(heads, 2, rank, num_keys, dim_head)`` (as used:
            normalise them first); core: ``(cores, heads, rank, rank)``.
        topk, candidates, first_stage: as :class:`TuckerKeys`.

    Returns:
        ``scores`` ``(..., heads, topk, cores)`` (float32, float64 for float64 input) and ``slots``
        ``(..., heads, topk)``, slot ``i * num_keys + j``, best first by the summed score.
    """
    heads, _, r, num_keys, d = keys.shape
    lead = queries.shape[:-3]
    q = queries.reshape(-1, heads, 2, d)  # (N, H, 2, d)
    sub = torch.einsum("nhtd,htrkd->nhtkr", q, keys)  # (N, H, 2, K, r): every sub-key set's scores
    sub = sub if sub.dtype == torch.float64 else sub.float()
    rows, cols = sub[:, :, 0], sub[:, :, 1]  # (N, H, K, r)
    u, v = tucker_rank_one(core)
    u, v = u.to(sub.dtype), v.to(sub.dtype)
    ri = _kept(torch.einsum("nhkr,hr->nhk", rows.detach(), u), candidates, first_stage)  # (N, H, M)
    ci = _kept(torch.einsum("nhkr,hr->nhk", cols.detach(), v), candidates, first_stage)
    m = ri.shape[-1]
    rs = rows.gather(2, ri.unsqueeze(-1).expand(-1, -1, -1, r))  # (N, H, M, r)
    cs = cols.gather(2, ci.unsqueeze(-1).expand(-1, -1, -1, r))
    per_core = torch.einsum("nhir,chrs,nhjs->nhijc", rs, core.to(sub.dtype), cs).flatten(2, 3)  # (N, H, M*M, C)
    _, pos = per_core.sum(-1).topk(topk, dim=-1)  # (N, H, k), best first
    slots = ri.gather(2, pos // m) * num_keys + ci.gather(2, pos % m)
    scores = per_core.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, core.shape[0]))  # (N, H, k, C)
    return scores.view(*lead, heads, topk, core.shape[0]), slots.view(*lead, heads, topk)
