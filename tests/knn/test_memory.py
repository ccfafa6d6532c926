"""KNNMemory: exact search equals brute force (tie rule included), FIFO ring buffers, scope, state, faiss recall."""

import pytest
import torch
from torch.testing import assert_close

from product_key_memory import KNNMemory
import product_key_memory.knn.memory as knn_module
from product_key_memory.knn.memory import GROUP_SIZE, KNNMemoryList, exact_search

from .._extras import importorskip


def brute_force(memory: KNNMemory, queries: torch.Tensor, topk: int, rows=None):
    """Per query: live slots sorted by (inner product desc, slot asc), the first topk; mask where they exist."""
    rows = range(memory.num_indices) if rows is None else rows
    slots, masks = [], []
    for b, i in enumerate(rows):
        count = int(memory.count[i])
        keys = memory.buffer[i, :count, 0]
        scores = queries[b].reshape(-1, memory.dim) @ keys.T  # (m, count)
        order = scores.sort(dim=-1, descending=True, stable=True).indices[:, :topk]
        s = torch.zeros(order.shape[0], topk, dtype=torch.long)
        s[:, :order.shape[1]] = order
        m = torch.arange(topk) < count
        slots.append(s)
        masks.append(m.expand(order.shape[0], topk))
    return torch.stack(slots), torch.stack(masks)


def stable_sort_topk(queries, keys, count, topk):
    """Per row: the first topk of (score desc, slot asc) over the live keys; scores -inf and slots 0 past count."""
    b, m, _ = queries.shape
    scores = torch.full((b, m, topk), float("-inf"), dtype=queries.dtype)
    slots = torch.zeros(b, m, topk, dtype=torch.long)
    for i in range(b):
        s, o = (queries[i] @ keys[i, :count[i]].T).sort(dim=-1, descending=True, stable=True)
        n = min(topk, int(count[i]))
        scores[i, :, :n], slots[i, :, :n] = s[:, :n], o[:, :n]
    return scores, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 7, GROUP_SIZE, 3 * GROUP_SIZE + 5])
def test_exact_search_ties_group_boundaries_and_counts(chunk_size, dtype):
    # small ints: many exact ties, also between group maxima; counts cut groups and chunks anywhere
    for trial in range(20):
        s = int(torch.randint(1, 6 * GROUP_SIZE, ()))
        queries, keys = torch.randint(0, 3, (3, 6, 4)).to(dtype), torch.randint(-2, 3, (3, s, 4)).to(dtype)
        count = torch.randint(0, s + 1, (3,))
        count[0] = s
        # stale memories past count (as after clear) score highest unless masked
        keys = torch.where(torch.arange(s)[:, None] >= count[:, None, None], torch.full_like(keys, 3), keys)
        topk = int(torch.randint(1, 2 * GROUP_SIZE + 3 if trial % 2 else 4, ()))
        scores, slots, mask = exact_search(queries, keys, count, topk, chunk_size)
        ref_scores, ref_slots = stable_sort_topk(queries, keys, count, topk)
        ref_mask = (torch.arange(topk) < count[:, None, None]).expand(3, 6, topk)
        msg = f"trial {trial}, s={s}, count={count.tolist()}, topk={topk}"
        assert torch.equal(mask, ref_mask), f"mask, {msg}"
        assert torch.equal(slots, ref_slots), f"slots (lower slot first on ties), {msg}"
        assert torch.equal(scores[mask], ref_scores[mask]) and scores.dtype == dtype, f"scores, {msg}"


def test_exact_search_scoped_rows_read_their_own_keys():
    keys, queries = torch.randn(4, 100, 8), torch.randn(2, 5, 8)
    rows, count = torch.tensor([3, 1]), torch.tensor([100, 60])
    _, slots, _ = exact_search(queries, keys, count, 9, chunk_size=33, rows=rows)
    _, ref, _ = exact_search(queries, keys[rows], count, 9)
    assert torch.equal(slots, ref)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 4096])
