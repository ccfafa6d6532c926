"""UltraMem (arXiv 2411.12364): against a plain brute-force reference written here (every one of the
``num_keys ** 2`` virtual slots scored, the values expanded explicitly), in float64, and with the library's
optimizer, hooks and torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from product_key_memory import EmbeddingValues, UltraMem, build_optimizer, fetch_optimizer_parameters
from product_key_memory.layers import MEMORY_KINDS, build_memory
from product_key_memory.layers.ultramem import ultramem_aux_loss
from product_key_memory.training import value_lr_scheduler

DIM, HEADS, NUM_KEYS, TOPK = 12, 2, 8, 3

CONFIGS = {
    "rank1": dict(rank=1, cores=2),  # rank 1, two-sided, 2 * 3 of 8 rows kept: exact all the same
    "rank2_full_grid": dict(rank=2, cores=2, candidates=NUM_KEYS // 2),  # both ends cover the grid: exact
    "rank3_one_core_softmax": dict(rank=3, cores=1, candidates=NUM_KEYS // 2, score_activation="softmax"),
}


def _layer(dtype=torch.float64, **kwargs):
    layer = UltraMem(DIM, heads=HEADS, num_keys=NUM_KEYS, topk=TOPK, value_expansion=4, value_dim=8, dtype=dtype,
                     **kwargs)
    with torch.no_grad():  # signed cores: scores of both signs
        layer.keys.core.normal_()
    return layer


def reference_ultramem(layer: UltraMem, x):
    """UltraMem written plainly: all slots scored, top-k by the summed cores, the virtual table expanded."""
    q = F.layer_norm((x @ layer.to_queries.weight.T).unflatten(-1, (layer.heads, 2, layer.dim_key)),
                     (layer.dim_key,), layer.query_norm.weight, layer.query_norm.bias)  # (..., H, 2, dk)
    tk = layer.keys
    keys = F.layer_norm(tk.keys, (tk.dim_head,), tk.key_norm.weight, tk.key_norm.bias)  # (H, 2, r, K, dk)
    rows = torch.einsum("...hd,hrkd->...hkr", q[..., 0, :], keys[:, 0])
    cols = torch.einsum("...hd,hrkd->...hkr", q[..., 1, :], keys[:, 1])
    per_core = torch.einsum("...hir,chrs,...hjs->...hijc", rows, tk.core, cols).flatten(-3, -2)  # (..., H, K*K, C)
    _, slots = per_core.sum(-1).topk(layer.topk, dim=-1)  # (..., H, k)
    scores = per_core.gather(-2, slots.unsqueeze(-1).expand(*slots.shape, tk.cores))  # (..., H, k, C)
    if layer.scoring.activation == "softmax":
        scores = scores.softmax(-2)
    iv = layer.values  # the virtual table, (K*K, C, dim): slot s, piece c = W_g (row with only piece c kept)
    p = iv.mapping
    row, group = (p % iv.rows + iv.offset) % iv.store.num_slots, p // iv.rows
    pieces = iv.store.weight[row].unflatten(-1, (tk.cores, -1))  # (K*K, C, vd/C)
    w = iv.proj.weight.unflatten(-1, (iv.expansion, tk.cores, -1))[:, group]  # (dim, K*K, C, vd/C)
    table = torch.einsum("dscv,scv->scd", w, pieces)
    return torch.einsum("...hkc,...hkcd->...d", scores, table[slots])


def _grads(layer, x, out):
    params = [p for p in layer.parameters()]
    return torch.autograd.grad(out.square().sum(), [x] + params)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_brute_force_reference_with_gradients(name):
    layer = _layer(**CONFIGS[name])
    x = torch.randn(3, 4, DIM, dtype=torch.float64, requires_grad=True)
    out, want = layer(x), reference_ultramem(layer, x)
    assert_close(out, want, msg="output")
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for n, got, ref in zip(names, _grads(layer, x, out), _grads(layer, x, want)):
        assert_close(got, ref, msg=f"gradient of {n}")


def test_gradcheck_float64():
    layer = UltraMem(4, heads=1, num_keys=4, topk=2, rank=2, cores=2, value_expansion=2, value_dim=2,
                     dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = (x, layer.to_queries.weight, layer.keys.keys, layer.keys.core, layer.values.store.weight,
              layer.values.proj.weight)
    assert torch.autograd.gradcheck(lambda *_: layer(x), params, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("shape", [(DIM,), (5, DIM), (2, 3, 4, DIM)])
def test_any_leading_dims(shape):
    layer = _layer(dtype=torch.float32)
    x = torch.randn(*shape)
    assert layer(x).shape == x.shape
    assert_close(layer(x).reshape(-1, DIM), layer(x.reshape(-1, DIM)))


def test_parts_are_called_through_the_module_tree():
    layer = _layer()
    called = []
    for name, module in layer.named_modules():
        if name:
            module.register_forward_hook(lambda m, a, o, name=name: called.append(name))
    layer(torch.randn(2, DIM, dtype=torch.float64))
    assert set(called) == {"to_queries", "query_norm", "keys", "keys.key_norm", "scoring", "values",
                           "values.store", "values.proj"}


def test_aux_loss_and_value_learning_rate_in_a_training_step():
    model = torch.nn.Sequential(_layer(rank=2), _layer(rank=3))
    aux = ultramem_aux_loss(model)
    assert_close(aux, model[0].aux_loss() + model[1].aux_loss())
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-3)
    values, rest = opt.param_groups[1]["params"], opt.param_groups[0]["params"]
    assert {id(p) for p in values} == {id(m.values.store.weight) for m in model}, "only the rows at the value lr"
    assert all(any(p is q for q in rest) for m in model for p in (m.values.proj.weight, m.keys.core))
    sched = value_lr_scheduler(opt, max_steps=10)
    (model(torch.randn(4, DIM, dtype=torch.float64)).square().mean() + 0.1 * aux).backward()
    assert model[0].values.store.weight.grad.is_sparse
    assert model[0].keys.core.grad is not None
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * (1 + 3 * 0.9))


def test_layers_share_one_pool_at_offsets():
    rows = NUM_KEYS**2 // 4
    pool = EmbeddingValues(2 * rows, 8, dtype=torch.float64)
    a, b = (UltraMem(DIM, num_keys=NUM_KEYS, topk=TOPK, values=pool, value_offset=i * rows, dtype=torch.float64)
            for i in range(2))
    assert a.values.store is b.values.store is pool
    model = torch.nn.Sequential(a, b)
    assert sum(p is pool.weight for g in fetch_optimizer_parameters(model) for p in g["params"]) == 1
    x = torch.randn(3, DIM, dtype=torch.float64)
    assert_close(b(x), reference_ultramem(b, x))


def test_compile_fullgraph_matches_eager():
    layer = _layer(dtype=torch.float32, rank=2)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(2, 5, DIM)
    results = []
    for fn in (layer, compiled):
        layer.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    assert_close(results[1][0], results[0][0], msg="compiled output")
    for key in results[0][1]:
        assert_close(results[1][1][key], results[0][1][key], msg=f"compiled gradient of {key}")


def test_registered_as_a_memory_kind():
    assert MEMORY_KINDS["ultramem"] is UltraMem
    layer = build_memory("ultramem", DIM, num_keys=NUM_KEYS, topk=TOPK)
    assert isinstance(layer, UltraMem) and "num_keys=8" in repr(layer)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0), "dim"), (dict(heads=0), "heads"), (dict(topk=0), "topk"),
    (dict(value_expansion=5), "value_expansion"),
    (dict(dim_key=0), "dim_key"), (dict(score_activation="gelu"), "score_activation"), (dict(rank=0), "rank"),
    (dict(cores=5), "value_dim"), (dict(first_stage="x"), "first_stage"), (dict(candidates=1), "topk"),
    (dict(value_offset=-1), "offset"),
])
def test_arguments_are_checked(kwargs, match):
    kwargs = {"dim": DIM, "num_keys": NUM_KEYS, "topk": TOPK, **kwargs}
    with pytest.raises(ValueError, match=match):
        UltraMem(kwargs.pop("dim"), **kwargs)
    with pytest.raises(ValueError, match="last dim"):
        _layer()(torch.randn(2, DIM + 1, dtype=torch.float64))


@pytest.mark.slow  # generated C++ for forward and backward: about a minute on a shared 2-core CPU
def test_compile_inductor_fullgraph_training_step_matches_eager():
    layer = _layer(dtype=torch.float32, rank=2)
    compiled = torch.compile(layer, fullgraph=True)  # the default backend
    x = torch.randn(2, 7, DIM)
    results = []
    for fn in (layer, compiled):
        layer.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        results.append([("output", out.detach())] + [(n, p.grad.clone()) for n, p in layer.named_parameters()])
    for (name, want), (_, got) in zip(*results):
        assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=f"inductor: {name}")


def test_usage_tracker_counts_the_pieces_and_the_stored_rows():
    from product_key_memory import MemoryUsageTracker

    layer = _layer(dtype=torch.float32)
    model = torch.nn.ModuleDict(dict(mem=layer))
    x = torch.randn(6, DIM)
    with MemoryUsageTracker(model) as tracker:
        layer(x)
    queries = layer.query_norm(layer.to_queries(x).view(-1, HEADS, 2, layer.dim_key))
    slots = layer.keys(queries)[1]  # (6, H, k)
    pieces = (slots.unsqueeze(-1) * 2 + torch.arange(2)).flatten()  # table slot s * cores + c
    reads = tracker.counts("mem")["reads"]
    assert torch.equal(reads, torch.bincount(pieces, minlength=NUM_KEYS**2 * 2).to(reads.dtype))
    rows, _ = layer.values.physical(slots.flatten())
    stored = tracker.counts("mem.values.store")["reads"]
    # the layer reads every piece of a slot at once (whole_slots): one stored row read per slot
    assert torch.equal(stored, torch.bincount(rows, minlength=len(stored)).to(stored.dtype))
