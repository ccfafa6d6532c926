"""The TDQKR search in fewer, denser torch ops (the implementation :func:`..tucker_search` runs).

The same search as :mod:`.reference`, laid out head-major ``(heads, N, ...)`` so that every product is
one batched matmul over contiguous operands:

* the sub-key scores of all ``rank`` sets are one ``bmm`` per head and half, ``(N, d) @ (d, rank * K)``;
* the candidate grid is scored without a gradient, through the summed core (the selection
  only needs ``sum_c r_i^T C_c c_j = r_i^T (sum_c C_c) c_j``), one ``(M, r) @ (r, r) @ (r, M)``
  per token and head;
* only the ``topk`` chosen pairs are scored per core with a gradient, so the backward touches
  ``(N, heads, topk, cores)`` numbers instead of the whole ``(N, heads, M * M, cores)`` grid.

The summed-core grid rounds differently from the reference's sum of per-core grids (last-bit
differences): the chosen slots are the same unless two candidates' scores agree to rounding.
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor
import torch

from .reference import kept, tucker_rank_one

__all__ = ["tucker_search"]


def tucker_search(
    queries: Tensor, keys: Tensor, core: Tensor, topk: int, *, candidates: int, first_stage: str = "two_sided"
) -> Tuple[Tensor, Tensor]:
    """As :func:`.reference.tucker_search` (same arguments and returns)."""
    heads, _, r, num_keys, d = keys.shape
    cores = core.shape[0]
    lead = queries.shape[:-3]
    q = queries.reshape(-1, heads, 2, d).permute(1, 2, 0, 3).reshape(heads * 2, -1, d)  # (H*2, N, d)
    n = q.shape[1]
    sub = torch.bmm(q, keys.reshape(heads * 2, r * num_keys, d).transpose(1, 2))  # (H*2, N, r*K)
    sub = sub if sub.dtype == torch.float64 else sub.float()
    sub = sub.view(heads, 2, n, r, num_keys)
    rows, cols = sub[:, 0], sub[:, 1]  # (H, N, r, K)
    u, v = tucker_rank_one(core)
    u, v = u.to(sub.dtype), v.to(sub.dtype)
    with torch.no_grad():
        ri = kept(torch.einsum("hnrk,hr->hnk", rows, u), candidates, first_stage)  # (H, N, M)
        ci = kept(torch.einsum("hnrk,hr->hnk", cols, v), candidates, first_stage)
        m = ri.shape[-1]
        rs = rows.gather(3, ri.unsqueeze(2).expand(-1, -1, r, -1))  # (H, N, r, M)
        cs = cols.gather(3, ci.unsqueeze(2).expand(-1, -1, r, -1))
        total = core.sum(0).to(sub.dtype)  # (H, r, r)
        grid = torch.matmul(torch.matmul(rs.transpose(2, 3), total.unsqueeze(1)), cs)  # (H, N, M, M)
        pos = grid.view(heads, n, m * m).topk(topk, dim=-1).indices  # (H, N, k), best first
        i, j = ri.gather(2, pos // m), ci.gather(2, pos % m)  # (H, N, k): row and column of each pick
    rsel = rows.gather(3, i.unsqueeze(2).expand(-1, -1, r, -1))  # (H, N, r, k), with a gradient
    csel = cols.gather(3, j.unsqueeze(2).expand(-1, -1, r, -1))
    scores = torch.einsum("hnak,chab,hnbk->nhkc", rsel, core.to(sub.dtype), csel)  # (N, H, k, C)
    slots = (i * num_keys + j).transpose(0, 1)  # (N, H, k)
    return scores.reshape(*lead, heads, topk, cores), slots.reshape(*lead, heads, topk)
