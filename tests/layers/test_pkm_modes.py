"""One forward in every mode: training, eval with and without gradients, ``inference_mode``.

``PKM.forward`` calls exactly the modules ``named_modules()`` shows, so hooks fire on every path
and a piece swapped by assignment on its parent takes effect; the eval/no-grad savings live in
the ops' entries, which select the same slots (on equal scores the lower index wins).
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.profiler import ProfilerActivity, profile

from product_key_memory import PKM, MemoryPlus, ValuePool, ops, quantize_values_

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


def no_grad_and_grad(pkm: nn.Module, x: torch.Tensor, **kwargs):
    with torch.no_grad():
        lean = pkm(x, **kwargs)
    normal = pkm(x, **kwargs)  # eval, gradients on: the parameters require grad
    assert normal.requires_grad, "the grad-enabled call must build a graph"
    return lean, normal.detach()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_grad_equals_grad(name):
    pkm = make(CONFIGS[name])
    x = torch.randn(3, 5, SMALL["dim"])
    mask = torch.rand(3, 5) > 0.3
    for kwargs in ({}, dict(input_mask=mask)):
        lean, normal = no_grad_and_grad(pkm, x, **kwargs)
        torch.testing.assert_close(lean, normal, rtol=0, atol=1e-6, msg=f"{name} {list(kwargs)}")
        with torch.inference_mode():
            torch.testing.assert_close(pkm(x, **kwargs), normal, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tokens", [(4, 6), (1, 1), (3, 5)])  # heads * tokens past and within the search's few-row branch
def test_no_grad_equals_grad_with_ties(tokens):
    # integer keys and queries: many equal sub-key scores and slot scores
    pkm = make({}, query_norm="none")
    with torch.no_grad():
        pkm.keys.copy_(torch.randint(-1, 2, pkm.keys.shape).float())
        pkm.to_queries.weight.copy_(torch.randint(-1, 2, pkm.to_queries.weight.shape).float())
    x = torch.randint(-1, 2, (*tokens, SMALL["dim"])).float()
    lean, normal = no_grad_and_grad(pkm, x)
    assert torch.equal(lean, normal)
    with torch.no_grad():
        q = pkm.queries(x.reshape(-1, SMALL["dim"]))
        got = pkm.product_keys(q)[1]
    # the tie rule, by brute force: every slot scored, the lower slot first on equal scores
    sub = torch.einsum("nhpd,hkpd->nhpk", q, pkm.keys)
    full = (sub[:, :, 0].unsqueeze(-1) + sub[:, :, 1].unsqueeze(-2)).flatten(-2)
    assert torch.equal(got, ops.topk.reference.topk_lower_index(full, SMALL["topk"])[1])


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.int8, "int4"])
def test_no_grad_equals_grad_quantized(fmt):
    pkm = quantize_values_(make({}), fmt)
    x = torch.randn(2, 7, SMALL["dim"])
    lean, normal = no_grad_and_grad(pkm, x, input_mask=torch.rand(2, 7) > 0.2)
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


def test_no_grad_skips_the_op_dispatch():
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
    grad_names, normal = ops_of(lambda: pkm(x))
    assert "pkm::search" not in names and "pkm::value_read" not in names
    assert "pkm::search" in grad_names and "pkm::value_read" in grad_names
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


@pytest.mark.parametrize("path", ["torch", "reference", "differentiable_topk"])
def test_training_after_a_first_call_in_inference_mode(path):
    # the first call fills the library's caches (candidate pairs, bag offsets, key words); made
    # inside inference mode they were inference tensors, which a later training step cannot save
    # for backward
    config = dict(SMALL, topk=3)  # a topk no other test uses, so the caches start empty here
    pkm = PKM(**config, differentiable_topk=path == "differentiable_topk")
    x = torch.randn(2, 9, SMALL["dim"])
    backend = "reference" if path == "reference" else None
    with ops.use_backend(backend):
        with torch.inference_mode():
            pkm.eval()(x)
        pkm.train()(x).sum().backward()
    assert pkm.keys.grad is not None and pkm.values.weight.grad is not None


MODES = ("train", "eval_grad", "eval_no_grad", "inference_mode")


def run_in(mode: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.train(mode == "train")
    if mode == "eval_no_grad":
        with torch.no_grad():
            return module(x)
    if mode == "inference_mode":
        with torch.inference_mode():
            return module(x)
    return module(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["default", "concat", "hidden_pre_norm_output_norm", "relu_gates_value_dim"])
def test_every_module_hook_fires_once_per_call(name, mode):
    pkm = make(CONFIGS[name])
    calls, handles = {}, []
    for path, module in pkm.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, args, path=path: calls.setdefault(path, []).append(1)))
    run_in(mode, pkm, torch.randn(2, 3, SMALL["dim"]))
    for handle in handles:
        handle.remove()
    # containers (nn.ModuleList) have no forward: their members are called
    expected = {path: 1 for path, m in pkm.named_modules() if not isinstance(m, (nn.ModuleList, nn.ModuleDict))}
    assert {path: len(c) for path, c in calls.items()} == expected


@pytest.mark.parametrize("mode", MODES)
def test_global_hooks_see_every_module(mode):
    pkm = make({})
    seen = []
    handle = nn_module.register_module_forward_hook(lambda m, args, out: seen.append(m))
    try:
        run_in(mode, pkm, torch.randn(3, SMALL["dim"]))
    finally:
        handle.remove()
    every = [m for m in pkm.modules() if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    assert {id(m) for m in seen} == {id(m) for m in every} and len(seen) == len(every)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["query", "query.to_queries", "query.norm", "product_keys", "scoring", "values",
                                  "output"])
def test_a_hook_that_changes_an_output_takes_effect(path, mode):
    pkm = make({})
    x = torch.randn(2, 3, SMALL["dim"])
    before = run_in(mode, pkm, x).detach().clone()

    def change(module, args, out):  # a change no later piece undoes (a LayerNorm would undo a scale)
        if isinstance(out, tuple):  # the search: (scores, slots); reverse each head's order of slots
            return out[0].flip(-1) * 2, out[1]
        return out.roll(1, -1)

    handle = pkm.get_submodule(path).register_forward_hook(change)
    try:
        changed = run_in(mode, pkm, x)
    finally:
        handle.remove()
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(run_in(mode, pkm, x), before, rtol=0, atol=0)  # hook gone: the plain result again


class LoRA(nn.Module):
    """A low-rank adapter around a linear map, as peft injects it: ``base(x) + up(down(x))``."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("mode", MODES)