@pytest.mark.parametrize("topk", [1, 7, 40])
def test_exact_search_equals_brute_force_with_ties_across_chunks(chunk_size, topk):
    memory = KNNMemory(4, max_memories=30, num_indices=3, chunk_size=chunk_size)
    memory.add(torch.randint(-2, 3, (3, 45, 2, 4)).float())  # wraps: 15 oldest overwritten in every row
    with memory.at_batch_indices([2]):
        memory.add(torch.randint(-2, 3, (1, 4, 2, 4)).float())
    memory.clear([1])
    with memory.at_batch_indices([1]):
        memory.add(torch.randint(-2, 3, (1, 6, 2, 4)).float())  # row 1 holds 6 < topk=7 or 40
    queries = torch.randint(-2, 3, (3, 2, 5, 4)).float()  # small ints: many exact ties
    key_values, mask, slots = memory.search(queries, topk, return_slots=True)
    ref_slots, ref_mask = brute_force(memory, queries, topk)
    assert torch.equal(mask.reshape(3, -1, topk), ref_mask), "mask"
    assert torch.equal(slots.reshape(3, -1, topk), ref_slots), "slots (tie rule: lower slot first)"
    expected = memory.buffer[torch.arange(3)[:, None, None], ref_slots] * ref_mask[..., None, None]
    assert torch.equal(key_values.reshape(3, -1, topk, 2, 4), expected), "key_values, zero where masked"
    assert key_values.shape == (3, 2, 5, topk, 2, 4) and mask.shape == (3, 2, 5, topk)


def test_exact_search_function_on_random_floats():
    queries, keys = torch.randn(2, 9, 8), torch.randn(2, 50, 8)
    count = torch.tensor([50, 20])
    scores, slots, mask = exact_search(queries, keys, count, 10, chunk_size=7)
    for b in range(2):
        full = queries[b] @ keys[b, : count[b]].T
        ref = full.topk(10, dim=-1)
        assert_close(scores[b], ref.values)
        assert torch.equal(slots[b], ref.indices)
    assert mask.all()


def test_empty_memory_masks_everything():
    memory = KNNMemory(8, max_memories=16, num_indices=2)
    key_values, mask = memory.search(torch.randn(2, 3, 8), 4)
    assert not mask.any() and not key_values.any()
    memory.add(torch.randn(2, 2, 2, 8))
    _, mask = memory.search(torch.randn(2, 3, 8), 4)
    assert torch.equal(mask, (torch.arange(4) < 2).expand(2, 3, 4))


def test_ring_buffer_overwrites_only_the_oldest():
    memory = KNNMemory(2, max_memories=5, num_indices=2)
    ids = torch.arange(12.0)
    batches = [ids[:3], ids[3:7], ids[7:8], ids[8:12]]
    for batch in batches:
        memories = batch[None, :, None, None].expand(2, -1, 2, 2).clone()
        memory.add(memories)
    # 12 added, capacity 5: the last five (7..11) are held, in slots (7..11) % 5
    held = memory.buffer[0, :, 0, 0]
    assert torch.equal(held.sort().values, torch.arange(7.0, 12.0))
    assert torch.equal(held, torch.tensor([10.0, 11.0, 7.0, 8.0, 9.0]))
    assert memory.count.tolist() == [5, 5] and memory.write_pos.tolist() == [2, 2]
    memory.add(torch.arange(20.0)[None, :, None, None].expand(2, -1, 2, 2))  # more than capacity at once
    assert torch.equal(memory.buffer[0, :, 0, 0].sort().values, torch.arange(15.0, 20.0))


