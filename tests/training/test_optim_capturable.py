"""SparseRowAdam(capturable=True) and build_optimizer(capturable=True): the step counts live on the
parameters' devices and are counted there, and N capturable steps give the numbers of N ordinary
steps (dense parameters, sparse value tables on the torch and the triton backend, lazy and
catch-up), also across a state_dict round trip. The triton backend's kernels run on CPU tensors
under TRITON_INTERPRET=1 (tests/conftest.py); ``_host_reads_free`` patched to ``False`` makes the
optimizer take its GPU branch (no data-dependent sizes) on the CPU."""

import copy

import pytest
import torch
from torch.testing import assert_close

from product_key_memory import PKM, SparseRowAdam, build_optimizer, use_backend
from product_key_memory.training import optim as optim_module

# the bias corrections come from a float32 count in float64 on the device, from a Python int on the
# host: the same numbers to a rounding, which a few steps of float32 arithmetic keep near 1e-7
TOL = dict(atol=1e-6, rtol=1e-5)


def _backends():
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["torch"]
    from product_key_memory.ops._triton import interpreted
    from product_key_memory.ops.sparse_adam import triton_impl

    return ["torch", "triton"] if interpreted(triton_impl._sparse_adam_row_kernel) else ["torch"]


def _model():
    torch.manual_seed(0)
    return PKM(16, heads=2, num_keys=8, topk=4, dim_head=8)


def _train(model, opt, batches, backend):
    with use_backend(backend):
        for x in batches:
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def _assert_same(model, opt, want_model, want_opt):
    for (name, a), (_, b) in zip(model.named_parameters(), want_model.named_parameters()):
        assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")
    for p, q in zip(model.parameters(), want_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[p][key], want_opt.state[q][key], **TOL, msg=lambda m: f"{key}: {m}")
        assert float(opt.state[p]["step"]) == float(want_opt.state[q]["step"])


BATCHES = [torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("catch_up", [False, True])
@pytest.mark.parametrize("host_reads_free", [True, False], ids=["cpu-branch", "gpu-branch"])
def test_capturable_steps_equal_ordinary_steps(monkeypatch, backend, catch_up, host_reads_free):
    monkeypatch.setattr(optim_module, "_host_reads_free", lambda device: host_reads_free)
    kw = dict(lr=1e-3, pkm_learning_rate=1e-2, eps=1e-3, weight_decay=0.01, decoupled_weight_decay=True,
              catch_up=catch_up)
    start = _model()
    runs = []
    for capturable in (False, True):
        model = copy.deepcopy(start)
        opt = build_optimizer(model, capturable=capturable, **kw)
        # the window of catch-up is small, so that rows fall out of it and the turn (cursor) must catch them
        opt.catch_up_window = 3
        _train(model, opt, BATCHES, backend)
        if catch_up:
            opt.catch_up_()
        runs.append((model, opt))
    (want_model, want_opt), (model, opt) = runs
    _assert_same(model, opt, want_model, want_opt)
    assert all(g["capturable"] for g in opt.param_groups)
    for p in model.parameters():
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device and step.dim() == 0
    if catch_up:
        state = opt.state[model.values.weight]
        assert isinstance(state["catch_up_cursor"], torch.Tensor), "a captured graph must read the turn's start"
        assert int(state["catch_up_clock"]) == len(BATCHES)


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True, maximize=True, weight_decay=0.1),
                                     dict(weight_decay=0.1, decoupled_weight_decay=True)],
                         ids=["plain", "amsgrad,maximize,l2", "adamw"])
def test_capturable_dense_steps_equal_torch_adam(options):
    """A dense gradient takes torch.optim.Adam's single-tensor formulas with the count on the device."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 5, generator=gen)
    grads = [torch.randn(6, 5, generator=gen) for _ in range(4)]
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = SparseRowAdam([p], lr=0.05, capturable=True, **options)
    ref = torch.optim.Adam([q], lr=0.05, foreach=False, **options)
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        ours.step(), ref.step()
    assert_close(p, q, **TOL)
    assert ours.state[p]["step"].dtype == torch.float32


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("catch_up", [False, True])
def test_state_dict_round_trip_keeps_the_count_on_the_device(backend, catch_up):
    kw = dict(lr=1e-3, pkm_learning_rate=1e-2, eps=1e-3, catch_up=catch_up)
    start = _model()
    straight = copy.deepcopy(start)
    straight_opt = build_optimizer(straight, capturable=True, **kw)
    _train(straight, straight_opt, BATCHES, backend)

    first = copy.deepcopy(start)
    first_opt = build_optimizer(first, capturable=True, **kw)
    _train(first, first_opt, BATCHES[:2], backend)
    saved = copy.deepcopy(first_opt.state_dict())
    assert all(isinstance(s["step"], torch.Tensor) for s in saved["state"].values())
    for capturable in (True, False):  # resumed capturable, and the same state read by an ordinary optimizer
        resumed = copy.deepcopy(first)
        opt = build_optimizer(resumed, capturable=capturable, **kw)
        opt.load_state_dict(copy.deepcopy(saved))
        assert all(g["capturable"] for g in opt.param_groups), "the saved groups' option is loaded"
        for g in opt.param_groups:
            g["capturable"] = capturable
        for p in resumed.parameters():
            assert opt.state[p]["step"].dtype == torch.float32
        if catch_up:
            state = opt.state[resumed.values.weight]
            assert state["catch_up_cursor"].dtype == torch.int64 and state["catch_up_row_step"].dtype == torch.int32
        _train(resumed, opt, BATCHES[2:], backend)
        _assert_same(resumed, opt, straight, straight_opt)


def test_an_ordinary_state_loads_into_a_capturable_optimizer():
    start = _model()
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    opt_a = build_optimizer(a)
    _train(a, opt_a, BATCHES[:2], "torch")
    opt_b = build_optimizer(b, capturable=True)
    b.load_state_dict(a.state_dict())
    saved = copy.deepcopy(opt_a.state_dict())  # loading shares the tensors of its argument
    for g in saved["param_groups"]:
        g["capturable"] = True
    opt_b.load_state_dict(saved)
    for p in b.parameters():
        assert opt_b.state[p]["step"].dtype == torch.float32
    _train(a, opt_a, BATCHES[2:], "torch")
    _train(b, opt_b, BATCHES[2:], "torch")
    _assert_same(b, opt_b, a, opt_a)


def test_capturable_option_is_checked():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="capturable"):
        SparseRowAdam([p], capturable="yes")
    opt = SparseRowAdam([p])
    assert opt.param_groups[0]["capturable"] is False
