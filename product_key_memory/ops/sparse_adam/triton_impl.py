"""The row-sparse Adam update as one Triton kernel: one program per row, 16-byte vector accesses.

A program loads its row index (and, with catch-up, the row's four coefficients) once, then walks
the row in blocks of ``BLOCK_D`` columns: each thread holds ``VEC`` consecutive elements, 16 bytes
of the widest of the parameter and its moments, so loads and stores are 16-byte vectors when a row
starts on a multiple of ``VEC`` elements (``ALIGNED``: ``dim % VEC == 0``; Triton also sees it when
``dim`` is a multiple of 16). Every value is computed in float32 and stored in its tensor's own
dtype; offsets are int64. Rows below 0 are padding: their program does nothing, so a caller can drop
duplicate rows without a data-dependent size (no host sync). The formulas are :mod:`.reference`'s;
``amsgrad`` and float64 tables take the torch implementation (the entry decides).

``STEP_ON_DEVICE``: the step count is read from a one-element tensor (a capturable optimizer's
``state["step"]``) and each program computes ``step_size = lr / (1 - beta1**step)`` and
``bc2_sqrt = sqrt(1 - beta2**step)`` itself, as ``exp2(step * log2(beta))`` in float64 (``1 - beta2**step``
for ``beta2`` near 1 would lose about four digits to cancellation in float32); otherwise the host
passes both numbers.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton import CompileCase, check_device

__all__ = ["sparse_adam_step_", "compile_cases"]


@triton.jit
def _sparse_adam_row_kernel(
    p_ptr, m_ptr, v_ptr, rows_ptr, g_ptr, c_ptr, step_ptr,
    D, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, log2_beta1, log2_beta2,
    HAS_GRAD: tl.constexpr, HAS_CATCH_UP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr, STEP_ON_DEVICE: tl.constexpr, VEC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i)
    if row >= 0:
        if STEP_ON_DEVICE:  # with HAS_GRAD only
            t = tl.maximum(tl.load(step_ptr).to(tl.float64), 1.0)
            bc1 = 1.0 - tl.exp2(t * log2_beta1)
            alpha = (lr / bc1).to(tl.float32)
            bc2 = tl.sqrt(1.0 - tl.exp2(t * log2_beta2)).to(tl.float32)
        else:
            alpha = step_size
            bc2 = bc2_sqrt
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
                p = p - alpha * (m / (tl.sqrt(v) / bc2 + eps))
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
    step_t: Optional[Tensor] = None,
) -> None:
    """In place; contiguous ``(S, D)`` tensors, ``rows`` int64 ``(U,)``, ``grad_rows`` ``(U, D)``,
    ``catch_up`` ``(U, 4)`` (any float dtype). ``step_t``: a one-element step count on the device,
    which then replaces ``step_size`` and ``bc2_sqrt``. Checked by the entry, :func:`..sparse_adam_step_`."""
    check_device("sparse_adam_step_", _sparse_adam_row_kernel, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                 rows=rows, grad_rows=grad_rows, catch_up=catch_up, step_t=step_t)
    U, D = rows.numel(), param.shape[1]
    if U == 0 or D == 0:
        return
    vec, block_d, num_warps = launch_config(param, exp_avg, exp_avg_sq)
    g = grad_rows.contiguous() if grad_rows is not None else rows  # a placeholder pointer, never read
    c = catch_up.contiguous() if catch_up is not None else rows
    on_device = step_t is not None and grad_rows is not None
    _sparse_adam_row_kernel[(U,)](
        param, exp_avg, exp_avg_sq, rows.contiguous(), g, c, step_t if on_device else rows,
        D, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, _log2(beta1), _log2(beta2),
        HAS_GRAD=grad_rows is not None, HAS_CATCH_UP=catch_up is not None, MAXIMIZE=maximize,
        HAS_WD=weight_decay != 0, DECOUPLED=decoupled_weight_decay, ALIGNED=D % vec == 0, STEP_ON_DEVICE=on_device,
        VEC=vec, BLOCK_D=block_d, num_warps=num_warps,
    )


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta**step = exp2(step * log2(beta)) = 0 for beta = 0


_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case(name: str, D: int, param=torch.float32, moments=None, grad=True, catch_up=False, maximize=False,
          weight_decay=False, decoupled=False, step_on_device=False, default=False) -> CompileCase:
    """The launch :func:`sparse_adam_step_` makes for ``(S, D)`` tables of these dtypes and these options."""
    moments = moments or param
    t = [torch.empty(1, D, dtype=d, device="meta") for d in (param, moments, moments)]
    vec, block_d, num_warps = launch_config(*t)
    p, m = "*" + _TYPES[param], "*" + _TYPES[moments]
    signature = dict(p_ptr=p, m_ptr=m, v_ptr=m, rows_ptr="*i64", g_ptr=p if grad else "*i64",
                     c_ptr="*fp64" if catch_up else "*i64", step_ptr="*fp32" if step_on_device else "*i64",
                     D="i32", lr="fp32", beta1="fp32", beta2="fp32", eps="fp32", weight_decay="fp32",
                     step_size="fp32", bc2_sqrt="fp32", log2_beta1="fp32", log2_beta2="fp32")
    constexprs = dict(HAS_GRAD=grad, HAS_CATCH_UP=catch_up, MAXIMIZE=maximize, HAS_WD=weight_decay,
                      DECOUPLED=decoupled, ALIGNED=D % vec == 0, STEP_ON_DEVICE=step_on_device and grad, VEC=vec,
                      BLOCK_D=block_d)
    # torch's allocations start on 16-byte boundaries; Triton sees D as a multiple of 16 when it is
    divisible = (0, 1, 2, 3, 4, 5, 6) + ((7,) if D % 16 == 0 else ())
    return CompileCase(name=name, kernel=_sparse_adam_row_kernel, signature=signature, constexprs=constexprs,
                       num_warps=num_warps, divisible=divisible, default=default)


def compile_cases() -> List[CompileCase]:
    """The README layer's tables (``dim=512``; fp32, bf16, bf16 with fp32 moments) under the
    optimizer's default and its options (decoupled weight decay, catch-up with a gradient, the
    catch-up alone), the same with the step count on the device (``capturable=True``), then the
    extremes of the row width: 1, odd 129, 4096 (eight 1,024-column blocks)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return [
        _case("readme fp32", 512, default=True),
        _case("readme bf16", 512, param=bf16, default=True),
        _case("readme bf16, fp32 moments", 512, param=bf16, moments=f32, default=True),
        _case("readme fp32 adamw", 512, weight_decay=True, decoupled=True, default=True),
        _case("readme fp32 catch-up", 512, catch_up=True, weight_decay=True, decoupled=True, default=True),
        _case("readme fp32 catch-up alone", 512, grad=False, catch_up=True, default=True),
        _case("readme fp32 capturable", 512, step_on_device=True, default=True),
        _case("readme bf16 capturable", 512, param=bf16, step_on_device=True, default=True),
        _case("readme bf16, fp32 moments capturable", 512, param=bf16, moments=f32, step_on_device=True,
              default=True),
        _case("readme fp32 adamw capturable", 512, weight_decay=True, decoupled=True, step_on_device=True,
              default=True),
        _case("readme fp32 catch-up capturable", 512, catch_up=True, weight_decay=True, decoupled=True,
              step_on_device=True, default=True),
        _case("dim 1", 1),
        _case("dim 129 fp16 maximize, l2", 129, param=f16, maximize=True, weight_decay=True),
        _case("dim 4096 fp32 catch-up", 4096, catch_up=True, weight_decay=True, decoupled=True),
        _case("dim 4096 bf16", 4096, param=bf16),
        _case("dim 129 fp16 capturable maximize, l2", 129, param=f16, maximize=True, weight_decay=True,
              step_on_device=True),
        _case("dim 4096 bf16 capturable", 4096, param=bf16, step_on_device=True),
    ]
