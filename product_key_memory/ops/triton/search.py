"""Product-key search: sub-key scores, per-half top-k, candidate pairs, final top-k in one kernel.

One program per ``(token, head)`` row. Every selection works on *packed* int64 keys
holding an order-preserving integer code of the fp32 score in the high 32 bits and
``2**31 - 1 - index`` in the low 32 bits: the largest key is the best (score descending,
index ascending), so the tie rule (lower index wins) comes for free, every key is
distinct, and the score decodes back exactly from the key. ``-0.0`` is folded into
``+0.0`` first (idea from Memory Layers at Scale's code: one sort returns both).

* Sub-key scores are computed ``BLOCK_K x BLOCK_D`` at a time (fp32 products and
  accumulation, int64 row offsets) into a vector of all ``K_P`` packed sub-keys of the
  half, held in registers (``K_P = next_power_of_2(num_keys)``: 1024 keys are 8 int64 per
  thread at 4 warps).
* Top-k is ``topk`` rounds of max extraction (:func:`_select_topk`): plain reductions,
  no ``tl.sort`` (whose compare-and-swap reduction the interpreter runs element by
  element in Python, 100x slower; on a GPU a bitonic sort is the alternative to time).
* The final top-k runs over the ``TOPK_P x TOPK_P`` grid of candidate sums with every
  pair ``(a + 1) * (b + 1) > topk`` masked to INT64_MIN (``functional.candidate_pairs``);
  the pruning stays exact under the lexicographic (score, -slot) order.

Reference: :func:`product_key_search_reference` (brute force over all ``num_keys ** 2`` slots
with the same tie rule).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton import check_device

__all__ = ["product_key_search", "product_key_search_reference"]

_MAX_INDEX = 2**31 - 1  # slots must fit below this in the low half of a packed key


@triton.jit
def _pack(score, index):
    """fp32 score, int index -> int64 key; larger key = higher score, then lower index."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 == +0.0
    bits = score.to(tl.int32, bitcast=True)
    code = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone signed code of the float
    return (code.to(tl.int64) << 32) | (2147483647 - index.to(tl.int64))


@triton.jit
def _unpack(key):
    code = (key >> 32).to(tl.int32)
    bits = code ^ ((code >> 31) & 0x7FFFFFFF)
    index = 2147483647 - (key & 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True), index


@triton.jit
def _lowest(shape: tl.constexpr):
    return tl.full(shape, 1, tl.int64) << 63  # INT64_MIN: below every packed key


@triton.jit
def _select_topk(keys, topk, N: tl.constexpr, TOPK_P: tl.constexpr):
    """The ``topk`` largest of ``N`` packed keys (all distinct but the INT64_MIN padding), best first.

    ``topk`` rounds of max extraction: cheap for the small ``topk`` of a memory layer, and
    only plain max reductions, which run at numpy speed under the interpreter (``tl.sort``
    does not). Entries ``topk..TOPK_P-1`` of the result are INT64_MIN.
    """
    offs = tl.arange(0, TOPK_P)
    out = _lowest((TOPK_P,))
    for j in range(0, topk):
        best = tl.max(keys, axis=0)
        out = tl.where(offs == j, best, out)
        keys = tl.where(keys == best, _lowest((N,)), keys)
    return out


