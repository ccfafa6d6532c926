"""The sparse Adam kernel (product_key_memory.ops.triton.adam) against its plain PyTorch step and
``SparseRowAdam``, moved unchanged from tests/ops/test_triton_kernels.py.

Interim: branch optim-23 turns the kernel into the op folder ops/sparse_adam/ with its tests in
tests/ops/sparse_adam/; this file goes when that lands (it imports ops.triton.adam, which goes too).
Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (tests/ops/conftest.py) at small sizes,
crossing ``BLOCK_D = 256`` columns; the ``cuda`` test repeats it at a real size on a GPU.
"""

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton")

from product_key_memory.ops.triton.adam import sparse_adam_step_, sparse_adam_step_reference_  # noqa: E402
from product_key_memory.optim import SparseRowAdam  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}  # one bf16 rounding of an fp32 result


def adam_state(S, D, dtype, moment_dtype, gen):
    p = torch.randn(S, D, generator=gen).to(dtype).to(DEVICE)
    m = (torch.randn(S, D, generator=gen) * 0.1).to(moment_dtype).to(DEVICE)
    v = (torch.rand(S, D, generator=gen) * 0.01).to(moment_dtype).to(DEVICE)
    return p, m, v


@pytest.mark.parametrize("D", [300, 5])  # 300 crosses BLOCK_D = 256
@pytest.mark.parametrize("dtype,moment_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, False), (0.01, True)])
def test_sparse_adam_equals_reference(D, dtype, moment_dtype, weight_decay, maximize):
    gen = torch.Generator().manual_seed(D)
    state = adam_state(20, D, dtype, moment_dtype, gen)
    ref_state = [t.clone() for t in state]
    rows = torch.tensor([0, 3, 4, 11, 19]).to(DEVICE)
    grad_rows = torch.randn(5, D, generator=gen).to(dtype).to(DEVICE)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, step=3, maximize=maximize)
    sparse_adam_step_(*state, rows, grad_rows, **kw)
    sparse_adam_step_reference_(*ref_state, rows, grad_rows, **kw)
    all_fp32 = dtype == torch.float32 and moment_dtype == torch.float32
    tol = dict(atol=1e-6, rtol=1e-6) if all_fp32 else TOL[torch.bfloat16]
    for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), state, ref_state):
        assert_close(got, want, **tol, msg=name)


def test_sparse_adam_equals_sparse_row_adam():
    """Three lazy steps with the kernel equal ``optim.SparseRowAdam`` (fp32, ~1e-6 relative)."""
    gen = torch.Generator().manual_seed(0)
    S, D, lr, betas, eps, wd = 40, 24, 1e-2, (0.9, 0.999), 1e-8, 0.05
    p0 = torch.randn(S, D, generator=gen)
    ref = torch.nn.Parameter(p0.clone())
    opt = SparseRowAdam([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    p, m, v = p0.clone().to(DEVICE), torch.zeros(S, D, device=DEVICE), torch.zeros(S, D, device=DEVICE)
    for step in (1, 2, 3):
        rows = torch.randperm(S, generator=gen)[:15].sort().values
        grad_rows = torch.randn(15, D, generator=gen)
        ref.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, (S, D), check_invariants=True).coalesce()
        opt.step()
        sparse_adam_step_(p, m, v, rows.to(DEVICE), grad_rows.to(DEVICE), lr=lr, beta1=betas[0], beta2=betas[1],
                          eps=eps, weight_decay=wd, step=step)
    st = opt.state[ref]
    assert_close(p.cpu(), ref.detach(), atol=1e-6, rtol=1e-6, msg="param")
    assert_close(m.cpu(), st["exp_avg"], atol=1e-6, rtol=1e-6, msg="exp_avg")
    assert_close(v.cpu(), st["exp_avg_sq"], atol=1e-6, rtol=1e-6, msg="exp_avg_sq")


def test_sparse_adam_untouched_rows_and_empty():
    gen = torch.Generator().manual_seed(1)
    state = adam_state(10, 8, torch.float32, torch.float32, gen)
    before = [t.clone() for t in state]
    rows = torch.tensor([2, 7], device=DEVICE)
    sparse_adam_step_(*state, rows, torch.randn(2, 8, generator=gen).to(DEVICE), lr=0.1, beta1=0.9, beta2=0.99,
                      eps=1e-8, weight_decay=0.0, step=1)
    other = torch.ones(10, dtype=torch.bool)
    other[[2, 7]] = False
    for got, want in zip(state, before):
        assert torch.equal(got[other], want[other]), "rows outside `rows` changed"
        assert not torch.equal(got[~other], want[~other])
    sparse_adam_step_(*state, rows[:0], torch.zeros(0, 8, device=DEVICE), lr=0.1, beta1=0.9, beta2=0.99,
                      eps=1e-8, weight_decay=0.0, step=2)


@pytest.mark.cuda
def test_cuda_sparse_adam_real_size():
    gen = torch.Generator().manual_seed(0)
    state = adam_state(65536, 512, torch.float32, torch.float32, gen)
    ref_state = [t.clone() for t in state]
    rows = torch.randperm(65536, generator=gen)[:20000].sort().values.cuda()
    grad_rows = torch.randn(20000, 512, generator=gen).cuda()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=5)
    sparse_adam_step_(*state, rows, grad_rows, **kw)
    sparse_adam_step_reference_(*ref_state, rows, grad_rows, **kw)
    for got, want in zip(state, ref_state):
        assert_close(got, want, atol=1e-6, rtol=1e-6)
