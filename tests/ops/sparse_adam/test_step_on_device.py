"""pkm::sparse_adam_step_ with the step count as a tensor on the table's device (a capturable
optimizer's ``state["step"]``): the bias corrections are computed on the device, from the count
current at each call, and give the numbers of the same count passed as a Python number; nothing is
read back to the host (the Triton kernel's ``STEP_ON_DEVICE`` variant under the interpreter on CPU).
"""

import pytest
import torch
from torch.library import opcheck
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from product_key_memory import use_backend
from product_key_memory.ops.sparse_adam import device_bias_corrections, sparse_adam_step_

from .test_sparse_adam import DEVICE, TOL, catch_up_coefficients, check, make_state, reference_step

def _backends():
    names = ["reference", "torch"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return names
    return names + ["triton"]


def _run(backend, state, steps, rows, grads, catch_ups, *, on_device, **kw):
    """``steps`` consecutive calls from ``state``: the count as a number, or one tensor counted in place."""
    count = torch.zeros((), dtype=torch.float32, device=DEVICE)
    with use_backend(backend):
        for k in range(steps):
            count += 1
            sparse_adam_step_(*state, rows[k], grads[k], catch_up=catch_ups[k],
                              step=count if on_device else k + 1, **kw)
    return state


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype,moment_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1, decoupled_weight_decay=True),
                                     dict(weight_decay=0.01, maximize=True), dict(amsgrad=True)],
                         ids=["plain", "adamw", "l2,maximize", "amsgrad"])
@pytest.mark.parametrize("catch_up", [False, True])
def test_count_on_device_equals_count_as_number(backend, dtype, moment_dtype, options, catch_up):
    """Five steps (padding rows included) with the count a tensor equal five with it a number."""
    gen = torch.Generator().manual_seed(7)
    S, D, U, steps = 12, 40, 5, 5
    state = make_state(S, D, dtype, moment_dtype, gen)
    options = dict(options)
    if options.pop("amsgrad", False):
        state.append(torch.zeros_like(state[2]))
    rows = [torch.randperm(S, generator=gen)[:U].to(DEVICE) for _ in range(steps)]
    rows[1][2] = -1  # padding
    grads = [torch.randn(U, D, generator=gen).to(dtype).to(DEVICE) for _ in range(steps)]
    catch_ups = [catch_up_coefficients(U, gen).to(DEVICE) if catch_up else None for _ in range(steps)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, **options)

    def start():
        s = [t.clone() for t in state]
        return s[:3], (dict(max_exp_avg_sq=s[3]) if len(s) == 4 else {})

    (got, got_max), (want, want_max) = start(), start()
    _run(backend, got, steps, rows, grads, catch_ups, on_device=True, **got_max, **kw)
    _run(backend, want, steps, rows, grads, catch_ups, on_device=False, **want_max, **kw)
    # the same formulas from a float32 count computed in float64 on either side: equal to a rounding
    tol = TOL[torch.bfloat16] if torch.bfloat16 in (dtype, moment_dtype) else dict(atol=1e-6, rtol=1e-6)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")
    if got_max:
        assert_close(got_max["max_exp_avg_sq"], want_max["max_exp_avg_sq"], **tol)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("step", [1, 2, 10, 1000, 100000])
def test_each_count_gives_the_reference_bias_correction(backend, step):
    """One step at each count, against the float64 reference with Python's bias corrections:
    ``beta2 = 0.9999`` makes ``1 - beta2**step`` small at low counts (no digits lost to cancellation)."""
    gen = torch.Generator().manual_seed(step)
    state = make_state(8, 20, torch.float32, torch.float32, gen)
    want = [t.clone() for t in state]
    rows = torch.tensor([0, 2, 5], device=DEVICE)
    grads = torch.randn(3, 20, generator=gen).to(DEVICE)
    kw = dict(lr=1e-2, betas=(0.95, 0.9999), eps=1e-8)
    with use_backend(backend):
        sparse_adam_step_(*state, rows, grads, step=torch.tensor(float(step), device=DEVICE), **kw)
    reference_step(want, rows, grads, None, step=step, **kw)
    check(state, want, torch.float32, torch.float32)


