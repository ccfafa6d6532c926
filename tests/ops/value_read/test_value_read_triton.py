"""The value-read kernels (:mod:`product_key_memory.ops.value_read.triton_impl`) against :mod:`reference`.

Without CUDA they run on CPU tensors under ``TRITON_INTERPRET=1`` (set in tests/ops/conftest.py) at
small shapes chosen to cross their blocks: ``BLOCK_M = 32`` reads and ``BLOCK_D = 128`` columns in
the read, runs of ``BLOCK_R = 16`` reads in the backward. Tests marked ``cuda`` repeat them at real
sizes on a GPU.
"""

import pytest
import torch
from torch.testing import assert_close

from ..._extras import importorskip
importorskip("triton")

from product_key_memory import functional as PF  # noqa: E402
from product_key_memory.ops.value_read import reference  # noqa: E402
from product_key_memory.ops.value_read.triton_impl import (  # noqa: E402
    value_read,
    value_read_backward,
    value_read_backward_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),  # one bf16 rounding of an fp32-accumulated result
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def read_inputs(S, D, B, m, dtype, idx_dtype=torch.int64, weights=True, gen=None):
    values = torch.randn(S, D, generator=gen).to(dtype)
    indices = torch.randint(0, S, (B, m), generator=gen).to(idx_dtype)
    w = None
    if weights:
        w = torch.randn(B, m, generator=gen)
        w[::2, : m // 2] = 0.0  # padding: read, weight 0
    return values.to(DEVICE), indices.to(DEVICE), None if w is None else w.to(DEVICE)


def reference_read(values, indices, w):
    """:func:`reference.value_read` in float32 (the kernel accumulates in float32), in the table's dtype."""
    return reference.value_read(values.float(), indices, w).to(values.dtype)


@pytest.mark.parametrize("S,D,B,m", [(300, 130, 5, 33), (7, 4, 9, 3), (50, 128, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("weighted", [True, False])
def test_value_read_forward(S, D, B, m, dtype, idx_dtype, weighted):
    values, indices, w = read_inputs(S, D, B, m, dtype, idx_dtype, weighted, torch.Generator().manual_seed(S))
    out = value_read(values, indices, w)
    assert out.dtype == dtype and out.shape == (B, D)
    assert_close(out, reference_read(values, indices, w), **TOL[dtype], msg="output")


def test_value_read_forward_bf16_weights_and_functional_reference():
    values, indices, w = read_inputs(40, 20, 6, 5, torch.float32)
    out = value_read(values, indices, w.bfloat16())
    assert_close(out, PF.value_read_reference(values, indices, w.bfloat16()), **TOL[torch.float32], msg="bf16 weights")
    assert_close(out, reference.value_read(values, indices, w.bfloat16()), **TOL[torch.float32], msg="bf16 weights")


def test_value_read_empty():
    values, indices, w = read_inputs(10, 8, 0, 4, torch.float32)
    assert value_read(values, indices, w).shape == (0, 8)
    g = torch.zeros(0, 8, device=DEVICE)
    gv, gw = value_read_backward(g, values, indices, w, None, True, True)
    assert gw.shape == (0, 4)
    assert torch.equal(gv, torch.zeros_like(values))
    rows_idx, rows, gw = value_read_backward_rows(g, values, indices, w, None, True)
    assert gw.shape == (0, 4)
    assert rows_idx.shape == (0,) and rows.shape == (0, 8)


def check_rows_layout(rows_idx, rows, touched, indices):
    """The triton backend's row-sparse gradient: one entry per read, sorted; its distinct rows are
    exactly the reference's touched rows (or, when none is touched, the slots read, all zero), and
    each row's total sits in one entry (the row's other entries are zero)."""
    assert rows_idx.shape == (indices.numel(),) and rows.shape[0] == indices.numel(), "one entry per read"
    assert bool((rows_idx[1:] >= rows_idx[:-1]).all()), "rows_idx sorted"
    if touched.numel():
        assert torch.equal(rows_idx.unique(), touched), "distinct rows: read, non-zero weight, trainable"
    else:
        assert torch.equal(rows_idx, indices.reshape(-1).long().sort().values) and not rows.any()
    filled = torch.zeros(rows_idx.max().item() + 1 if rows_idx.numel() else 0, dtype=torch.long, device=DEVICE)
    filled.index_add_(0, rows_idx, rows.ne(0).any(1).long())
    assert int(filled.max()) <= 1 if filled.numel() else True, "a row's total sits in one entry, the others are zero"


def check_backward(values, indices, w, trainable, sparse, need_values_grad=True, need_weights_grad=True, gen=None):
    """The kernel's dense (or, with ``sparse``, touched-rows) backward against the reference's."""
    B, D = indices.shape[0], values.shape[1]
    grad_out = torch.randn(B, D, generator=gen).to(DEVICE)
    tol = TOL[values.dtype]
    if sparse:
        rows_idx, rows, gw = value_read_backward_rows(grad_out, values, indices, w, trainable, need_weights_grad)
        r_idx, r_rows, rw = reference.value_read_backward_rows(
            grad_out, values.float(), indices, w, trainable, need_weights_grad
        )
        assert rows_idx.dtype == torch.int64 and rows.dtype == values.dtype
        check_rows_layout(rows_idx, rows, r_idx, indices)
        merged = torch.zeros(values.shape, dtype=torch.float32, device=DEVICE).index_add_(0, rows_idx, rows.float())
        assert_close(merged[r_idx].to(values.dtype), r_rows.to(values.dtype), **tol, msg="sparse value gradient rows")
    else:
        gv, gw = value_read_backward(grad_out, values, indices, w, trainable, need_values_grad, need_weights_grad)
        rv, rw = reference.value_read_backward(
            grad_out, values.float(), indices, w, trainable, need_values_grad, need_weights_grad
        )
        if rv is None:
            assert gv is None
        else:
            assert gv.dtype == values.dtype and gv.shape == values.shape
            assert_close(gv, rv.to(values.dtype), **tol, msg="dense value gradient")
    if rw is None:
        assert gw is None
    else:
        assert gw.dtype == w.dtype and gw.shape == w.shape
        assert_close(gw, rw.to(w.dtype), **TOL[w.dtype], msg="weight gradient")


@pytest.mark.parametrize("S,D,B,m", [(40, 130, 3, 33), (3, 4, 9, 7)])  # (3, ...): runs of ~21 reads > BLOCK_R
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [True, False])
def test_value_read_backward(S, D, B, m, dtype, sparse, masked, weighted):
    gen = torch.Generator().manual_seed(S + D)
    values, indices, w = read_inputs(S, D, B, m, dtype, weights=weighted, gen=gen)
    trainable = (torch.rand(S, generator=gen) < 0.6).to(DEVICE) if masked else None
    check_backward(values, indices, w, trainable, sparse, gen=gen)


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
def test_value_read_backward_partial_needs(need):
    values, indices, w = read_inputs(30, 20, 4, 6, torch.float32)
    for idx_dtype in (torch.int64, torch.int32):
        check_backward(values, indices.to(idx_dtype), w, None, False, *need)


def test_value_read_backward_weight_dtypes():
    values, indices, w = read_inputs(30, 20, 4, 6, torch.bfloat16)
    check_backward(values, indices, w.bfloat16(), None, True)
    check_backward(values, indices, w.half(), None, False)


def test_value_read_backward_matches_autograd():
    """The kernel's backward against autograd through ``reference.value_read``."""
    gen = torch.Generator().manual_seed(3)
    values, indices, w = read_inputs(12, 6, 5, 4, torch.float32, gen=gen)
    trainable = torch.rand(12, generator=gen) < 0.5
    grad_out = torch.randn(5, 6, generator=gen)
    v = values.cpu().requires_grad_()
    wt = w.cpu().requires_grad_()
    PF.value_read_reference(v, indices.cpu(), wt, trainable=trainable).backward(grad_out)
    gv, gw = value_read_backward(grad_out.to(DEVICE), values, indices, w, trainable.to(DEVICE), True, True)
    assert_close(gv.cpu(), v.grad, **TOL[torch.float32], msg="value gradient vs autograd")
    assert_close(gw.cpu(), wt.grad, **TOL[torch.float32], msg="weight gradient vs autograd")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_value_read_real_sizes(dtype, sparse):
    gen = torch.Generator().manual_seed(0)
    values, indices, w = read_inputs(65536, 512, 2048, 128, dtype, gen=gen)
    assert_close(value_read(values, indices, w), reference_read(values, indices, w), **TOL[dtype])
    check_backward(values, indices, w, (torch.rand(65536, generator=gen) < 0.9).to(DEVICE), sparse, gen=gen)


@pytest.mark.cuda
def test_cuda_value_read_int64_offsets():
    """A table of more than 2**31 elements: the last rows are read with int64 offsets."""
    S, D = (2**31) // 128 + 64, 128
    values = torch.zeros(S, D, dtype=torch.bfloat16, device="cuda")
    values[-64:] = torch.arange(64, dtype=torch.bfloat16, device="cuda").unsqueeze(-1)
    indices = torch.arange(S - 64, S, device="cuda").view(8, 8)
    out = value_read(values, indices, None)
    assert_close(out.float(), values[indices].float().sum(1))
    rows_idx, rows, gw = value_read_backward_rows(torch.ones(8, D, device="cuda"), values, indices,
                                                  torch.ones(8, 8, device="cuda"), None, True)
    assert torch.equal(rows_idx, indices.flatten().sort().values)
    assert_close(gw, values[indices].float().sum(-1))
