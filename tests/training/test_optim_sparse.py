"""SparseRowAdam and build_optimizer against torch.optim.Adam and exact invariants."""

import pytest
import torch
from torch.testing import assert_close

from product_key_memory import PKM, SparseRowAdam, build_optimizer, fetch_optimizer_parameters

HYPER = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def _pair(shape=(30, 6), **kw):
    p_ref = torch.nn.Parameter(torch.randn(shape))
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.Adam([p_ref], foreach=False, **HYPER, **kw)
    ours = SparseRowAdam([p], chunk_bytes=40, **HYPER, **kw)  # tiny chunks: several blocks per step
    return p_ref, p, ref, ours


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("as_sparse", [False, True])
def test_equals_adam_when_every_row_is_touched(weight_decay, as_sparse):
    p_ref, p, ref, ours = _pair(weight_decay=weight_decay)
    for _ in range(4):
        g = torch.randn(p.shape)
        p_ref.grad = g.clone()
        p.grad = g.to_sparse(sparse_dim=1) if as_sparse else g.clone()
        ref.step(), ours.step()
        assert_close(p, p_ref, atol=0, rtol=0)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert_close(ours.state[p][key], ref.state[p_ref][key], atol=0, rtol=0, msg=key)


def test_rows_touched_every_step_follow_adam_others_never_move():
    rows = torch.tensor([1, 4, 5, 9])
    full = torch.nn.Parameter(torch.randn(12, 3))
    sub = torch.nn.Parameter(full.detach()[rows].clone())
    start = full.detach().clone()
    ours, ref = SparseRowAdam([full], **HYPER), torch.optim.Adam([sub], foreach=False, **HYPER)
    for _ in range(3):
        g = torch.randn(len(rows), 3)
        full.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), g, full.shape)
        sub.grad = g.clone()
        ours.step(), ref.step()
    assert_close(full.detach()[rows], sub.detach(), atol=0, rtol=0)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(full.detach()[untouched], start[untouched])
    assert torch.equal(ours.state[full]["exp_avg"][untouched], torch.zeros(8, 3))


def test_uncoalesced_gradient_equals_coalesced():
    a = torch.nn.Parameter(torch.randn(10, 4))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = SparseRowAdam([a], **HYPER), SparseRowAdam([b], **HYPER)
    idx = torch.tensor([[3, 1, 3, 7]])
    vals = torch.randn(4, 4)
    a.grad = torch.sparse_coo_tensor(idx, vals, a.shape)  # duplicates, unsorted
    b.grad = a.grad.coalesce()
    oa.step(), ob.step()
    assert_close(a, b, atol=0, rtol=0)


