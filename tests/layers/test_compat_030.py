"""product-key-memory 0.3.0 checkpoints load strictly and compute the same outputs."""

import itertools

import pytest
import torch

from product_key_memory import PKM

CONFIG = dict(dim=32, heads=2, num_keys=16, topk=4, dim_head=8)
CORRECT_IN_030 = ("pre_layernorm", "norm_output", "non_competitive_gates")

# where each of 0.3.0's state-dict entries lives in this library's layer (written out here, not
# taken from the library's renaming hook, so a wrong hook fails these tests)
_030_PARTS = {
    "keys": "product_keys.keys",
    "maybe_concat_combine.2.weight": "output.combine.weight",
    "to_queries.": "query.to_queries.",
    "norm.": "query.norm.",
    "pre_layernorm.": "query.pre_layernorm.",
    "output_norm.": "output.output_norm.",
}


def ours(name_030: str) -> str:
    for old, new in _030_PARTS.items():
        if name_030 == old or (old.endswith(".") and name_030.startswith(old)):
            return new + name_030[len(old):]
    return name_030


@pytest.fixture(scope="module")
def pkm_030():
    from benchmarks.peer import load_peer

    try:
        return load_peer()
    except Exception as error:  # no registry reachable: nothing to compare against
        pytest.skip(f"product-key-memory 0.3.0 could not be fetched: {error}")


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_same_outputs_where_030_is_correct(pkm_030, flags):
    kwargs = {**CONFIG, **dict(zip(CORRECT_IN_030, flags))}
    old = pkm_030.PKM(**kwargs)
    new = PKM(**kwargs)
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 7, CONFIG["dim"])
    torch.testing.assert_close(new(x), old(x), atol=1e-6, rtol=1e-5)
    # and the gradient of every parameter
    g = torch.randn(2, 7, CONFIG["dim"])
    old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
    assert {ours(n) for n in old_params} == new_params.keys()
    names = list(old_params)
    old_grads = torch.autograd.grad((old(x) * g).sum(), [old_params[n] for n in names])
    new_grads = torch.autograd.grad((new(x) * g).sum(), [new_params[ours(n)] for n in names])
    for name, a, b in zip(names, new_grads, old_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "extra",
    [
        dict(use_layernorm=False),
        dict(concat_values_and_combine=True),
        dict(differentiable_topk=True),
        dict(use_layernorm=False, concat_values_and_combine=True, pre_layernorm=True, norm_output=True),
        dict(input_dropout=0.1, query_dropout=0.1, value_dropout=0.1, attn_dropout=0.1),
    ],
)
def test_every_configuration_loads_strictly(pkm_030, extra):
    old = pkm_030.PKM(**CONFIG, **extra)
    new = PKM(**CONFIG, **extra)
    result = new.load_state_dict(old.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[ours(name)], tensor, msg=name)


def test_concat_mode_differs_from_030_only_by_the_applied_weights(pkm_030):
    """0.3.0 summed the selected values unweighted (its bug); with all weights equal to 1 we agree."""
    old = pkm_030.PKM(**CONFIG, concat_values_and_combine=True, non_competitive_gates=True)
    new = PKM(**CONFIG, concat_values_and_combine=True, non_competitive_gates=True)
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(3, 5, CONFIG["dim"])
    q = new.queries(x.reshape(-1, CONFIG["dim"]))
    _, slots = new.search(q)
    ones = torch.ones(slots.shape)
    torch.testing.assert_close(new.read(slots, ones).view(3, 5, -1), old(x), atol=1e-5, rtol=1e-5)


def test_030_batchnorm_checkpoint_keeps_its_running_statistics(pkm_030):
    old = pkm_030.PKM(**CONFIG, use_layernorm=False)
    with torch.no_grad():
        old.norm.fn.running_mean.uniform_(-1, 1)
        old.norm.fn.running_var.uniform_(0.5, 2)
    new = PKM(**CONFIG, use_layernorm=False)
    new.load_state_dict(old.state_dict(), strict=True)
    torch.testing.assert_close(new.query.norm.fn.running_mean, old.norm.fn.running_mean)
    torch.testing.assert_close(new.query.norm.fn.running_var, old.norm.fn.running_var)
    # 0.3.0's attribute path reaches the same module
    assert new.norm is new.query.norm
