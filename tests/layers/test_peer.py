"""PEER (arXiv 2407.04153): against a brute-force plain-torch reference written here, against
PEER-pytorch 0.2.2 (its state dict, outputs and gradients), and with the library's optimizer,
usage tracker and torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from product_key_memory import PEER, ExpertValues, MemoryUsageTracker, build_optimizer, fetch_optimizer_parameters

from .._extras import needs

DIM, HEADS, NUM_EXPERTS, PER_HEAD = 16, 3, 64, 4  # 8 x 8 sub-keys

CONFIGS = {
    "softmax": dict(non_competing_scores=False),
    "relu_0.2.2_cut": dict(),  # non_competing_scores=True keeps one expert per head (PEER-pytorch#4)
    "relu_all_experts": dict(non_competing_single_expert=False),
    "separate_prenorm_topk": dict(non_competing_scores=False, separate_embed_per_head=True, pre_rmsnorm=True,
                                  product_key_topk=6),
    "dim_key": dict(non_competing_scores=False, dim_key=5),
}


def _layer(dtype=torch.float64, **kwargs):
    layer = PEER(DIM, heads=HEADS, num_experts=NUM_EXPERTS, num_experts_per_head=PER_HEAD, dtype=dtype, **kwargs)
    with torch.no_grad():  # spread the sub-key scores so that no two slots tie
        layer.keys.keys.normal_()
        if hasattr(layer.norm, "gamma"):
            layer.norm.gamma.normal_()
    return layer


def reference_peer(layer: PEER, x, train_mem_mask=None):
    """PEER written plainly from the layer's parameters: every one of the ``num_experts`` slots scored."""
    if hasattr(layer.norm, "gamma"):
        x = F.normalize(x, dim=-1) * DIM**0.5 * (layer.norm.gamma + 1)
    q = (x @ layer.to_queries.weight.T).unflatten(-1, (2, layer.heads, layer.dim_key))  # (..., 2, H, dk)
    keys = layer.keys.keys  # (H, num_keys, 2, dk)
    s1 = torch.einsum("...hd,hkd->...hk", q[..., 0, :, :], keys[:, :, 0])
    s2 = torch.einsum("...hd,hkd->...hk", q[..., 1, :, :], keys[:, :, 1])
    all_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., H, num_experts), slot i1 * K + i2
    scores, slots = all_scores.topk(layer.experts_per_head, dim=-1)
    if layer.separate_embed_per_head:
        slots = slots + torch.arange(layer.heads).unsqueeze(-1) * layer.num_experts
    down, up = layer.experts.down[slots], layer.experts.up[slots]  # (..., H, k, dim)
    if train_mem_mask is not None:
        keep = train_mem_mask.repeat(layer.experts.num_slots // len(train_mem_mask))[slots].unsqueeze(-1)
        down, up = torch.where(keep, down, down.detach()), torch.where(keep, up, up.detach())
    hidden = layer.activation(torch.einsum("...d,...hkd->...hk", x, down))
    gates = torch.relu(scores) if layer.non_competing_scores else scores.softmax(-1)
    return torch.einsum("...hk,...hkd->...d", hidden * gates, up)


def _grads(module, x, out, g):
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, g, allow_unused=True)
    return dict(zip(["x"] + names, grads))


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_plain_reference(name):
    layer = _layer(**CONFIGS[name])
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(NUM_EXPERTS) > 0.4
    for train_mem_mask in (None, mask):
        out = layer(x, train_mem_mask)
        expected = reference_peer(layer, x, train_mem_mask)
        assert_close(out, expected, msg=f"{name}: output")
        g = torch.randn_like(out)
        got, want = _grads(layer, x, out, g), _grads(layer, x, expected, g)
        for key in got:
            assert_close(got[key], want[key], msg=f"{name} (mask={train_mem_mask is not None}): gradient of {key}")


