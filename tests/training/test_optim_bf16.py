"""bfloat16 tables train with build_optimizer: sparse value gradients, SparseRowAdam, loss goes down."""

import pytest
import torch

from product_key_memory import PKM, build_optimizer

SIZES = dict(dim=32, heads=2, num_keys=16, topk=4, dim_head=16)


def bf16_models():
    yield "dtype=", PKM(**SIZES, dtype=torch.bfloat16)
    yield ".bfloat16()", PKM(**SIZES).bfloat16()


@pytest.mark.parametrize("how", ["dtype=", ".bfloat16()"])
def test_bf16_pkm_trains_with_build_optimizer(how):
    model = dict(bf16_models())[how]
    opt = build_optimizer(model, lr=1e-2, pkm_learning_rate=1e-1)
    x, y = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(64, 32, dtype=torch.bfloat16)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = (model(x) - y).float().square().mean()
        loss.backward()
        grad = model.values.weight.grad
        assert grad.is_sparse and grad.dtype == torch.bfloat16
        losses.append(loss.item())
        opt.step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_value_rows_move_as_adam_math_says():
    """First step of SparseRowAdam on the sparse bf16 gradient = torch.optim.Adam's torch math on
    the dense one (same rows, same bf16 ops); rows not read stay put."""
    model = PKM(**SIZES, dtype=torch.bfloat16)
    opt = build_optimizer(model, lr=1e-2, pkm_learning_rate=1e-1)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    before = model.values.weight.detach().clone()
    model(x).float().square().mean().backward()
    grad = model.values.weight.grad.to_dense()
    opt.step()

    lr, (b1, b2), eps = 1e-1, (0.9, 0.999), 1e-8
    m = torch.zeros_like(before).lerp_(grad, 1 - b1)
    v = torch.zeros_like(before).mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v.sqrt() / (1 - b2) ** 0.5).add_(eps)
    expected = before.addcdiv(m, denom, value=-lr / (1 - b1))
    read = grad.abs().sum(-1) > 0
    after = model.values.weight.detach()
    assert read.any() and not read.all()
    torch.testing.assert_close(after[read], expected[read], rtol=0, atol=0, msg=lambda s: f"read rows: {s}")
    assert torch.equal(after[~read], before[~read]), "rows not read moved"