def test_add_mask_writes_only_the_true_positions_per_row():
    memory = KNNMemory(1, max_memories=4, num_indices=2)
    memories = torch.arange(6.0)[None, :, None, None].expand(2, 6, 2, 1).clone()
    mask = torch.tensor([[True, False, True, False, False, True], [False] * 6])
    memory.add(memories, mask)
    assert memory.count.tolist() == [3, 0]
    assert memory.buffer[0, :3, 0, 0].tolist() == [0.0, 2.0, 5.0]
    memory.add(memories, torch.tensor([[True] * 6, [False, True] * 3]))  # row 0 wraps past 4
    assert sorted(memory.buffer[0, :, 0, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
    assert memory.buffer[1, :3, 0, 0].tolist() == [1.0, 3.0, 5.0] and memory.count.tolist() == [4, 3]


def test_clear_and_at_batch_indices_touch_only_their_rows():
    memory = KNNMemory(4, max_memories=8, num_indices=3)
    memory.add(torch.randn(3, 5, 2, 4))
    before = memory.buffer.clone()
    with memory.at_batch_indices([2, 0]) as scoped:
        assert scoped is memory
        new = torch.randn(2, 2, 2, 4)
        memory.add(new)
        _, mask = memory.search(torch.randn(2, 1, 4), 8)
        assert mask.sum(-1).flatten().tolist() == [7, 7]
    assert memory.scoped_indices == [0, 1, 2]
    assert torch.equal(memory.buffer[2, 5:7], new[0]) and torch.equal(memory.buffer[0, 5:7], new[1])
    assert torch.equal(memory.buffer[1], before[1]) and memory.count.tolist() == [7, 5, 7]
    memory.clear([0, 2])
    assert memory.count.tolist() == [0, 5, 0]
    memory.clear(1)
    assert memory.count.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="batch indices"):
        with memory.at_batch_indices([0, 0]):
            pass
    with pytest.raises(ValueError, match="batch_indices"):
        memory.clear([3])
    with pytest.raises(ValueError, match="memories"):
        memory.add(torch.randn(2, 5, 2, 4))  # 3 rows in scope


def test_state_dict_round_trip_resumes_the_same_search(tmp_path):
    memory = KNNMemory(4, max_memories=6, num_indices=2, dtype=torch.float64)
    memory.add(torch.randn(2, 9, 2, 4, dtype=torch.float64))
    path = tmp_path / "memory.pt"
    torch.save(memory.state_dict(), path)
    resumed = KNNMemory(4, max_memories=6, num_indices=2, dtype=torch.float64,
                        memmap_filename=str(tmp_path / "buffer.mm"))
    resumed.load_state_dict(torch.load(path))
    new, queries = torch.randn(2, 3, 2, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    for m in (memory, resumed):
        m.add(new)
    a, b = memory.search(queries, 4), resumed.search(queries, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="max_memories"):
        KNNMemory(4, max_memories=7, num_indices=2).load_state_dict(memory.state_dict())


def test_memory_list_clears_scopes_and_saves_every_layer():
    memories = KNNMemoryList(KNNMemory(4, 8, 2) for _ in range(2))
    with memories.at_batch_indices([1]):
        for m in memories:
            m.add(torch.randn(1, 3, 2, 4))
    assert [m.count.tolist() for m in memories] == [[0, 3], [0, 3]]
    state = memories.state_dict()
    memories.clear()
    assert all(m.count.sum() == 0 for m in memories)
    memories.load_state_dict(state)
    assert [m.count.tolist() for m in memories] == [[0, 3], [0, 3]]


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(dim=0), "dim"), (dict(max_memories=-1), "max_memories"), (dict(num_indices=1.5), "num_indices"),
     (dict(backend="hnsw"), "backend"), (dict(chunk_size=0), "chunk_size"), (dict(dtype=torch.long), "dtype")],
)
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(dim=4, max_memories=8)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        KNNMemory(**args)


def test_bad_search_arguments():
    memory = KNNMemory(4, 8, 2)
    with pytest.raises(ValueError, match="topk"):
        memory.search(torch.randn(2, 3, 4), 0)
    with pytest.raises(ValueError, match="queries"):
        memory.search(torch.randn(2, 3, 5), 2)
    with pytest.raises(ValueError, match="mask"):
        memory.add(torch.randn(2, 3, 2, 4), torch.ones(2, 3))


