"""Value read: ``out[b] = sum_j weights[b, j] * values[indices[b, j]]``, and its backward.

Forward (:func:`value_read`): one program per bag. The bag's ``m`` slots and weights are loaded
once (``BLOCK_M >= m``), then the program walks the row in blocks of ``BLOCK_D`` columns,
accumulating in fp32 and storing in the table's dtype. Bags wider than ``MAX_ONE_PASS_M`` reads
take a variant that reloads them per column block. Row offsets are int64 (``slot * dim`` overflows
int32 on tables over 2**31 elements). A slot outside ``[0, num_slots)`` is masked out of every
load, so it never reads another row or faults; on CPU tensors (the interpreter) the entry raises
the torch backend's error first, which costs no device sync there. On CUDA nothing is read back:
a bad slot adds a zero row (``tl.device_assert`` traps it when Triton's debug mode is on).

Backward (:func:`value_read_backward`, :func:`value_read_backward_rows`): the flat reads are
sorted by slot (``torch.sort``, stable; no host sync) and cut into fixed chunks of ``CHUNK``
sorted reads, one program per chunk, so a hot slot's reads are spread over many programs. In
each column block a program gathers its reads' ``weight * grad_out[bag]`` rows and sums them per
run of equal slots with a segmented scan down the chunk (``tl.associative_scan``, fp32), so the
run's row stays in registers; a run wholly inside the chunk is stored straight to the output by
its last read, with a plain store (each row has one writer: no atomics, deterministic). A run that
crosses a chunk border leaves its piece in a small fp32 buffer (two pieces per chunk), and a
second kernel, one program per piece, sums the consecutive pieces of each border run (``BLOCK_P``
at a time, so a hot slot's hundreds of pieces load in parallel) and stores the total. In the
chunk pass each read's weight gradient ``dot(grad_out[bag], values[slot])`` is stored at the
read's position (all reads, padding and frozen rows included).

The dense gradient is one zero-filled table that only those stores touch. The row-sparse
gradient has a fixed size, one entry per read (so nothing depends on the data's distinct slots):
``rows_idx`` sorted, each run's total at one of its reads (the last for a run inside a chunk, the
first for one that crosses a border), zero rows elsewhere; the entries of an untouched slot point
at the nearest touched slot before them (after them for leading ones), so the distinct indices
are exactly the touched rows (read with a non-zero weight and ``trainable``) and the entries sum
to the gradient. Only when no read at all is
touched do the entries keep their own slots (all zero rows). :class:`~product_key_memory.SparseRowAdam`
merges duplicates without a host sync. Everything is fp32 inside, whatever the input dtypes.

The chunked, slot-sorted backward with a segmented scan and the integer bf16 rounding follow the
design described in re133/sparse-memory-lm, docs/kernels.md (Apache-2.0; there the runs at chunk
borders use atomics, here a second pass, which keeps bf16 outputs singly rounded and the result
independent of scheduling). Specification: :mod:`.reference`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton import CompileCase, check_device

__all__ = ["value_read", "value_read_backward", "value_read_backward_rows", "compile_cases", "ROWS_UNIQUE"]

# value_read_backward_rows repeats rows (one entry per read): the caller's sparse tensor is uncoalesced
ROWS_UNIQUE = False

SparseRows = Tuple[Tensor, Tensor]

MAX_ONE_PASS_M = 512  # reads of a bag held at once by the forward; wider bags reload them per column block
_READ_TILE = 8192  # BLOCK_M * BLOCK_D elements a forward program holds
CHUNK = 32  # sorted reads per backward program
_BACKWARD_BLOCK_D = 32  # with CHUNK = 32 and 4 warps: 128-165 registers on sm_90, no spills (64 spills)
_BACKWARD_WARPS = 4
@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest even. For bfloat16 the rounding is done on the
    bits first: Triton's interpreter truncates fp32 -> bf16, the GPU rounds to nearest even, and
    this makes both give the GPU's result (a no-op change of the value on the GPU)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        up = bits + 0x7FFF + ((bits >> 16) & 1)
        x = tl.where(x != x, x, (up & 0xFFFF0000).to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def _read_kernel(
    values_ptr, idx_ptr, w_ptr, out_ptr,
    m, D, S,
    HAS_W: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if ONE_PASS:  # the bag's slots and weights once, for every column block
        ok = offs_m < m
        slot = tl.load(idx_ptr + bag * m + offs_m, mask=ok, other=0).to(tl.int64)
        in_range = (slot >= 0) & (slot < S)
        tl.device_assert(in_range | ~ok, "value_read: a slot is outside [0, num_slots)")
        ok = ok & in_range
        if HAS_W:
            w = tl.load(w_ptr + bag * m + offs_m, mask=ok, other=0.0).to(tl.float32)
        else:
            w = ok.to(tl.float32)
        base = slot * D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            col_ok = cols < D
            rows = tl.load(values_ptr + base[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                           other=0.0).to(tl.float32)
            acc = tl.sum(rows * w[:, None], axis=0)
            tl.store(out_ptr + bag * D + cols, _cast(acc, out_ptr.dtype.element_ty), mask=col_ok)
    else:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            col_ok = cols < D
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for j0 in range(0, m, BLOCK_M):
                jj = j0 + offs_m
                ok = jj < m
                slot = tl.load(idx_ptr + bag * m + jj, mask=ok, other=0).to(tl.int64)
                in_range = (slot >= 0) & (slot < S)
                tl.device_assert(in_range | ~ok, "value_read: a slot is outside [0, num_slots)")
                ok = ok & in_range
                if HAS_W:
                    w = tl.load(w_ptr + bag * m + jj, mask=ok, other=0.0).to(tl.float32)
                else:
                    w = ok.to(tl.float32)
                rows = tl.load(values_ptr + slot[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                               other=0.0).to(tl.float32)
                acc += tl.sum(rows * w[:, None], axis=0)
            tl.store(out_ptr + bag * D + cols, _cast(acc, out_ptr.dtype.element_ty), mask=col_ok)


def _border_config(D: int) -> dict:
    """Launch constants of :func:`_backward_border_kernel`: tiles of 32 pieces by up to 128 columns
    (no spills on sm_80 or sm_90; 16 pieces spilled 4 bytes for bf16 on sm_80)."""
    return dict(BLOCK_P=32, BLOCK_D=max(16, min(triton.next_power_of_2(D), 128)), num_warps=4)


def _read_config(m: int, D: int) -> dict:
    """Launch constants of :func:`_read_kernel` for bags of ``m`` reads of ``D`` columns."""
    one_pass = m <= MAX_ONE_PASS_M
    block_m = max(2, triton.next_power_of_2(m)) if one_pass else 32
    block_d = max(16, min(triton.next_power_of_2(D), _READ_TILE // block_m, 256))
    num_warps = 8 if block_m * block_d >= 4096 else 4
    return dict(ONE_PASS=one_pass, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)


def _check_slots(indices: Tensor, num_slots: int) -> None:
    """A slot outside the table is an error, never a silent zero row or a read of other memory.

    On CPU tensors (the interpreter) it raises at once, read through NumPy: a CPU tensor has no
    device to wait for. On CUDA the check stays on the device (``torch._assert_async``, as
    ``F.embedding_bag``'s own bounds check): a bad slot fails the launch with this message at the
    next synchronisation, and nothing reads back to the host, so a step stays capturable. The
    kernels also mask bad slots, so no load ever leaves the table.
    """
    if indices.numel() == 0:
        return
    if indices.device.type == "cuda":
        inside = ((indices >= 0) & (indices < num_slots)).all()
        torch._assert_async(inside, f"indices: a slot is outside the table's range [0, {num_slots})")
        return
    if indices.device.type != "cpu":
        return
    flat = indices.detach().reshape(-1).numpy()
    bad = (flat < 0) | (flat >= num_slots)
    if bad.any():
        i = int(bad.argmax())
        raise IndexError(
            f"indices: slot {int(flat[i])} (read {i}) is outside the table's range [0, {num_slots})"
        )


def value_read(values: Tensor, indices: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``values (S, D)``, ``indices (B, m)`` int32/int64, ``weights (B, m)`` or ``None`` -> ``(B, D)``.

    Output in ``values.dtype``, accumulated in fp32 (weights are taken in fp32).
    """
    _check(values, indices, weights)
    check_device("value_read", _read_kernel, values=values, indices=indices, weights=weights)
    _check_slots(indices, values.shape[0])
    B, m = indices.shape
    S, D = values.shape
    out = torch.empty(B, D, dtype=values.dtype, device=values.device)
    if B == 0 or D == 0:
        return out
    if m == 0:
        return out.zero_()
    indices = indices.contiguous()
    w = None if weights is None else weights.contiguous()
    _read_kernel[(B,)](
        values, indices, indices if w is None else w, out,
        m, D, S,
        HAS_W=w is not None, **_read_config(m, D),
    )
    return out


@triton.jit
def _segmented_add(a, a_start, b, b_start):
    """The combine of a segmented sum scan: ``b`` starts a new segment or adds to ``a``'s."""
    return tl.where(b_start, b, a + b), a_start | b_start


@triton.jit
def _backward_chunk_kernel(
    grad_out_ptr, values_ptr, w_ptr, trainable_ptr, slots_ptr, order_ptr,
    out_ptr, gw_ptr, part_ptr, part_slot_ptr, part_pos_ptr,
    N, m, D, S, stride_g,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, NEED_VG: tl.constexpr, NEED_WG: tl.constexpr,
    DENSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    s = c * CHUNK
    e = tl.minimum(s + CHUNK, N)
    pos = s + tl.arange(0, CHUNK)
    ok = pos < N
    slot = tl.load(slots_ptr + pos, mask=ok, other=-1)
    prev = tl.load(slots_ptr + pos - 1, mask=ok & (pos > 0), other=-2)
    in_range = ok & (slot >= 0) & (slot < S)
    read = tl.load(order_ptr + pos, mask=ok, other=0)  # flat read position b * m + j
    bag = read // m
    if HAS_W:
        w = tl.load(w_ptr + read, mask=ok, other=0.0).to(tl.float32)
    else:
        w = ok.to(tl.float32)
    keep = in_range & (w != 0.0)
    if HAS_MASK:
        keep = keep & (tl.load(trainable_ptr + slot, mask=in_range, other=0) != 0)
    coef = tl.where(keep, w, 0.0)
    # the runs cut by this chunk's borders: the first continues from the chunk before, the last into the next
    first_slot = tl.load(slots_ptr + s)
    last_slot = tl.load(slots_ptr + e - 1)
    head = tl.load(slots_ptr + s - 1, mask=s > 0, other=-2) == first_slot
    tail = tl.load(slots_ptr + e, mask=e < N, other=-3) == last_slot
    whole = head & tail & (first_slot == last_slot)  # one run covers the chunk: its piece counts as the head
    zero = tl.zeros((CHUNK,), dtype=tl.int32)  # scalar flags as vectors (the interpreter widens scalar & vector)
    in_head = ok & (slot == first_slot) & ((zero + head.to(tl.int32)) != 0)
    in_tail = ok & (slot == last_slot) & ((zero + (tail & ~whole).to(tl.int32)) != 0)
    nxt = tl.load(slots_ptr + pos + 1, mask=pos + 1 < N, other=-3)
    direct = ok & (slot != nxt) & ~in_head & ~in_tail  # last read of a run that lies inside this chunk
    starts = (slot != prev)[:, None]  # a run starts here: the segmented sum restarts
    offs_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros((CHUNK,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        col_ok = cols < D
        g = tl.load(grad_out_ptr + bag[:, None] * stride_g + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if NEED_WG:
            v = tl.load(values_ptr + slot[:, None] * D + cols[None, :], mask=in_range[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            dot += tl.sum(g * v, axis=1)
        if NEED_VG:
            contrib = g * coef[:, None]
            # running sum of each run's reads, in order: at a run's last read, the run's total
            total, _ = tl.associative_scan((contrib, tl.broadcast_to(starts, (CHUNK, BLOCK_D))), 0, _segmented_add)
            if DENSE:
                tl.store(out_ptr + slot[:, None] * D + cols[None, :], _cast(total, out_ptr.dtype.element_ty),
                         mask=(direct & in_range)[:, None] & col_ok[None, :])
            else:  # one entry per read: the total at a run's last read, zeros elsewhere
                tl.store(out_ptr + pos[:, None] * D + cols[None, :],
                         _cast(tl.where(direct[:, None], total, 0.0), out_ptr.dtype.element_ty),
                         mask=ok[:, None] & col_ok[None, :])
            head_piece = tl.sum(tl.where(in_head[:, None], contrib, 0.0), axis=0)
            tail_piece = tl.sum(tl.where(in_tail[:, None], contrib, 0.0), axis=0)
            tl.store(part_ptr + (2 * c) * D + cols, head_piece, mask=col_ok)
            tl.store(part_ptr + (2 * c + 1) * D + cols, tail_piece, mask=col_ok)
    if NEED_WG:
        tl.store(gw_ptr + read, _cast(dot, gw_ptr.dtype.element_ty), mask=ok)
    if NEED_VG:
        # a whole-chunk run also marks its tail (a zero piece) so the pieces of one run stay consecutive
        tl.store(part_slot_ptr + 2 * c, tl.where(head, first_slot, -1))
        tl.store(part_slot_ptr + 2 * c + 1, tl.where(tail, last_slot, -1))
        tail_start = tl.min(tl.where(ok & (slot == last_slot), pos, N), axis=0)
        tl.store(part_pos_ptr + 2 * c + 1, tail_start)


@triton.jit
def _backward_border_kernel(
    out_ptr, part_ptr, part_slot_ptr, part_pos_ptr, group_end_ptr, P, D, S,
    DENSE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    key = tl.load(part_slot_ptr + p)
    before = tl.load(part_slot_ptr + p - 1, mask=p > 0, other=-1)
    if (key >= 0) & (key != before) & (key < S):  # the first piece of a run that crosses chunk borders
        q = tl.load(group_end_ptr + p)  # one past its last piece
        if DENSE:
            dst = key
        else:
            dst = tl.load(part_pos_ptr + p)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            col_ok = cols < D
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for r0 in range(p, q, BLOCK_P):  # BLOCK_P pieces at a time: a hot slot's many pieces load in parallel
                r = r0 + offs_p
                acc += tl.sum(tl.load(part_ptr + r[:, None] * D + cols[None, :],
                                      mask=(r < q)[:, None] & col_ok[None, :], other=0.0), axis=0)
            tl.store(out_ptr + dst * D + cols, _cast(acc, out_ptr.dtype.element_ty), mask=col_ok)


def _group_ends(part_slot: Tensor) -> Tensor:
    """For each border piece, one past the last piece of its run (equal consecutive keys), by a
    reversed running minimum: fixed sizes, no host sync."""
    P = part_slot.numel()
    at = torch.arange(P, device=part_slot.device)
    starts = torch.ones(P, dtype=torch.bool, device=part_slot.device)
    starts[1:] = part_slot[1:] != part_slot[:-1]
    next_start = torch.where(starts, at, P).flip(0).cummin(0).values.flip(0)  # the next start at or after
    return torch.cat((next_start[1:], next_start.new_full((1,), P)))


def _backward(
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
    ``(rows_idx, rows)`` of one entry per read (see the module docstring), rows in ``values.dtype``.
    """
    _check(values, indices, weights, trainable)
    check_device("value_read_backward", _backward_chunk_kernel, grad_out=grad_out, values=values,
                 indices=indices, weights=weights, trainable=trainable)
    _check_slots(indices, values.shape[0])
    S, D = values.shape
    B, m = indices.shape
    N = B * m
    if grad_out.shape != (B, D):
        raise ValueError(f"grad_out must have shape {(B, D)}, got {tuple(grad_out.shape)}")
    need_wg = need_weights_grad and weights is not None
    device = values.device
    grad_weights = torch.empty(B, m, dtype=weights.dtype, device=device) if need_wg else None
    if not (need_values_grad or need_wg):
        return None, None

    slots, order = indices.reshape(-1).to(torch.int64).sort(stable=True)
    out = None
    if need_values_grad:
        out = torch.zeros(S, D, dtype=values.dtype, device=device) if not sparse else \
            torch.empty(N, D, dtype=values.dtype, device=device)
    if N > 0 and D > 0:
        chunks = triton.cdiv(N, CHUNK)
        parts = torch.empty(2 * chunks, D, dtype=torch.float32, device=device) if need_values_grad else slots
        part_slot = torch.empty(2 * chunks, dtype=torch.int64, device=device) if need_values_grad else slots
        part_pos = torch.zeros(2 * chunks, dtype=torch.int64, device=device) if need_values_grad else slots
        g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        w = None if weights is None else weights.contiguous()
        block_d = max(16, min(triton.next_power_of_2(D), _BACKWARD_BLOCK_D))
        _backward_chunk_kernel[(chunks,)](
            g, values, slots if w is None else w, slots if trainable is None else trainable.view(torch.uint8),
            slots, order,
            slots if out is None else out, slots if grad_weights is None else grad_weights, parts, part_slot, part_pos,
            N, m, D, S, g.stride(0),
            HAS_W=w is not None, HAS_MASK=trainable is not None, NEED_VG=need_values_grad, NEED_WG=need_wg,
            DENSE=not sparse, CHUNK=CHUNK, BLOCK_D=block_d, num_warps=_BACKWARD_WARPS,
        )
        if need_values_grad and chunks > 1:
            _backward_border_kernel[(2 * chunks,)](
                out, parts, part_slot, part_pos, _group_ends(part_slot), 2 * chunks, D, S,
                DENSE=not sparse, **_border_config(D),
            )
    elif need_wg:
        grad_weights.zero_()  # D == 0: every dot product is empty
    if need_values_grad and sparse:
        if D == 0:
            out.zero_()
        return (_sparse_rows_index(slots, order, weights, trainable, S), out), grad_weights
    return out, grad_weights


def _sparse_rows_index(slots: Tensor, order: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
                       S: int) -> Tensor:
    """``rows_idx`` of the fixed-size sparse gradient (module docstring), in torch ops of fixed sizes."""
    N = slots.numel()
    if N == 0:
        return slots
    keep = torch.ones_like(slots, dtype=torch.int32)
    if weights is not None:
        keep = (weights.reshape(-1).index_select(0, order) != 0).to(torch.int32)
    if trainable is not None:
        keep = keep * trainable.index_select(0, slots).to(torch.int32)
    starts = torch.ones_like(slots, dtype=torch.bool)
    starts[1:] = slots[1:] != slots[:-1]
    run = starts.cumsum(0) - 1  # (N,): each read's run, 0 ..
    touched = torch.zeros_like(keep).scatter_reduce_(0, run, keep, "amax").index_select(0, run) != 0
    before = torch.where(touched, slots, -1).cummax(0).values  # the nearest touched slot at or before
    first = torch.where(touched, slots, S).amin()
    rows_idx = torch.where(before >= 0, before, first)
    return torch.where(rows_idx < S, rows_idx, slots)  # nothing touched: every entry its own (zero) row


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


def value_read_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_values_grad: bool, need_weights_grad: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Dense ``(grad_values, grad_weights)``, ``None`` for a gradient not asked for."""
    return _backward(
        grad_out, values, indices, weights, trainable,
        need_values_grad=need_values_grad, need_weights_grad=need_weights_grad, sparse=False,
    )


def value_read_backward_rows(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Optional[Tensor], trainable: Optional[Tensor],
    need_weights_grad: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(rows_idx, rows, grad_weights)``: the value gradient as one entry per read (``rows_idx``
    sorted, repeating; the distinct entries are the touched rows and the entries sum to the
    gradient, see the module docstring), and the weights' gradient."""
    (rows_idx, rows), grad_weights = _backward(
        grad_out, values, indices, weights, trainable,
        need_values_grad=True, need_weights_grad=need_weights_grad, sparse=True,
    )
    return rows_idx, rows, grad_weights


def compile_cases() -> List[CompileCase]:
    """Every kernel variant to build for a GPU (:class:`~product_key_memory.ops._triton.CompileCase`):
    the README layer (512-wide fp32 rows, 4 heads x top-32 = 128 reads a bag), a 1M-row table
    (keys 1024), tiny and odd widths, bf16 tables, the wide-bag forward, and both backward outputs."""
    cases = []
    read_sig = dict(values_ptr="*fp32", idx_ptr="*i64", w_ptr="*fp32", out_ptr="*fp32", m="i32", D="i32", S="i32")
    for name, m, D, dt, idx, default in (
        ("readme", 128, 512, "fp32", "i64", True),
        ("keys1024", 128, 512, "fp32", "i64", True),
        ("readme_bf16", 128, 512, "bf16", "i64", True),
        ("tiny", 4, 8, "fp32", "i32", True),
        ("odd33", 33, 33, "fp32", "i64", True),
        ("odd100_bf16", 7, 100, "bf16", "i32", True),
        ("wide_bag", 2048, 512, "fp32", "i64", True),
    ):
        cfg = _read_config(m, D)
        sig = dict(read_sig, values_ptr=f"*{dt}", out_ptr=f"*{dt}", idx_ptr=f"*{idx}")
        for has_w in (True, False):
            consts = dict(HAS_W=has_w, ONE_PASS=cfg["ONE_PASS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"])
            cases.append(CompileCase(
                name=f"read/{name}/{'weighted' if has_w else 'unweighted'}", kernel=_read_kernel, signature=sig,
                constexprs=consts, num_warps=cfg["num_warps"], divisible=(0, 1, 2, 3) + ((5,) if D % 16 == 0 else ()),
                default=default and (has_w or name == "tiny"),
            ))
    bwd_sig = dict(grad_out_ptr="*fp32", values_ptr="*fp32", w_ptr="*fp32", trainable_ptr="*u8", slots_ptr="*i64",
                   order_ptr="*i64", out_ptr="*fp32", gw_ptr="*fp32", part_ptr="*fp32", part_slot_ptr="*i64",
                   part_pos_ptr="*i64", N="i32", m="i32", D="i32", S="i32", stride_g="i32")
    border_sig = dict(out_ptr="*fp32", part_ptr="*fp32", part_slot_ptr="*i64", part_pos_ptr="*i64",
                      group_end_ptr="*i64", P="i32", D="i32", S="i32")
    for name, D, dt in (("readme", 512, "fp32"), ("readme_bf16", 512, "bf16"), ("tiny", 8, "fp32"),
                        ("odd33", 33, "fp32"), ("odd100_bf16", 100, "bf16")):
        block_d = max(16, min(triton.next_power_of_2(D), _BACKWARD_BLOCK_D))
        sig = dict(bwd_sig, values_ptr=f"*{dt}", out_ptr=f"*{dt}", grad_out_ptr=f"*{dt}", w_ptr="*fp32",
                   gw_ptr="*fp32")
        for dense in (True, False):
            for mask in (False, True):
                consts = dict(HAS_W=True, HAS_MASK=mask, NEED_VG=True, NEED_WG=True, DENSE=dense, CHUNK=CHUNK,
                              BLOCK_D=block_d)
                cases.append(CompileCase(
                    name=f"backward/{name}/{'dense' if dense else 'rows'}{'/masked' if mask else ''}",
                    kernel=_backward_chunk_kernel, signature=sig, constexprs=consts, num_warps=_BACKWARD_WARPS,
                    divisible=tuple(range(11)) + ((13, 15) if D % 16 == 0 else ()), default=not mask,
                ))
            border = _border_config(D)
            cases.append(CompileCase(
                name=f"border/{name}/{'dense' if dense else 'rows'}", kernel=_backward_border_kernel,
                signature=dict(border_sig, out_ptr=f"*{dt}"),
                constexprs=dict(DENSE=dense, BLOCK_P=border["BLOCK_P"], BLOCK_D=border["BLOCK_D"]),
                num_warps=border["num_warps"], divisible=(0, 1, 2, 3, 4) + ((6,) if D % 16 == 0 else ()),
                default=True,
            ))
    cases.append(CompileCase(
        name="backward/readme/weights_only", kernel=_backward_chunk_kernel, signature=bwd_sig,
        constexprs=dict(HAS_W=True, HAS_MASK=False, NEED_VG=False, NEED_WG=True, DENSE=True, CHUNK=CHUNK,
                        BLOCK_D=_BACKWARD_BLOCK_D),
        num_warps=_BACKWARD_WARPS, divisible=tuple(range(11)) + (13, 15), default=False,
    ))
    return cases