def test_a_lora_swapped_in_on_its_parent_is_used_and_learns(mode):
    pkm = make({})
    x = torch.randn(4, SMALL["dim"])
    before = run_in(mode, pkm, x).detach()
    # what peft does: walk named_modules, wrap each nn.Linear it targets, setattr on the parent
    for path, module in list(pkm.named_modules()):
        for name, child in list(module.named_children()):
            if name == "to_queries":
                setattr(module, name, LoRA(child))
    assert isinstance(pkm.query.to_queries, LoRA) and "query.to_queries.down" in dict(pkm.named_modules())
    out = run_in(mode, pkm, x)
    assert not torch.allclose(out, before)
    if mode in ("train", "eval_grad"):
        out.square().sum().backward()
        assert pkm.query.to_queries.down.weight.grad.abs().sum() > 0


def test_030_attribute_names_assign_into_the_parts():
    pkm = make({})
    x = torch.randn(4, SMALL["dim"])
    with torch.no_grad():
        before = pkm(x)
    base = pkm.to_queries
    pkm.to_queries = LoRA(base)  # 0.3.0's name, on the layer: replaces the piece in the query network
    assert pkm.query.to_queries is pkm.to_queries and "to_queries" not in pkm._modules
    with torch.no_grad():
        assert not torch.allclose(pkm(x), before)
        pkm.to_queries = base
        torch.testing.assert_close(pkm(x), before, rtol=0, atol=0)
    keys = nn.Parameter(torch.zeros_like(pkm.keys))
    pkm.keys = keys
    assert pkm.product_keys.keys is keys and [n for n, _ in pkm.named_parameters()].count("product_keys.keys") == 1


def test_quantize_dynamic_swaps_the_linear_maps():
    pkm = make({}, query_hidden=(24,), concat_values_and_combine=True)
    x = torch.randn(6, SMALL["dim"])
    float_layer = copy.deepcopy(pkm)
    with torch.no_grad():
        want_q = pkm.query(x)
    quantized = torch.ao.quantization.quantize_dynamic(pkm, {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.query.to_queries) is not nn.Linear and type(quantized.output.combine) is not nn.Linear
    with torch.no_grad():
        got, got_q = quantized(x), quantized.query(x)
        assert not torch.equal(got_q, want_q)  # the int8 maps ran
        assert (got_q - want_q).norm() / want_q.norm() < 0.05  # int8 weights and activations
        # the float layer with the quantized parts put in gives the same output: forward ran those parts
        float_layer.query, float_layer.output = quantized.query, quantized.output
        assert torch.equal(float_layer(x), got)


TABLES = {
    "embedding": {},
    "value_dim": dict(value_dim=16),
    "concat": dict(concat_values_and_combine=True),
    "qk_norm_batchnorm": dict(qk_norm=True, use_layernorm=False),
    "pool": "pool",
    "int8": torch.int8,
    "bfloat16": torch.bfloat16,
    "int4": "int4",
}


def table_layer(kind) -> nn.Module:
    if kind == "pool":
        return PKM(**SMALL, values=ValuePool(SMALL["num_keys"], SMALL["dim"]))
    if isinstance(kind, dict):
        return PKM(**SMALL, **kind)
    return quantize_values_(PKM(**SMALL), kind)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_zero_tokens(table, mode, lead):
    pkm = table_layer(TABLES[table])
    for layer in (pkm, MemoryPlus(SMALL["dim"], memory=pkm)):
        x = torch.randn(*lead, SMALL["dim"], requires_grad=mode in ("train", "eval_grad"))
        out = run_in(mode, layer, x)
        assert out.shape == (*lead, SMALL["dim"])
        if x.requires_grad:
            out.sum().backward()
            assert x.grad.shape == x.shape and not x.grad.any()
        mask = torch.zeros(lead, dtype=torch.bool)
        layer.train(mode == "train")
        with torch.no_grad():
            assert layer(x.detach(), input_mask=mask).shape == (*lead, SMALL["dim"])