@pytest.mark.parametrize("parts", ["step", "catch_up+step", "catch_up"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_blocks_of_padding_without_a_host_read(parts, amsgrad):
    """The torch implementation with the count on the device keeps padding in its blocks (two rows
    a block here): a padding entry beside a real one, and blocks of padding only, change nothing
    but the real rows, as the reference says."""
    gen = torch.Generator().manual_seed(1)
    D = 6
    state = make_state(9, D, torch.float32, torch.float32, gen, device="cpu")
    max_sq = torch.rand(9, D, generator=gen) * 0.01 if amsgrad else None
    want, want_max = [t.clone() for t in state], None if max_sq is None else max_sq.clone()
    rows = torch.tensor([-1, 0, -1, -1, 5, -1, -1, -1, 8])  # blocks [-1, 0] [-1, -1] [5, -1] [-1, -1] [8]
    U = rows.numel()
    grads = torch.randn(U, D, generator=gen) if "step" in parts else None
    c = catch_up_coefficients(U, gen) if "catch_up" in parts else None
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    with use_backend("torch"):
        sparse_adam_step_(*state, rows, grads, catch_up=c, max_exp_avg_sq=max_sq, step=torch.tensor(3.0),
                          chunk_bytes=2 * D * 4, **kw)
    reference_step(want, rows, grads, c, max_sq=want_max, step=3, **kw)
    check(state, want, torch.float32, torch.float32)
    if amsgrad:
        assert_close(max_sq, want_max, **TOL[torch.float32])


def test_device_bias_corrections_are_pythons():
    for step in (1, 3, 1000, 2**20):
        for beta1, beta2 in ((0.9, 0.999), (0.0, 0.5), (0.99, 0.99999)):
            step_size, bc2_sqrt = device_bias_corrections(torch.tensor(float(step)), 0.1, beta1, beta2)
            assert step_size.dtype == bc2_sqrt.dtype == torch.float64 and step_size.dim() == 0
            assert_close(step_size.item(), 0.1 / (1 - beta1**step), atol=0, rtol=1e-14)
            assert_close(bc2_sqrt.item(), (1 - beta2**step) ** 0.5, atol=0, rtol=1e-14)


class _HostReads(TorchDispatchMode):
    """Records every read of a tensor's value by the host (``.item()``, ``bool(t)``, ...) with the
    tensor's dtype, also inside the custom op (run on CPU with this mode on)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.seen.append((str(func), args[0].dtype))
        if func.namespace == "pkm":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "reference"])
@pytest.mark.parametrize("catch_up", [False, True])
def test_count_on_device_is_never_read_back(backend, catch_up):
    """Nothing reaches the host: neither the count (nor anything computed from it) nor whether
    ``rows`` holds padding (the torch implementation drops padding with a host read when the
    count is a number)."""
    gen = torch.Generator().manual_seed(0)
    state = make_state(10, 8, torch.float32, torch.float32, gen, device="cpu")
    rows = torch.tensor([1, -1, 4, 7])
    c = catch_up_coefficients(4, gen) if catch_up else None
    with use_backend(backend), _HostReads() as rec:
        sparse_adam_step_(*state, rows, torch.randn(4, 8, generator=gen), catch_up=c, lr=1e-2, betas=(0.9, 0.999),
                          eps=1e-8, step=torch.tensor(4.0))
    assert rec.seen == [], rec.seen


def test_opcheck_with_count_on_device():
    gen = torch.Generator().manual_seed(3)
    p, m, v = make_state(10, 4, torch.float32, torch.float32, gen, device="cpu")
    rows, g = torch.tensor([1, 4]), torch.randn(2, 4, generator=gen)
    count = torch.tensor(3.0)
    for max_sq in (None, v.clone()):
        opcheck(torch.ops.pkm.sparse_adam_step_, (p, m, v, max_sq, rows, g, None, 1e-2, 0.9, 0.999, 1e-8, 0.0,
                                                  False, False, 0.0, 0.0, count, 1 << 20, "torch"))


def test_count_tensor_errors_name_step():
    t = torch.zeros(4, 3)
    args = dict(param=t, exp_avg=t.clone(), exp_avg_sq=t.clone(), rows=torch.tensor([0]), grad_rows=torch.zeros(1, 3),
                lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    for bad in (torch.tensor(1), torch.ones(2), torch.tensor(1.0, device="meta")):
        with pytest.raises(ValueError, match="step"):
            sparse_adam_step_(**args, step=bad)
    sparse_adam_step_(**args, step=torch.ones(1))  # one element of any shape


@pytest.mark.cuda
def test_cuda_count_on_device_equals_count_as_number():
    gen = torch.Generator().manual_seed(0)
    state = make_state(65536, 512, torch.bfloat16, torch.float32, gen)
    want = [t.clone() for t in state]
    rows = torch.randperm(65536, generator=gen)[:20000].cuda()
    grads = torch.randn(20000, 512, generator=gen).to(torch.bfloat16).cuda()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True)
    sparse_adam_step_(*state, rows, grads, step=torch.tensor(3.0, device="cuda"), **kw)
    sparse_adam_step_(*want, rows, grads, step=3, **kw)
    check(state, want, torch.bfloat16, torch.float32)
