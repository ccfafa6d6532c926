"""SparseRowAdam(catch_up=True) against dense torch.optim.AdamW in float64.

The catch-up leaves out one term, Adam's ``eps`` in the skipped steps. For a row with a zero
gradient at step ``j`` dense Adam moves it by ``e_j = step_size_j * m_j / (a_j + eps)``,
``a_j = sqrt(v_j) / sqrt(1 - beta2**j)``; the closed form moves it by ``e_j * (a_j + eps) / a_j``,
so by ``|e_j| * eps / a_j`` more. The moments are scaled exactly and the gradients are given, so
the error stays in the parameter, shrunk by later decays (factors in (0, 1]): the bound on
``|p_catch_up - p_dense|`` is the sum of ``|e_j| * eps / a_j`` over the skipped steps, which the
tests accumulate from the dense run itself, plus float64 rounding.
"""

import copy
import io

import pytest
import torch
from torch.testing import assert_close

from product_key_memory import PKM, SparseRowAdam, ValueTable, build_optimizer

S, D = 40, 6
HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def schedule(step):
    return 1.0 / (1 + 0.3 * step)


def gradient_sequence(steps, gen, rows_per_step=6):
    """(rows, values) per step: a few random rows, sometimes none, sometimes the same again."""
    seq = []
    for i in range(steps):
        k = 0 if i == 5 else rows_per_step
        rows = torch.randperm(S, generator=gen)[:k].sort().values
        seq.append((rows, torch.randn(k, D, generator=gen, dtype=torch.float64)))
    return seq


def run_dense(p0, seq, maximize=False, **hyper):
    """AdamW with LambdaLR on densified gradients; also the eps bound accumulated for unread rows."""
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], foreach=False, maximize=maximize, **hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    bound = torch.zeros_like(p0)
    beta1, beta2 = hyper["betas"]
    for step, (rows, values) in enumerate(seq, 1):
        grad = torch.zeros_like(p0)
        grad[rows] = values
        p.grad = grad
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        st = opt.state[p]
        a = st["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5
        update = lr / (1 - beta1**step) * st["exp_avg"].abs() / (a + hyper["eps"])
        unread = torch.ones(S, dtype=torch.bool)
        unread[rows] = False
        contribution = torch.where(a > 0, update * hyper["eps"] / a.clamp_min(1e-300), torch.zeros_like(a))
        bound[unread] += contribution[unread]
    return p.detach(), opt.state[p], bound


def run_sparse(p0, seq, *, catch_up, maximize=False, window=4096, finish=True, **hyper):
    p = torch.nn.Parameter(p0.clone())
    opt = SparseRowAdam([p], decoupled_weight_decay=True, catch_up=catch_up, catch_up_window=window,
                        maximize=maximize, chunk_bytes=3 * D * 8, **hyper)  # blocks of 3 rows
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for rows, values in seq:
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (S, D))
        opt.step()
        sched.step()
    if finish:
        opt.catch_up_()
    return p.detach(), opt


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("window", [4096, 3])  # 3: rows fall behind the window and are caught up in turn
def test_catch_up_equals_adamw_with_schedule_within_the_eps_bound(maximize, window):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(S, D, generator=gen, dtype=torch.float64)
    seq = gradient_sequence(30, gen)
    dense, dense_state, bound = run_dense(p0, seq, maximize=maximize, **HYPER)
    ours, opt = run_sparse(p0, seq, catch_up=True, maximize=maximize, window=window, **HYPER)
    lazy, _ = run_sparse(p0, seq, catch_up=False, maximize=maximize, **HYPER)
    rounding = 1e-13 * (1 + dense.abs())
    err = (ours - dense).abs()
    assert bound.max() > 0, "some unread row had moments to decay"
    assert (err <= bound + rounding).all(), f"worst excess {(err - bound - rounding).max():.3g}"
    st = opt.state[opt.param_groups[0]["params"][0]]
    for key in ("exp_avg", "exp_avg_sq"):
        assert_close(st[key], dense_state[key], rtol=1e-13, atol=1e-300, msg=key)
    lazy_err = (lazy - dense).abs().max()
    assert lazy_err > 1e3 * (bound.max() + rounding.max()), f"lazy Adam differs by only {lazy_err:.3g}"


def test_eps_zero_is_exact_up_to_rounding():
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(S, D, generator=gen, dtype=torch.float64)
    first = (torch.arange(S), torch.randn(S, D, generator=gen, dtype=torch.float64))  # every row once: v > 0
    seq = [first] + gradient_sequence(20, gen)
    hyper = dict(HYPER, eps=0.0)
    dense, _, _ = run_dense(p0, seq, **hyper)
    ours, _ = run_sparse(p0, seq, catch_up=True, **hyper)
    assert_close(ours, dense, rtol=1e-12, atol=1e-12)