@pytest.mark.cuda
def test_search_on_cuda_equals_cpu():
    cpu = KNNMemory(16, 300, 2, chunk_size=64)
    gpu = KNNMemory(16, 300, 2, chunk_size=64, device="cuda")
    memories, queries = torch.randn(2, 400, 2, 16), torch.randn(2, 4, 20, 16)
    cpu.add(memories)
    gpu.add(memories.cuda())
    a, b = cpu.search(queries, 32, return_slots=True), gpu.search(queries.cuda(), 32, return_slots=True)
    assert torch.equal(a[2], b[2].cpu()) and torch.equal(a[1], b[1].cpu())
    loaded = KNNMemory(16, 300, 2)
    loaded.load_state_dict(gpu.state_dict())
    assert torch.equal(loaded.buffer, cpu.buffer)


def test_faiss_backend_recall_and_fifo_eviction():
    importorskip("faiss")
    torch.manual_seed(0)
    memory = KNNMemory(16, max_memories=2000, num_indices=2, backend="faiss", faiss_nlist=16, faiss_nprobe=8)
    exact = KNNMemory(16, max_memories=2000, num_indices=2)
    queries = torch.randn(2, 50, 16)
    memory.add(torch.randn(2, 100, 2, 16))  # below faiss_train_size (624): exact search
    exact.load_state_dict(memory.state_dict())
    assert torch.equal(memory.search(queries, 8, return_slots=True)[2], brute_force(exact, queries, 8)[0])
    for _ in range(6):  # 2,500 added to 2,000 slots: the index is trained, then evicts FIFO
        memory.add(torch.randn(2, 400, 2, 16))
    assert [ix.ntotal for ix in memory._indexes] == [2000, 2000]
    exact.load_state_dict({k: v for k, v in memory.state_dict().items() if k != "faiss_indexes"})
    _, mask, slots = memory.search(queries, 8, return_slots=True)
    ref, _ = brute_force(exact, queries, 8)
    recall = sum(len(set(a) & set(b)) for a, b in zip(slots.reshape(-1, 8).tolist(), ref.reshape(-1, 8).tolist()))
    recall /= ref.numel()
    assert mask.all() and recall > 0.9, f"recall {recall:.2f}"
    # retrieved key_values are the buffer's live memories of the slots faiss returned
    key_values, _ = memory.search(queries, 8)
    assert torch.equal(key_values, memory.buffer[torch.arange(2)[:, None, None], slots])
    resumed = KNNMemory(16, max_memories=2000, num_indices=2, backend="faiss", faiss_nlist=16, faiss_nprobe=8)
    resumed.load_state_dict(memory.state_dict())
    assert torch.equal(resumed.search(queries, 8, return_slots=True)[2], slots)
    memory.clear([0])
    assert memory._indexes[0].ntotal == 0 and not memory.search(queries, 8)[1][0].any()


def test_exact_search_splits_the_queries_when_the_smallest_chunk_is_over_budget(monkeypatch):
    import product_key_memory.knn.memory as knn

    monkeypatch.setattr(knn, "SCORE_BUDGET", 1 << 12)  # 2 rows * 10 queries * 1024 memories is over it
    # float64: the grouped search (CPU float32 takes the candidate paths)
    queries, keys = torch.randn(2, 10, 4, dtype=torch.float64), torch.randn(2, 1500, 4, dtype=torch.float64)
    keys[:, 700:710] = keys[:, 5:15]  # exact ties across chunk and query-split boundaries
    count = torch.tensor([1500, 900])
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape[1]) or real_bmm(a, b))
    scores, slots, mask = exact_search(queries, keys, count, 7, precision="fp32")
    ref_scores, ref_slots = stable_sort_topk(queries, keys, count, 7)
    assert max(calls) == 2, "every matmul scores at most 2 queries"
    assert torch.equal(slots, ref_slots) and mask.all()
    assert_close(scores, ref_scores)


def test_search_takes_the_peers_positional_arguments():
    torch.manual_seed(0)
    memory = KNNMemory(8, 64, 2)
    memory.add(torch.randn(2, 40, 2, 8))
    queries = torch.randn(2, 5, 8)
    plain = memory.search(queries, 4)
    # memorizing-transformers-pytorch: search(queries, topk, nprobe=8, increment_hits=True, increment_age=True)
    peer_style = memory.search(queries, 4, 8, False, False)
    assert all(torch.equal(a, b) for a, b in zip(plain, peer_style))
    with pytest.raises(ValueError, match="nprobe"):
        memory.search(queries, 4, 0)