def test_non_competing_cut_is_explicit():
    assert _layer().experts_per_head == 1  # PEER-pytorch 0.2.2's output, the default
    assert _layer(non_competing_single_expert=False).experts_per_head == PER_HEAD
    assert _layer(non_competing_scores=False).experts_per_head == PER_HEAD
    assert "experts_per_head=1" in repr(_layer())


@pytest.mark.parametrize("shape", [(DIM,), (7, DIM), (2, 3, 2, DIM)])
def test_any_leading_dims(shape):
    layer = _layer(non_competing_scores=False)
    x = torch.randn(shape, dtype=torch.float64)
    out = layer(x)
    assert out.shape == shape
    assert_close(out, reference_peer(layer, x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=60), "num_experts must be a square"),
        (dict(num_experts_per_head=9, non_competing_scores=False), "num_experts_per_head must be at most"),
        (dict(product_key_topk=2, non_competing_scores=False), "product_key_topk must be at least"),
        (dict(dropout=1.5), "dropout"),
        (dict(non_competing_single_expert=1), "non_competing_single_expert"),
    ],
)
def test_arguments_are_checked(kwargs, match):
    args = dict(heads=HEADS, num_experts=NUM_EXPERTS, num_experts_per_head=PER_HEAD) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        PEER(DIM, **args)
    with pytest.raises(ValueError, match="even"):
        PEER(15, heads=2, num_experts=64, num_experts_per_head=4)


def test_train_mem_mask_is_checked():
    layer = _layer()
    with pytest.raises(ValueError, match="train_mem_mask"):
        layer(torch.randn(2, DIM, dtype=torch.float64), torch.ones(NUM_EXPERTS + 1, dtype=torch.bool))


def test_parts_are_called_through_the_module_tree():
    layer = _layer(non_competing_scores=False)
    x = torch.randn(4, DIM, dtype=torch.float64)
    called = []
    for name, module in layer.named_children():
        module.register_forward_hook(lambda m, a, o, name=name: called.append(name))
    layer(x)
    assert called == ["norm", "to_queries", "keys", "activation", "dropout", "scoring", "experts"]
    layer.activation = nn.ReLU()  # a setattr swap takes effect
    assert_close(layer(x), reference_peer(layer, x))


def test_state_dict_round_trip():
    layer = _layer(pre_rmsnorm=True)
    other = _layer(pre_rmsnorm=True)
    other.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(3, DIM, dtype=torch.float64)
    assert_close(other(x), layer(x))


def test_build_optimizer_steps_only_the_experts_read():
    layer = _layer(dtype=torch.float32, non_competing_scores=False)
    # small sub-keys: no softmax weight underflows to 0 (a row read with weight 0 is not stepped)
    layer.reset_parameters()
    opt = build_optimizer(layer, lr=1e-3, pkm_learning_rate=1e-2)
    assert layer.experts.sparse
    groups = fetch_optimizer_parameters(layer, 1e-2)
    assert {id(p) for p in groups[1]["params"]} == {id(layer.experts.down), id(layer.experts.up)}
    before = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    x = torch.randn(2, DIM)
    layer(x).square().sum().backward()
    assert layer.experts.down.grad.is_sparse and layer.experts.up.grad.is_sparse
    read = torch.zeros(NUM_EXPERTS, dtype=torch.bool)
    read[layer.keys(layer.to_queries(x).view(-1, 2, HEADS, layer.dim_key).transpose(1, 2))[1].flatten()] = True
    opt.step()
    for name, p in layer.experts.named_parameters():
        changed = (p.detach() != before[name]).any(-1)
        assert torch.equal(changed, read), f"{name}: the step must move exactly the experts read"


def test_usage_tracker_counts_every_expert_read():
    layer = _layer(non_competing_scores=False)
    layer.reset_parameters()  # no weight underflows to 0 (the tracker does not count zero-weight reads)
    x = torch.randn(6, DIM, dtype=torch.float64)
    with MemoryUsageTracker(layer) as tracker:
        layer(x)
    reads = tracker.counts("experts")["reads"]
    assert reads.sum() == 6 * HEADS * PER_HEAD
    slots = layer.keys(layer.to_queries(x).view(-1, 2, HEADS, layer.dim_key).transpose(1, 2))[1]
    assert_close(reads, torch.bincount(slots.flatten(), minlength=NUM_EXPERTS).to(reads.dtype))


