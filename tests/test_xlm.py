"""from_xlm against a reference of the paper's reference-code memory, written from its description.

The reference below follows the description in issue 3 (query network, per-head
halves, two-stage top-k, re-scoring, EmbeddingBag read) and reads the reference
state dict directly, in its own layouts; it shares no code with the library.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from product_key_memory import EmbeddingValues, PKM, from_xlm


def make_xlm_state_dict(
    input_dim=24, heads=3, k_dim=8, n_keys=10, v_dim=None, hidden=(), bias=True, batchnorm=False, gen=None
):
    """A random state dict in the reference code's format; BatchNorm statistics far from identity."""
    g = gen or torch.Generator().manual_seed(0)
    v_dim = input_dim if v_dim is None else v_dim
    sd = {
        "keys": torch.empty(heads, 2, n_keys, k_dim // 2).uniform_(-1, 1, generator=g),
        "values.weight": torch.randn(n_keys**2, v_dim, generator=g) / math.sqrt(v_dim),
    }
    sizes = (input_dim,) + tuple(hidden) + (heads * k_dim,)
    i = 0
    for layer, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
        sd[f"query_proj.query_mlps.{i}.weight"] = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
        if bias:
            sd[f"query_proj.query_mlps.{i}.bias"] = torch.randn(d_out, generator=g) * 0.3
        i += 1
        if batchnorm:
            p = f"query_proj.query_mlps.{i}."
            sd[p + "weight"] = 1 + 0.5 * torch.rand(d_out, generator=g)
            sd[p + "bias"] = 0.2 * torch.randn(d_out, generator=g)
            sd[p + "running_mean"] = 0.5 * torch.randn(d_out, generator=g)
            sd[p + "running_var"] = 0.5 + torch.rand(d_out, generator=g)
            sd[p + "num_batches_tracked"] = torch.tensor(7)
            i += 1
        if layer < len(sizes) - 2:
            i += 1  # ReLU: no entries
    return sd


def xlm_reference(
    sd, x, knn, temperature=1.0, score_softmax=True, subtract=None, normalize=False, eps=1e-5, training=False
):
    """Forward of the reference memory for x ``(N, input_dim)``, from its description (no dropout)."""
    mlp = {}
    for name, t in sd.items():
        if name.startswith("query_proj.query_mlps."):
            i, entry = name[len("query_proj.query_mlps."):].split(".", 1)
            mlp.setdefault(int(i), {})[entry] = t
    h = x
    for i in range(max(mlp) + 1):
        layer = mlp.get(i)
        if layer is None:
            h = torch.relu(h)  # the parameter-free module between layers
        elif "running_mean" in layer:
            if training:  # batch statistics over all tokens
                mean, var = h.mean(0), h.var(0, unbiased=False)
            else:
                mean, var = layer["running_mean"], layer["running_var"]
            h = (h - mean) / torch.sqrt(var + eps) * layer["weight"] + layer["bias"]
        else:
            h = h @ layer["weight"].t() + layer.get("bias", 0.0)
    keys = sd["keys"]  # (heads, 2, n_keys, k_dim / 2)
    heads, _, n_keys, half = keys.shape
    q = h.view(-1, heads, 2 * half)  # (N, heads, k_dim): first half, then second half
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], keys[:, 1])
    b1, i1 = s1.topk(knn, dim=-1)
    b2, i2 = s2.topk(knn, dim=-1)
    all_scores = (b1[..., :, None] + b2[..., None, :]).flatten(-2)  # (N, heads, knn * knn)
    all_slots = (i1[..., :, None] * n_keys + i2[..., None, :]).flatten(-2)
    scores, best = all_scores.topk(knn, dim=-1)
    slots = all_slots.gather(-1, best)
    scores = scores / temperature
    if score_softmax:
        scores = F.softmax(scores.float(), dim=-1)
    if subtract == "min":
        scores = scores - scores.min(-1, keepdim=True).values
    elif subtract == "mean":
        scores = scores - scores.mean(-1, keepdim=True)
    elif subtract == "median":
        scores = scores - scores.median(-1, keepdim=True).values
    if normalize:
        scores = scores / scores.abs().sum(-1, keepdim=True)
    bag = torch.nn.EmbeddingBag.from_pretrained(sd["values.weight"], mode="sum")
    return bag(slots.reshape(len(x), -1), per_sample_weights=scores.reshape(len(x), -1))


