"""The lean inference path of ``PKM.forward`` (eval mode, no gradient wanted) against the normal path.

The normal path is the same layer in eval mode with gradients on: both must select the same
slots (on equal scores the lower index wins) and give the same output.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from product_key_memory import PKM, quantize_values_
from product_key_memory.ops import cpu
from product_key_memory.ops.reference import stable_topk

SMALL = dict(dim=32, heads=2, num_keys=16, topk=4, dim_head=8)

CONFIGS = {
    "default": {},
    "concat": dict(concat_values_and_combine=True),
    "batchnorm": dict(use_layernorm=False),
    "channel_batchnorm": dict(query_norm="channel_batchnorm"),
    "qk_norm": dict(qk_norm=True),
    "hidden_pre_norm_output_norm": dict(query_hidden=(24,), query_hidden_batchnorm=True, pre_layernorm=True,
                                        norm_output=True, query_bias=True),
    "scoring": dict(temperature=0.5, score_subtract="median", score_normalize=True),
    "relu_gates_value_dim": dict(non_competitive_gates=True, value_dim=16),
    "dropouts": dict(input_dropout=0.3, query_dropout=0.3, value_dropout=0.3, attn_dropout=0.3),
}


def make(config: dict, **extra) -> PKM:
    pkm = PKM(**SMALL, **config, **extra)
    if config.get("use_layernorm") is False or "batchnorm" in str(config.get("query_norm")) or config.get(
        "query_hidden_batchnorm"
    ):
        pkm.train()
        with torch.no_grad():
            pkm(torch.randn(64, SMALL["dim"]))  # running statistics that are not the identity
    return pkm.eval()


def both_paths(pkm: PKM, x: torch.Tensor, **kwargs):
    with torch.no_grad():
        lean = pkm(x, **kwargs)
    normal = pkm(x, **kwargs)  # eval, gradients on: the parameters require grad
    assert normal.requires_grad, "the grad-enabled call must take the normal path"
    return lean, normal.detach()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_equals_normal(name):
    pkm = make(CONFIGS[name])
    x = torch.randn(3, 5, SMALL["dim"])
    mask = torch.rand(3, 5) > 0.3
    for kwargs in ({}, dict(input_mask=mask)):
        lean, normal = both_paths(pkm, x, **kwargs)
        torch.testing.assert_close(lean, normal, rtol=0, atol=1e-6, msg=f"{name} {list(kwargs)}")


@pytest.mark.parametrize("tokens", [(4, 6), (1, 1), (3, 5)])  # heads * tokens past and within the search's few-row branch
def test_lean_equals_normal_with_ties(tokens):
    # integer keys and queries: many equal sub-key scores and slot scores
    pkm = make({}, query_norm="none")
    with torch.no_grad():
        pkm.keys.copy_(torch.randint(-1, 2, pkm.keys.shape).float())
        pkm.to_queries.weight.copy_(torch.randint(-1, 2, pkm.to_queries.weight.shape).float())
    x = torch.randint(-1, 2, (*tokens, SMALL["dim"])).float()
    lean, normal = both_paths(pkm, x)
    assert torch.equal(lean, normal)
    with torch.no_grad():
        q = pkm.queries(x.reshape(-1, SMALL["dim"]))
        got = pkm.product_keys(q, pkm.keys)[1]
    # the tie rule, by brute force: every slot scored, the lower slot first on equal scores
    sub = torch.einsum("nhpd,hkpd->nhpk", q, pkm.keys)
    full = (sub[:, :, 0].unsqueeze(-1) + sub[:, :, 1].unsqueeze(-2)).flatten(-2)
    assert torch.equal(got, stable_topk(full, SMALL["topk"])[1])


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.int8, "int4"])
def test_lean_equals_normal_quantized(fmt):
    pkm = quantize_values_(make({}), fmt)
    x = torch.randn(2, 7, SMALL["dim"])
    lean, normal = both_paths(pkm, x, input_mask=torch.rand(2, 7) > 0.2)
    torch.testing.assert_close(lean, normal, rtol=0, atol=1e-6)


def test_eval_with_gradients_still_gets_gradients():
    pkm = make({})
    pkm(torch.randn(4, SMALL["dim"])).sum().backward()
    for name, p in pkm.named_parameters():
        assert p.grad is not None, f"{name} got no gradient in eval mode with gradients on"
    x = torch.randn(4, SMALL["dim"], requires_grad=True)
    for p in pkm.parameters():
        p.requires_grad_(False)
    pkm(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lean_path_runs_fewer_ops():
    pkm = PKM(dim=64, heads=2, num_keys=32, topk=8, dim_head=16).eval()
    x = torch.randn(1, 1, 64)

    def ops_of(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.key for e in prof.key_averages()}, sum(e.count for e in prof.key_averages())

    with torch.no_grad():
        pkm(x)  # the first call fills caches
        names, lean = ops_of(lambda: pkm(x))
    pkm(x)
    _, normal = ops_of(lambda: pkm(x))
    assert "pkm::search" not in names and "pkm::value_read" not in names
    assert "aten::dropout" not in names
    assert lean < normal


def test_keys_changed_in_place_are_seen():
    pkm = make({})
    x = torch.randn(5, SMALL["dim"])
    with torch.no_grad():
        before = pkm(x)
        pkm.keys.mul_(-1)
        after = pkm(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, pkm(x).detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, k", [((3, 50), 7), ((2, 4, 256), 32), ((5, 9), 9), ((4, 1), 1)])
def test_topk_lower_index_matches_stable_sort(shape, k):
    x = torch.randn(shape)
    x[..., ::3] = x[..., :1].clone()  # ties in every row, inside and at the edge of the top k
    x[0] = torch.randn(shape[-1])  # and a row without
    idx = torch.randperm(shape[-1]).expand(shape).contiguous()
    for index in (None, idx):
        got = cpu.topk_lower_index(x, k, index)
        want = stable_topk(x, k, index)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("path", ["torch", "reference", "differentiable_topk"])
def test_training_after_a_first_call_in_inference_mode(path):
    # the first call fills the library's caches (candidate pairs, bag offsets, key words); made
    # inside inference mode they were inference tensors, which a later training step cannot save
    # for backward
    from product_key_memory import ops

    config = dict(SMALL, topk=3)  # a topk no other test uses, so the caches start empty here
    pkm = PKM(**config, differentiable_topk=path == "differentiable_topk")
    x = torch.randn(2, 9, SMALL["dim"])
    backend = "reference" if path == "reference" else None
    with ops.use_backend(backend):
        with torch.inference_mode():
            pkm.eval()(x)
        pkm.train()(x).sum().backward()
    assert pkm.keys.grad is not None and pkm.values.weight.grad is not None


@pytest.mark.parametrize("piece", ["to_queries", "norm", "values"])
def test_lean_path_runs_the_hooks_of_its_pieces(piece):
    # the lean path calls the projection, the LayerNorm and the table as functions only when
    # nothing would see the difference: a hook on any of them is still run, and what it returns used
    pkm = make({})
    x = torch.randn(2, 3, SMALL["dim"])
    with torch.no_grad():
        before = pkm(x)
    calls = []

    def roll(module, args, out):  # a change no later piece undoes (a LayerNorm would undo a scale)
        calls.append(type(module).__name__)
        return out.roll(1, -1)

    handle = getattr(pkm, piece).register_forward_hook(roll)
    try:
        lean, normal = both_paths(pkm, x)
    finally:
        handle.remove()
    assert len(calls) == 2  # the lean call and the normal one
    torch.testing.assert_close(lean, normal, rtol=0, atol=1e-6)
    assert not torch.allclose(lean, before)
    with torch.no_grad():
        torch.testing.assert_close(pkm(x), before, rtol=0, atol=0)  # hook gone: the plain result again
