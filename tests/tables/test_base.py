"""ValueTable: a table of one's own (two matrices, not one weight) works with every helper that finds tables."""

import pytest
import torch
from torch import nn

from product_key_memory import (
    PKM,
    MemoryPlus,
    MemoryUsageTracker,
    ValueTable,
    build_optimizer,
    clip_grad_norm_,
    fetch_optimizer_parameters,
    fetch_pkm_value_parameters,
    shard_values,
)

SIZES = dict(heads=2, num_keys=8, topk=4, dim_head=8)


class LowRankValues(ValueTable):
    """A table of two matrices: row ``i`` is ``codes[i] @ basis`` (as an expert table would be)."""

    def __init__(self, num_slots, dim, rank=3):
        super().__init__(num_slots, dim)
        self.codes = nn.Parameter(torch.empty(num_slots, rank))
        self.basis = nn.Parameter(torch.empty(rank, dim))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.codes)
        nn.init.normal_(self.basis, std=self.dim**-0.5)

    def read(self, indices, weights, *, trainable=None):
        rows = self.codes[indices] @ self.basis  # (..., m, dim)
        return (rows * weights.unsqueeze(-1)).sum(-2)


class OwnMemory(nn.Module):
    """A memory that is not a PKM: a linear query over the slots, reading a ValueTable."""

    def __init__(self, dim, values):
        super().__init__()
        self.dim = dim
        self.to_scores = nn.Linear(dim, values.num_slots)
        self.values = values

    def forward(self, x, input_mask=None, mem_trainable_mask=None, gumbel_noise_scale=0.0):
        scores, indices = self.to_scores(x).topk(2, dim=-1)
        return self.values(indices, scores.softmax(-1))


def test_a_table_of_ones_own_works_with_every_helper():
    torch.manual_seed(0)
    mine, other = LowRankValues(64, 16), LowRankValues(64, 16)
    model = nn.Sequential(PKM(16, **SIZES, values=mine), MemoryPlus(16, memory=OwnMemory(16, other)))
    values, rest = fetch_pkm_value_parameters(model)
    assert {id(p) for p in values} == {id(mine.codes), id(mine.basis), id(other.codes), id(other.basis)}
    assert len(values) + len(rest) == len(list(model.parameters()))
    assert fetch_optimizer_parameters(model, 0.5)[1]["lr"] == 0.5

    tracker = MemoryUsageTracker(model)
    assert list(tracker.layers) == ["0", "1.memory"]
    opt = build_optimizer(model, lr=1e-2, pkm_learning_rate=1e-1)
    assert mine.sparse and other.sparse  # its own read gives dense gradients, which SparseRowAdam takes too
    x = torch.randn(4, 6, 16)
    before = mine.basis.detach().clone()
    with tracker:
        model(x).square().mean().backward()
    total = clip_grad_norm_(model, 1e-3)
    assert total > 1e-3
    opt.step()
    assert not torch.equal(mine.basis, before)
    assert int(tracker.counts("0")["reads"].sum()) == 4 * 6 * SIZES["heads"] * SIZES["topk"]
    assert int(tracker.counts("1.memory")["reads"].sum()) == 4 * 6 * 2
    with pytest.raises(TypeError, match="LowRankValues cannot be sharded"):
        shard_values(model)


class ReadOnlyValues(ValueTable):
    supports_sparse_grad = False

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim)
        self.register_buffer("rows", torch.randn(num_slots, dim))

    def read(self, indices, weights, *, trainable=None):
        rows = self.rows[indices]
        return rows.sum(-2) if weights is None else (rows * weights.unsqueeze(-1)).sum(-2)


def test_the_base_class_contract():
    table = ReadOnlyValues(8, 3)
    assert (table.num_slots, table.dim, table.sparse) == (8, 3, False)
    with pytest.raises(ValueError, match=r"^ReadOnlyValues does not give sparse gradients; sparse must be False"):
        table.sparse = True
    with pytest.raises(TypeError, match=r"^sparse must be a bool, got 1"):
        LowRankValues(8, 3).sparse = 1
    with pytest.raises(ValueError, match=r"^num_slots must be a positive int, got 0"):
        ReadOnlyValues(0, 3)
    with pytest.raises(ValueError, match=r"^dim must be a positive int, got -1"):
        ReadOnlyValues(8, -1)
    with pytest.raises(NotImplementedError):
        ValueTable(8, 3)(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="ReadOnlyValues cannot be sharded"):
        table.shard()
    assert repr(table) == "ReadOnlyValues(num_slots=8, dim=3)"

    # calling the table is its read, so a forward hook sees every read
    seen = []
    table.register_forward_hook(
        lambda module, args, kwargs, out: seen.append((args[0].shape, kwargs)), with_kwargs=True
    )
    indices, weights = torch.randint(0, 8, (4, 2)), torch.rand(4, 2)
    mask = torch.ones(8, dtype=torch.bool)
    out = table(indices, weights, trainable=mask)
    torch.testing.assert_close(out, table.read(indices, weights), rtol=0, atol=0)
    assert len(seen) == 1 and seen[0][0] == (4, 2) and seen[0][1]["trainable"] is mask, "the hook missed the read"
    low_rank = LowRankValues(8, 3)
    assert [id(p) for p in low_rank.value_parameters()] == [id(low_rank.codes), id(low_rank.basis)]
