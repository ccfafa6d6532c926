"""pkm::sparse_adam_step_: the torch and Triton implementations against the float64 reference.

The Triton kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (set in tests/ops/conftest.py)
at sizes that cross its ``BLOCK_D`` (up to 1024 float32 columns a block); tests marked ``cuda``
repeat it at a real table size on a GPU.
"""

import pytest
import torch
from torch.library import opcheck
from torch.testing import assert_close

from product_key_memory import use_backend
from product_key_memory.ops.sparse_adam import route, sparse_adam_step_
from product_key_memory.ops.sparse_adam.reference import sparse_adam_step_reference_

from ..._extras import importorskip

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 compute against float64: a few roundings of values of size ~1; half storage: one rounding
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, step=3)


def make_state(S, D, dtype, moment_dtype, gen, device=DEVICE):
    p = torch.randn(S, D, generator=gen).to(dtype)
    m = (torch.randn(S, D, generator=gen) * 0.1).to(moment_dtype)
    v = (torch.rand(S, D, generator=gen) * 0.01).to(moment_dtype)
    v[0, :2] = 0  # a never-updated element: catch-up leaves m / sqrt(v) out
    m[0, :2] = 0
    return [t.to(device) for t in (p, m, v)]


def catch_up_coefficients(U, gen):
    d = 1 - torch.rand(U, 1, generator=gen, dtype=torch.float64) * 0.01
    b1 = torch.rand(U, 1, generator=gen, dtype=torch.float64)
    b2 = 1 - torch.rand(U, 1, generator=gen, dtype=torch.float64) * 0.1
    s = torch.rand(U, 1, generator=gen, dtype=torch.float64) * 0.05
    return torch.cat([d, b1, b2, s], 1)


def reference_step(state, rows, grad_rows, catch_up, *, max_sq=None, weight_decay=0.0, decoupled=False,
                   maximize=False, lr, betas, eps, step):
    b1, b2 = betas
    sparse_adam_step_reference_(
        *state, max_sq, rows, grad_rows, catch_up, lr=lr, beta1=b1, beta2=b2, eps=eps,
        weight_decay=weight_decay, decoupled_weight_decay=decoupled, maximize=maximize,
        step_size=lr / (1 - b1**step), bc2_sqrt=(1 - b2**step) ** 0.5,
    )


