"""ExpertValues: PEER's two expert matrices, both read through the value read."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from product_key_memory import PEER, ExpertValues, ValueTable, quantize_values_
from product_key_memory.tables import QuantizedExpertValues


def _inputs(n=5, m=6, slots=40, dim=8, dtype=torch.float64):
    x = torch.randn(n, dim, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, slots, (n, m))
    weights = torch.randn(n, m, dtype=dtype, requires_grad=True)
    return x, indices, weights


def test_is_a_value_table_with_two_matrices():
    table = ExpertValues(40, 8)
    assert isinstance(table, ValueTable)
    assert [name for name, _ in table.named_parameters()] == ["down", "up"]
    assert table.down.shape == table.up.shape == (40, 8)


def test_project_and_read_match_plain_torch():
    table = ExpertValues(40, 8, dtype=torch.float64)
    x, indices, weights = _inputs()
    assert_close(table.project(x, indices), torch.einsum("nd,nmd->nm", x, table.down[indices]), msg="project")
    assert_close(table(indices, weights), torch.einsum("nm,nmd->nd", weights, table.up[indices]), msg="read")


@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_match_plain_torch(sparse):
    table = ExpertValues(40, 8, sparse=sparse, dtype=torch.float64)
    x, indices, weights = _inputs()
    trainable = torch.rand(40) > 0.3
    out = table(indices, table.project(x, indices, trainable=trainable) * weights, trainable=trainable)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weights, table.down, table.up), g)

    down, up = table.down.detach().clone().requires_grad_(), table.up.detach().clone().requires_grad_()
    keep = trainable[indices].unsqueeze(-1)
    rows_down = torch.where(keep, down[indices], down[indices].detach())
    rows_up = torch.where(keep, up[indices], up[indices].detach())
    expected = torch.einsum("nm,nmd->nd", torch.einsum("nd,nmd->nm", x, rows_down) * weights, rows_up)
    want = torch.autograd.grad(expected, (x, weights, down, up), g)
    for name, got, ref in zip(("x", "weights", "down", "up"), grads, want):
        assert got.is_sparse == (sparse and name in ("down", "up")), name
        assert_close(got.to_dense(), ref, msg=f"gradient of {name}")


class _Step(nn.Module):
    """Down projection, gate, up read: what PEER does with its table."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x, indices, weights):
        return self.table(indices, self.table.project(x, indices) * weights)


def test_gradcheck_float64():
    step = _Step(ExpertValues(12, 4, dtype=torch.float64))
    x, indices, weights = _inputs(n=3, m=4, slots=12, dim=4)
    down = step.table.down.detach().clone().requires_grad_()
    up = step.table.up.detach().clone().requires_grad_()

    def fn(x, weights, down, up):
        return functional_call(step, {"table.down": down, "table.up": up}, (x, indices, weights))

    assert torch.autograd.gradcheck(fn, (x, weights, down, up))


def test_project_checks_shapes():
    table = ExpertValues(40, 8)
    with pytest.raises(ValueError, match="x must be"):
        table.project(torch.randn(5, 7), torch.zeros(5, 3, dtype=torch.long))


# a half table's read rounds the weights and sums to its dtype; int rows are dequantized to float32
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.int8, 1e-5), ("int4", 1e-5)])
def test_quantized_experts_read_their_dequantized_rows(dtype, tol):
    layer = PEER(16, heads=2, num_experts=64, num_experts_per_head=4, non_competing_scores=False)
    x = torch.randn(5, 16)
    quantize_values_(layer, dtype)
    assert isinstance(layer.experts, QuantizedExpertValues) and not layer.experts.supports_sparse_grad
    with torch.no_grad():
        got = layer(x)
        float_experts = ExpertValues(64, 16)
        float_experts.down.copy_(layer.experts.down.dequantized())
        float_experts.up.copy_(layer.experts.up.dequantized())
        layer.experts = float_experts
        want = layer(x)
    assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=f"{dtype}: the quantized rows' read")