def test_invalid_arguments():
    p = [torch.nn.Parameter(torch.randn(2))]
    for kw in (dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(weight_decay=-0.1), dict(chunk_bytes=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SparseRowAdam(p, **kw)


def test_build_optimizer_groups_and_sparse_values():
    first = PKM(16, heads=2, num_keys=8, topk=3, dim_head=4)
    second = PKM(16, heads=2, num_keys=8, topk=3, dim_head=4, values=first.values)
    model = torch.nn.Sequential(first, second)
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)
    assert isinstance(opt, SparseRowAdam)
    assert first.values.sparse and second.values.sparse
    rest, values = opt.param_groups
    assert values["lr"] == 1e-2 and rest["lr"] == 1e-3
    assert [id(p) for p in values["params"]] == [id(first.values.weight)]  # shared table listed once
    assert len(rest["params"]) + 1 == len(list(model.parameters()))

    table = first.values.weight
    before = table.detach().clone()
    x = torch.randn(2, 3, 16)
    model(x).square().mean().backward()
    grad = table.grad.coalesce()
    opt.step()
    changed = (table.detach() != before).any(-1)
    read = torch.zeros(64, dtype=torch.bool)
    read[grad.indices()[0]] = True
    assert torch.equal(changed, read), "exactly the rows read move"

    dense = build_optimizer(PKM(16, heads=2, num_keys=8, topk=3, dim_head=4), sparse_values=False)
    assert len(dense.param_groups) == len(fetch_optimizer_parameters(PKM(16, num_keys=8, topk=3, dim_head=4)))


def test_pkm_training_step_matches_adam_when_all_rows_read():
    # 4 slots, read by 16 tokens: every row is in every sparse gradient, so lazy Adam == Adam
    torch.manual_seed(1)
    a = PKM(8, heads=1, num_keys=2, topk=2, dim_head=4)
    b = PKM(8, heads=1, num_keys=2, topk=2, dim_head=4)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.Adam(fetch_optimizer_parameters(a), foreach=False, **HYPER)
    opt_b = build_optimizer(b, **HYPER)
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        assert b.values.weight.grad.coalesce().indices().shape[1] == 4
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_close(pa, pb, msg=name)


def test_state_dict_round_trip_and_loading_adam_state():
    import copy
    import io

    p_ref, p, ref, ours = _pair()
    for _ in range(2):
        g = torch.randn(p.shape)
        p_ref.grad, p.grad = g.clone(), g.to_sparse(sparse_dim=1)
        ref.step(), ours.step()
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    reloaded = SparseRowAdam([q], chunk_bytes=40, **HYPER)
    reloaded.load_state_dict(torch.load(buf))
    from_adam = torch.nn.Parameter(p_ref.detach().clone())
    adam_state = SparseRowAdam([from_adam], chunk_bytes=40, **HYPER)
    adam_state.load_state_dict(copy.deepcopy(ref.state_dict()))
    for _ in range(2):
        g = torch.randn(p.shape)
        p_ref.grad = g.clone()
        for t in (p, q, from_adam):
            t.grad = g.to_sparse(sparse_dim=1)
        ref.step(), ours.step(), reloaded.step(), adam_state.step()
    for t in (p, q, from_adam):
        assert_close(t, p_ref, atol=0, rtol=0)


OPTIONS = [dict(maximize=True), dict(amsgrad=True), dict(decoupled_weight_decay=True, weight_decay=0.1),
           dict(amsgrad=True, maximize=True, weight_decay=0.1)]


def _grads(shape, steps=5):
    # growing then shrinking gradients, so amsgrad's running maximum differs from the plain second moment
    return [torch.randn(shape) * (3.0 if i in (1, 2) else 0.3) for i in range(steps)]


@pytest.mark.parametrize("as_sparse", [False, True])
@pytest.mark.parametrize("how", ["constructor", "group", "add_param_group", "edited"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_adam_options_equal_adam_in_every_way_of_setting_them(options, how, as_sparse):
    p_ref = torch.nn.Parameter(torch.randn(30, 6))
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.Adam([p_ref], foreach=False, **HYPER, **options)
    if how == "constructor":
        ours = SparseRowAdam([p], chunk_bytes=40, **HYPER, **options)
    elif how == "group":
        ours = SparseRowAdam([{"params": [p], **options}], chunk_bytes=40, **HYPER)
    elif how == "add_param_group":
        ours = SparseRowAdam([torch.nn.Parameter(torch.zeros(1))], chunk_bytes=40, **HYPER)
        ours.add_param_group({"params": [p], **options})
    else:
        ours = SparseRowAdam([p], chunk_bytes=40, **HYPER)
        ours.param_groups[0].update(options)
    for g in _grads(p.shape):
        p_ref.grad = g.clone()
        p.grad = g.to_sparse(sparse_dim=1) if as_sparse else g.clone()
        ref.step(), ours.step()
        assert_close(p, p_ref, atol=0, rtol=0)
    for key in ref.state[p_ref]:
        assert_close(ours.state[p][key], ref.state[p_ref][key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_adam_options_on_sparse_rows_touch_those_rows_only(options):
    rows = torch.tensor([1, 4, 5, 9])
    full = torch.nn.Parameter(torch.randn(12, 3))
    sub = torch.nn.Parameter(full.detach()[rows].clone())
    start = full.detach().clone()
    ours = SparseRowAdam([full], **HYPER, **options)
    ref = torch.optim.Adam([sub], foreach=False, **HYPER, **options)
    for g in _grads((len(rows), 3)):
        full.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), g, full.shape)
        sub.grad = g.clone()
        ours.step(), ref.step()
    assert_close(full.detach()[rows], sub.detach(), atol=0, rtol=0)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(full.detach()[untouched], start[untouched])


def test_group_options_that_would_be_ignored_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    bad = [dict(fused=True), dict(capturable="yes"), dict(differentiable=True), dict(momentum=0.9),
           dict(nesterov=True), dict(amsgrad="yes"), dict(maximize=1), dict(lr=-1.0)]
    for options in bad:
        key = next(iter(options))
        with pytest.raises(ValueError, match=key):
            SparseRowAdam([{"params": [p], **options}])
        opt = SparseRowAdam([torch.nn.Parameter(torch.zeros(1))])
        with pytest.raises(ValueError, match=key):
            opt.add_param_group({"params": [p], **options})
        opt = SparseRowAdam([p])
        opt.param_groups[0].update(options)
        before = p.detach().clone()
        with pytest.raises(ValueError, match=key):
            opt.step()
        assert torch.equal(p.detach(), before), "a refused step changes nothing"
    # Adam's switches at values that change nothing, and bookkeeping keys, are accepted
    fine = dict(foreach=True, fused=None, capturable=True, differentiable=False, initial_lr=0.1, name="values")
    SparseRowAdam([{"params": [p], **fine}]).step()


def test_loads_an_amsgrad_adam_state_and_a_state_without_the_new_options():
    import copy

    p_ref, p, ref, _ = _pair(amsgrad=True)
    for g in _grads(p.shape, 3):
        p_ref.grad = g.clone()
        ref.step()
    q = torch.nn.Parameter(p_ref.detach().clone())
    ours = SparseRowAdam([q], **HYPER)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # loading shares the tensors of its argument
    assert ours.param_groups[0]["amsgrad"]
    old = ours.state_dict()
    for key in ("amsgrad", "maximize", "decoupled_weight_decay", "foreach", "fused", "capturable", "differentiable"):
        old["param_groups"][0].pop(key, None)  # a 0.4.0 SparseRowAdam state dict
    legacy = SparseRowAdam([torch.nn.Parameter(q.detach().clone())], **HYPER)
    legacy.load_state_dict(old)
    assert legacy.param_groups[0]["maximize"] is False
    for g in _grads(p.shape, 2):
        p_ref.grad, q.grad = g.clone(), g.clone()
        ref.step(), ours.step()
    assert_close(q, p_ref, atol=0, rtol=0)
