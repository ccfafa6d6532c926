import pytest
import torch

from product_key_memory import MaskedBatchNorm, QueryLayerNorm


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_mask_equals_batchnorm1d(momentum):
    norm = MaskedBatchNorm(6, momentum=momentum, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(6, momentum=momentum, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(5, 2, 3, 6, dtype=torch.float64)
        torch.testing.assert_close(norm(x), bn(x.reshape(-1, 6)).view_as(x))
    for name, buf in bn.state_dict().items():
        torch.testing.assert_close(norm.fn.state_dict()[name], buf, msg=name)
    norm.eval(), bn.eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(norm(x), bn(x))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_mask_equals_batchnorm_on_the_real_tokens_only(momentum):
    norm = MaskedBatchNorm(6, momentum=momentum, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(6, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        norm.fn.weight.uniform_(0.5, 2)
        norm.fn.bias.uniform_(-1, 1)
        bn.load_state_dict(norm.fn.state_dict())
    for _ in range(2):
        x = torch.randn(8, 3, 6, dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([True, False, True, True, False, True, False, True])
        with torch.no_grad():
            x[~mask] = float("inf")
        out = norm(x, mask)
        want = bn(x[mask].reshape(-1, 6)).view(-1, 3, 6)
        torch.testing.assert_close(out[mask], want)
        g = torch.randn_like(want)
        (gx,) = torch.autograd.grad((out[mask] * g).sum(), x)
        (gx_want,) = torch.autograd.grad((want * g).sum(), x)
        torch.testing.assert_close(gx, gx_want)
        assert torch.all(gx[~mask] == 0)
    for name, buf in bn.state_dict().items():
        torch.testing.assert_close(norm.fn.state_dict()[name], buf, msg=name)


def test_all_padded_batch_leaves_statistics_alone():
    norm = MaskedBatchNorm(4)
    before = {k: v.clone() for k, v in norm.fn.state_dict().items() if k != "num_batches_tracked"}
    out = norm(torch.randn(3, 4), torch.zeros(3, dtype=torch.bool))
    assert torch.isfinite(out).all()
    for name, buf in before.items():
        torch.testing.assert_close(norm.fn.state_dict()[name], buf, msg=name)


def test_query_layernorm_ignores_the_mask_and_keeps_layernorm_keys():
    norm = QueryLayerNorm(5)
    x = torch.randn(3, 5)
    torch.testing.assert_close(norm(x, torch.zeros(3, dtype=torch.bool)), torch.nn.functional.layer_norm(x, (5,)))
    assert set(norm.state_dict()) == {"weight", "bias"}