@pytest.mark.parametrize("name", ["softmax", "relu_0.2.2_cut", "separate_prenorm_topk"])
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    layer = _layer(dtype=torch.float32, **CONFIGS[name])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(2, 5, DIM)
    mask = torch.rand(NUM_EXPERTS) > 0.4
    results = []
    for fn in (layer, compiled):
        layer.zero_grad()
        out = fn(x, mask)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    assert_close(results[1][0], results[0][0], msg="compiled output")
    for key in results[0][1]:
        assert_close(results[1][1][key], results[0][1][key], msg=f"compiled gradient of {key}")


def test_expert_table_is_a_value_table():
    assert isinstance(_layer().experts, ExpertValues)
    assert _layer(separate_embed_per_head=True).experts.num_slots == HEADS * NUM_EXPERTS


def test_compile_inductor_fullgraph_training_step_matches_eager():
    torch._dynamo.reset()
    layer = _layer(dtype=torch.float32, non_competing_scores=False)
    compiled = torch.compile(layer, fullgraph=True)  # the default backend: generated C++ on CPU
    x = torch.randn(2, 7, DIM)
    results = []
    for fn in (layer, compiled):
        layer.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        results.append([("output", out.detach())] + [(n, p.grad.clone()) for n, p in layer.named_parameters()])
    for (name, want), (_, got) in zip(*results):
        assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=f"inductor: {name}")


# ---- PEER-pytorch 0.2.2 itself

needs_peer_pytorch = needs("PEER_pytorch")

PEER_PYTORCH_CONFIGS = dict(CONFIGS)
PEER_PYTORCH_CONFIGS.pop("relu_all_experts")  # PEER-pytorch cannot keep more than one expert with relu gates


@needs_peer_pytorch
@pytest.mark.parametrize("name", PEER_PYTORCH_CONFIGS)
def test_peer_pytorch_state_dict_gives_the_same_outputs_and_gradients(name):
    from PEER_pytorch import PEER as PeerPytorch

    kwargs = dict(heads=HEADS, num_experts=NUM_EXPERTS, num_experts_per_head=PER_HEAD, **CONFIGS[name])
    theirs = PeerPytorch(DIM, **kwargs).double()
    with torch.no_grad():
        theirs.keys.normal_()
        if kwargs.get("pre_rmsnorm"):
            theirs.norm.gamma.normal_()
    ours = PEER(DIM, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    names = {"keys": "keys.keys", "weight_down_embed.weight": "experts.down", "weight_up_embed.weight": "experts.up",
             "to_queries.0.weight": "to_queries.weight", "norm.gamma": "norm.gamma"}
    assert set(names[k] for k in theirs.state_dict()) == set(ours.state_dict())

    # PEER-pytorch takes (batch, seq, dim) and, with separate sets, indexes the mask by the offset slots
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    mask_len = NUM_EXPERTS * (HEADS if kwargs.get("separate_embed_per_head") else 1)
    for mask in (None, torch.rand(mask_len) > 0.4):
        if mask is not None and kwargs.get("separate_embed_per_head"):
            continue  # PEER-pytorch asserts len(mask) == num_experts, then indexes past it
        out_theirs, out_ours = theirs(x, mask), ours(x, mask)
        assert_close(out_ours, out_theirs, msg=f"{name}: output")
        g = torch.randn_like(out_theirs)
        want, got = _grads(theirs, x, out_theirs, g), _grads(ours, x, out_ours, g)
        for key, value in want.items():
            assert_close(got[names.get(key, key)], value, msg=f"{name} (mask={mask is not None}): gradient of {key}")

