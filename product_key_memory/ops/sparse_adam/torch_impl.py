"""The row-sparse Adam update in torch ops, in blocks of rows (CPU, and CUDA without Triton).

Each block is gathered, updated and copied back (``index_copy_``): on CPU with several threads
``index_add_`` is a slow scatter. The step's formulas and their order are those of
``torch.optim.Adam``'s single-tensor step, so a gradient holding every row gives Adam's numbers
exactly. The catch-up of :mod:`.reference` runs first, in the parameter's precision (float32
for half tables). With the step count on the device, ``step_size`` and ``bc2_sqrt`` are 0-dim
tensors (:func:`device_bias_corrections`), the last update is written as tensor ops, and padding
rows are handled without reading ``rows`` back (:func:`_redirect_padding`), so that the whole update
can be captured in a CUDA graph; with a count on the host, padding is dropped first (a host read).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["sparse_adam_step_", "device_bias_corrections"]


def device_bias_corrections(step: Tensor, lr: float, beta1: float, beta2: float) -> Tuple[Tensor, Tensor]:
    """``(step_size, bc2_sqrt)`` of :mod:`.reference` as 0-dim float64 tensors on ``step``'s device,
    computed there from the count ``step`` (clamped to ``>= 1``): nothing is read back to the host.
    Float64, so that ``1 - beta2**step`` for ``beta2`` near 1 loses no digits to cancellation."""
    t = step.detach().to(torch.float64).clamp(min=1.0)
    return lr / (1 - torch.pow(beta1, t)), (1 - torch.pow(beta2, t)).sqrt()


def sparse_adam_step_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
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
    step_size: Union[float, Tensor],
    bc2_sqrt: Union[float, Tensor],
    chunk_bytes: int,
) -> None:
    count_on_device = isinstance(step_size, Tensor)  # a capturable step: read nothing back, not even padding
    if not count_on_device and rows.numel() and bool((rows < 0).any()):  # padding (a sync on CUDA)
        keep = rows >= 0
        rows = rows[keep]
        grad_rows = None if grad_rows is None else grad_rows[keep]
        catch_up = None if catch_up is None else catch_up[keep]
    if rows.numel() == 0:
        return
    row_bytes = max(1, param[0].numel() * param.element_size())
    chunk = max(1, chunk_bytes // row_bytes)
    half = param.dtype in (torch.float16, torch.bfloat16)
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        g = None if grad_rows is None else grad_rows[start : start + chunk]
        c = None if catch_up is None else catch_up[start : start + chunk]
        keep = None
        if count_on_device:
            r, g, c, keep = _redirect_padding(r, g, c)
        p_r, m_r, v_r = param.index_select(0, r), exp_avg.index_select(0, r), exp_avg_sq.index_select(0, r)
        if catch_up is not None:
            cdt = torch.float32 if half else param.dtype
            d, b1, b2, s = (c[:, k : k + 1].to(cdt) for k in range(4))
            m_c, v_c = m_r.to(cdt), v_r.to(cdt)
            u = torch.where(v_c > 0, m_c / v_c.sqrt(), torch.zeros_like(m_c))
            p_r = (p_r.to(cdt) * d - s * u).to(param.dtype)
            m_r, v_r = (m_c * b1).to(exp_avg.dtype), (v_c * b2).to(exp_avg_sq.dtype)
        if grad_rows is None:
            _put(exp_avg, r, m_r, keep)
            _put(exp_avg_sq, r, v_r, keep)
            _put(param, r, p_r, keep)
            continue
        mixed = p_r.dtype != m_r.dtype  # e.g. a bf16 table with float32 moments: compute in the moments' dtype
        if mixed:
            p_r, g = p_r.to(m_r.dtype), g.to(m_r.dtype)
        if maximize:
            g = -g
        if weight_decay != 0 and decoupled_weight_decay:
            p_r.mul_(1 - lr * weight_decay)
        elif weight_decay != 0:
            g = g.add(p_r, alpha=weight_decay)
        m_r = m_r.lerp_(g, 1 - beta1)
        v_r = v_r.to(m_r.dtype).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        _put(exp_avg, r, m_r, keep)
        _put(exp_avg_sq, r, v_r, keep)
        if max_exp_avg_sq is not None:
            v_r = torch.maximum(max_exp_avg_sq.index_select(0, r), v_r, out=v_r)
            _put(max_exp_avg_sq, r, v_r, keep)
        denom = v_r.sqrt_().div_(bc2_sqrt).add_(eps)
        if isinstance(step_size, Tensor):  # addcdiv_ takes a number only: p - step_size * (m / denom)
            p_r.sub_(torch.div(m_r, denom, out=denom).mul_(step_size))
        else:
            p_r.addcdiv_(m_r, denom, value=-step_size)
        _put(param, r, p_r.to(param.dtype), keep)


def _redirect_padding(r: Tensor, g: Optional[Tensor], c: Optional[Tensor]):
    """A block's padding entries (``r < 0``) without a host read: each takes the row, gradient and
    coefficients of the block's first real entry, so it computes that entry's numbers and writes
    them to that row (duplicate writes of equal values: any order gives the same table). Returns
    ``(r, g, c, keep)``; ``keep`` (a 0-dim bool) is False for a block of padding only, whose
    entries all point at row 0 and must leave it as it is (:func:`_put`)."""
    valid = r >= 0
    first = valid.to(torch.int32).argmax()  # the first real entry; 0 when there is none
    src = torch.where(valid, torch.arange(r.numel(), device=r.device), first)
    pick = (lambda t: None if t is None else t.index_select(0, src))  # noqa: E731
    return pick(r).clamp(min=0), pick(g), pick(c), valid.any()


def _put(table: Tensor, r: Tensor, new: Tensor, keep: Optional[Tensor]) -> None:
    """``table[r] = new``, or (``keep`` False) ``table[r]`` as it is."""
    if keep is not None:
        new = torch.where(keep, new, table.index_select(0, r))
    table.index_copy_(0, r, new)
