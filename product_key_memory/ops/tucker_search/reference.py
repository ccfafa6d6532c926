"""The TDQKR search of UltraMem (arXiv 2411.12364 sec. 3.2), written plainly: the specification.

Formulas from the official code, ZihaoHuang-notabot/Ultra-Sparse-Memory-Network at commit 041104b
(Apache-2.0), cited ``ultramem_layer.py:LINE`` for ``olmo/ultramem_layer.py``.

:func:`tucker_search` scores the whole candidate grid per core with one einsum and picks the
``topk`` by the summed score; :mod:`.torch_impl` computes the same with less memory traffic.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FIRST_STAGES", "tucker_search", "tucker_rank_one", "tucker_aux_loss", "kept"]

FIRST_STAGES = ("two_sided", "top")


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


def kept(s: Tensor, m: int, first_stage: str) -> Tensor:
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
    """The specification of the entry :func:`product_key_memory.ops.tucker_search.tucker_search` (the same
    arguments and results), written plainly."""
    heads, _, r, num_keys, d = keys.shape
    lead = queries.shape[:-3]
    q = queries.reshape(-1, heads, 2, d)  # (N, H, 2, d)
    sub = torch.einsum("nhtd,htrkd->nhtkr", q, keys)  # (N, H, 2, K, r): every sub-key set's scores
    sub = sub if sub.dtype == torch.float64 else sub.float()
    rows, cols = sub[:, :, 0], sub[:, :, 1]  # (N, H, K, r)
    u, v = tucker_rank_one(core)
    u, v = u.to(sub.dtype), v.to(sub.dtype)
    ri = kept(torch.einsum("nhkr,hr->nhk", rows.detach(), u), candidates, first_stage)  # (N, H, M)
    ci = kept(torch.einsum("nhkr,hr->nhk", cols.detach(), v), candidates, first_stage)
    m = ri.shape[-1]
    rs = rows.gather(2, ri.unsqueeze(-1).expand(-1, -1, -1, r))  # (N, H, M, r)
    cs = cols.gather(2, ci.unsqueeze(-1).expand(-1, -1, -1, r))
    per_core = torch.einsum("nhir,chrs,nhjs->nhijc", rs, core.to(sub.dtype), cs).flatten(2, 3)  # (N, H, M*M, C)
    _, pos = per_core.sum(-1).topk(topk, dim=-1)  # (N, H, k), best first
    slots = ri.gather(2, pos // m) * num_keys + ci.gather(2, pos % m)
    scores = per_core.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, core.shape[0]))  # (N, H, k, C)
    return scores.view(*lead, heads, topk, core.shape[0]), slots.view(*lead, heads, topk)
