"""A run interrupted after N steps and resumed from state dicts ends bit-identical to an uninterrupted run."""

import io

import pytest
import torch
from torch import nn

from product_key_memory import PKM, build_optimizer, fetch_optimizer_parameters

STEPS, STOP = 6, 3


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), PKM(16, heads=2, num_keys=8, topk=3, dim_head=4), nn.Linear(16, 4))


def make_optimizer(kind, model):
    if kind == "build_optimizer":
        return build_optimizer(model, lr=1e-2, pkm_learning_rate=5e-2, weight_decay=0.01)
    return torch.optim.Adam(fetch_optimizer_parameters(model, 5e-2), lr=1e-2, foreach=False)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 5, 16, generator=g), torch.randn(4, 5, 4, generator=g)


def train(model, opt, steps):
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("kind", ["build_optimizer", "adam"])
def test_resumed_run_is_bit_identical(kind):
    model = make_model(0)
    opt = make_optimizer(kind, model)
    train(model, opt, range(STEPS))

    first = make_model(0)
    first_opt = make_optimizer(kind, first)
    train(first, first_opt, range(STOP))
    saved = round_trip({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    del first, first_opt

    resumed = make_model(1)  # another init: everything must come from the checkpoint
    resumed_opt = make_optimizer(kind, resumed)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    train(resumed, resumed_opt, range(STOP, STEPS))

    if kind == "build_optimizer":
        assert resumed[1].values.weight.grad.is_sparse
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key
