"""The row-sparse Adam update as one Triton kernel: one program per row, 16-byte vector accesses.

A program loads its row index (and, with catch-up, the row's four coefficients) once, then walks
the row in blocks of ``BLOCK_D`` columns: each thread holds ``VEC`` consecutive elements, 16 bytes
of the widest of the parameter and its moments, so loads and stores are 16-byte vectors when a row
starts on a multiple of ``VEC`` elements (``ALIGNED``: ``dim % VEC == 0``; Triton also sees it when
``dim`` is a multiple of 16). Every value is computed in float32 and stored in its tensor's own
dtype; offsets are int64. Rows below 0 are padding: their program does nothing, so a caller can drop
duplicate rows without a data-dependent size (no host sync). The formulas are :mod:`.reference`'s;
``amsgrad`` and float64 tables take the torch implementation (the entry decides).
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from .._triton import check_device

__all__ = ["sparse_adam_step_"]


@triton.jit
def _sparse_adam_row_kernel(
    p_ptr, m_ptr, v_ptr, rows_ptr, g_ptr, c_ptr,
    D, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
    HAS_GRAD: tl.constexpr, HAS_CATCH_UP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i)
    if row >= 0:
        base = row * D
        if ALIGNED:
            base = tl.multiple_of(base, VEC)
        if HAS_CATCH_UP:
            d = tl.load(c_ptr + i * 4).to(tl.float32)
            b1 = tl.load(c_ptr + i * 4 + 1).to(tl.float32)
            b2 = tl.load(c_ptr + i * 4 + 2).to(tl.float32)
            s = tl.load(c_ptr + i * 4 + 3).to(tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            ok = cols < D
            at = base + cols
            p = tl.load(p_ptr + at, mask=ok, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + at, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + at, mask=ok, other=0.0).to(tl.float32)
            if HAS_CATCH_UP:
                u = tl.where(v > 0, m / tl.sqrt(tl.where(v > 0, v, 1.0)), 0.0)
                p = d * p - s * u
                m = b1 * m
                v = b2 * v
            if HAS_GRAD:
                g = tl.load(g_ptr + i * D + cols, mask=ok, other=0.0).to(tl.float32)
                if MAXIMIZE:
                    g = -g
                if HAS_WD:
                    if DECOUPLED:
                        p = p * (1.0 - lr * weight_decay)
                    else:
                        g = g + weight_decay * p
                m = m + (1.0 - beta1) * (g - m)  # torch.lerp for a weight < 0.5
                v = v * beta2 + (1.0 - beta2) * g * g
                p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
            tl.store(m_ptr + at, m.to(m_ptr.dtype.element_ty), mask=ok)
            tl.store(v_ptr + at, v.to(v_ptr.dtype.element_ty), mask=ok)
            tl.store(p_ptr + at, p.to(p_ptr.dtype.element_ty), mask=ok)


def launch_config(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor):
    """``(VEC, BLOCK_D, num_warps)``: 16 bytes of the widest tensor per thread, up to 8 warps a row."""
    vec = 16 // max(t.element_size() for t in (param, exp_avg, exp_avg_sq))
    D = param.shape[1]
    block_d = max(vec, min(triton.next_power_of_2(D), vec * 32 * 8))
    num_warps = max(1, min(8, block_d // (vec * 32)))
    return vec, block_d, num_warps


def sparse_adam_step_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    rows: Tensor,
    grad_rows: Optional[Tensor],
    catch_up: Optional[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    step_size: float,
    bc2_sqrt: float,
) -> None:
    """In place; contiguous ``(S, D)`` tensors, ``rows`` int64 ``(U,)``, ``grad_rows`` ``(U, D)``,
    ``catch_up`` ``(U, 4)`` (any float dtype). Checked by the entry, :func:`..sparse_adam_step_`."""
    check_device("sparse_adam_step_", _sparse_adam_row_kernel, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                 rows=rows, grad_rows=grad_rows, catch_up=catch_up)
    U, D = rows.numel(), param.shape[1]
    if U == 0 or D == 0:
        return
    vec, block_d, num_warps = launch_config(param, exp_avg, exp_avg_sq)
    g = grad_rows.contiguous() if grad_rows is not None else rows  # a placeholder pointer, never read
    c = catch_up.contiguous() if catch_up is not None else rows
    _sparse_adam_row_kernel[(U,)](
        param, exp_avg, exp_avg_sq, rows.contiguous(), g, c,
        D, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
        HAS_GRAD=grad_rows is not None, HAS_CATCH_UP=catch_up is not None, MAXIMIZE=maximize,
        HAS_WD=weight_decay != 0, DECOUPLED=decoupled_weight_decay, ALIGNED=D % vec == 0, VEC=vec,
        BLOCK_D=block_d, num_warps=num_warps,
    )
