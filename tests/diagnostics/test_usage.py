"""Memory-usage statistics against counts and formulas worked out by hand."""

import math

import pytest
import torch
from torch import nn

from product_key_memory import PKM, MemoryPlus, MemoryUsageTracker, ValuePool, ValueTable, save_usage_plot, usage_statistics

from .._extras import importorskip


def small_pkm(**kw):
    return PKM(16, heads=2, num_keys=4, topk=2, dim_head=8, **kw)


def test_statistics_of_known_counts():
    reads = torch.tensor([4, 0, 3, 1])  # 8 reads over 4 slots
    mass = torch.tensor([1.0, 0.0, 1.0, 2.0])
    s = usage_statistics(reads, mass, tokens=torch.tensor(2))
    assert (s["slots"], s["tokens"], s["reads"]) == (4, 2, 8)
    assert s["used_fraction"] == 0.75
    p = [4 / 8, 3 / 8, 1 / 8]  # the empty slot adds 0 log 0 = 0
    assert s["kl_uniform"] == pytest.approx(sum(pi * math.log(pi * 4) for pi in p))
    # Gini = mean absolute difference over all ordered pairs / (2 * mean)
    x = [4, 0, 3, 1]
    mad = sum(abs(a - b) for a in x for b in x) / 16
    assert s["gini"] == pytest.approx(mad / (2 * 2.0))
    # sorted 4, 3, 1, 0 (total 8): 50% -> {4}; 90% (7.2) -> {4, 3, 1}; 99% -> {4, 3, 1}
    assert (s["slots_50"], s["slots_90"], s["slots_99"]) == (1, 3, 3)
    # weighted: 2, 1, 1, 0 of 4
    q = [0.5, 0.25, 0.25]
    assert s["kl_uniform_weighted"] == pytest.approx(sum(qi * math.log(qi * 4) for qi in q))
    assert (s["slots_50_weighted"], s["slots_90_weighted"], s["slots_99_weighted"]) == (1, 3, 3)


def test_statistics_extremes():
    uniform = usage_statistics(torch.full((8,), 5))
    assert uniform["kl_uniform"] == pytest.approx(0.0, abs=1e-12) and uniform["gini"] == pytest.approx(0.0)
    assert (uniform["slots_50"], uniform["slots_90"], uniform["slots_99"]) == (4, 8, 8)
    one = usage_statistics(torch.tensor([0, 0, 9, 0]))
    assert one["kl_uniform"] == pytest.approx(math.log(4)) and one["gini"] == pytest.approx(3 / 4)
    assert one["used_fraction"] == 0.25 and one["slots_99"] == 1
    empty = usage_statistics(torch.zeros(4, dtype=torch.long))
    assert empty["used_fraction"] == 0.0 and math.isnan(empty["kl_uniform"])
    with pytest.raises(ValueError, match="mass"):
        usage_statistics(torch.zeros(4), torch.zeros(3))


def test_tracker_counts_known_indices_and_skips_padding():
    pkm = small_pkm()
    tracker = MemoryUsageTracker(pkm)
    indices = torch.tensor([[[0, 5], [5, 15]], [[3, 3], [1, 2]], [[7, 7], [7, 7]]])  # (tokens 3, heads 2, topk 2)
    weights = torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.5, 0.5], [0.9, 0.1]], [[1.0, 0.0], [0.5, 0.5]]])
    mask = torch.tensor([True, True, False])  # token 2 is padding: the layer reads it with weight 0
    weights = torch.where(mask.view(-1, 1, 1), weights, 0.0)
    with tracker:
        pkm.values(indices.flatten(-2), weights.flatten(-2))  # how the layer reads its table
    c = tracker.counts("pkm")
    expected_reads = torch.zeros(16, dtype=torch.long)
    for slot, n in {0: 1, 5: 2, 15: 1, 3: 2, 1: 1, 2: 1}.items():
        expected_reads[slot] = n
    assert torch.equal(c["reads"], expected_reads)
    expected_mass = torch.zeros(16, dtype=torch.float64)
    for slot, m in {0: 0.75, 5: 0.75, 15: 0.5, 3: 1.0, 1: 0.9, 2: 0.1}.items():
        expected_mass[slot] = m
    torch.testing.assert_close(c["mass"], expected_mass)
    assert int(c["tokens"]) == 2
    stats = tracker.stats()["pkm"]
    assert stats["reads"] == 8 and stats["used_fraction"] == 6 / 16


