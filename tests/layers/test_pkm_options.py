"""PKM's keyword-only options (issue 3) against a slot-by-slot reference; defaults unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from product_key_memory import EmbeddingValues, PKM, fetch_optimizer_parameters, fetch_pkm_value_parameters
from product_key_memory.parts.norms import MaskedBatchNorm


def _batch_norm(h, bn, rows, training):
    """Batch norm of ``h`` over ``rows`` (a bool mask of h's leading dims) or running stats."""
    if training:
        sel = h[rows]
        mean, var = sel.mean(0), sel.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def reference_forward(pkm, x, mask):
    """Output ``(N, dim)`` of ``pkm`` (dropout 0) written plainly from the option descriptions."""
    n_tok = x.shape[0]
    h_, n, d, k = pkm.heads, pkm.num_keys, pkm.dim_head, pkm.topk
    x = torch.where(mask[:, None], x, 0.0)
    h = pkm.pre_layernorm(x)
    if pkm.query_hidden is not None:
        for layer in pkm.query_hidden.layers:
            if isinstance(layer, nn.Linear):
                h = F.linear(h, layer.weight, layer.bias)
            elif isinstance(layer, MaskedBatchNorm):
                h = _batch_norm(h, layer.fn, mask, pkm.training)
            else:
                h = torch.relu(h)
    q = F.linear(h, pkm.to_queries.weight, pkm.to_queries.bias)  # (N, 2 * H * d) as (half, head, d)
    if pkm.query_norm == "layernorm":
        q = F.layer_norm(q.view(n_tok, 2, h_, d), (d,), pkm.norm.weight, pkm.norm.bias, pkm.norm.eps)
    elif pkm.query_norm == "batchnorm":  # one statistic per d, over tokens, halves and heads
        q = q.view(n_tok, 2 * h_, d)
        q = _batch_norm(q, pkm.norm.fn, mask[:, None].expand(n_tok, 2 * h_), pkm.training)
    elif pkm.query_norm == "channel_batchnorm":
        q = _batch_norm(q, pkm.norm.fn, mask, pkm.training)
    q = q.reshape(n_tok, 2, h_, d)
    table = pkm.values.weight
    outs = []
    for t in range(n_tok):
        reads = []
        for head in range(h_):
            s1 = pkm.keys[head, :, 0] @ q[t, 0, head]
            s2 = pkm.keys[head, :, 1] @ q[t, 1, head]
            scores, slots = (s1[:, None] + s2[None, :]).reshape(n * n).topk(k)
            w = scores / pkm.temperature
            if pkm.non_competitive_gates:
                w = torch.relu(w)
            elif pkm.score_activation == "softmax":
                w = torch.softmax(w, dim=-1)
            if pkm.score_subtract == "min":
                w = w - w.min()
            elif pkm.score_subtract == "mean":
                w = w - w.mean()
            elif pkm.score_subtract == "median":
                w = w - w.sort().values[(k - 1) // 2]
            if pkm.score_normalize:
                w = w / w.abs().sum()
            reads.append((w[:, None] * table[slots]).sum(0))
        if pkm.combine is not None:
            out = pkm.combine.weight @ torch.cat(reads)
        else:
            out = torch.stack(reads).sum(0)
            if pkm.value_proj is not None:
                out = pkm.value_proj.weight @ out
        outs.append(pkm.output_norm(out) * mask[t])
    return torch.stack(outs)


CONFIGS = {
    "xlm_full": dict(
        query_bias=True, query_hidden=(24,), query_hidden_batchnorm=True, query_norm="channel_batchnorm",
        temperature=0.7, score_subtract="mean", score_normalize=True, value_dim=12, sparse_values=True,
    ),
    "raw_scores_concat": dict(
        query_norm="none", score_softmax=False, key_init="uniform", freeze_keys=True,
        concat_values_and_combine=True, value_dim=6,
    ),
    "batchnorm_030_relu_median": dict(use_layernorm=False, score_subtract="median", non_competitive_gates=True),
    "hidden_no_bn_min": dict(
        query_hidden=(20, 12), query_norm="batchnorm", score_subtract="min", pre_layernorm=True, norm_output=True,
        value_init="zeros",
    ),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_options_match_reference_outputs_and_gradients(name, training):
    torch.manual_seed(0)
    # float64: the comparison checks the computation, not float32 rounding through batch norms
    pkm = PKM(16, heads=2, num_keys=6, topk=3, dim_head=4, dtype=torch.float64, **CONFIGS[name])
    if CONFIGS[name].get("value_init") == "zeros":
        nn.init.normal_(pkm.values.weight)  # zeros would hide the value gradient's routing
    for m in pkm.modules():  # running statistics away from (0, 1) so eval mode is tested
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    pkm.train(training)
    x = torch.randn(10, 16, dtype=torch.float64)
    mask = torch.ones(10, dtype=torch.bool)
    mask[[2, 7]] = False
    x_in = torch.where(mask[:, None], x, float("nan"))
    g = torch.randn(10, 16, dtype=torch.float64)

    out = pkm(x_in, input_mask=mask)
    params = [p for p in pkm.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * g).sum(), params)
    ref = reference_forward(pkm, x, mask)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)

    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: output: {m}")
    names = [n for n, p in pkm.named_parameters() if p.requires_grad]
    for pname, a, b in zip(names, grads, ref_grads):
        a = a.to_dense() if a.is_sparse else a
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: gradient of {pname}: {m}")


def test_defaults_have_030s_tensors_under_the_parts_names():
    names = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert names(PKM(32, heads=2, num_keys=8, topk=4, dim_head=8)) == {
        "product_keys.keys": (2, 8, 2, 8), "query.to_queries.weight": (32, 32), "query.norm.weight": (8,),
        "query.norm.bias": (8,), "values.weight": (64, 32),
    }
    bn = names(PKM(32, heads=2, num_keys=8, topk=4, dim_head=8, use_layernorm=False))
    assert {k for k in bn if k.startswith("query.norm.")} == {
        f"query.norm.fn.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    # the explicit spelling of the defaults builds the same layer
    torch.manual_seed(1)
    a = PKM(32, heads=2, num_keys=8, topk=4, dim_head=8)
    torch.manual_seed(1)
    b = PKM(32, heads=2, num_keys=8, topk=4, dim_head=8, query_norm="layernorm", temperature=1.0, key_init="normal")
    x = torch.randn(5, 32)
    assert torch.equal(a(x), b(x))


def test_inits_and_frozen_keys():
    uni = PKM(8, heads=4, num_keys=64, topk=4, dim_head=16, key_init="uniform", value_init="zeros", freeze_keys=True)
    assert uni.keys.abs().max() <= 1 / math.sqrt(16) and uni.keys.std() < 0.2
    assert uni.values.weight.abs().max() == 0
    assert not uni.keys.requires_grad and "product_keys.keys" in uni.state_dict()
    uni(torch.randn(3, 8)).sum().backward()
    assert uni.keys.grad is None
    normal = PKM(8, heads=4, num_keys=64, topk=4, dim_head=16)
    assert normal.keys.std().item() == pytest.approx(0.25, rel=0.05)  # dim_head ** -0.5


def test_sparse_values_train_with_sparse_adam():
    pkm = PKM(16, heads=2, num_keys=8, topk=2, dim_head=4, sparse_values=True, query_norm="channel_batchnorm")
    values, rest = fetch_pkm_value_parameters(pkm)
    opts = [torch.optim.SparseAdam(values, lr=1e-2), torch.optim.Adam(rest, lr=1e-3)]
    x = torch.randn(4, 16)
    before = pkm.values.weight.detach().clone()
    loss = pkm(x).pow(2).sum()
    loss.backward()
    grad = pkm.values.weight.grad
    assert grad.is_sparse
    read = torch.zeros(64, dtype=torch.bool)
    read[grad.coalesce().indices()[0]] = True
    for opt in opts:
        opt.step()
    changed = (pkm.values.weight.detach() != before).any(-1)
    assert changed[read].all() and not changed[~read].any()


def test_shared_table_with_options():
    table = EmbeddingValues(64, 12, sparse=True)
    model = nn.ModuleList(
        [PKM(16, heads=2, num_keys=8, topk=2, dim_head=4, values=table, value_dim=12, sparse_values=True,
             query_norm="channel_batchnorm"),
         PKM(16, heads=2, num_keys=8, topk=2, dim_head=4, values=table, value_dim=12, temperature=0.5)]
    )
    assert model[0].values is model[1].values and model[0].value_proj is not model[1].value_proj
    values, rest = fetch_pkm_value_parameters(model)
    assert len(values) == 1 and values[0] is table.weight
    assert sum(p.numel() for p in rest) + table.weight.numel() == sum(p.numel() for p in model.parameters())
    groups = fetch_optimizer_parameters(model)
    assert groups[1]["params"] == [table.weight]
    x = torch.randn(3, 16)
    (model[0](x) + model[1](x)).sum().backward()
    g = table.weight.grad.coalesce()
    slots = torch.cat([m.search(m.queries(x))[1].reshape(-1) for m in model]).unique()
    assert torch.equal(g.indices()[0].unique(), slots)
    with pytest.raises(ValueError, match="sparse"):
        PKM(16, heads=2, num_keys=8, topk=2, dim_head=4, values=EmbeddingValues(64, 16), sparse_values=True)
    with pytest.raises(TypeError, match="values must be a ValueTable .*ValuePool.*got EmbeddingBag"):
        PKM(16, heads=2, num_keys=8, topk=2, dim_head=4, values=nn.EmbeddingBag(64, 16))
    with pytest.raises(ValueError, match="values"):
        PKM(16, heads=2, num_keys=8, topk=2, dim_head=4, values=table)  # value_dim defaults to dim=16


def test_value_dim_shapes():
    p = PKM(16, heads=2, num_keys=4, topk=2, dim_head=4, value_dim=6)
    assert p.values.weight.shape == (16, 6) and p.value_proj.weight.shape == (16, 6)
    c = PKM(16, heads=2, num_keys=4, topk=2, dim_head=4, value_dim=6, concat_values_and_combine=True)
    assert c.value_proj is None and c.combine.weight.shape == (16, 12)
    assert PKM(16, heads=2, num_keys=4, topk=2, dim_head=4, value_dim=16).value_proj is None
    assert p(torch.randn(2, 3, 16)).shape == (2, 3, 16)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(query_norm="groupnorm"), ValueError, "query_norm"),
        (dict(use_layernorm=False, query_norm="none"), ValueError, "use_layernorm"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=True), ValueError, "temperature"),
        (dict(score_subtract="max"), ValueError, "score_subtract"),
        (dict(non_competitive_gates=True, score_softmax=False), ValueError, "non_competitive_gates"),
        (dict(key_init="xavier"), ValueError, "key_init"),
        (dict(value_init="ones"), ValueError, "value_init"),
        (dict(value_dim=0), ValueError, "value_dim"),
        (dict(query_hidden=32), TypeError, "query_hidden"),
        (dict(query_hidden=(32, 0)), ValueError, "hidden"),
    ],
)
def test_option_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        PKM(16, heads=2, num_keys=4, topk=2, dim_head=4, **kwargs)


def test_repr_shows_only_changed_options():
    assert "temperature" not in repr(PKM(16, heads=2, num_keys=4, topk=2, dim_head=4))
    r = repr(PKM(16, heads=2, num_keys=4, topk=2, dim_head=4, temperature=0.5, query_norm="none", freeze_keys=True))
    # each option shows on the part it configures
    assert "temperature=0.5" in r and "norm='none'" in r and "freeze=True" in r
