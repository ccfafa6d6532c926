"""A layer built from parts: the same layer as the builder's, and tables of a user's own everywhere."""

import pytest
import torch
from torch import nn

from product_key_memory import (
    PKM,
    EmbeddingValues,
    MemoryOutput,
    MemoryPlus,
    MemoryUsageTracker,
    ProductKeys,
    QueryNetwork,
    Scoring,
    ValueTable,
    build_optimizer,
    clip_grad_norm_,
    fetch_optimizer_parameters,
    fetch_pkm_value_parameters,
    shard_values,
)

SIZES = dict(heads=2, num_keys=8, topk=4, dim_head=8)


def parts(dim=16, value_dim=16):
    return dict(
        query=QueryNetwork(dim, 2, 8, hidden=(24,), norm="channel_batchnorm", bias=True),
        product_keys=ProductKeys(2, 8, 8, 4, init="uniform", qk_norm=True),
        scoring=Scoring(temperature=0.5, subtract="mean"),
        values=EmbeddingValues(64, value_dim, sparse=True),
        output=MemoryOutput(dim, value_dim, 2, norm=True),
    )


def test_parts_build_the_layer_the_options_build():
    torch.manual_seed(0)
    from_options = PKM(
        16, **SIZES, query_hidden=(24,), query_norm="channel_batchnorm", query_bias=True, key_init="uniform",
        qk_norm=True, temperature=0.5, score_subtract="mean", sparse_values=True, norm_output=True,
    )
    from_parts = PKM(16, **SIZES, **parts())
    assert list(from_parts.state_dict()) == list(from_options.state_dict())
    from_parts.load_state_dict(from_options.state_dict(), strict=True)
    x = torch.randn(3, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    for mode in ("train", "eval"):
        getattr(from_options, mode)(), getattr(from_parts, mode)()
        torch.testing.assert_close(from_parts(x, input_mask=mask), from_options(x, input_mask=mask), rtol=0, atol=0)
    assert from_parts.query.training is False and from_parts.output.training is False


def test_state_dict_keys_are_attribute_paths_of_the_parts():
    pkm = PKM(16, **SIZES, pre_layernorm=True, concat_values_and_combine=True, norm_output=True)
    assert list(pkm.state_dict()) == [
        "query.pre_layernorm.weight", "query.pre_layernorm.bias", "query.to_queries.weight", "query.norm.weight",
        "query.norm.bias", "product_keys.keys", "values.weight", "output.combine.weight", "output.output_norm.weight",
        "output.output_norm.bias",
    ]
    for name, p in pkm.named_parameters():  # every key is an attribute path (DCP, FSDP and HF walk them)
        assert pkm.get_parameter(name) is p
    # 0.3.0's attribute names reach the pieces in their parts
    assert pkm.to_queries is pkm.query.to_queries and pkm.combine is pkm.output.combine
    assert pkm.keys is pkm.product_keys.keys and pkm.norm is pkm.query.norm
    children = dict(pkm.named_children())
    assert list(children) == ["query", "product_keys", "scoring", "values", "output"]


def test_a_part_passed_in_is_used_as_given_and_sizes_must_chain():
    query = QueryNetwork(16, 2, 8)
    pkm = PKM(16, **SIZES, query=query, query_hidden=(8,))  # the options that would build it are not read
    assert pkm.query is query and pkm.query.query_hidden is None
    with pytest.raises(ValueError, match=r"product_keys.num_keys is 16 but the layer has num_keys=8"):
        PKM(16, **SIZES, product_keys=ProductKeys(2, 16, 8, 4))
    with pytest.raises(ValueError, match=r"query.heads is 4 but the layer has heads=2"):
        PKM(16, **SIZES, query=QueryNetwork(16, 4, 8))
    with pytest.raises(ValueError, match=r"values.num_slots is 16 but the layer has num_keys \*\* 2=64"):
        PKM(16, **SIZES, values=EmbeddingValues(16, 16))
    with pytest.raises(TypeError, match="scoring must be a Scoring"):
        PKM(16, **SIZES, scoring=nn.Softmax(-1))


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


def test_product_keys_refuse_num_keys_past_the_limit_of_every_backend():
    from product_key_memory.ops.search import MAX_NUM_KEYS
    from product_key_memory.parts.keys import ProductKeys

    assert MAX_NUM_KEYS == 65536
    with pytest.raises(ValueError, match=r"num_keys must be at most 65536 .* got num_keys=65537"):
        ProductKeys(heads=1, num_keys=65537, dim_head=1, topk=1, device="meta")
    ProductKeys(heads=1, num_keys=65536, dim_head=1, topk=1, device="meta")  # the limit itself is held
