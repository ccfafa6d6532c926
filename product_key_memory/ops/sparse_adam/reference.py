r"""The row-sparse Adam update, the specification: plain torch, every row on its own, in float64.

For each ``i`` with ``rows[i] >= 0`` (negative entries are padding and change nothing), on
``p = param[rows[i]]``, ``m = exp_avg[rows[i]]``, ``v = exp_avg_sq[rows[i]]``:

1. catch-up (``catch_up`` given, a ``(U, 4)`` float64 tensor of ``(d, b1, b2, s)`` per row;
   :class:`~product_key_memory.SparseRowAdam` computes them, see its ``catch_up`` docs)::

       u = m / sqrt(v)  (0 where v == 0);  p = d * p - s * u;  m = b1 * m;  v = b2 * v

2. Adam step (``grad_rows`` given, ``g = grad_rows[i]``; ``torch.optim.Adam``'s single-tensor step)::

       g = -g if maximize
       p = p * (1 - lr * weight_decay)          if decoupled_weight_decay
       g = g + weight_decay * p                  otherwise (L2)
       m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
       w = max(max_exp_avg_sq, v) (stored)       if amsgrad (``max_exp_avg_sq`` given), else w = v
       p = p - step_size * m / (sqrt(w) / bc2_sqrt + eps)

``step_size = lr / (1 - beta1**step)`` and ``bc2_sqrt = sqrt(1 - beta2**step)``. Rows must be
unique. Results are stored back in each tensor's own dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["sparse_adam_step_reference_"]


def sparse_adam_step_reference_(
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
    step_size: float,
    bc2_sqrt: float,
) -> None:
    """In place, the update the module docstring states, one row at a time in float64."""
    for i, row in enumerate(rows.tolist()):
        if row < 0:
            continue
        p, m, v = param[row].double(), exp_avg[row].double(), exp_avg_sq[row].double()
        if catch_up is not None:
            d, b1, b2, s = catch_up[i].double().tolist()
            u = torch.where(v > 0, m / v.sqrt(), torch.zeros_like(m))
            p, m, v = d * p - s * u, b1 * m, b2 * v
        if grad_rows is not None:
            g = grad_rows[i].double()
            if maximize:
                g = -g
            if weight_decay != 0 and decoupled_weight_decay:
                p = p * (1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g + weight_decay * p
            m = m + (1 - beta1) * (g - m)
            v = beta2 * v + (1 - beta2) * g * g
            w = v
            if max_exp_avg_sq is not None:
                w = torch.maximum(max_exp_avg_sq[row].double(), v)
                max_exp_avg_sq[row] = w.to(max_exp_avg_sq.dtype)
            p = p - step_size * m / (w.sqrt() / bc2_sqrt + eps)
        param[row], exp_avg[row], exp_avg_sq[row] = p.to(param.dtype), m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)
