"""Lazy (row-sparse) Adam step: only the given rows of a table and of its moments change.

One program per ``(row, BLOCK_D columns)``: load the parameter, gradient and moment
rows, do the step in fp32, store each back in its own dtype (the parameter may be bf16,
the moments fp32 or the parameter's dtype). Offsets are int64. The formulas are those of
``optim.SparseRowAdam._sparse_step`` (``torch.optim.Adam``'s single-tensor step):

    g = -g if maximize;  g += weight_decay * p                (L2, touched rows only)
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
    p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

Reference: :func:`sparse_adam_step_reference_`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton import check_device

__all__ = ["sparse_adam_step_", "sparse_adam_step_reference_"]


@triton.jit
def _sparse_adam_kernel(
    p_ptr, m_ptr, v_ptr, rows_ptr, g_ptr,
    D, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    row = tl.load(rows_ptr + i)
    at = row * D + cols
    p = tl.load(p_ptr + at, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + at, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + at, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i * D + cols, mask=ok, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + weight_decay * p
    m = m + (1.0 - beta1) * (g - m)  # torch.lerp for a weight < 0.5
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    tl.store(m_ptr + at, m.to(m_ptr.dtype.element_ty), mask=ok)
    tl.store(v_ptr + at, v.to(v_ptr.dtype.element_ty), mask=ok)
    tl.store(p_ptr + at, p.to(p_ptr.dtype.element_ty), mask=ok)


def _coefficients(lr: float, beta1: float, beta2: float, step: float):
    return lr / (1 - beta1**step), math.sqrt(1 - beta2**step)


def sparse_adam_step_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    rows: Tensor,
    grad_rows: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """In place: one Adam step of the ``rows`` (int64, unique) of ``param (S, D)`` and its moments.

    ``grad_rows (U, D)`` holds the gradient of each row in ``rows``; ``step`` is the step
    count after this step (bias correction), as ``SparseRowAdam`` keeps it.
    """
    if param.dim() != 2 or not param.is_contiguous():
        raise ValueError(f"param must be a contiguous (num_rows, dim) table, got shape {tuple(param.shape)}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with param's shape {tuple(param.shape)}, got {tuple(t.shape)}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if grad_rows.shape != (rows.numel(), param.shape[1]):
        raise ValueError(f"grad_rows must be ({rows.numel()}, {param.shape[1]}), got {tuple(grad_rows.shape)}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after this step), got {step}")
    check_device("sparse_adam_step_", _sparse_adam_kernel, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                 rows=rows, grad_rows=grad_rows)
    U, D = rows.numel(), param.shape[1]
    if U == 0 or D == 0:
        return
    step_size, bc2_sqrt = _coefficients(lr, beta1, beta2, step)
    block_d = min(triton.next_power_of_2(D), 256)
    _sparse_adam_kernel[(U, triton.cdiv(D, block_d))](
        param, exp_avg, exp_avg_sq, rows.contiguous(), grad_rows.contiguous(),
        D, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
        MAXIMIZE=maximize, HAS_WD=weight_decay != 0, BLOCK_D=block_d,
    )


def sparse_adam_step_reference_(
    param, exp_avg, exp_avg_sq, rows, grad_rows, *, lr, beta1, beta2, eps, weight_decay, step, maximize=False
) -> None:
    """The same step with torch ops in fp32 (``SparseRowAdam._sparse_step``'s formulas)."""
    step_size, bc2_sqrt = _coefficients(lr, beta1, beta2, step)
    g = grad_rows.float()
    if maximize:
        g = -g
    p_r = param.index_select(0, rows).float()
    if weight_decay != 0:
        g = g.add(p_r, alpha=weight_decay)
    m_r = exp_avg.index_select(0, rows).float().lerp_(g, 1 - beta1)
    v_r = exp_avg_sq.index_select(0, rows).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.index_copy_(0, rows, m_r.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v_r.to(exp_avg_sq.dtype))
    denom = v_r.sqrt().div_(bc2_sqrt).add_(eps)
    param.index_copy_(0, rows, p_r.addcdiv_(m_r, denom, value=-step_size).to(param.dtype))
