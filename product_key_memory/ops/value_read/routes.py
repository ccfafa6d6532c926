"""The size rule that picks between the torch backend's two dense read backwards.

A pure function of sizes: no tensors, no timing at run time, so a compiled or exported model
takes the same route every call. :func:`.torch_impl.value_read_backward` asks it on every dense
backward; the measurements behind each threshold are in benchmarks/README.md ("The dense read
backward"), produced by ``python benchmarks/read_backward_routes.py``.
"""

from __future__ import annotations

import torch

__all__ = ["choose_read_backward", "READ_BACKWARDS"]

READ_BACKWARDS = ("sorted", "embedding_bag")

# a table this small sits in the last-level cache: the slot-sorted walk saves nothing (on one thread)
_SMALL_TABLE_BYTES = 8 << 20
# ... and with this few bytes of rows read, its sort / unique / index_copy cost more than they save
_FEW_READ_BYTES = 16 << 20
# rows this wide, read 1 to 8 times each on average: adding each read straight into the zeroed
# gradient beats building the touched rows apart and copying them in
_WIDE_ROW_BYTES = 2 << 10
_READS_PER_SLOT = (1, 8)


def choose_read_backward(num_reads: int, num_slots: int, dim: int, dtype: torch.dtype, threads: int) -> str:
    """``"sorted"`` or ``"embedding_bag"``: the faster dense backward of ``num_reads`` reads of a
    ``(num_slots, dim)`` table of ``dtype`` on ``threads`` threads.

    ``"sorted"``: :func:`.torch_impl.value_read_backward_sorted`, the reads sorted by slot once, the
    touched rows computed apart and copied into the zeroed gradient (also the only route to a
    sparse gradient). ``"embedding_bag"``: :func:`.torch_impl.value_read_backward_bag`, each read
    added straight into the zeroed gradient by the kernel autograd of ``F.embedding_bag`` runs
    (product-key-memory 0.3.0's route). Both take the weights' gradient in slot order.

    Rule: ``"embedding_bag"`` when the table fits in ``8 MiB`` and the rows read in ``16 MiB``
    on one thread, or when rows are at least ``2 KiB`` wide and read ``1`` to ``8`` times each on
    average (the README layer: 131,072 reads of a 65,536 x 512 float32 table); ``"sorted"``
    otherwise. ``dtype`` scales the byte sizes. Measured in benchmarks/README.md.

    Raises:
        ValueError: a size or ``threads`` that is not a positive int.
        TypeError: ``dtype`` not a ``torch.dtype``.
    """
    for name, value in (("num_reads", num_reads), ("num_slots", num_slots), ("dim", dim), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    itemsize = dtype.itemsize
    table_bytes = num_slots * dim * itemsize
    read_bytes = num_reads * dim * itemsize
    if threads == 1 and table_bytes <= _SMALL_TABLE_BYTES and read_bytes <= _FEW_READ_BYTES:
        return "embedding_bag"
    low, high = _READS_PER_SLOT
    if dim * itemsize >= _WIDE_ROW_BYTES and low * num_slots <= num_reads <= high * num_slots:
        return "embedding_bag"
    return "sorted"