def test_rows_read_after_steps_without_catch_up_call():
    """Without catch_up_(), rows in the last gradient equal dense AdamW's; the others lag and a
    read through catch_up_read_ brings exactly those rows up."""
    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(S, D, generator=gen, dtype=torch.float64)
    seq = gradient_sequence(12, gen)
    dense, _, bound = run_dense(p0, seq, **HYPER)
    ours, opt = run_sparse(p0, seq, catch_up=True, finish=False, **HYPER)
    p = opt.param_groups[0]["params"][0]
    last = seq[-1][0]
    assert ((ours[last] - dense[last]).abs() <= bound[last] + 1e-13).all()
    stale = torch.tensor([r for r in range(S) if r not in set(last.tolist())])
    assert (ours[stale] - dense[stale]).abs().max() > 1e-6, "unread rows wait for a read"
    wanted = stale[:5]
    opt.catch_up_read_(p, torch.stack([wanted, wanted]))  # repeats are fine
    after = p.detach()
    assert ((after[wanted] - dense[wanted]).abs() <= bound[wanted] + 1e-13).all()
    others = stale[5:]
    assert torch.equal(after[others], ours[others]), "rows not read stay as they were"


def test_state_dict_resume_and_per_group_options():
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(S, D, generator=gen, dtype=torch.float64)
    seq = gradient_sequence(16, gen)
    straight, _ = run_sparse(p0, seq, catch_up=True, **HYPER)

    p = torch.nn.Parameter(p0.clone())
    opt = SparseRowAdam([{"params": [p], "catch_up": True, "decoupled_weight_decay": True}], chunk_bytes=3 * D * 8,
                        **HYPER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for rows, values in seq[:8]:
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (S, D))
        opt.step(), sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    q = torch.nn.Parameter(p.detach().clone())
    resumed = SparseRowAdam([q], chunk_bytes=3 * D * 8, **HYPER)  # catch_up and decay come from the state dict
    sched2 = torch.optim.lr_scheduler.LambdaLR(resumed, schedule)
    resumed.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert resumed.param_groups[0]["catch_up"] is True
    assert resumed.state[q]["catch_up_window"].dtype == torch.float64, "torch casts floating state; not this"
    for rows, values in seq[8:]:
        q.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (S, D))
        resumed.step(), sched2.step()
    resumed.catch_up_()
    assert_close(q.detach(), straight, rtol=1e-14, atol=1e-14)


def test_switching_catch_up_off_brings_rows_up_first():
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(S, D, generator=gen, dtype=torch.float64)
    seq = gradient_sequence(10, gen)
    ours, opt = run_sparse(p0, seq[:9], catch_up=True, finish=False, **HYPER)
    p = opt.param_groups[0]["params"][0]
    ref = copy.deepcopy(opt)
    ref_p = ref.param_groups[0]["params"][0]
    ref.catch_up_()
    opt.param_groups[0]["catch_up"] = False
    for o, t in ((opt, p), (ref, ref_p)):
        o.param_groups[0]["catch_up"] = False
        t.grad = torch.sparse_coo_tensor(seq[9][0].unsqueeze(0), seq[9][1], (S, D))
        o.step()
    assert "catch_up_row_step" not in opt.state[p]
    assert_close(p.detach(), ref_p.detach(), rtol=0, atol=0)


def test_options_it_cannot_honour_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 2))
    cases = [(dict(amsgrad=True), "amsgrad"), (dict(weight_decay=0.1), "weight_decay"),
             (dict(betas=(0.95, 0.9)), "betas")]
    for options, name in cases:
        with pytest.raises(ValueError, match=name):
            SparseRowAdam([p], catch_up=True, **options)
        opt = SparseRowAdam([p], **options)
        opt.param_groups[0]["catch_up"] = True
        with pytest.raises(ValueError, match="catch_up"):
            opt.step()
    with pytest.raises(ValueError, match="catch_up_window"):
        SparseRowAdam([p], catch_up=True, catch_up_window=0)
    SparseRowAdam([p], catch_up=True, weight_decay=0.1, decoupled_weight_decay=True)  # AdamW decay is fine


def test_float32_table_keeps_float64_step_numbers_through_a_state_dict():
    p = torch.nn.Parameter(torch.randn(S, D))
    opt = SparseRowAdam([p], catch_up=True, catch_up_window=64, chunk_bytes=512)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.randn(2, D), (S, D))
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = SparseRowAdam([q], chunk_bytes=256)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.state[q]["catch_up_window"].dtype == torch.float64
    assert torch.equal(other.state[q]["catch_up_window"], opt.state[p]["catch_up_window"])
    assert other.chunk_bytes == 256, "load_state_dict keeps the instance's own setting"
    copied = copy.deepcopy(opt)
    assert (copied.chunk_bytes, copied.catch_up_window) == (512, 64)


# -- end to end: a PKM trained with catch-up reads and learns what dense AdamW's does -------------

PKM_SIZES = dict(dim=8, heads=2, num_keys=4, topk=2, dim_head=4)


def train_pkm(model, opt, batches, sched=None):
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _pkm(shared: bool):
    first = PKM(**PKM_SIZES, dtype=torch.float64)
    if not shared:
        return first
    # two layers reading one table: the second layer's hook changes rows after the first has read
    return torch.nn.Sequential(first, PKM(**PKM_SIZES, dtype=torch.float64, values=first.values))


