"""ExpertValues: PEER's two expert matrices, both read through the value read."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from product_key_memory import ExpertValues, ValueTable


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