def test_tracker_end_to_end_matches_search_on_real_tokens():
    model = nn.Sequential(nn.Linear(16, 16), small_pkm(), nn.Linear(16, 16), small_pkm(query_norm="channel_batchnorm"))
    x = torch.randn(3, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    x_nan = torch.where(mask.unsqueeze(-1), x, float("nan"))  # padding content must not matter
    tracker = MemoryUsageTracker(model)
    assert list(tracker.layers) == ["1", "3"]
    with tracker:
        h = model[0](x_nan)
        model[1](h, input_mask=mask)
    # what the layer read for the real tokens, computed again without the tracker
    pkm = model[1]
    q = pkm.queries(torch.where(mask.unsqueeze(-1), h, 0.0).reshape(-1, 16), mask.reshape(-1))
    weights, indices = pkm.search(q)
    real = indices[mask.reshape(-1)].reshape(-1)
    c = tracker.counts("1")
    assert torch.equal(c["reads"], torch.bincount(real, minlength=16))
    real_weights = weights[mask.reshape(-1)].reshape(-1).double()
    torch.testing.assert_close(c["mass"], torch.zeros(16, dtype=torch.float64).index_add_(0, real, real_weights))
    assert int(c["tokens"]) == int(mask.sum())
    assert int(tracker.counts("3")["reads"].sum()) == 0  # not called


def test_tracker_is_opt_in_resettable_and_independent():
    pkm = small_pkm()
    x = torch.randn(4, 16)
    pkm(x)
    tracker, other = MemoryUsageTracker(pkm), MemoryUsageTracker(pkm)
    with tracker:
        pkm(x)
        with other:  # two trackers count side by side
            pkm(x)
    assert not pkm.values._forward_hooks
    assert tracker.stats()["pkm"]["reads"] == 2 * 4 * 2 * 2
    assert other.stats()["pkm"]["reads"] == 4 * 2 * 2
    pkm(x)  # detached: not counted
    assert tracker.stats()["pkm"]["tokens"] == 8
    tracker.reset()
    assert tracker.stats()["pkm"]["reads"] == 0
    with pytest.raises(ValueError, match="no value table"):
        MemoryUsageTracker(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="tracked"):
        tracker.counts("nope")


def test_tracker_counts_a_shared_table_once_for_every_layer():
    table = ValuePool(4, 16)
    model = nn.ModuleList([small_pkm(values=table), MemoryPlus(16, heads=2, num_keys=4, topk=2, dim_head=8, values=table)])
    tracker = MemoryUsageTracker(model)
    assert list(tracker.layers) == ["0"]
    with tracker:
        model[0](torch.randn(3, 16))
        assert tracker.stats()["0"]["reads"] == 12
        model[1](torch.randn(3, 16))
    assert tracker.stats()["0"]["reads"] == 24


class OwnTable(ValueTable):
    """A table of the user's own: rows are a fixed pattern plus a learned bias per slot."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim)
        self.bias = nn.Parameter(torch.zeros(num_slots))

    def reset_parameters(self):
        nn.init.zeros_(self.bias)

    def read(self, indices, weights, *, trainable=None):
        rows = torch.arange(self.dim, dtype=self.bias.dtype) + self.bias[indices].unsqueeze(-1)
        return (rows * weights.unsqueeze(-1)).sum(-2)


def test_tracker_finds_a_table_of_the_users_own_inside_memory_plus():
    memory = small_pkm(values=OwnTable(16, 16))
    model = nn.Sequential(nn.Linear(16, 16), MemoryPlus(16, memory=memory))
    tracker = MemoryUsageTracker(model)
    assert list(tracker.layers) == ["1.memory"]
    x = torch.randn(5, 16)
    with tracker:
        model(x)
    weights, indices = memory.search(memory.queries(model[0](x)))
    assert torch.equal(tracker.counts("1.memory")["reads"], torch.bincount(indices.reshape(-1), minlength=16))


def test_save_usage_plot(tmp_path):
    importorskip("matplotlib")
    model = nn.ModuleList([small_pkm(), small_pkm(), small_pkm()])
    tracker = MemoryUsageTracker(model)
    with tracker:
        for m in model[:2]:  # the third layer counts nothing
            m(torch.randn(32, 16))
    path = tmp_path / "usage.png"
    save_usage_plot(tracker, path, title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tracker_does_not_sync_on_cuda():
    pkm = small_pkm(device="cuda")
    x = torch.randn(4, 16, device="cuda")
    mask = torch.rand(4, device="cuda") > 0.5
    tracker = MemoryUsageTracker(pkm)
    with tracker:
        pkm(x, input_mask=mask)  # allocates the counts
        weights, indices = pkm.search(pkm.queries(x, mask))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the hook raises
        try:
            pkm.values(indices.flatten(-2), torch.where(mask.view(-1, 1, 1), weights, 0.0).flatten(-2))
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_concurrent_forwards_of_one_layer_count_exactly():
    import threading

    pkm = PKM(16, heads=2, num_keys=128, topk=4, dim_head=8)
    tracker = MemoryUsageTracker(pkm)
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randint(128**2, (64, 2, 4), generator=g), torch.rand(64, 2, 4, generator=g)) for _ in range(8)]
    rounds = 10
    with tracker:
        barrier = threading.Barrier(len(calls))

        def run(indices, weights):
            barrier.wait()
            for _ in range(rounds):
                pkm.values(indices.flatten(-2), weights.flatten(-2))  # how the layer reads its table

        threads = [threading.Thread(target=run, args=call) for call in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    every = torch.cat([i.reshape(-1) for i, _ in calls])
    weights = torch.cat([w.reshape(-1) for _, w in calls]).double()
    c = tracker.counts("pkm")
    assert torch.equal(c["reads"], torch.bincount(every, minlength=128**2) * rounds)
    expected = torch.zeros(128**2, dtype=torch.float64).index_add_(0, every, weights) * rounds
    torch.testing.assert_close(c["mass"], expected)
    assert int(c["tokens"]) == 64 * len(calls) * rounds


def test_a_deep_copy_of_a_tracked_model_can_be_tracked_on_its_own():
    import copy
    import pickle

    model = nn.Sequential(nn.Linear(16, 16), small_pkm())
    x = torch.randn(4, 16)
    tracker = MemoryUsageTracker(model).attach()
    model(x)
    twin = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))(x)  # a pickled tracked model loads and runs
    with MemoryUsageTracker(twin) as twin_tracker:
        twin(x)
        twin(x)
    assert twin_tracker.stats()["1"]["tokens"] == 8
    assert tracker.stats()["1"]["tokens"] == 4, "the copy's reads are not the original's"
    model(x)
    assert tracker.stats()["1"]["tokens"] == 8
    with pytest.raises(TypeError, match="new one"):
        copy.deepcopy(tracker)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
@pytest.mark.parametrize("argument", ["reads", "mass"])
def test_statistics_refuse_counts_that_are_not_counts(argument, bad):
    counts = dict(reads=torch.tensor([4.0, 0.0, 3.0]), mass=torch.tensor([1.0, 0.0, 2.0]))
    counts[argument][1] = bad
    with pytest.raises(ValueError, match=f"{argument} must hold finite counts >= 0, got {bad} at slot 1"):
        usage_statistics(**counts)
    with pytest.raises(ValueError, match="tokens"):
        usage_statistics(torch.tensor([1, 2]), tokens=-3)