def test_memory_list_slices_and_clear_memory_as_the_peer():
    memories = KNNMemoryList(KNNMemory(4, 8, 2) for _ in range(3))
    for m in memories:
        m.add(torch.randn(2, 3, 2, 4))
    assert isinstance(memories[1:], KNNMemoryList) and isinstance(memories[0], KNNMemory)
    memories.clear_memory(batch_indices=[1], memory_indices=[0, 2])
    assert [m.count.tolist() for m in memories] == [[3, 0], [3, 3], [3, 0]]
    memories[1:].clear()
    assert [m.count.tolist() for m in memories] == [[3, 0], [0, 0], [0, 0]]


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_clear_where_equals_clear_of_those_rows(backend):
    if backend == "faiss":
        importorskip("faiss")
    torch.manual_seed(0)
    made = [KNNMemory(4, 16, 3, backend=backend, faiss_nlist=2, faiss_train_size=16) for _ in range(2)]
    batch = torch.randn(3, 20, 2, 4)
    for m in made:
        m.add(batch)
    a, b = made
    with a.at_batch_indices([2, 0]), b.at_batch_indices([2, 0]):
        a.clear_where(torch.tensor([True, False]))  # batch row 0 is index 2
        b.clear([2])
        with pytest.raises(ValueError, match="rows must be a bool tensor of shape \\(2,\\)"):
            a.clear_where(torch.tensor([True, False, True]))
    assert torch.equal(a.count, b.count) and torch.equal(a.write_pos, b.write_pos)
    assert a.count.tolist() == [16, 16, 0]
    queries = torch.randn(3, 6, 4)
    assert all(torch.equal(x, y) for x, y in zip(a.search(queries, 4), b.search(queries, 4)))


def test_faiss_index_holds_exactly_the_live_memories_after_eviction():
    """Probing every inverted list makes IVF exact: its answers must then be brute force over the live buffer."""
    importorskip("faiss")
    torch.manual_seed(1)
    memory = KNNMemory(16, max_memories=500, num_indices=2, backend="faiss", faiss_nlist=8, faiss_nprobe=1)
    exact = KNNMemory(16, max_memories=500, num_indices=2)
    for _ in range(4):  # 1,200 into 500 slots: trained, then wrapped twice
        batch = torch.randn(2, 300, 2, 16)
        memory.add(batch)
        exact.add(batch)
    queries = torch.randn(2, 40, 16)
    _, mask, slots = memory.search(queries, 6, 8, return_slots=True)  # nprobe = nlist
    ref, _ = brute_force(exact, queries, 6)
    assert mask.all() and torch.equal(slots, ref)


needs_bf16 = pytest.mark.skipif(not knn_module.bf16_search_available(torch.device("cpu"), torch.float32, 16),
                                reason="this CPU has no bf16 matmul (oneDNN)")