CASES = [
    dict(layout=dict(), options=dict()),
    dict(layout=dict(bias=False), options=dict(temperature=0.5)),
    dict(layout=dict(batchnorm=True), options=dict()),
    dict(layout=dict(batchnorm=True, hidden=(32,)), options=dict(temperature=2.0)),
    dict(layout=dict(hidden=(20, 16)), options=dict(score_subtract="mean", score_normalize=True)),
    dict(layout=dict(batchnorm=True, hidden=(16,), bias=False), options=dict(score_subtract="median")),
    dict(layout=dict(batchnorm=True), options=dict(score_softmax=False, score_subtract="min", score_normalize=True)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['layout']}-{c['options']}")
def test_from_xlm_matches_reference_forward(case):
    sd = make_xlm_state_dict(**case["layout"])
    x = torch.randn(2, 7, 24)
    pkm = from_xlm(sd, topk=4, **case["options"])
    assert not pkm.training
    opts = case["options"]
    expected = xlm_reference(
        sd,
        x.reshape(-1, 24),
        knn=4,
        temperature=opts.get("temperature", 1.0),
        score_softmax=opts.get("score_softmax", True),
        subtract=opts.get("score_subtract"),
        normalize=opts.get("score_normalize", False),
    ).view(2, 7, 24)
    with torch.no_grad():
        got = pkm(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg="from_xlm eval forward != reference")


def test_from_xlm_infers_sizes_and_layout():
    sd = make_xlm_state_dict(heads=3, k_dim=8, n_keys=10, hidden=(32,), batchnorm=True)
    pkm = from_xlm(sd, topk=5)
    assert (pkm.dim, pkm.heads, pkm.num_keys, pkm.dim_head, pkm.topk) == (24, 3, 10, 4, 5)
    assert pkm.query_norm == "channel_batchnorm" and pkm.query_hidden.sizes == (32,)
    # keys (heads, 2, n, d) -> (heads, n, 2, d); query channel (head, half, d) -> (half, head, d)
    torch.testing.assert_close(pkm.keys.detach(), sd["keys"].transpose(1, 2))
    w = sd["query_proj.query_mlps.3.weight"].view(3, 2, 4, 32)
    torch.testing.assert_close(pkm.to_queries.weight.detach().view(2, 3, 4, 32), w.transpose(0, 1))
    rm = sd["query_proj.query_mlps.4.running_mean"].view(3, 2, 4)
    torch.testing.assert_close(pkm.norm.fn.running_mean.view(2, 3, 4), rm.transpose(0, 1))
    assert int(pkm.norm.fn.num_batches_tracked) == 7


def test_from_xlm_with_prefix_options_and_padding():
    sd = {f"memories.1.{k}": v for k, v in make_xlm_state_dict(batchnorm=True).items()}
    sd["embeddings.weight"] = torch.zeros(3, 3)  # outside the prefix: ignored
    pkm = from_xlm(sd, topk=4, prefix="memories.1.", sparse_values=True, freeze_keys=True)
    assert pkm.values.sparse and not pkm.keys.requires_grad
    x = torch.randn(3, 5, 24)
    mask = torch.rand(3, 5) > 0.4
    out = pkm(x, input_mask=mask)
    inner = {k[len("memories.1."):]: v for k, v in sd.items() if k.startswith("memories.1.")}
    ref = xlm_reference(inner, x.view(-1, 24), 4)
    torch.testing.assert_close(out[mask], ref.view(3, 5, 24)[mask], atol=1e-5, rtol=1e-5)
    assert (out[~mask] == 0).all()


def test_from_xlm_rejects_what_it_cannot_convert():
    sd = make_xlm_state_dict()
    with pytest.raises(TypeError, match="pre_layernorm"):
        from_xlm(sd, topk=4, pre_layernorm=True)
    with pytest.raises(TypeError, match="heads"):
        from_xlm(sd, topk=4, heads=2)
    with pytest.raises(ValueError, match="v_dim"):
        from_xlm(make_xlm_state_dict(v_dim=16), topk=4)
    with pytest.raises(ValueError, match="does not understand"):
        from_xlm({**sd, "query_proj.conv.weight": torch.zeros(1)}, topk=4)
    with pytest.raises(ValueError, match="no 'keys'"):
        from_xlm({k: v for k, v in sd.items() if k != "keys"}, topk=4)
    bad = dict(sd)
    bad["query_proj.query_mlps.0.weight"] = torch.zeros(5, 24)
    with pytest.raises(ValueError, match="heads \\* k_dim"):
        from_xlm(bad, topk=4)
    with pytest.raises(ValueError, match="topk"):
        from_xlm(sd, topk=11)


def test_from_xlm_training_forward_uses_batch_statistics_like_the_reference():
    sd = make_xlm_state_dict(batchnorm=True, hidden=(32,))
    pkm = from_xlm(sd, topk=4).train()
    x = torch.randn(40, 24)
    torch.testing.assert_close(pkm(x), xlm_reference(sd, x, 4, training=True), atol=1e-5, rtol=1e-5)


def test_from_xlm_result_trains():
    pkm = from_xlm(make_xlm_state_dict(batchnorm=True, hidden=(16,)), topk=4).train()
    x = torch.randn(4, 6, 24)
    pkm(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in pkm.parameters())
    assert isinstance(pkm, PKM)


def test_from_xlm_memories_sharing_one_table():
    first = make_xlm_state_dict(batchnorm=True)
    second = make_xlm_state_dict(hidden=(16,), gen=torch.Generator().manual_seed(1))
    second["values.weight"] = first["values.weight"]
    table = EmbeddingValues(*first["values.weight"].shape)
    with torch.no_grad():
        table.weight.copy_(first["values.weight"])
    without_table = [{k: v for k, v in sd.items() if k != "values.weight"} for sd in (first, second)]
    pkms = [from_xlm(sd, topk=4, values=table) for sd in without_table]
    assert pkms[0].values is table and pkms[1].values is table
    x = torch.randn(6, 24)
    for pkm, sd in zip(pkms, (first, second)):
        torch.testing.assert_close(pkm(x), xlm_reference(sd, x, 4), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="own"):
        from_xlm(first, topk=4, values=table)
