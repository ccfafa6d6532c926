"""KNN memory: keys and values seen earlier, retrieved by nearest-neighbour search (Wu et al. 2022, arXiv 2203.08913).

:class:`KNNMemory` keeps the API of ``memorizing-transformers-pytorch`` 0.4.1 (``add``, ``search``, ``clear``,
``at_batch_indices``) on torch tensors: one ring buffer per index (batch row), exact inner-product search
(:func:`exact_search`: on CPU, bf16 candidate scores certified and rescored in fp32), and two approximate
backends: an inverted-file index on torch tensors (:class:`IVFIndex`) and Faiss.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .._checks import check_positive_int
from ..ops import topk_lower_index

__all__ = ["KNNMemory", "KNNMemoryList", "exact_search"]

BACKENDS = ("exact", "ivf", "faiss")


GROUP_SIZE = 16
SCORE_BUDGET = 1 << 23  # scores held at once by the default chunking (32 MiB of float32; measured best)


# bf16 candidate scores (see exact_search): unit roundoff of bf16, the bound's factor, the widths it holds for
BF16_UNIT = 2.0 ** -9
BF16_EPS = 4 * BF16_UNIT
BF16_MAX_DIM = 256
SEARCH_CHUNK = 8192  # memories scored at once by the candidate paths (CPU, float32 keys)
SEARCH_BUDGET = 1 << 23  # their scores held at once (16 MiB in bf16, 32 MiB in fp32)


def bf16_search_available(device: torch.device, dtype: torch.dtype, dim: int) -> bool:
    """Whether :func:`exact_search` takes bf16 candidate scores for these keys (CPU with bf16 matmul, float32)."""
    return (device.type == "cpu" and dtype == torch.float32 and dim <= BF16_MAX_DIM
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def exact_search(
    queries: Tensor, keys: Tensor, count: Tensor, topk: int, chunk_size: Optional[int] = None,
    rows: Optional[Tensor] = None, *, precision: str = "auto", keys_bf16: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact inner-product top-k of ``queries (b, m, d)`` over the first ``count[i]`` of ``keys (b, s, d)`` per row.

    ``precision``: ``"auto"`` (default) takes the bf16 candidate path below where
    :func:`bf16_search_available` (CPU with bf16 matmul, float32 keys, ``d <= 256``), else ``"fp32"``;
    ``"bf16"`` forces it (CPU only), ``"fp32"`` the full-precision path. Both return the same answer.
    On CPU float32 keys without ``chunk_size`` the fp32 path is the candidate path below with fp32 scores
    (``E = 0``; the candidates' scores are the answer's) and queries whose certificate fails (an exact tie
    at the boundary) take the grouped search; elsewhere (CUDA, other dtypes, a ``chunk_size``) the grouped
    search is the whole of it, with no host synchronisation. The candidate paths read ``count.min()`` and the
    certificates on the host.

    bf16 path: queries and keys are rounded to bf16 (``keys_bf16``, the same ``(b, s, d)`` keys already
    rounded, saves that pass), and scored ``SEARCH_CHUNK`` memories at a time by one bf16 matmul (fp32
    accumulation, bf16 result) into a reused buffer of at most ``SEARCH_BUDGET`` scores (the queries are split to
    hold that). With unit roundoff ``u = 2**-9``, each approximate score ``s'`` of ``<q, k>`` obeys
    ``|s' - <q, k>| <= E = 4u * |q| * max|k'| * (1 + 4u)`` (``max|k'|`` over the row's bf16 keys): ``2u + u**2``
    from rounding ``q`` and ``k`` (``sum |q_i k_i| <= |q| |k|``), ``u`` from rounding the result, ``d * 2**-24``
    from fp32 accumulation (``<= u / 2`` for ``d <= 256``), and ``|k| <= |k'| / (1 - u)``. Per chunk the
    scores are reduced to maxima over ``GROUP_SIZE`` groups of slots ``j, j + c/16, ...`` (one elementwise pass);
    the members of the ``topk`` groups of highest maxima are kept, the best ``topk + 32`` of all chunks' kept
    members are rescored exactly in fp32 from ``keys``, and the exact tie-ruled top-k of those is the answer.
    It is the true top-k when ``U + E < kth``: ``U`` the highest approximate score of any live memory not
    rescored (the best group not kept, the best member dropped), ``kth`` the exact ``topk``-th score found;
    no memory outside could then reach it. Queries where that does not hold (near-ties wider than the bound)
    are searched again by the fp32 path, so the answer is always the fp32 one.

    With ``rows (b,)``, query row ``i`` searches ``keys[rows[i]]``. Returns ``scores (b, m, topk)``, ``slots (b,
    m, topk)`` (positions in ``keys``) and ``mask (b, m, topk)``, False where row ``i`` holds fewer than ``topk``
    keys (those slots are 0, scores ``-inf``). Sorted by score, ties to the lower slot. The grouped search and
    ``chunk_size``: see ``_exact_search_fp32``.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    use_bf16 = precision == "bf16" or (
        precision == "auto" and bf16_search_available(keys.device, keys.dtype, keys.shape[-1]))
    if use_bf16 and keys.device.type != "cpu":
        raise ValueError(f"precision='bf16' runs on CPU only (its re-search is host-side), got {keys.device}")
    if keys.device.type == "cpu" and keys.dtype == torch.float32 and chunk_size is None:
        return _exact_search_candidates(queries, keys, count, topk, rows, keys_bf16, use_bf16)
    return _exact_search_fp32(queries, keys, count, topk, chunk_size, rows)


def _exact_search_fp32(
    queries: Tensor, keys: Tensor, count: Tensor, topk: int, chunk_size: Optional[int] = None,
    rows: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`exact_search`'s grouped search, in the keys' precision.

    With ``rows (b,)``, query row ``i`` searches ``keys[rows[i]]`` (a chunk at a time, not copying ``keys``).

    Returns ``scores (b, m, topk)``, ``slots (b, m, topk)`` (positions in ``keys``) and ``mask (b, m, topk)``,
    False where row ``i`` holds fewer than ``topk`` keys (those slots are 0, scores ``-inf``). Sorted by score,
    ties to the lower slot. Keys are scored ``chunk_size`` at a time (default: as many as keep ``b * m *
    chunk_size`` under 2**23, at least 1024; where even that is over, the queries are split as well) by one
    batched matmul each; no host synchronisation, so it runs as queued work.

    Per chunk, the only full pass over the scores besides the matmul is a max over groups of ``GROUP_SIZE``
    consecutive slots. The top-k memories lie in the ``topk`` best groups (by max, ties to the lower group:
    a group ranked below ``topk`` others has, in each of them, a memory that beats all of its own), so
    the exact, tie-ruled :func:`~product_key_memory.ops.topk_lower_index` runs only on group maxima and on
    the ``topk * GROUP_SIZE`` memories of the chosen groups, merged with the running best of earlier chunks.
    """
    b, m, _ = queries.shape
    device, g = queries.device, GROUP_SIZE
    if chunk_size is None:
        if b * m * 64 * g > SCORE_BUDGET and m > 1:  # even the smallest chunk of memories is over budget:
            step = max(1, SCORE_BUDGET // (b * 64 * g))  # split the queries too, so the bound holds
            parts = [_exact_search_fp32(queries[:, i:i + step], keys, count, topk, None, rows) for i in range(0, m, step)]
            return tuple(torch.cat(p, 1) for p in zip(*parts))
        chunk_size = max(64 * g, SCORE_BUDGET // max(1, b * m) // g * g)
    # memories past count[i] are masked on the group maxima and on the candidates only; the one group a row's
    # count cuts may then look better than it is, so one more group is kept (it can displace at most one)
    count = count[:, None, None]  # (b, 1, 1)
    best = torch.full((b, m, 0), float("-inf"), device=device)
    best_slots = torch.zeros((b, m, 0), dtype=torch.int64, device=device)
    offsets = torch.arange(g, device=device)
    for start in range(0, keys.shape[1], chunk_size):
        chunk = keys[:, start:start + chunk_size] if rows is None else keys[rows, start:start + chunk_size]
        c = chunk.shape[1]
        scores = torch.bmm(queries, chunk.transpose(1, 2))  # (b, m, c)
        whole = c - c % g
        group_max = scores[..., :whole].unflatten(-1, (-1, g)).amax(-1)  # (b, m, c // g)
        if whole < c:
            group_max = torch.cat((group_max, scores[..., whole:].amax(-1, keepdim=True)), -1)
        first_slot = torch.arange(start, start + c, g, device=device)
        group_max = group_max.masked_fill(first_slot >= count, float("-inf"))
        _, groups = topk_lower_index(group_max, min(topk + 1, group_max.shape[-1]))  # (b, m, topk + 1)
        pos = (groups[..., None] * g + offsets).flatten(-2)  # (b, m, (topk + 1) * g), positions in the chunk
        cand = scores.gather(-1, pos.clamp(max=c - 1))
        cand = cand.to(torch.promote_types(cand.dtype, torch.float32))  # the codes of topk_lower_index: >= fp32
        cand = cand.masked_fill((pos >= c) | (pos + start >= count), float("-inf"))
        merged = torch.cat((best, cand), -1)
        best, best_slots = topk_lower_index(  # slots are positions in keys: no range check (no host sync)
            merged, min(topk, merged.shape[-1]), torch.cat((best_slots, pos + start), -1), index_bound=keys.shape[1]
        )
    if best.shape[-1] < topk:  # fewer keys than topk in all
        fill = topk - best.shape[-1]
        best = torch.cat((best, best.new_full((b, m, fill), float("-inf"))), -1)
        best_slots = torch.cat((best_slots, best_slots.new_zeros((b, m, fill))), -1)
    mask = (torch.arange(topk, device=device) < count).expand(b, m, topk)
    return best.to(queries.dtype), best_slots.masked_fill(~mask, 0), mask


def _exact_search_candidates(
    queries: Tensor, keys: Tensor, count: Tensor, topk: int, rows: Optional[Tensor], keys_bf16: Optional[Tensor],
    bf16: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`exact_search` on CPU float32 keys by candidates and a certificate (see there): scores in bf16
    (``bf16=True``, rescored in fp32, uncertified queries searched again with ``bf16=False``) or in fp32 (the
    candidates' scores are the answer's, ``E = 0``; uncertified queries, exact ties at the boundary, take the
    grouped fp32 search)."""
    b, m, d = queries.shape
    s, g = keys.shape[1], GROUP_SIZE
    if s == 0 or m == 0 or b == 0:
        return _exact_search_fp32(queries, keys, count, topk, None, rows)
    q = queries.float()
    low = (keys_bf16 if keys_bf16 is not None else keys.bfloat16()) if bf16 else keys
    if rows is not None:
        low = low[rows]  # (b, s, d), the rows in scope (copied); rescoring reads the fp32 keys in place
    row_ids = torch.arange(b) if rows is None else rows
    c = min(SEARCH_CHUNK, -(-s // g) * g)  # a multiple of g
    step = max(1, min(m, SEARCH_BUDGET // max(1, b * c)))  # queries per block
    if bf16:
        kmax = low.float().norm(dim=-1).amax(-1)  # (b,)
        bound = BF16_EPS * (1 + BF16_EPS) * q.norm(dim=-1) * kmax[:, None]  # (b, m): E of each query
    else:
        bound = torch.zeros(b, m)
    count_min = int(count.min()) if b else 0
    live_from = count[:, None, None]  # (b, 1, 1)
    keep = topk + 32
    buf = torch.empty(b * step * c, dtype=torch.bfloat16 if bf16 else torch.float32)
    scores_out = torch.full((b, m, topk), float("-inf"))
    slots_out = torch.zeros((b, m, topk), dtype=torch.int64)
    certified = torch.ones((b, m), dtype=torch.bool)
    for q0 in range(0, m, step):
        qb = q[:, q0:q0 + step]
        mq = qb.shape[1]
        q16 = qb.bfloat16() if bf16 else qb
        dropped = torch.full((b, mq), float("-inf"))  # U: best approximate score not rescored
        cands, cand_slots = [], []
        for start in range(0, s, c):
            chunk = low[:, start:start + c]  # (b, c', d)
            cr = chunk.shape[1]
            cp = -(-cr // g) * g
            if cp != cr:  # the last chunk: zero keys, scored -inf below
                chunk = torch.cat((chunk, chunk.new_zeros(b, cp - cr, d)), 1)
            sc = buf[:b * mq * cp].view(b, mq, cp)
            torch.bmm(q16, chunk.transpose(1, 2), out=sc)  # (b, mq, cp)
            if start + cp > count_min:  # slots past a row's count (stale or padding) never compete
                sc.masked_fill_(torch.arange(start, start + cp) >= live_from, float("-inf"))
            w = cp // g
            group_max = sc.view(b, mq, g, w).amax(-2)  # (b, mq, w); group j: slots j, j + w, ...
            n = min(topk, w)
            top, groups = group_max.topk(min(n + 1, w), dim=-1)
            if n < w:
                dropped = torch.maximum(dropped, top[..., n].float())
            pos = (groups[..., :n, None] + torch.arange(0, cp, w)).flatten(-2)  # (b, mq, n * g)
            cands.append(sc.gather(-1, pos))
            cand_slots.append(pos + start)
        cand, cand_slot = torch.cat(cands, -1), torch.cat(cand_slots, -1)
        n = min(keep, cand.shape[-1])
        top, idx = cand.topk(min(n + 1, cand.shape[-1]), dim=-1)
        if n < cand.shape[-1]:
            dropped = torch.maximum(dropped, top[..., n].float())
        live = top[..., :n] > float("-inf")
        slot = cand_slot.gather(-1, idx[..., :n]).clamp(max=max(0, s - 1))  # (b, mq, n)
        if bf16:
            # a row at a time: index_select reads the (strided) buffer in place, 7x faster than keys[i, j]
            picked = torch.stack([keys[int(r)].index_select(0, slot[i].flatten()) for i, r in enumerate(row_ids)])
            exact = torch.einsum("bqnd,bqd->bqn", picked.view(b, mq, n, d), qb)
            exact = exact.masked_fill(~live, float("-inf"))
        else:
            exact = top[..., :n]
        if n < topk:
            exact = torch.cat((exact, exact.new_full((b, mq, topk - n), float("-inf"))), -1)
            slot = torch.cat((slot, slot.new_zeros((b, mq, topk - n))), -1)
        best, best_slot = topk_lower_index(exact, topk, slot, index_bound=max(1, s))  # slot < s
        ok = (dropped + bound[:, q0:q0 + step] < best[..., -1]) | (dropped == float("-inf"))
        scores_out[:, q0:q0 + mq], slots_out[:, q0:q0 + mq], certified[:, q0:q0 + mq] = best, best_slot, ok
    if not bool(certified.all()):  # near-ties within the bound: those queries again, in fp32
        for i in range(b):
            redo = (~certified[i]).nonzero().flatten()
            if len(redo):
                args = (q[i:i + 1, redo], keys, count[i:i + 1], topk)
                sc_i, sl_i, _ = _exact_search_candidates(*args, row_ids[i:i + 1], None, False) if bf16 else \
                    _exact_search_fp32(*args, None, row_ids[i:i + 1])
                scores_out[i, redo], slots_out[i, redo] = sc_i[0], sl_i[0]
    mask = (torch.arange(topk) < count[:, None, None]).expand(b, m, topk)
    return scores_out.to(queries.dtype), slots_out.masked_fill(~mask, 0), mask


class IVFIndex:
    r"""Inverted-file index over the rings of a :class:`KNNMemory`, on torch tensors (any device, no host copies).

    Per index (batch row) ``nlist`` centroids, learned by k-means (Lloyd, squared L2; 10 iterations from evenly
    spaced keys, 4 from the current centroids when relearned) from the row's live keys when its memory asks
    (:class:`KNNMemory` relearns as its memories turn over).
    Each buffer slot records the list of the key it holds (``list_of``), set when the slot is written: an
    overwritten slot leaves its old list with it, so the lists hold exactly the live memories.

    A search scores each query against its row's centroids (inner product), probes the ``nprobe`` best lists,
    scores the query against every live key of those lists in bf16 on CPU (fp32 elsewhere), and returns the
    ``topk`` best, ranked by those scores. Per row it reads the list sizes to the host once (a sync on CUDA);
    work is grouped by list, one matmul per probed list over the queries that probe it.
    """

    def __init__(self, num_indices: int, max_memories: int, dim: int, nlist: int, nprobe: int, train_size: int,
                 device: torch.device):
        self.nlist, self.nprobe, self.train_size, self.max_memories = nlist, nprobe, train_size, max_memories
        self.centroids = torch.zeros(num_indices, nlist, dim, device=device)
        self.list_of = torch.full((num_indices, max_memories + 1), -1, dtype=torch.int64, device=device)
        self.trained = [False] * num_indices  # host-side: decides which rows take the index

    @staticmethod
    def _nearest(x: Tensor, centroids: Tensor) -> Tensor:
        """Index of the nearest centroid (squared L2) of each of ``x (n, d)``."""
        return (x @ centroids.T - 0.5 * (centroids * centroids).sum(-1)).argmax(-1)

    def train(self, i: int, keys: Tensor, iters: Optional[int] = None) -> None:
        """Learn row ``i``'s centroids from ``keys (n, d)`` (its live keys, in slot order) and file them."""
        keys = keys.float()
        n = keys.shape[0]
        if self.trained[i]:  # relearning: start from the current centroids
            c, iters = self.centroids[i].clone(), iters or 4
        else:  # evenly spaced keys: deterministic, and spread over the row's history
            c, iters = keys[torch.linspace(0, n - 1, self.nlist, device=keys.device).long()].clone(), iters or 10
        for _ in range(iters):
            assign = self._nearest(keys, c)
            sums = torch.zeros_like(c).index_add_(0, assign, keys)
            sizes = torch.bincount(assign, minlength=self.nlist)[:, None]
            c = torch.where(sizes > 0, sums / sizes.clamp(min=1), c)  # an empty list keeps its centroid
        self.centroids[i] = c
        self.list_of[i].fill_(-1)
        self.list_of[i, :n] = self._nearest(keys, c)
        self.trained[i] = True

    def assign(self, rows: Tensor, keys: Tensor, slots: Tensor) -> None:
        """File ``keys (b, n, d)`` written to ``slots (b, n)`` of ``rows (b,)`` (slot ``max_memories``: dropped)."""
        scores = torch.bmm(keys.float(), self.centroids[rows].transpose(1, 2))
        scores = scores - 0.5 * (self.centroids[rows] ** 2).sum(-1)[:, None]
        self.list_of[rows[:, None].expand_as(slots), slots] = scores.argmax(-1)

    def search(self, i: int, queries: Tensor, keys: Tensor, count: int, topk: int, nprobe: int,
               keys_bf16: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Row ``i``: ``queries (m, d)`` over its first ``count`` ``keys (s, d)`` -> ``slots (m, topk)``, ``mask``.

        Per probed list, one matmul of the queries that probe it with its keys and the ``topk`` best of each
        (query, list) pair; then per query the ``topk`` best of its ``nprobe * topk``, best first.
        """
        m, d = queries.shape
        device, nlist, inf = queries.device, self.nlist, float("-inf")
        nprobe = min(nprobe, nlist)
        q = queries.float()
        probe = (q @ self.centroids[i].T).topk(nprobe, dim=-1).indices.flatten()  # (m * nprobe,)
        lists = self.list_of[i, :count]  # (count,)
        order = lists.argsort(stable=True)  # live slots grouped by list
        pair_order = probe.argsort(stable=True)  # (query, list) pairs grouped by list
        sizes = torch.stack([torch.bincount(x, minlength=nlist) for x in (lists, probe)]).tolist()  # one read
        if bf16_search_available(device, keys.dtype, d):
            grouped = (keys_bf16[:count] if keys_bf16 is not None else keys[:count].bfloat16()).index_select(0, order)
            qq = q.bfloat16()
        else:
            grouped, qq = keys[:count].float().index_select(0, order), q
        pair_query = pair_order // nprobe
        best = torch.full((m * nprobe, topk), inf, device=device)
        best_slot = torch.zeros((m * nprobe, topk), dtype=torch.int64, device=device)
        k0 = p0 = 0
        for nk, nq in zip(*sizes):
            if nk and nq:
                pairs = pair_order[p0:p0 + nq]
                v, j = (qq.index_select(0, pair_query[p0:p0 + nq]) @ grouped[k0:k0 + nk].T).topk(min(topk, nk), dim=-1)
                best[pairs, :v.shape[1]] = v.float()
                best_slot[pairs, :v.shape[1]] = order.index_select(0, (j + k0).flatten()).view(j.shape)
            k0, p0 = k0 + nk, p0 + nq
        v, j = best.view(m, nprobe * topk).topk(topk, dim=-1)
        mask = v > inf
        return best_slot.view(m, nprobe * topk).gather(-1, j).masked_fill(~mask, 0), mask


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or the 'faiss' extra: "
                          "pip install -e '.[faiss]' in a checkout of product-key-memory)") from err
    return faiss


class KNNMemory:
    r"""Per-row memories of ``(key, value)`` pairs with top-k inner-product search, as memorizing-transformers-pytorch.

    Each of ``num_indices`` indices (one per batch row) is a ring buffer of ``max_memories`` pairs: when it is
    full, :meth:`add` overwrites the oldest pairs, never more. Search is exact by default (:func:`exact_search`;
    any device, no host copies) and returns, per query, the ``topk`` memories of highest ``<query, key>`` in its
    row's index, best first, ties to the lower buffer slot. On a CPU with bf16 matmul the memory keeps a bf16
    copy of its keys (``dim * 2`` bytes per slot) for the search's candidate scores, written by :meth:`add`
    and :meth:`load_state_dict` (keys written into :attr:`buffer` directly are not copied there).

    Args:
        dim: width of keys, values and queries.
        max_memories: capacity of each index.
        num_indices: number of indices, usually the batch size.
        memmap_filename: ``None`` (default) keeps the buffer in memory. A path keeps it in that file, mapped
            into memory (CPU only; the file is overwritten); the peer's default wrote ``./knn.memory.memmap``.
        multiprocessing: accepted for compatibility with memorizing-transformers-pytorch; all rows are
            searched in one batched call, so there are no worker processes.

    Keyword-only args:
        backend: ``"exact"`` (default, every size and device): :func:`exact_search`. ``"ivf"`` (opt-in): an
            :class:`IVFIndex` per memory, approximate, on torch tensors: an index is searched exactly until
            ``ivf_train_size`` memories have been written to it; its centroids are then learned from its live
            keys, and learned again whenever the count written since its last :meth:`clear` reaches
            ``ivf_train_size``, then doubles (while ``< max_memories``), then grows by ``max_memories`` (the
            memories have turned over). :meth:`clear` keeps the centroids: the next document is filed in
            them until they are learned again. Reads list sizes to the host once
            per search and row, and counts once per :meth:`add` (syncs on CUDA). ``"faiss"``: per index a Faiss
            ``IndexIVFFlat`` (inner product) over the keys, ids = buffer slots, overwritten slots removed before
            re-adding, so eviction is FIFO as in the exact backend. Until an index holds ``faiss_train_size`` memories it is searched exactly; it is
            then trained on the keys it holds (centroids are kept across :meth:`clear`). Approximate; ties
            follow Faiss. Needs ``pip install faiss-cpu`` (the ``faiss`` extra).
        chunk_size: memories scored at once by the exact search's grouped path (given, it is taken on every
            device); its scores take ``rows * queries * chunk_size * 4`` bytes. Default ``None``: on CPU float32
            the candidate paths (``SEARCH_CHUNK`` memories, at most ``SEARCH_BUDGET`` scores at once), elsewhere
            as many as keep the scores under 32 MiB.
        faiss_nlist: inverted lists of each Faiss index (default ``sqrt(max_memories)``, at least 1).
        faiss_nprobe: lists searched per query (default ``faiss_nlist // 4``, at least 1: recall 0.80 on
            256,000 random unit keys of 64 dims, where IVF is at its worst; clustered keys do better).
        faiss_train_size: memories an index must hold before it is trained (default ``39 * faiss_nlist``).
        ivf_nlist: lists of each IVF index (default ``sqrt(max_memories) / 2``, at least 1).
        ivf_nprobe: lists probed per query (default ``ivf_nlist // 4``, at least 1).
        ivf_train_size: memories an index must hold before its first centroids (default ``16 * ivf_nlist``).
        device, dtype: of the buffer (default CPU, float32). Added memories are cast to ``dtype``; queries are
            cast to it for the search.

    Shape:
        - :meth:`add`: ``memories (b, n, 2, dim)`` (``[..., 0, :]`` keys, ``[..., 1, :]`` values), ``b`` the
          number of rows in scope (all indices, or those of :meth:`at_batch_indices`).
        - :meth:`search`: ``queries (b, ..., dim)`` -> ``key_values (b, ..., topk, 2, dim)`` (zeros where
          masked) and ``mask (b, ..., topk)``.

    Examples::

        >>> memory = KNNMemory(dim=64, max_memories=1024, num_indices=2)
        >>> memory.add(torch.randn(2, 512, 2, 64))
        >>> key_values, mask = memory.search(torch.randn(2, 8, 128, 64), topk=32)  # (2, 8, 128, 32, 2, 64)
        >>> with memory.at_batch_indices([1]):
        ...     memory.add(torch.randn(1, 16, 2, 64))
        >>> memory.clear([0])
    """

    def __init__(
        self,
        dim: int,
        max_memories: int = 16000,
        num_indices: int = 1,
        memmap_filename: Optional[str] = None,
        multiprocessing: bool = True,
        *,
        backend: str = "exact",
        chunk_size: Optional[int] = None,
        faiss_nlist: Optional[int] = None,
        faiss_nprobe: Optional[int] = None,
        faiss_train_size: Optional[int] = None,
        ivf_nlist: Optional[int] = None,
        ivf_nprobe: Optional[int] = None,
        ivf_train_size: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        for name, value in (("dim", dim), ("max_memories", max_memories), ("num_indices", num_indices)):
            check_positive_int(name, value)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if ivf_nlist is None:
            ivf_nlist = max(1, min(max_memories, round(math.sqrt(max_memories) / 2)))
        check_positive_int("ivf_nlist", ivf_nlist)
        if ivf_nprobe is None:
            ivf_nprobe = max(1, ivf_nlist // 4)
        check_positive_int("ivf_nprobe", ivf_nprobe)
        if ivf_train_size is None:
            ivf_train_size = min(max_memories, 16 * ivf_nlist)
        check_positive_int("ivf_train_size", ivf_train_size)
        if ivf_nlist > max_memories or ivf_train_size < ivf_nlist or ivf_train_size > max_memories:
            raise ValueError(f"ivf_nlist must be <= max_memories={max_memories} and ivf_train_size in "
                             f"[ivf_nlist={ivf_nlist}, max_memories], got ivf_nlist={ivf_nlist}, "
                             f"ivf_train_size={ivf_train_size}")
        if faiss_nlist is None:
            faiss_nlist = max(1, min(max_memories, int(math.sqrt(max_memories))))
        check_positive_int("faiss_nlist", faiss_nlist)
        if faiss_nprobe is None:
            faiss_nprobe = max(1, faiss_nlist // 4)
        check_positive_int("faiss_nprobe", faiss_nprobe)
        if faiss_train_size is None:
            faiss_train_size = min(max_memories, 39 * faiss_nlist)
        check_positive_int("faiss_train_size", faiss_train_size)
        if faiss_train_size < faiss_nlist or faiss_train_size > max_memories:
            raise ValueError(f"faiss_train_size must be in [faiss_nlist={faiss_nlist}, max_memories={max_memories}],"
                             f" got {faiss_train_size}")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
        device = torch.device(device if device is not None else "cpu")
        if memmap_filename is not None and device.type != "cpu":
            raise ValueError(f"memmap_filename needs a CPU buffer, got device={device}")
        self.dim, self.max_memories, self.num_indices = dim, max_memories, num_indices
        self.memmap_filename, self.multiprocessing = memmap_filename, multiprocessing
        self.backend, self.chunk_size = backend, chunk_size
        self.faiss_nlist, self.faiss_nprobe, self.faiss_train_size = faiss_nlist, faiss_nprobe, faiss_train_size

        # slot max_memories is a spare that takes the writes add() drops, so add() never needs a host sync
        shape = (num_indices, max_memories + 1, 2, dim)
        if memmap_filename is not None:
            self._storage = torch.from_file(str(memmap_filename), shared=True, size=math.prod(shape), dtype=dtype)
            self._storage = self._storage.view(shape).zero_()
        else:
            self._storage = torch.zeros(shape, dtype=dtype, device=device)
        self.write_pos = torch.zeros(num_indices, dtype=torch.int64, device=device)
        # the keys rounded to bf16, kept beside the buffer for the bf16 searches (CPU with bf16 matmul)
        self._keys_bf16 = torch.zeros(shape[:2] + (dim,), dtype=torch.bfloat16) \
            if backend in ("exact", "ivf") and bf16_search_available(device, dtype, dim) else None
        self.count = torch.zeros(num_indices, dtype=torch.int64, device=device)
        self._filled = 0  # host-side upper bound of count.max(): the search skips chunks no index has reached
        self._indexes: list = [None] * num_indices
        self.ivf_nlist, self.ivf_nprobe, self.ivf_train_size = ivf_nlist, ivf_nprobe, ivf_train_size
        self._ivf = IVFIndex(num_indices, max_memories, dim, ivf_nlist, ivf_nprobe, ivf_train_size, device) \
            if backend == "ivf" else None
        self._written = [0] * num_indices  # IVF: memories written per index since its clear (host-side)
        self._next_train = [ivf_train_size] * num_indices  # IVF: learn the centroids once _written reaches it
        if backend == "faiss":
            _faiss()
        self.set_scoped_indices(range(num_indices))

    @property
    def buffer(self) -> Tensor:
        """The memories, ``(num_indices, max_memories, 2, dim)``; slots ``[0, count[i])`` of index ``i`` are live."""
        return self._storage[:, :self.max_memories]

    @property
    def device(self) -> torch.device:
        return self._storage.device

    @property
    def dtype(self) -> torch.dtype:
        return self._storage.dtype

    # -- scope ------------------------------------------------------------------------------------------------

    def set_scoped_indices(self, indices: Iterable[int]) -> None:
        """Make :meth:`add` and :meth:`search` act on these indices (batch row ``j`` is index ``indices[j]``)."""
        indices = [int(i) for i in indices]
        if len(set(indices)) != len(indices) or not all(0 <= i < self.num_indices for i in indices):
            raise ValueError(f"batch indices must be distinct ints in [0, num_indices={self.num_indices}), "
                             f"got {indices}")
        self.scoped_indices = indices
        self._scope = torch.tensor(indices, dtype=torch.int64, device=self.device)

    @contextmanager
    def at_batch_indices(self, indices: Iterable[int]):
        """Context in which batch row ``j`` of :meth:`add` and :meth:`search` is index ``indices[j]``."""
        previous = self.scoped_indices
        self.set_scoped_indices(indices)
        try:
            yield self
        finally:
            self.set_scoped_indices(previous)

    def _check_rows(self, name: str, tensor: Tensor) -> None:
        if tensor.dim() < 2 or tensor.shape[0] != len(self.scoped_indices) or tensor.shape[-1] != self.dim:
            raise ValueError(f"{name} must be (b={len(self.scoped_indices)}, ..., dim={self.dim}) for the "
                             f"{len(self.scoped_indices)} indices in scope, got shape {tuple(tensor.shape)}")

    # -- writing ----------------------------------------------------------------------------------------------

    def clear(self, batch_indices: Union[int, Sequence[int], None] = None) -> None:
        """Empty the given indices (default: all of them); the others keep their memories.

        ``batch_indices``: an int, ints, an integer tensor of indices, or a bool tensor of shape
        ``(num_indices,)``, True for the indices to empty (a mask, not the indices 1 and 0).
        """
        if batch_indices is None:
            batch_indices = range(self.num_indices)
        elif isinstance(batch_indices, Tensor) and batch_indices.dtype == torch.bool:
            if batch_indices.shape != (self.num_indices,):
                raise ValueError(f"a bool batch_indices is a mask of shape (num_indices={self.num_indices},), got "
                                 f"shape {tuple(batch_indices.shape)}")
            batch_indices = batch_indices.nonzero().flatten().tolist()
        elif isinstance(batch_indices, Tensor):
            if batch_indices.is_floating_point() or batch_indices.is_complex():
                raise TypeError(f"batch_indices must be ints or a bool mask, got a {batch_indices.dtype} tensor")
            batch_indices = batch_indices.flatten().tolist()
        elif isinstance(batch_indices, int):
            batch_indices = [batch_indices]
        batch_indices = sorted({int(i) for i in batch_indices})
        if not all(0 <= i < self.num_indices for i in batch_indices):
            raise ValueError(f"batch_indices must be in [0, num_indices={self.num_indices}), got {batch_indices}")
        if not batch_indices:
            return
        rows = torch.tensor(batch_indices, dtype=torch.int64, device=self.device)
        self.count[rows] = 0
        self.write_pos[rows] = 0
        if len(batch_indices) == self.num_indices:
            self._filled = 0
        for i in batch_indices:
            if self._indexes[i] is not None:
                self._indexes[i].reset()  # keeps the trained centroids
            self._written[i], self._next_train[i] = 0, self.ivf_train_size

    @torch.no_grad()
    def clear_where(self, rows: Tensor) -> None:
        """Empty the indices in scope whose entry of ``rows (b,)`` (bool, batch rows) is True.

        :meth:`clear` for a mask computed on the device: the exact backend does it without a host sync.
        """
        if rows.shape != (len(self.scoped_indices),) or rows.dtype != torch.bool:
            raise ValueError(f"rows must be a bool tensor of shape ({len(self.scoped_indices)},), one per batch row "
                             f"in scope, got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.to(self.device)
        if self.backend in ("faiss", "ivf"):  # their bookkeeping is host-side
            self.clear([self.scoped_indices[j] for j in rows.nonzero().flatten().tolist()])
            return
        self.count[self._scope] = self.count[self._scope].masked_fill(rows, 0)
        self.write_pos[self._scope] = self.write_pos[self._scope].masked_fill(rows, 0)

    @torch.no_grad()
    def add(self, memories: Tensor, mask: Optional[Tensor] = None) -> None:
        """Append ``memories (b, n, 2, dim)`` to the indices in scope, overwriting the oldest when full.

        ``mask (b, n)`` bool, optional: only the True positions are written (padding, other documents).
        Memories are detached. Of more than ``max_memories`` new ones in a row, the last ``max_memories`` stay.
        """
        self._check_rows("memories", memories)
        if memories.dim() != 4 or memories.shape[2] != 2:
            raise ValueError(f"memories must be (b, n, 2, dim={self.dim}), got shape {tuple(memories.shape)}")
        b, n = memories.shape[:2]
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=self.device)
        elif mask.shape != (b, n) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(b, n)}, got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(self.device)
        memories = memories.detach().to(device=self.device, dtype=self.dtype)

        rank = mask.cumsum(-1) - 1  # (b, n): place of each written memory among its row's new ones
        total = mask.sum(-1)  # (b,)
        keep = mask & (rank >= (total - self.max_memories)[:, None])
        pos, count = self.write_pos[self._scope], self.count[self._scope]
        slots = torch.where(keep, (pos[:, None] + rank) % self.max_memories, self.max_memories)  # spare slot
        self._storage.index_put_((self._scope[:, None].expand(b, n), slots), memories)
        self.write_pos[self._scope] = (pos + total) % self.max_memories
        self.count[self._scope] = (count + total).clamp(max=self.max_memories)
        self._filled = min(self.max_memories, self._filled + n)
        if self._keys_bf16 is not None:
            self._keys_bf16.index_put_((self._scope[:, None].expand(b, n), slots), memories[..., 0, :].bfloat16())
        if self.backend == "faiss":
            self._faiss_add(memories, keep, slots)
        elif self.backend == "ivf":
            self._ivf_add(memories, slots, total)

    # -- reading ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def search(
        self,
        queries: Tensor,
        topk: int,
        nprobe: Optional[int] = None,
        increment_hits: bool = True,
        increment_age: bool = True,
        *,
        return_slots: bool = False,
    ):
        """The ``topk`` memories of largest inner product with each of ``queries (b, ..., dim)``, best first.

        Returns ``key_values (b, ..., topk, 2, dim)`` (zeros where masked) and ``mask (b, ..., topk)``, False
        where an index holds fewer than ``topk`` memories; with ``return_slots=True`` also the buffer slots
        ``(b, ..., topk)``. Results are detached.

        ``nprobe``: inverted lists searched per query by the Faiss backend for this call (default
        ``faiss_nprobe``); the exact backend has none to probe. ``increment_hits`` and ``increment_age`` are
        memorizing-transformers-pytorch's hit and age counters, which nothing in it reads back and which
        eviction here (oldest first) does not need: accepted so calls written for it run, and change nothing.
        """
        check_positive_int("topk", topk)
        if nprobe is not None:
            check_positive_int("nprobe", nprobe)
        self._check_rows("queries", queries)
        lead = queries.shape[:-1]
        q = queries.detach().reshape(lead[0], -1, self.dim).to(device=self.device, dtype=self.dtype)  # (b, m, d)
        if self.backend == "faiss":
            slots, mask = self._faiss_search(q, topk, self.faiss_nprobe if nprobe is None else nprobe)
        elif self.backend == "ivf":
            slots, mask = self._ivf_search(q, topk, self.ivf_nprobe if nprobe is None else nprobe)
        else:
            slots, mask = self._exact(q, topk, self._scope, list(range(q.shape[0])))
        # a slot past its index's count holds no live memory, whatever the scores said (a NaN query ranks
        # every slot alike): never returned as valid
        mask = mask & (slots < self.count[self._scope][:, None, None])
        slots = slots.masked_fill(~mask, 0)
        flat = (self._scope[:, None, None] * (self.max_memories + 1) + slots).flatten()
        # index_select of (key, value) rows: several times faster than storage[rows, slots] on CPU
        key_values = self._storage.view(-1, 2, self.dim).index_select(0, flat).view(*slots.shape, 2, self.dim)
        key_values = key_values * mask[..., None, None]  # (b, m, topk, 2, d)
        out_device = queries.device
        key_values = key_values.reshape(*lead, topk, 2, self.dim).to(out_device)
        mask = mask.reshape(*lead, topk).to(out_device)
        if return_slots:
            return key_values, mask, slots.reshape(*lead, topk).to(out_device)
        return key_values, mask

    def _scope_is_all(self) -> bool:
        return self.scoped_indices == list(range(self.num_indices))

    def _exact(self, q: Tensor, topk: int, rows: Tensor, batch_rows: list) -> tuple[Tensor, Tensor]:
        """Exact search of ``q[batch_rows]`` in the indices ``rows``."""
        keys = self._storage[:, :self._filled, 0]  # (num_indices, filled, d)
        low = None if self._keys_bf16 is None else self._keys_bf16[:, :self._filled]
        whole = len(batch_rows) == self.num_indices and self._scope_is_all()
        qq = q if len(batch_rows) == q.shape[0] else q[batch_rows]
        _, slots, mask = exact_search(qq, keys, self.count[rows], topk, self.chunk_size, None if whole else rows,
                                      keys_bf16=low)
        return slots, mask

    # -- ivf backend ------------------------------------------------------------------------------------------

    def _ivf_add(self, memories: Tensor, slots: Tensor, total: Tensor) -> None:
        ivf = self._ivf
        trained = [row for row, i in enumerate(self.scoped_indices) if ivf.trained[i]]
        if trained:
            rows = torch.tensor(trained, device=self.device)
            ivf.assign(self._scope[rows], memories[rows, :, 0], slots[rows])
        written = total.tolist()
        counts = self.count[self._scope].tolist()
        for row, i in enumerate(self.scoped_indices):
            self._written[i] += written[row]
            # learn when an index first holds ivf_train_size memories, then whenever the memories written since
            # its clear double (while it fills) or reach max_memories more (once full: they have turned over)
            if self._written[i] >= self._next_train[i]:
                ivf.train(i, self._storage[i, :counts[row], 0])
                w = self._written[i]
                self._next_train[i] = 2 * w if w < self.max_memories else w + self.max_memories

    def _ivf_search(self, q: Tensor, topk: int, nprobe: int) -> tuple[Tensor, Tensor]:
        b, m, _ = q.shape
        slots = torch.zeros((b, m, topk), dtype=torch.int64, device=self.device)
        mask = torch.zeros((b, m, topk), dtype=torch.bool, device=self.device)
        exact_rows = [row for row, i in enumerate(self.scoped_indices) if not self._ivf.trained[i]]
        if exact_rows:
            s, k = self._exact(q, topk, self._scope[exact_rows], exact_rows)
            slots[exact_rows], mask[exact_rows] = s, k
        counts = self.count[self._scope].tolist()
        for row, i in enumerate(self.scoped_indices):
            if self._ivf.trained[i]:
                low = None if self._keys_bf16 is None else self._keys_bf16[i]
                slots[row], mask[row] = self._ivf.search(i, q[row], self._storage[i, :, 0], counts[row], topk,
                                                         nprobe, low)
        return slots, mask

    # -- faiss backend ----------------------------------------------------------------------------------------

    def _new_faiss_index(self):
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.faiss_nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(self.faiss_nprobe, self.faiss_nlist)
        return index

    def _faiss_add(self, memories: Tensor, keep: Tensor, slots: Tensor) -> None:
        import numpy as np

        counts = self.count[self._scope].tolist()
        for row, i in enumerate(self.scoped_indices):
            index = self._indexes[i]
            if index is None or not index.is_trained:
                if counts[row] >= self.faiss_train_size:
                    self._faiss_build(i)  # trains on, and adds, everything index i holds
                continue
            written = keep[row].cpu()
            ids = slots[row].cpu()[written].numpy().astype(np.int64)
            if len(ids) == 0:
                continue
            index.remove_ids(ids)  # the slots being overwritten: FIFO eviction
            keys = memories[row, :, 0][written.to(memories.device)].float().cpu().numpy()
            index.add_with_ids(np.ascontiguousarray(keys), ids)

    def _faiss_build(self, i: int) -> None:
        import numpy as np

        index = self._indexes[i] or self._new_faiss_index()
        count = int(self.count[i])
        keys = np.ascontiguousarray(self._storage[i, :count, 0].float().cpu().numpy())
        if not index.is_trained:
            index.train(keys)
        index.reset()
        index.add_with_ids(keys, np.arange(count, dtype=np.int64))
        self._indexes[i] = index

    def _faiss_search(self, q: Tensor, topk: int, nprobe: int) -> tuple[Tensor, Tensor]:
        slots, masks = [], []
        exact_rows = [row for row, i in enumerate(self.scoped_indices)
                      if self._indexes[i] is None or self._indexes[i].ntotal == 0]
        if exact_rows:  # untrained indices (few memories): exact search
            rows = self._scope[exact_rows]
            _, s, m = exact_search(q[exact_rows], self._storage[:, :self._filled, 0], self.count[rows], topk,
                                   self.chunk_size, rows)
            exact = dict(zip(exact_rows, zip(s, m)))
        for row, i in enumerate(self.scoped_indices):
            if row in exact_rows:
                s, m = exact[row]
            else:
                index = self._indexes[i]
                index.nprobe = min(nprobe, self.faiss_nlist)
                _, ids = index.search(q[row].float().cpu().numpy(), topk)
                ids = torch.from_numpy(ids).to(self.device)
                m = ids >= 0
                s = ids.clamp(min=0)
            slots.append(s)
            masks.append(m)
        return torch.stack(slots), torch.stack(masks)

    # -- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Memories, write positions, counts (and serialized Faiss indices): enough to resume a document."""
        state = {"buffer": self.buffer.clone(), "write_pos": self.write_pos.clone(), "count": self.count.clone()}
        if self.backend == "ivf":
            state["ivf"] = {"centroids": self._ivf.centroids.clone(), "list_of": self._ivf.list_of.clone(),
                            "trained": list(self._ivf.trained), "written": list(self._written),
                            "next_train": list(self._next_train)}
        if self.backend == "faiss":
            faiss = _faiss() if any(ix is not None for ix in self._indexes) else None
            state["faiss_indexes"] = [None if ix is None else torch.from_numpy(faiss.serialize_index(ix))
                                      for ix in self._indexes]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` of a memory of the same ``num_indices``, ``max_memories`` and ``dim``."""
        buffer = state["buffer"]
        if tuple(buffer.shape) != tuple(self.buffer.shape):
            raise ValueError(f"state buffer has shape {tuple(buffer.shape)}, this memory needs "
                             f"{tuple(self.buffer.shape)} (num_indices, max_memories, 2, dim)")
        self._storage[:, :self.max_memories].copy_(buffer)
        self.write_pos.copy_(state["write_pos"])
        self.count.copy_(state["count"])
        self._filled = int(self.count.max()) if self.num_indices else 0
        if self._keys_bf16 is not None:
            self._keys_bf16[:, :self.max_memories].copy_(buffer[..., 0, :])
        if self.backend == "ivf":
            saved = state.get("ivf")
            if saved is not None:
                self._ivf.centroids.copy_(saved["centroids"])
                self._ivf.list_of.copy_(saved["list_of"])
                self._ivf.trained = list(saved["trained"])
                self._written, self._next_train = list(saved["written"]), list(saved["next_train"])
            else:  # a state of another backend: learn the lists from the memories
                for i, count in enumerate(self.count.tolist()):
                    self._ivf.trained[i] = False
                    self._written[i], self._next_train[i] = count, self.ivf_train_size
                    if count >= self.ivf_train_size:
                        self._ivf.train(i, self._storage[i, :count, 0])
                        self._next_train[i] = 2 * count if count < self.max_memories else count + self.max_memories
        if self.backend == "faiss":
            saved = state.get("faiss_indexes") or [None] * self.num_indices
            faiss = _faiss()
            for i, blob in enumerate(saved):
                if blob is not None:
                    index = faiss.deserialize_index(blob.numpy())
                    index.nprobe = min(self.faiss_nprobe, self.faiss_nlist)
                    self._indexes[i] = index
                elif int(self.count[i]) >= self.faiss_train_size:
                    self._faiss_build(i)
                else:
                    self._indexes[i] = None

    def __repr__(self) -> str:
        extra = {"exact": "", "faiss": f", backend='faiss', faiss_nlist={self.faiss_nlist}",
                 "ivf": f", backend='ivf', ivf_nlist={self.ivf_nlist}, ivf_nprobe={self.ivf_nprobe}"}[self.backend]
        return (f"KNNMemory(dim={self.dim}, max_memories={self.max_memories}, num_indices={self.num_indices}"
                f"{extra}, device={self.device}, dtype={self.dtype})")


class KNNMemoryList(list):
    """The memories of a model's KNN layers, in block order (what ``TransformerLM.create_knn_memories`` returns)."""

    def __getitem__(self, item):
        got = super().__getitem__(item)
        return type(self)(got) if isinstance(item, slice) else got  # memories[1:3].clear() as the peer's

    def clear(self, batch_indices: Union[int, Sequence[int], None] = None) -> None:
        for memory in self:
            memory.clear(batch_indices)

    def clear_memory(self, batch_indices: Union[int, Sequence[int], None] = None,
                     memory_indices: Optional[Iterable[int]] = None) -> None:
        """memorizing-transformers-pytorch's name: clear ``batch_indices`` of the memories ``memory_indices``
        (default: all of them)."""
        memories = self if memory_indices is None else [self[i] for i in memory_indices]
        for memory in memories:
            memory.clear(batch_indices)

    @contextmanager
    def at_batch_indices(self, indices: Iterable[int]):
        indices = list(indices)
        with ExitStack() as stack:
            for memory in self:
                stack.enter_context(memory.at_batch_indices(indices))
            yield self

    def state_dict(self) -> list:
        return [memory.state_dict() for memory in self]

    def load_state_dict(self, states: list) -> None:
        if len(states) != len(self):
            raise ValueError(f"states holds {len(states)} memories, this list has {len(self)}")
        for memory, state in zip(self, states):
            memory.load_state_dict(state)