def exact_grid(*shape, generator):
    """Multiples of 2**-9 in [-1, 1): not all exact in bf16 (8 bits), and 16-dim inner products of them are
    exact in fp32 (<= 24 bits) in any summation order, so fp32 brute force has one answer, ties included."""
    return torch.randint(-512, 512, shape, generator=generator).float() / 512


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_bf16), "fp32"])
@pytest.mark.parametrize("near_ties", [False, True])
def test_candidate_paths_equal_fp32_brute_force(near_ties, precision, monkeypatch):
    g = torch.Generator().manual_seed(int(near_ties))
    queries, keys = exact_grid(2, 300, 16, generator=g), exact_grid(2, 5000, 16, generator=g)
    if near_ties:
        # 600 copies of 3 keys per row, apart by one step of 2**-9 in one coordinate: below bf16's resolution
        # there, so the approximate scores cannot order them and the certificate must send them to fp32
        base = keys[:, :3].repeat_interleave(200, 1)
        base[..., 0] = (base[..., 0] + torch.arange(600) % 5 / 512).clamp(-1, 1 - 1 / 512)
        keys[:, 1000:1600] = base
    count = torch.tensor([5000, 3777])
    calls = []
    real = knn_module._exact_search_fp32
    monkeypatch.setattr(knn_module, "_exact_search_fp32", lambda q, *a: calls.append(q.shape[1]) or real(q, *a))
    scores, slots, mask = exact_search(queries, keys, count, 32, precision=precision)
    ref_scores, ref_slots = stable_sort_topk(queries, keys, count, 32)
    assert torch.equal(slots, ref_slots), "slots of fp32 brute force (ties to the lower slot)"
    assert torch.equal(scores, ref_scores) and mask.all()
    if near_ties:
        assert calls, "near-ties within the bound (and exact ties) reached the grouped search"


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_bf16), "fp32"])
def test_candidate_paths_hold_their_score_budget_and_counts(precision, monkeypatch):
    monkeypatch.setattr(knn_module, "SEARCH_CHUNK", 64)
    monkeypatch.setattr(knn_module, "SEARCH_BUDGET", 2 * 10 * 64)  # 2 rows * 10 queries * 64 memories
    g = torch.Generator().manual_seed(2)
    queries, keys = exact_grid(2, 37, 16, generator=g), exact_grid(2, 203, 16, generator=g)
    count = torch.tensor([203, 61])  # cuts a group, a chunk and the last padded chunk
    sizes = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, out=None: sizes.append(a.shape[1] * b.shape[2])
                        or real_bmm(a, b, out=out))
    for topk in (1, 32, 70):  # 70 > count of row 1
        scores, slots, mask = exact_search(queries, keys, count, topk, precision=precision)
        ref_scores, ref_slots = stable_sort_topk(queries, keys, count, topk)
        assert torch.equal(mask, (torch.arange(topk) < count[:, None, None]).expand(2, 37, topk))
        assert torch.equal(slots, ref_slots) and torch.equal(scores[mask], ref_scores[mask]), f"topk={topk}"
    assert max(sizes) <= 10 * 64, "no bf16 score block over the budget"


def test_bad_precision_names_itself():
    with pytest.raises(ValueError, match="precision must be"):
        exact_search(torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.tensor([3]), 1, precision="half")


def clustered(n, generator, rows=2, dim=32, centers=None):
    """Unit keys around 64 unit centres (noise 0.5 in norm): where an inverted file has lists to find."""
    if centers is None:
        centers = torch.nn.functional.normalize(torch.randn(64, dim, generator=generator), dim=-1)
    picks = centers[torch.randint(0, 64, (rows, n), generator=generator)]
    noise = 0.5 * torch.nn.functional.normalize(torch.randn(rows, n, dim, generator=generator), dim=-1)
    return torch.nn.functional.normalize(picks + noise, dim=-1), centers


def test_ivf_lists_hold_exactly_the_live_memories_through_fifo_turnover():
    g = torch.Generator().manual_seed(0)
    memory = KNNMemory(32, max_memories=2000, num_indices=2, backend="ivf", ivf_nlist=16, ivf_train_size=600)
    _, centers = clustered(1, g)
    for step in range(14):  # 7,000 memories per row: the ring turns over three times; relearned on the way
        keys, _ = clustered(500, g, centers=centers)
        memory.add(torch.stack((keys, keys), 2))
        if step == 0:
            assert not any(memory._ivf.trained), "below ivf_train_size: no centroids yet"
        for i in range(2):
            count = int(memory.count[i])
            if memory._ivf.trained[i]:
                ivf = memory._ivf
                filed = ivf.list_of[i, :count]
                expected = ivf._nearest(memory.buffer[i, :count, 0], ivf.centroids[i])
                assert torch.equal(filed, expected), f"step {step}, row {i}: each live slot in its nearest list"
    assert memory._next_train[0] > 7000, "relearned as the memories turned over"


