"""Gradient-norm clipping for models with sparse value gradients or column-sharded value tables.

``torch.nn.utils.clip_grad_norm_`` cannot take the norm of a sparse gradient (what
:func:`~product_key_memory.build_optimizer` gives the value tables), and a
:class:`~product_key_memory.ShardedValues` table's gradient is spread over processes, so
one rank's norm of it is only a part. :func:`clip_grad_norm_` handles both and is
otherwise torch's.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..tables.sharded import ShardedValues
from .optim import merge_repeated_rows

__all__ = ["clip_grad_norm_"]


def _as_dense(grad: Tensor) -> Tensor:
    """The gradient's rows as a dense tensor whose norm is the gradient's.

    A COO gradient may repeat a row (uncoalesced, as the triton backend's one entry per read): its
    norm is that of the summed rows. They are summed as ``SparseRowAdam`` sums them, in ops of fixed size,
    not by ``coalesce()``, whose size depends on the data (a read back from the GPU)."""
    if grad.layout != torch.sparse_coo:
        return grad
    if grad.is_coalesced():
        return grad.values()
    if grad.sparse_dim() != 1:
        return grad.coalesce().values()
    return merge_repeated_rows(grad._indices()[0], grad._values())[2]


def _sharded_tables(module: nn.Module) -> List[Tuple[Tensor, Optional[dist.ProcessGroup]]]:
    seen, tables = set(), []
    for m in module.modules():
        if isinstance(m, ShardedValues) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            tables.append((m.weight, m.group))
    return tables


def _sharded_norms(tables, norm_type: float, dtype: torch.dtype, device: torch.device) -> List[Tensor]:
    """Each sharded table's norm as one process would compute it on the whole table (collective)."""
    by_group: Dict[int, Tuple[Optional[dist.ProcessGroup], List[Tensor]]] = {}
    for weight, group in tables:  # every rank lists the tables in the same (module) order
        by_group.setdefault(id(group), (group, []))[1].append(weight)
    norms = []
    for group, weights in by_group.values():
        local = torch.stack([
            torch.linalg.vector_norm(_as_dense(w.grad).to(dtype), norm_type).to(device)
            if w.grad is not None
            else torch.zeros((), dtype=dtype, device=device)
            for w in weights
        ])
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        else:  # sum of |g| ** p over the column slices
            local = local.pow(norm_type)
            dist.all_reduce(local, group=group)
            local = local.pow(1.0 / norm_type)
        norms.extend(n for n, w in zip(local, weights) if w.grad is not None)
    return norms


@torch.no_grad()
def clip_grad_norm_(
    parameters: Union[nn.Module, Tensor, Iterable[Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    *,
    foreach: Optional[bool] = None,
) -> Tensor:
    r"""``torch.nn.utils.clip_grad_norm_`` that also takes sparse and column-sharded gradients.

    The norm is taken over all gradients together, as if they were one vector, and every
    gradient is scaled by ``min(1, max_norm / (total_norm + 1e-6))`` in place. On dense
    gradients the result (total norm and clipped gradients) is torch's, bit for bit.

    - Sparse (COO) gradients, coalesced or not, count as the dense gradient they stand
      for (repeated rows are summed first); they stay sparse.
    - Pass the **model** (an ``nn.Module``) when it holds
      :class:`~product_key_memory.ShardedValues` tables: each rank holds only its columns of
      such a table's gradient, so that part of the norm is reduced over the table's process
      group, and the norm equals the unsharded model's in one process. Every other gradient
      (the same on every rank after DDP's all-reduce, or a DTensor under ``fully_shard``)
      counts once. The call is then collective: every rank of the tables' groups must make
      it. A plain iterable of tensors is taken as local to this process, sharded or not.

    Args:
        parameters: an ``nn.Module`` (its parameters, with sharded tables found), a tensor,
            or an iterable of tensors whose ``.grad`` are clipped.
        max_norm: largest allowed norm.
        norm_type: as torch (``2.0``, ``1.0``, ``inf``, ...); with sharded tables it must be
            ``> 0`` (``inf`` included).
        error_if_nonfinite: raise ``RuntimeError`` when the total norm is NaN or infinite
            (on every rank alike), instead of scaling by it.
        foreach: as torch, for the dense gradients.

    Returns:
        the total norm of all gradients before clipping (a 0-dim tensor).
    """
    if isinstance(parameters, nn.Module):
        tables = _sharded_tables(parameters)
        params = list(parameters.parameters())
    else:
        tables = []
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        wrong = [type(p).__name__ for p in params if not isinstance(p, Tensor)]
        if wrong:
            raise TypeError(f"parameters must be an nn.Module, a tensor or tensors, got items of type {wrong}")
    max_norm, norm_type = float(max_norm), float(norm_type)
    if tables and not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (or inf) with sharded value tables, got {norm_type}")
    table_ids = {id(w) for w, _ in tables}
    local = [p for p in params if p.grad is not None and id(p) not in table_ids]
    dense = [p for p in local if p.grad.layout != torch.sparse_coo]
    sparse = [p for p in local if p.grad.layout == torch.sparse_coo]
    sharded = [w for w, _ in tables if w.grad is not None]
    if not local and not tables:
        return torch.tensor(0.0)

    grads = [p.grad for p in dense] + [_as_dense(p.grad) for p in sparse]
    total = nn.utils.get_total_norm(grads, norm_type, False, foreach) if grads else None
    if tables:
        if total is not None and hasattr(total, "full_tensor"):  # a DTensor under fully_shard
            total = total.full_tensor()
        ref = total if total is not None else next((w.grad for w in sharded), tables[0][0])
        dtype = torch.promote_types(ref.dtype, torch.float32)  # float64 gradients: a float64 norm
        device = ref.device
        norms = _sharded_norms(tables, norm_type, dtype, device)
        if total is not None:
            norms.insert(0, total.to(dtype))
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms else torch.zeros((), dtype=dtype)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    sparse += [w for w in sharded if w.grad.layout == torch.sparse_coo]
    sharded = [w for w in sharded if w.grad.layout != torch.sparse_coo]
    for group in (dense, sharded):  # two calls: foreach kernels do not mix DTensors and tensors
        if group:
            nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach)
    if sparse:  # torch's coefficient, one tensor at a time (foreach kernels take no sparse tensors)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in sparse:
            p.grad.mul_(coef.to(p.grad.device))
    return total