def check(state, want, dtype, moment_dtype):
    tol = TOL[torch.bfloat16] if torch.bfloat16 in (dtype, moment_dtype) else TOL[dtype]
    for name, got, ref in zip(("param", "exp_avg", "exp_avg_sq"), state, want):
        assert_close(got.cpu(), ref.cpu(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("D", [5, 300, 1100])  # 1100 crosses the float32 block of 1024 columns
@pytest.mark.parametrize("dtype,moment_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled=True),
                                     dict(weight_decay=0.01, maximize=True)], ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("parts", ["step", "catch_up+step", "catch_up"])
def test_equals_reference(backend, D, dtype, moment_dtype, options, parts):
    if backend == "triton":
        importorskip("triton")
    gen = torch.Generator().manual_seed(D)
    state = make_state(20, D, dtype, moment_dtype, gen)
    want = [t.clone() for t in state]
    rows = torch.tensor([0, 3, 4, 11, 19], device=DEVICE)
    grad_rows = torch.randn(5, D, generator=gen).to(dtype).to(DEVICE) if "step" in parts else None
    catch_up = catch_up_coefficients(5, gen).to(DEVICE) if "catch_up" in parts else None
    kw = dict(HYPER, weight_decay=options.get("weight_decay", 0.0), maximize=options.get("maximize", False))
    with use_backend(backend):
        sparse_adam_step_(*state, rows, grad_rows, catch_up=catch_up,
                          decoupled_weight_decay=options.get("decoupled", False), **kw)
    reference_step(want, rows, grad_rows, catch_up, decoupled=options.get("decoupled", False), **kw)
    check(state, want, dtype, moment_dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_rows_and_untouched_rows_stay(backend):
    if backend == "triton":
        importorskip("triton")
    gen = torch.Generator().manual_seed(1)
    state = make_state(10, 8, torch.float32, torch.float32, gen)
    before = [t.clone() for t in state]
    want = [t.clone() for t in state]
    rows = torch.tensor([2, -1, 7, -1], device=DEVICE)  # -1: a dropped duplicate, no work
    grad_rows = torch.randn(4, 8, generator=gen).to(DEVICE)
    catch_up = catch_up_coefficients(4, gen).to(DEVICE)
    with use_backend(backend):
        sparse_adam_step_(*state, rows, grad_rows, catch_up=catch_up, **HYPER)
        sparse_adam_step_(*state, rows[:0], grad_rows[:0], **HYPER)  # nothing to do
    reference_step(want, rows, grad_rows, catch_up, **HYPER)
    check(state, want, torch.float32, torch.float32)
    other = torch.ones(10, dtype=torch.bool)
    other[[2, 7]] = False
    for got, old in zip(state, before):
        assert torch.equal(got[other].cpu(), old[other].cpu()), "rows outside `rows` changed"


@pytest.mark.parametrize("catch_up", [False, True])
def test_amsgrad_and_float64_take_torch_and_equal_reference(catch_up):
    gen = torch.Generator().manual_seed(2)
    state = make_state(12, 6, torch.float64, torch.float64, gen, device="cpu")
    max_sq = state[2].clone() * 1.5
    want, want_max = [t.clone() for t in state], max_sq.clone()
    rows, grad_rows = torch.tensor([1, 5, 6]), torch.randn(3, 6, generator=gen, dtype=torch.float64)
    coeffs = catch_up_coefficients(3, gen) if catch_up else None
    with use_backend("triton" if torch.cuda.is_available() else None):
        assert route(*state, max_sq) == "torch"
        assert route(state[0], state[1], state[2], None) != "triton"  # float64 never takes the kernel
    sparse_adam_step_(*state, rows, grad_rows, catch_up=coeffs, max_exp_avg_sq=max_sq, weight_decay=0.1, **HYPER)
    reference_step(want, rows, grad_rows, coeffs, max_sq=want_max, weight_decay=0.1, **HYPER)
    check(state, want, torch.float64, torch.float64)
    assert_close(max_sq, want_max, **TOL[torch.float64], msg="max_exp_avg_sq")


def test_routes():
    t = torch.zeros(4, 3)
    assert route(t, t, t, None) == "torch"
    with use_backend("reference"):
        assert route(t, t, t, None) == "reference"
    if importorskip("triton"):
        with use_backend("triton"):
            assert route(t, t, t, None) == "triton"
            assert route(t, t, t, t) == "torch", "amsgrad takes the torch implementation"
            assert route(t.t(), t.t(), t.t(), None) == "torch", "strided tables take the torch implementation"


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    p, m, v = make_state(10, 4, torch.float32, torch.float32, gen, device="cpu")
    rows, g = torch.tensor([1, 4]), torch.randn(2, 4, generator=gen)
    c = catch_up_coefficients(2, gen)
    for args in ((p, m, v, None, rows, g, None), (p, m, v, v.clone(), rows, g, c), (p, m, v, None, rows, None, c)):
        opcheck(torch.ops.pkm.sparse_adam_step_, (*args, 1e-2, 0.9, 0.999, 1e-8, 0.1, True, False, 0.1, 0.05, None,
                                                  1 << 20, "torch"))


def test_errors_name_the_argument():
    t = torch.zeros(4, 3)
    kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, step=1)
    cases = [
        (dict(param=torch.zeros(())), "param"),
        (dict(param=torch.zeros(4, 3, 2).transpose(0, 1)), "param"),  # rows of another shape must be contiguous
        (dict(exp_avg=torch.zeros(4, 2)), "exp_avg"),
        (dict(rows=torch.tensor([0], dtype=torch.int32)), "rows"),
        (dict(grad_rows=torch.zeros(2, 3)), "grad_rows"),
        (dict(catch_up=torch.zeros(1, 3)), "catch_up"),
        (dict(step=0), "step"),
    ]
    for change, name in cases:
        args = dict(param=t, exp_avg=t.clone(), exp_avg_sq=t.clone(), rows=torch.tensor([0]),
                    grad_rows=torch.zeros(1, 3), **kw)
        args.update(change)
        with pytest.raises(ValueError, match=name):
            sparse_adam_step_(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_real_size(dtype):
    gen = torch.Generator().manual_seed(0)
    state = make_state(65536, 512, dtype, torch.float32, gen)
    rows = torch.randperm(65536, generator=gen)[:20000].sort().values.cuda()
    grad_rows = torch.randn(20000, 512, generator=gen).to(dtype).cuda()
    catch_up = catch_up_coefficients(20000, gen).cuda()
    kw = dict(HYPER, weight_decay=0.01)
    want = [t.clone() for t in state]
    sparse_adam_step_(*state, rows, grad_rows, catch_up=catch_up, decoupled_weight_decay=True, **kw)
    assert route(*state, None) == "triton"
    with use_backend("torch"):
        sparse_adam_step_(*want, rows, grad_rows.float(), catch_up=catch_up, decoupled_weight_decay=True, **kw)
    check(state, want, dtype, torch.float32)
