"""Value read: ``out[b] = sum_j weights[b, j] * values[indices[b, j]]``, and its backward.

Forward: one program per ``(bag, BLOCK_D columns)``, reads in blocks of ``BLOCK_M``,
fp32 accumulation, output in the table's dtype. Row offsets are int64
(``slot * dim`` overflows int32 on tables over 2**31 elements).

Backward: the flat reads are sorted by slot once on the host (``torch.sort``, stable),
cut into runs of equal slots (``unique_consecutive``), and one program owns one run:
it walks the run's reads ``BLOCK_R`` at a time and

* adds ``weight * grad_out[bag]`` of every kept read (non-zero weight, trainable row)
  into the run's value-gradient row, which only this program writes: no atomics, and
  the result does not depend on scheduling;
* in the same pass takes each read's weight gradient ``dot(grad_out[bag], values[slot])``
  (all reads, padding and frozen rows included) and stores it at the read's position.

The table row is fetched once per run block, so a hot slot read by many bags is read
from memory once, and the table is walked front to back. Everything is fp32 inside
whatever the input dtypes (bf16 included: torch's
``_embedding_bag_per_sample_weights_backward`` has no bf16 CUDA kernel).

References: :func:`value_read_reference`, :func:`value_read_backward_reference`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton import check_device

__all__ = ["value_read", "value_read_backward", "value_read_reference", "value_read_backward_reference"]

SparseRows = Tuple[Tensor, Tensor]


@triton.jit
def _read_kernel(
    values_ptr, idx_ptr, w_ptr, out_ptr,
    m, D,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, m, BLOCK_M):
        jj = j0 + offs_m
        ok = jj < m
        slot = tl.load(idx_ptr + bag * m + jj, mask=ok, other=0).to(tl.int64)
        rows = tl.load(
            values_ptr + slot[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0
        ).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + bag * m + jj, mask=ok, other=0.0).to(tl.float32)
            rows = rows * w[:, None]
        acc += tl.sum(rows, axis=0)
    tl.store(out_ptr + bag * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def value_read(values: Tensor, indices: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``values (S, D)``, ``indices (B, m)`` int32/int64, ``weights (B, m)`` or ``None`` -> ``(B, D)``.

    Output in ``values.dtype``, accumulated in fp32 (weights are taken in fp32).
    """
    _check(values, indices, weights)
    check_device("value_read", _read_kernel, values=values, indices=indices, weights=weights)
    B, m = indices.shape
    D = values.shape[1]
    out = torch.empty(B, D, dtype=values.dtype, device=values.device)
    if B == 0 or D == 0:
        return out
    if m == 0:
        return out.zero_()
    indices = indices.contiguous()
    w = None if weights is None else weights.contiguous()
    block_d = min(triton.next_power_of_2(D), 128)
    _read_kernel[(B, triton.cdiv(D, block_d))](
        values, indices, indices if w is None else w, out,
        m, D,
        HAS_W=w is not None, BLOCK_M=min(triton.next_power_of_2(m), 32), BLOCK_D=block_d,
    )
    return out


@triton.jit
def _read_backward_kernel(
    grad_out_ptr, values_ptr, w_ptr, trainable_ptr,
    slots_ptr, order_ptr, starts_ptr, counts_ptr,
    rows_ptr, has_ptr, gw_ptr,
    m, D, stride_g,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, NEED_VG: tl.constexpr, NEED_WG: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    run = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + run)
    count = tl.load(counts_ptr + run)
    slot = tl.load(slots_ptr + start)  # every read of the run has this slot
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    if HAS_MASK:
        trainable = tl.load(trainable_ptr + slot) != 0
    else:
        trainable = True
    any_kept = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for r0 in range(0, count, BLOCK_R):
        rr = r0 + offs_r
        ok = rr < count
        pos = tl.load(order_ptr + start + rr, mask=ok, other=0)  # flat read position b * m + j
        bag = pos // m
        if HAS_W:
            w = tl.load(w_ptr + pos, mask=ok, other=0.0).to(tl.float32)
            keep = ok & (w != 0.0) & trainable
        else:
            w = tl.full((BLOCK_R,), 1.0, tl.float32)
            keep = ok & trainable
        any_kept = tl.maximum(any_kept, keep.to(tl.int32))
        dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            col_ok = cols < D
            g = tl.load(
                grad_out_ptr + bag[:, None] * stride_g + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0
            ).to(tl.float32)
            if NEED_WG:
                v = tl.load(values_ptr + slot * D + cols, mask=col_ok, other=0.0).to(tl.float32)
                dot += tl.sum(g * v[None, :], axis=1)
            if NEED_VG:
                contrib = tl.sum(g * tl.where(keep, w, 0.0)[:, None], axis=0)
                row = rows_ptr + run * D + cols
                tl.store(row, tl.load(row, mask=col_ok, other=0.0) + contrib, mask=col_ok)
        if NEED_WG:
            tl.store(gw_ptr + pos, dot.to(gw_ptr.dtype.element_ty), mask=ok)
    if NEED_VG:
        tl.store(has_ptr + run, tl.max(any_kept, axis=0).to(tl.int8))


