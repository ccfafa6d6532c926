"""from_xlm against a reference of the paper's reference-code memory, written from its description.

The reference below follows the description in issue 3 (query network, per-head
halves, two-stage top-k, re-scoring, EmbeddingBag read) and reads the reference
state dict directly, in its own layouts; it shares no code with the library.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from product_key_memory import EmbeddingValues, PKM, from_xlm


def make_xlm_state_dict(
    input_dim=24, heads=3, k_dim=8, n_keys=10, v_dim=None, hidden=(), bias=True, batchnorm=False, gen=None,
    multi_query=False, identity=False,
):
    """A random state dict in the reference code's exact layout; BatchNorm statistics far from identity.

    The reference (XLM's HashingMemory with QueryMLP, read from its description) names the query
    network's parameters by module position: with no hidden layer (``mem_query_layer_sizes="0,0"``)
    one Sequential, ``query_proj.query_mlps.{i}``; with hidden layers (``"0,40,0"``) a ModuleList of
    Sequentials, ``query_proj.query_mlps.{net}.{i}``, one net, or ``2 * heads`` nets of ``k_dim / 2``
    outputs each with ``mem_multi_query_net``. A Sequential is Linear, [BatchNorm1d], ReLU, ..., Linear,
    [BatchNorm1d]; a ReLU has no entries but takes a position. No query network (``identity``,
    ``mem_query_layer_sizes=""``) has no entries.
    """
    g = gen or torch.Generator().manual_seed(0)
    v_dim = input_dim if v_dim is None else v_dim
    sd = {
        "keys": torch.empty(heads, 2, n_keys, k_dim // 2).uniform_(-1, 1, generator=g),
        "values.weight": torch.randn(n_keys**2, v_dim, generator=g) / math.sqrt(v_dim),
    }
    if identity:
        return sd
    nets = 2 * heads if multi_query else 1
    sizes = (input_dim,) + tuple(hidden) + ((k_dim // 2) if multi_query else (heads * k_dim),)
    for net in range(nets):
        head = f"query_proj.query_mlps.{net}." if hidden else "query_proj.query_mlps."
        i = 0
        for layer, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
            sd[f"{head}{i}.weight"] = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
            if bias:
                sd[f"{head}{i}.bias"] = torch.randn(d_out, generator=g) * 0.3
            i += 1
            if batchnorm:
                p = f"{head}{i}."
                sd[p + "weight"] = 1 + 0.5 * torch.rand(d_out, generator=g)
                sd[p + "bias"] = 0.2 * torch.randn(d_out, generator=g)
                sd[p + "running_mean"] = 0.5 * torch.randn(d_out, generator=g)
                sd[p + "running_var"] = 0.5 + torch.rand(d_out, generator=g)
                sd[p + "num_batches_tracked"] = torch.tensor(7)
                i += 1
            if layer < len(sizes) - 2:
                i += 1  # ReLU: no entries
    return sd


def _sequential(layers, h, eps, training):
    for i in range(max(layers) + 1):
        layer = layers.get(i)
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
    return h


def xlm_reference(
    sd, x, knn, temperature=1.0, score_softmax=True, subtract=None, normalize=False, eps=1e-5, training=False
):
    """Forward of the reference memory for x ``(N, input_dim)``, from its description (no dropout)."""
    nets = {}
    for name, t in sd.items():
        if name.startswith("query_proj.query_mlps."):
            parts = name[len("query_proj.query_mlps."):].split(".")
            if len(parts) == 2:  # no hidden layer: one net, no net index
                parts = ["0"] + parts
            net, i, entry = int(parts[0]), int(parts[1]), parts[2]
            nets.setdefault(net, {}).setdefault(i, {})[entry] = t
    heads = sd["keys"].shape[0]
    if nets:  # the nets' outputs side by side
        h = torch.cat([_sequential(nets[n], x, eps, training) for n in sorted(nets)], dim=-1)
    else:  # no query network: the input is the query of every head
        h = x.repeat(1, heads)
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
    w = sd["query_proj.query_mlps.0.3.weight"].view(3, 2, 4, 32)
    torch.testing.assert_close(pkm.to_queries.weight.detach().view(2, 3, 4, 32), w.transpose(0, 1))
    rm = sd["query_proj.query_mlps.0.4.running_mean"].view(3, 2, 4)
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
    bad["query_proj.query_mlps.0.bias"] = torch.zeros(5)
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


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_from_xlm_converts_the_reference_hidden_layout(batchnorm, bias):
    # mem_query_layer_sizes="0,40,0": the MLP sits in a ModuleList, query_proj.query_mlps.0.<i>.*
    sd = make_xlm_state_dict(hidden=(40,), batchnorm=batchnorm, bias=bias)
    assert "query_proj.query_mlps.0.0.weight" in sd
    pkm = from_xlm(sd, topk=4)
    assert pkm.query_hidden.sizes == (40,)
    x = torch.randn(9, 24)
    torch.testing.assert_close(pkm(x), xlm_reference(sd, x, 4), atol=1e-5, rtol=1e-5)


def test_from_xlm_identity_query_one_head_converts_several_heads_refused():
    sd = make_xlm_state_dict(input_dim=8, heads=1, k_dim=8, identity=True)
    pkm = from_xlm(sd, topk=4)
    x = torch.randn(9, 8)
    torch.testing.assert_close(pkm(x), xlm_reference(sd, x, 4), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mem_shuffle_query"):
        from_xlm(make_xlm_state_dict(input_dim=8, heads=2, k_dim=8, identity=True), topk=4)


def test_from_xlm_refuses_a_multi_query_network():
    sd = make_xlm_state_dict(hidden=(16,), multi_query=True)
    assert "query_proj.query_mlps.5.0.weight" in sd  # 2 * heads nets
    with pytest.raises(ValueError, match="6 query networks .*mem_multi_query_net"):
        from_xlm(sd, topk=4)
    grouped = {k: v for k, v in make_xlm_state_dict().items() if not k.startswith("query_proj")}
    grouped["query_proj.query_mlps.0.weight"] = torch.zeros(24, 24)
    grouped["query_proj.query_mlps.2.layer.weight"] = torch.zeros(24, 4, 1)  # mem_grouped_conv
    with pytest.raises(ValueError, match="grouped convolutions"):
        from_xlm(grouped, topk=4)


@pytest.mark.parametrize(
    "removed",
    [
        ("query_proj.query_mlps.0.1.",),  # the hidden batch norm
        ("query_proj.query_mlps.0.4.running_var",),  # part of the last batch norm
        ("query_proj.query_mlps.0.3.bias",),  # one bias
        ("query_proj.query_mlps.0.3.", "query_proj.query_mlps.0.4."),  # the last layer
    ],
)
def test_from_xlm_refuses_an_incomplete_checkpoint_naming_what_is_missing(removed):
    sd = make_xlm_state_dict(hidden=(32,), batchnorm=True)
    gone = sorted(k for k in sd if k.startswith(removed))
    incomplete = {k: v for k, v in sd.items() if k not in gone}
    with pytest.raises(ValueError) as error:
        from_xlm(incomplete, topk=4)
    message = str(error.value)
    if removed != ("query_proj.query_mlps.0.3.", "query_proj.query_mlps.0.4."):
        assert "incomplete" in message
        for key in gone:
            if not key.endswith("num_batches_tracked"):
                assert key in message
    else:  # the last layer gone: what is left ends with a hidden layer, too narrow for the keys
        assert "heads * k_dim" in message


def test_from_xlm_names_an_entry_of_the_wrong_shape():
    sd = make_xlm_state_dict(hidden=(32,), batchnorm=True)
    sd["query_proj.query_mlps.0.4.weight"] = sd["query_proj.query_mlps.0.4.weight"][:-1]  # truncated
    with pytest.raises(ValueError, match=r"query_proj\.query_mlps\.0\.4\.weight must have shape \(24,\), got \(23,\)"):
        from_xlm(sd, topk=4)
    sd = make_xlm_state_dict()
    sd["query_proj.query_mlps.0.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"query_proj\.query_mlps\.0\.bias must have shape \(24,\)"):
        from_xlm(sd, topk=4)


def test_from_xlm_takes_numpy_arrays_and_names_other_types():
    sd = make_xlm_state_dict(hidden=(16,), batchnorm=True)
    as_numpy = {k: v.numpy() for k, v in sd.items()}
    x = torch.randn(5, 24)
    torch.testing.assert_close(from_xlm(as_numpy, topk=4)(x), from_xlm(sd, topk=4)(x), atol=0, rtol=0)
    with pytest.raises(TypeError, match=r"state_dict\['values.weight'\] must be a tensor .* got list"):
        from_xlm({**sd, "values.weight": sd["values.weight"].tolist()}, topk=4)


@pytest.mark.parametrize("entry", ["values.weight", "keys", "query_proj.query_mlps.0.weight"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_from_xlm_names_an_entry_that_is_not_float(entry, dtype):
    sd = make_xlm_state_dict()
    sd[entry] = sd[entry].to(dtype)
    with pytest.raises(ValueError, match=re.escape(f"{entry!r} must be a float tensor, got {dtype}")):
        from_xlm(sd, topk=4)