@triton.jit
def _half_topk(
    q_ptr, k_ptr, stride_kk, K, D, topk,
    K_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TOPK_P: tl.constexpr,
):
    """The ``topk`` best packed (score, sub-key) keys of one query half, best first.

    Scores are computed ``BLOCK_K x BLOCK_D`` at a time and placed into the ``K_P`` vector
    of all sub-keys through a ``(K_P // BLOCK_K, BLOCK_K)`` view (Triton has no concat).
    """
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    blk_row = tl.arange(0, K_P // BLOCK_K)[:, None]
    keys = tl.reshape(_lowest((K_P,)), (K_P // BLOCK_K, BLOCK_K))
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            q = tl.load(q_ptr + dd, mask=dd < D, other=0.0).to(tl.float32)
            k = tl.load(
                k_ptr + kk.to(tl.int64)[:, None] * stride_kk + dd[None, :],
                mask=(kk[:, None] < K) & (dd[None, :] < D), other=0.0,
            ).to(tl.float32)
            acc += tl.sum(k * q[None, :], axis=1)
        blk = tl.where(kk < K, _pack(acc, kk), _lowest((BLOCK_K,)))
        keys = tl.where(blk_row == k0 // BLOCK_K, blk[None, :], keys)
    return _select_topk(tl.reshape(keys, (K_P,)), topk, K_P, TOPK_P)


@triton.jit
def _search_kernel(
    q_ptr, k_ptr, scores_ptr, idx_ptr,
    H, K, D, topk,
    stride_qn, stride_qh, stride_qp,
    stride_kh, stride_kp, stride_kk,
    K_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TOPK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # = n * H + h
    n = row // H
    h = row % H
    q_row = q_ptr + n * stride_qn + h * stride_qh
    k_head = k_ptr + h * stride_kh
    best1 = _half_topk(q_row, k_head, stride_kk, K, D, topk, K_P, BLOCK_K, BLOCK_D, TOPK_P)
    best2 = _half_topk(q_row + stride_qp, k_head + stride_kp, stride_kk, K, D, topk, K_P, BLOCK_K, BLOCK_D, TOPK_P)
    s1, i1 = _unpack(best1)
    s2, i2 = _unpack(best2)

    a = tl.arange(0, TOPK_P)[:, None]
    b = tl.arange(0, TOPK_P)[None, :]
    cand = (a + 1) * (b + 1) <= topk  # functional.candidate_pairs
    grid = _pack(s1[:, None] + s2[None, :], i1[:, None] * K + i2[None, :])
    grid = tl.where(cand, grid, _lowest((TOPK_P, TOPK_P)))
    best = _select_topk(tl.reshape(grid, (TOPK_P * TOPK_P,)), topk, TOPK_P * TOPK_P, TOPK_P)
    scores, slots = _unpack(best)

    offs = tl.arange(0, TOPK_P)
    out = row * topk + offs
    tl.store(scores_ptr + out, scores, mask=offs < topk)
    tl.store(idx_ptr + out, slots, mask=offs < topk)


def product_key_search(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """``(N, H, 2, d)`` queries, ``(H, 2, K, d)`` keys -> ``scores`` fp32, ``indices`` int64, ``(N, H, topk)``.

    Best first: score descending, then slot ``i1 * K + i2`` ascending. Any strides with a
    unit last stride (the module's keys are a transposed view; nothing is copied).
    """
    if queries.dim() != 4 or queries.shape[2] != 2:
        raise ValueError(f"queries must be (N, heads, 2, dim_key), got shape {tuple(queries.shape)}")
    if keys.dim() != 4 or keys.shape[1] != 2:
        raise ValueError(f"keys must be (heads, 2, num_keys, dim_key), got shape {tuple(keys.shape)}")
    N, H, _, D = queries.shape
    K = keys.shape[2]
    if keys.shape[0] != H or keys.shape[3] != D:
        raise ValueError(f"keys {tuple(keys.shape)} do not match queries {tuple(queries.shape)} (heads, dim_key)")
    if not 1 <= topk <= K:
        raise ValueError(f"topk must be in [1, num_keys={K}], got {topk}")
    if K * K > _MAX_INDEX:
        raise ValueError(f"num_keys={K} gives more than 2**31 - 1 slots, which a packed key cannot hold")
    check_device("search", _search_kernel, queries=queries, keys=keys)
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    scores = torch.empty(N, H, topk, dtype=torch.float32, device=queries.device)
    indices = torch.empty(N, H, topk, dtype=torch.int64, device=queries.device)
    if N == 0 or H == 0:
        return scores, indices
    k_p = triton.next_power_of_2(K)
    block_k = min(k_p, 128)
    block_d = min(triton.next_power_of_2(D), 64)
    _search_kernel[(N * H,)](
        queries, keys, scores, indices,
        H, K, D, topk,
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        K_P=k_p, BLOCK_K=block_k, BLOCK_D=block_d, TOPK_P=triton.next_power_of_2(topk),
        num_warps=4 if k_p <= 1024 else 8,
    )
    return scores, indices


def product_key_search_reference(queries: Tensor, keys: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Brute force over all ``K * K`` slots, ties to the lower slot: the specification."""
    q, k = queries.float(), keys.float()
    s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], k[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], k[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (N, H, K * K), slot order
    full = torch.where(full == 0, torch.zeros_like(full), full)  # -0.0 == +0.0
    order = full.sort(dim=-1, descending=True, stable=True).indices[..., :topk]
    return full.gather(-1, order), order