@pytest.mark.parametrize("nprobe", [None, 16])
def test_ivf_recall_against_exact_search(nprobe):
    g = torch.Generator().manual_seed(1)
    keys, centers = clustered(6000, g)
    kwargs = dict(ivf_nprobe=nprobe) if nprobe else {}
    ivf = KNNMemory(32, max_memories=6000, num_indices=2, backend="ivf", ivf_nlist=16, **kwargs)
    exact = KNNMemory(32, max_memories=6000, num_indices=2)
    for memory in (ivf, exact):
        memory.add(torch.stack((keys, keys), 2))
    queries, _ = clustered(300, g, centers=centers)
    _, mask, slots = ivf.search(queries, 32, return_slots=True)
    _, _, truth = exact.search(queries, 32, return_slots=True)
    recall = ((slots[..., :, None] == truth[..., None, :]).any(-1) & mask).float().mean().item()
    if nprobe == 16:  # every list probed: ranked by bf16 scores, so each pick is within 2E of the exact 32nd
        got = torch.einsum("bmd,bmkd->bmk", queries, torch.stack([keys[i][slots[i]] for i in range(2)]))
        kth = torch.einsum("bmd,bmkd->bmk", queries, torch.stack([keys[i][truth[i]] for i in range(2)]))[..., -1:]
        assert mask.all() and (got >= kth - 2 * knn_module.BF16_EPS * (1 + knn_module.BF16_EPS)).all()
    else:
        assert recall >= 0.9, f"recall@32 {recall:.3f} with the default nprobe"


def test_ivf_state_round_trip_and_bad_arguments(tmp_path):
    g = torch.Generator().manual_seed(2)
    keys, centers = clustered(3000, g)
    memory = KNNMemory(32, max_memories=3000, num_indices=2, backend="ivf", ivf_nlist=16)
    memory.add(torch.stack((keys, keys), 2))
    queries, _ = clustered(50, g, centers=centers)
    again = KNNMemory(32, max_memories=3000, num_indices=2, backend="ivf", ivf_nlist=16)
    again.load_state_dict(memory.state_dict())
    assert torch.equal(again.search(queries, 8, return_slots=True)[2], memory.search(queries, 8, return_slots=True)[2])
    with pytest.raises(ValueError, match="ivf_nlist must be <= max_memories"):
        KNNMemory(8, max_memories=10, backend="ivf", ivf_nlist=11)
    with pytest.raises(ValueError, match="ivf_nprobe"):
        KNNMemory(8, max_memories=10, backend="ivf", ivf_nprobe=0)


def test_clear_takes_a_bool_mask_as_a_mask():
    memory = KNNMemory(4, max_memories=8, num_indices=3)
    memory.add(torch.randn(3, 5, 2, 4))
    memory.clear(torch.tensor([True, False, False]))
    assert memory.count.tolist() == [0, 5, 5], "True clears that row; False is not index 0"
    with pytest.raises(ValueError, match="mask of shape"):
        memory.clear(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="ints or a bool mask"):
        memory.clear(torch.tensor([0.0]))


@pytest.mark.parametrize("backend, chunk_size", [("exact", None), ("exact", 16), ("ivf", None)])
def test_nan_query_never_returns_a_dead_slot_as_valid(backend, chunk_size):
    memory = KNNMemory(4, max_memories=64, num_indices=2, backend=backend, ivf_nlist=2, ivf_train_size=8,
                       chunk_size=chunk_size)  # chunk_size: the grouped search (as on CUDA)
    memory.add(torch.randn(2, 40, 2, 4))
    memory.clear([0])
    memory.add(torch.randn(2, 3, 2, 4))  # row 0: 3 live memories; slots 3.. hold the cleared document
    queries = torch.randn(2, 5, 4)
    queries[0, 1] = float("nan")
    queries[1, 2, 0] = float("inf")
    _, mask, slots = memory.search(queries, 8, return_slots=True)
    live = slots < memory.count[:, None, None]
    assert not (mask & ~live).any(), "a valid result is a live memory"
    assert mask[0].sum(-1).le(3).all()
