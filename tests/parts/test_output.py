"""MemoryOutput on its own: the read -> (..., dim), against the explicit sums, products and norms."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from product_key_memory import MemoryOutput

DIM, VALUE_DIM, HEADS = 12, 6, 3
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_summed_heads_of_width_dim_pass_through(dtype):
    out = MemoryOutput(DIM, DIM, HEADS, dtype=dtype)
    assert out.value_proj is None and out.combine is None
    read = torch.randn(2, 5, DIM, dtype=dtype)
    assert torch.equal(out(read), read), "value_dim == dim is not the identity"
    # absent pieces are registered as None, so assigning one later makes it a child
    assert list(out._modules) == ["combine", "value_proj", "value_dropout", "output_norm"]
    out.value_proj = nn.Linear(DIM, DIM, bias=False, dtype=dtype)
    assert "value_proj" in dict(out.named_children()), "an assigned value_proj is not a child"


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_proj_maps_value_dim_to_dim(dtype):
    out = MemoryOutput(DIM, VALUE_DIM, HEADS, dtype=dtype)
    assert out.combine is None and out.value_proj.weight.shape == (DIM, VALUE_DIM) and out.value_proj.bias is None
    read = torch.randn(2, 5, VALUE_DIM, dtype=dtype)
    want = read.double() @ out.value_proj.weight.double().t()
    got = out(read)
    assert got.dtype == dtype and got.shape == (2, 5, DIM)
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype], msg=f"value_proj, {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value_dim", [VALUE_DIM, DIM])
def test_concat_heads_is_cat_then_matmul(dtype, value_dim):
    out = MemoryOutput(DIM, value_dim, HEADS, concat_heads=True, dtype=dtype)
    assert out.value_proj is None, "concat_heads also built value_proj"
    assert out.combine.weight.shape == (DIM, HEADS * value_dim) and out.combine.bias is None
    read = torch.randn(4, 2, HEADS, value_dim, dtype=dtype)  # (..., heads, value_dim)
    cat = torch.cat([read[..., h, :] for h in range(HEADS)], dim=-1).double()  # head 0's row first
    want = cat @ out.combine.weight.double().t()
    got = out(read)
    assert got.shape == (4, 2, DIM)
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype], msg=f"combine, {dtype}")


@pytest.mark.parametrize("concat_heads", [False, True])
def test_norm_output_layernorms_the_projection(concat_heads):
    out = MemoryOutput(DIM, VALUE_DIM, HEADS, concat_heads=concat_heads, norm=True, dtype=torch.float64)
    assert isinstance(out.output_norm, nn.LayerNorm) and out.output_norm.normalized_shape == (DIM,)
    with torch.no_grad():
        out.output_norm.weight.uniform_(0.5, 2)
        out.output_norm.bias.uniform_(-1, 1)
    read = torch.randn(7, HEADS, VALUE_DIM, dtype=torch.float64) if concat_heads else torch.randn(
        7, VALUE_DIM, dtype=torch.float64)
    proj = out.combine(read.flatten(-2)) if concat_heads else out.value_proj(read)
    x = proj
    want = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + out.output_norm.eps)
    want = want * out.output_norm.weight + out.output_norm.bias
    torch.testing.assert_close(out(read), want, **TOL[torch.float64], msg="norm_output")
    assert isinstance(MemoryOutput(DIM, DIM).output_norm, nn.Identity)


def test_dropout_only_in_training():
    out = MemoryOutput(DIM, DIM, dropout=0.5)
    read = torch.randn(64, DIM)
    torch.testing.assert_close(out.eval()(read), read, rtol=0, atol=0, msg="dropout in eval")
    dropped = out.train()(read)
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1, "training dropout kept all or none"
    torch.testing.assert_close(dropped[kept], read[kept] * 2, **TOL[torch.float32], msg="kept entries not scaled")


def test_dropout_comes_before_the_norm():
    out = MemoryOutput(DIM, DIM, dropout=0.5, norm=True).train()
    read = torch.randn(64, DIM)
    torch.manual_seed(5)
    got = out(read)
    torch.manual_seed(5)
    want = F.layer_norm(F.dropout(read, 0.5, training=True), (DIM,), out.output_norm.weight, out.output_norm.bias)
    torch.testing.assert_close(got, want, **TOL[torch.float32], msg="dropout then LayerNorm")


@pytest.mark.parametrize("kwargs, piece", [
    (dict(value_dim=VALUE_DIM), "value_proj"),
    (dict(value_dim=VALUE_DIM, concat_heads=True), "combine"),
])
def test_reset_parameters_redraws_every_piece(kwargs, piece):
    out = MemoryOutput(DIM, heads=HEADS, norm=True, **kwargs)
    linear = getattr(out, piece)
    with torch.no_grad():
        for p in out.parameters():
            p.fill_(3.0)
    torch.manual_seed(7)
    out.reset_parameters()
    torch.manual_seed(7)
    want = nn.Linear(linear.in_features, linear.out_features, bias=False)  # nn.Linear's own init, same draw
    torch.testing.assert_close(linear.weight, want.weight, rtol=0, atol=0, msg=f"{piece} not redrawn")
    torch.testing.assert_close(out.output_norm.weight, torch.ones(DIM), rtol=0, atol=0, msg="norm weight")
    torch.testing.assert_close(out.output_norm.bias, torch.zeros(DIM), rtol=0, atol=0, msg="norm bias")
    MemoryOutput(DIM, DIM).reset_parameters()  # nothing to draw: no error


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim=0), ValueError, r"^dim must be a positive int, got 0"),
    (dict(value_dim=-1), ValueError, r"^value_dim must be a positive int, got -1"),
    (dict(heads=1.0), ValueError, r"^heads must be a positive int, got 1.0"),
    (dict(concat_heads=1), TypeError, r"^concat_heads / PKM's concat_values_and_combine must be a bool, got 1"),
    (dict(norm="yes"), TypeError, r"^norm / PKM's norm_output must be a bool, got 'yes'"),
    (dict(dropout=1.0), ValueError, r"^dropout / PKM's value_dropout must be a float in \[0, 1\), got 1.0"),
])
def test_argument_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        MemoryOutput(**{**dict(dim=DIM, value_dim=VALUE_DIM, heads=HEADS), **kwargs})


def test_extra_repr_shows_sizes_and_layout():
    assert MemoryOutput(DIM, VALUE_DIM).extra_repr() == f"dim={DIM}, value_dim={VALUE_DIM}"
    assert MemoryOutput(DIM, VALUE_DIM, HEADS, concat_heads=True).extra_repr().endswith(
        f"heads={HEADS}, concat_heads=True")
