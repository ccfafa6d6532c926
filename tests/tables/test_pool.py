"""ValuePool: one value table read by several layers, nothing shared between models."""

import pytest
import torch
from torch import nn

from product_key_memory import PKM, MemoryPlus, ValuePool, fetch_optimizer_parameters, fetch_pkm_value_parameters

SIZES = dict(heads=2, num_keys=8, topk=4, dim_head=8)
DIM = 16


def _model(pool=None):
    pool = ValuePool(SIZES["num_keys"], DIM) if pool is None else pool
    return nn.ModuleList([PKM(DIM, values=pool, **SIZES), MemoryPlus(DIM, values=pool, **SIZES), PKM(DIM, **SIZES)])


def test_pool_init_is_the_layers_own_init():
    torch.manual_seed(0)
    pool = ValuePool(8, DIM)
    torch.manual_seed(0)
    expected = torch.empty(64, DIM).normal_(std=DIM**-0.5)
    torch.testing.assert_close(pool.weight.detach(), expected, rtol=0, atol=0)


def test_layers_hold_the_pool_itself():
    model = _model()
    pool = model[0].values
    assert model[1].memory.values is pool
    assert model[2].values is not pool


def test_shared_table_gets_gradient_from_every_layer():
    torch.manual_seed(0)
    model = _model()
    pool = model[0].values.weight
    x = torch.randn(3, 5, DIM)
    per_layer = []
    for layer in model[:2]:
        model.zero_grad()
        layer(x).pow(2).sum().backward()
        assert pool.grad.abs().sum() > 0, f"{type(layer).__name__} sent no gradient to the pool"
        per_layer.append(pool.grad.clone())
    model.zero_grad()
    (model[0](x).pow(2).sum() + model[1](x).pow(2).sum()).backward()
    torch.testing.assert_close(pool.grad, per_layer[0] + per_layer[1], msg="pool gradient is not the sum over layers")


def test_two_models_in_one_process_stay_independent():
    torch.manual_seed(0)
    a, b = _model(), _model()
    assert not {id(p) for p in a.parameters()} & {id(p) for p in b.parameters()}
    before = {n: p.detach().clone() for n, p in b.named_parameters()}
    opt = torch.optim.SGD(fetch_optimizer_parameters(a, 1.0), lr=1.0)
    x = torch.randn(2, 4, DIM)
    sum(layer(x).sum() for layer in a).backward()
    opt.step()
    for n, p in b.named_parameters():
        assert p.grad is None, f"{n} of the other model got a gradient"
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=f"{n} of the other model changed")


def test_optimizer_helpers_count_a_shared_table_once():
    model = _model()
    values, rest = fetch_pkm_value_parameters(model)
    assert [id(p) for p in values] == [id(model[0].values.weight), id(model[2].values.weight)]
    assert sorted(map(id, values + rest)) == sorted(map(id, model.parameters()))  # a partition, no repeats
    groups = fetch_optimizer_parameters(model, 1e-2, pkm_weight_decay=0.0)
    assert groups[1]["lr"] == 1e-2 and groups[1]["weight_decay"] == 0.0
    torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)  # raises if a parameter were in two groups


def test_sparse_pool_gives_sparse_gradient():
    pool = ValuePool(8, DIM, sparse=True)
    PKM(DIM, values=pool, **SIZES)(torch.randn(4, DIM)).sum().backward()
    assert pool.weight.grad.is_sparse


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_keys=0, dim=4), "num_keys"),
    (dict(num_keys=4, dim=True), "dim"),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ValuePool(**kwargs)


def test_pool_of_wrong_size_is_refused():
    with pytest.raises(ValueError, match="values"):
        PKM(DIM, values=ValuePool(4, DIM), **SIZES)
