"""A layer built from parts: the same layer as the builder's; a part passed in is used as given."""

import pytest
import torch
from torch import nn

from product_key_memory import (
    PKM,
    EmbeddingValues,
    MemoryOutput,
    ProductKeys,
    QueryNetwork,
    Scoring,
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