def value_read_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    weights: Optional[Tensor],
    trainable: Optional[Tensor],
    *,
    need_values_grad: bool,
    need_weights_grad: bool,
    sparse: bool,
) -> Tuple[Union[Tensor, SparseRows, None], Optional[Tensor]]:
    """Gradients of :func:`value_read`: ``(grad_values, grad_weights)``.

    ``grad_weights`` ``(B, m)`` in ``weights.dtype`` (``None`` without weights or when not
    needed). ``grad_values``: dense ``(S, D)`` in ``values.dtype``, or with ``sparse`` a pair
    ``(rows_idx, rows)``: the sorted unique int64 rows read with a non-zero weight that are
    ``trainable``, and their gradient rows ``(U, D)`` in ``values.dtype``.
    """
    _check(values, indices, weights, trainable)
    check_device("value_read_backward", _read_backward_kernel, grad_out=grad_out, values=values, indices=indices,
                 weights=weights, trainable=trainable)
    S, D = values.shape
    B, m = indices.shape
    if grad_out.shape != (B, D):
        raise ValueError(f"grad_out must have shape {(B, D)}, got {tuple(grad_out.shape)}")
    need_wg = need_weights_grad and weights is not None
    device = values.device
    grad_weights = torch.empty(B, m, dtype=weights.dtype, device=device) if need_wg else None
    if not (need_values_grad or need_wg):
        return None, None

    slots, order = indices.reshape(-1).to(torch.int64).sort(stable=True)
    uniq, counts = torch.unique_consecutive(slots, return_counts=True)
    U = uniq.numel()
    rows = torch.zeros(U, D, dtype=torch.float32, device=device) if need_values_grad else None
    has = torch.zeros(U, dtype=torch.int8, device=device) if need_values_grad else None
    if U > 0 and D > 0:
        starts = counts.cumsum(0) - counts
        g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        w = None if weights is None else weights.contiguous()
        dummy = slots
        block_d = min(triton.next_power_of_2(D), 128)
        _read_backward_kernel[(U,)](
            g, values, dummy if w is None else w, dummy if trainable is None else trainable.view(torch.uint8),
            slots, order, starts, counts,
            dummy if rows is None else rows, dummy if has is None else has,
            dummy if grad_weights is None else grad_weights,
            m, D, g.stride(0),
            HAS_W=w is not None, HAS_MASK=trainable is not None, NEED_VG=need_values_grad, NEED_WG=need_wg,
            BLOCK_R=16, BLOCK_D=block_d,
        )
    elif need_wg:
        grad_weights.zero_()  # D == 0: every dot product is empty

    grad_values = None
    if need_values_grad:
        if sparse:
            kept = has.bool()
            grad_values = (uniq[kept], rows[kept].to(values.dtype))
        else:
            grad_values = torch.zeros(S, D, dtype=values.dtype, device=device)
            grad_values.index_copy_(0, uniq, rows.to(values.dtype))  # rows with nothing kept are zero
    return grad_values, grad_weights


def _check(values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor] = None) -> None:
    if values.dim() != 2 or not values.is_contiguous():
        raise ValueError(f"values must be a contiguous (num_slots, dim) table, got shape {tuple(values.shape)}")
    if indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be (bags, m) int32 or int64, got {indices.dtype} {tuple(indices.shape)}")
    if weights is not None and (weights.shape != indices.shape or not weights.is_floating_point()):
        raise ValueError(f"weights must be a float tensor of shape {tuple(indices.shape)}, got "
                         f"{weights.dtype} {tuple(weights.shape)}")
    if trainable is not None and (trainable.dtype != torch.bool or trainable.shape != values.shape[:1]):
        raise ValueError(f"trainable must be bool of shape ({values.shape[0]},), got "
                         f"{trainable.dtype} {tuple(trainable.shape)}")


# -- references: the specification, in plain PyTorch -------------------------------------------


def value_read_reference(values: Tensor, indices: Tensor, weights: Optional[Tensor]) -> Tensor:
    rows = values.float()[indices.long()]  # (B, m, D)
    if weights is not None:
        rows = rows * weights.float().unsqueeze(-1)
    return rows.sum(1).to(values.dtype)


def value_read_backward_reference(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    weights: Optional[Tensor],
    trainable: Optional[Tensor],
    *,
    need_values_grad: bool,
    need_weights_grad: bool,
    sparse: bool,
):
    idx = indices.long()
    g = grad_out.float()
    grad_weights = None
    if need_weights_grad and weights is not None:
        grad_weights = torch.einsum("bd,bmd->bm", g, values.float()[idx]).to(weights.dtype)
    if not need_values_grad:
        return None, grad_weights
    w = torch.ones(idx.shape, device=values.device) if weights is None else weights.float()
    keep = w != 0
    if trainable is not None:
        keep = keep & trainable[idx]
    dense = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    dense.index_add_(0, idx[keep], (w.unsqueeze(-1) * g.unsqueeze(1))[keep])
    if not sparse:
        return dense.to(values.dtype), grad_weights
    rows_idx = idx[keep].unique()
    return (rows_idx, dense[rows_idx].to(values.dtype)), grad_weights