@pytest.mark.parametrize("shared", [False, True], ids=["one layer", "shared table"])
def test_pkm_trained_with_catch_up_equals_dense_adamw(shared):
    """With ``eps = 0`` the closed form is exact, so the two trainings differ by float64 rounding
    only (about 1e-16 relative per operation, some hundred operations a value per step, over 12
    steps: far below the 1e-9 allowed), however many steps a row skips. The first batch reads
    every slot, so dense AdamW has ``v > 0`` everywhere (``eps = 0`` would give it 0 / 0)."""
    torch.manual_seed(0)
    dense_model = _pkm(shared)
    ours_model = copy.deepcopy(dense_model)
    lazy_model = copy.deepcopy(dense_model)
    table = lambda m: next(t for t in m.modules() if isinstance(t, ValueTable))  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(256, 8, generator=gen, dtype=torch.float64)]
    batches += [torch.randn(2, 8, generator=gen, dtype=torch.float64) for _ in range(11)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=0.0, weight_decay=0.05)
    dense_table = table(dense_model).weight
    dense_opt = torch.optim.AdamW(
        [{"params": [p for p in dense_model.parameters() if p is not dense_table]},
         {"params": [dense_table], "lr": 3e-2}], foreach=False, **hyper)
    ours_opt = build_optimizer(ours_model, pkm_learning_rate=3e-2, decoupled_weight_decay=True, catch_up=True,
                               **hyper)
    lazy_opt = build_optimizer(lazy_model, pkm_learning_rate=3e-2, decoupled_weight_decay=True, **hyper)
    assert not table(dense_model).sparse and table(ours_model).sparse
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (dense_opt, ours_opt, lazy_opt)]
    train_pkm(dense_model, dense_opt, batches[:1], scheds[0])
    assert (dense_table.grad.abs().sum(-1) > 0).all(), "the first batch reads every slot"
    want = train_pkm(dense_model, dense_opt, batches[1:], scheds[0])
    got = train_pkm(ours_model, ours_opt, batches, scheds[1])
    lazy = train_pkm(lazy_model, lazy_opt, batches, scheds[2])
    name_of_table = next(n for n, p in dense_model.named_parameters() if p is dense_table)
    for name, w in want.items():  # the table's unread rows wait for a read or catch_up_(): below
        if name != name_of_table:
            assert_close(got[name], w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    assert (lazy[name_of_table] - want[name_of_table]).abs().max() > 1e-4, "lazy Adam differs"
    x = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # the hook catches the rows read up: the outputs are dense AdamW's model's
        assert_close(ours_model(x), dense_model(x), rtol=1e-9, atol=1e-9)
    ours_opt.catch_up_()
    assert_close(table(ours_model).weight.detach(), dense_table.detach(), rtol=1e-9, atol=1e-9)


def _trained_with_stale_rows():
    torch.manual_seed(1)
    model = PKM(**PKM_SIZES)
    opt = build_optimizer(model, pkm_learning_rate=3e-2, catch_up=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(2, 8, generator=gen)).square().mean().backward()
        opt.step()
    return model, opt


def test_hook_under_torch_compile_fullgraph():
    """The pre-hook runs inside the compiled graph (fullgraph: no break) and catches up the rows
    read, as in eager mode. (Compiled training takes the dense value gradient, so there the
    optimizer steps every row and the hook finds nothing behind.)"""
    eager, eager_opt = _trained_with_stale_rows()
    model, opt = _trained_with_stale_rows()
    state = opt.state[model.values.weight]
    assert (state["catch_up_row_step"] < state["catch_up_clock"]).any()
    x = torch.randn(5, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), eager(x)
    assert_close(got, want)
    assert (state["catch_up_row_step"] < state["catch_up_clock"]).sum() < 16, "the compiled hook caught rows up"
    eager_opt.catch_up_()
    with torch.no_grad():
        assert_close(got, eager(x), msg="the compiled read saw caught-up rows")


@pytest.mark.parametrize("catch_up", [False, True])
def test_rows_of_any_shape_step_as_flat_rows(catch_up):
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(S, 2, 3, generator=gen, dtype=torch.float64)
    cube = torch.nn.Parameter(p0.clone())
    flat = torch.nn.Parameter(p0.reshape(S, 6).clone())
    opts = [SparseRowAdam([t], decoupled_weight_decay=True, catch_up=catch_up, **HYPER) for t in (cube, flat)]
    for rows, values in gradient_sequence(6, gen):
        cube.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values.view(-1, 2, 3), cube.shape)
        flat.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, flat.shape)
        for o in opts:
            o.step()
    for o in opts:
        o.catch_up_()
    assert_close(cube.detach().reshape(S, 6), flat.detach(), rtol=0, atol=0)


def test_model_with_hooks_pickles_and_copies():
    import pickle

    model, opt = _trained_with_stale_rows()
    x = torch.randn(3, 8)
    clone = pickle.loads(pickle.dumps(model))  # the hook comes along, inert: its optimizer stays behind
    with torch.no_grad():
        before = clone(x)
        assert_close(clone(x), before)
        model(x)
    assert copy.deepcopy(model) is not None
