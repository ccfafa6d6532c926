"""Query-network parts: masked statistics equal torch's BatchNorm on the real tokens alone."""

import pytest
import torch
from torch import nn

from product_key_memory.parts.query import ChannelBatchNorm, IdentityNorm, QueryMLP, query_norm


def test_channel_batchnorm_is_batchnorm_over_real_tokens():
    torch.manual_seed(0)
    heads, d = 3, 4
    norm = ChannelBatchNorm(2 * heads * d)
    plain = nn.BatchNorm1d(2 * heads * d)
    plain.load_state_dict(norm.fn.state_dict())
    x = torch.randn(9, 2, heads, d) * 2 + 1
    mask = torch.tensor([True, False, True, True, False, True, True, True, False])
    x_pad = torch.where(mask.view(-1, 1, 1, 1), x, float("nan"))
    out = norm(x_pad, mask)
    expected = plain(x[mask].flatten(1)).view(-1, 2, heads, d)
    torch.testing.assert_close(out[mask], expected)
    torch.testing.assert_close(norm.fn.running_mean, plain.running_mean)
    torch.testing.assert_close(norm.fn.running_var, plain.running_var)
    norm.eval(), plain.eval()
    torch.testing.assert_close(norm(x, mask), plain(x.flatten(1)).view_as(x))


def test_query_mlp_layers_and_masked_statistics():
    torch.manual_seed(0)
    mlp = QueryMLP(8, (6, 5), bias=True, batchnorm=True)
    kinds = [type(m).__name__ for m in mlp.layers]
    assert kinds == ["Linear", "MaskedBatchNorm", "ReLU", "Linear", "MaskedBatchNorm", "ReLU"]
    plain = nn.Sequential(
        *[nn.BatchNorm1d(m.fn.num_features) if type(m).__name__ == "MaskedBatchNorm" else m for m in mlp.layers]
    )
    for m, p in zip(mlp.layers, plain):
        if isinstance(p, nn.BatchNorm1d):
            p.load_state_dict(m.fn.state_dict())
    x = torch.randn(7, 8)
    mask = torch.tensor([True, True, False, True, True, False, True])
    torch.testing.assert_close(mlp(x, mask)[mask], plain(x[mask]))
    assert mlp.out_features == 5 and QueryMLP(8, [3], bias=False).layers[0].bias is None


def test_query_norm_factory():
    assert isinstance(query_norm("none", 2, 4), IdentityNorm)
    assert query_norm("channel_batchnorm", 2, 4).fn.num_features == 16
    assert query_norm("batchnorm", 2, 4).fn.num_features == 4
    assert query_norm("layernorm", 2, 4).normalized_shape == (4,)
    with pytest.raises(ValueError, match="query_norm"):
        query_norm("rmsnorm", 2, 4)
    with pytest.raises(ValueError, match="hidden"):
        QueryMLP(8, ())
