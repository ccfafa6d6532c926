"""MemoryPlus: the gated Memory+ output against its formula, masks, arguments, optimizer groups."""

import pytest
import torch
import torch.nn.functional as F

from product_key_memory import PKM, MemoryPlus, fetch_optimizer_parameters, fetch_pkm_value_parameters

SIZES = dict(heads=2, num_keys=8, topk=4, dim_head=8)
DIM = 16


def _reference(layer, x, mask=None):
    """``W_out(memory(x) * silu(W_gate(x)))``, arXiv 2412.09764, written out."""
    read = layer.memory(x, mask)
    gate = F.silu(x @ layer.to_gate.weight.t())
    return (read * gate) @ layer.to_out.weight.t()


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (0, 4)])
def test_matches_formula(lead):
    layer = MemoryPlus(DIM, **SIZES).double()
    x = torch.randn(*lead, DIM, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (*lead, DIM)
    torch.testing.assert_close(out, _reference(layer, x))


def test_gradients_match_formula():
    layer = MemoryPlus(DIM, **SIZES).double()
    x = torch.randn(3, 5, DIM, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, DIM, dtype=torch.float64)
    grads = torch.autograd.grad((layer(x) * g).sum(), [x, *layer.parameters()])
    ref = torch.autograd.grad((_reference(layer, x) * g).sum(), [x, *layer.parameters()])
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, ref):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad {name}: {m}")


def test_masked_tokens_give_zero_output_and_no_gradient():
    layer = MemoryPlus(DIM, **SIZES)
    x = torch.randn(2, 6, DIM)
    mask = torch.rand(2, 6) > 0.4
    x = torch.where(mask.unsqueeze(-1), x, float("nan")).requires_grad_()  # padding may hold garbage
    out = layer(x, mask)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    out.sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_wraps_a_given_memory():
    memory = PKM(DIM, **SIZES)
    layer = MemoryPlus(DIM, memory=memory)
    assert layer.memory is memory
    assert set(layer.state_dict()) == {f"memory.{k}" for k in memory.state_dict()} | {"to_gate.weight", "to_out.weight"}


def test_optimizer_groups_find_the_table_inside():
    layer = MemoryPlus(DIM, **SIZES)
    values, rest = fetch_pkm_value_parameters(layer)
    assert [id(p) for p in values] == [id(layer.memory.values.weight)]
    assert sorted(map(id, values + rest)) == sorted(map(id, layer.parameters()))
    groups = fetch_optimizer_parameters(layer, 1e-2, pkm_weight_decay=0.0)
    assert groups[1] == {"params": values, "lr": 1e-2, "weight_decay": 0.0}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim=0), ValueError, "dim"),
    (dict(dim=DIM, memory=PKM(DIM + 1, **SIZES)), ValueError, "memory.dim"),
    (dict(dim=DIM, memory=PKM(DIM, **SIZES), heads=2), ValueError, "either memory or PKM arguments"),
    (dict(dim=DIM, memory="pkm"), TypeError, "nn.Module"),
    (dict(dim=DIM, head=2), TypeError, "head"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MemoryPlus(**kwargs)
