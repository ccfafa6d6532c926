"""UltraMem's value learning-rate multiplier and the scheduler that applies it to the value groups."""

import math

import pytest
import torch

from product_key_memory import PKM, build_optimizer
from product_key_memory.training import value_lr_multiplier, value_lr_scheduler


def test_multiplier_decays_linearly_to_one():
    assert value_lr_multiplier(0, max_steps=100) == 4.0
    assert value_lr_multiplier(50, max_steps=100) == 2.5
    assert value_lr_multiplier(100, max_steps=100) == 1.0
    assert value_lr_multiplier(1000, max_steps=100) == 1.0
    assert value_lr_multiplier(25, max_steps=100, initial=3.0, decay_fraction=0.5) == 2.0
    assert value_lr_multiplier(60, max_steps=100, initial=3.0, decay_fraction=0.5) == 1.0
    for step in range(0, 120, 7):  # the official formula, written out
        want = 1 + (4.0 - 1) * max(0, 1 - step / (100 * 1.0))
        assert value_lr_multiplier(step, max_steps=100) == want


def test_scheduler_scales_only_the_value_group():
    model = PKM(8, num_keys=4, topk=2, heads=1)
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=2e-3)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, 10) / 10))  # noqa: E731
    sched = value_lr_scheduler(opt, max_steps=10, initial=4.0, base=cosine)
    for step in range(12):
        rest, values = (g["lr"] for g in opt.param_groups)
        assert rest == pytest.approx(1e-3 * cosine(step))
        assert values == pytest.approx(2e-3 * cosine(step) * value_lr_multiplier(step, max_steps=10))
        opt.step()
        sched.step()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_steps=0), "max_steps"), (dict(max_steps=10, initial=0), "initial"),
    (dict(max_steps=10, decay_fraction=-1), "decay_fraction"), (dict(max_steps=10, value_groups=(5,)), "value_groups"),
])
def test_arguments_are_checked(kwargs, match):
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))]} for _ in range(2)], lr=1.0)
    with pytest.raises(ValueError, match=match):
        value_lr_scheduler(opt, **kwargs)
    with pytest.raises(ValueError, match="step"):
        value_lr_multiplier(-1, max_steps=10)
