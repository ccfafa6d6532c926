"""Size rules that pick between equivalent implementations (issue 12, item 3).

Pure functions of sizes: no tensors, no timing at run time, so a compiled or exported
model takes the same route every call. The ops package calls them; the numbers behind
each rule are in its docstring and reproduce with the named benchmark.
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
    """The faster backward of a value read with a dense table gradient.

    ``"sorted"``: :func:`ops.cpu.value_read_backward_sorted`, reads sorted by slot once, the
    touched rows computed apart and copied into the zeroed gradient (also the only route to a
    sparse gradient). ``"embedding_bag"``: :func:`ops.cpu.value_read_backward_bag`, each read
    added straight into the zeroed gradient by the kernel autograd of ``F.embedding_bag`` runs
    (product-key-memory 0.3.0's route). Both take the weights' gradient in slot order.
    ``ops.cpu.value_read_backward`` asks this rule on every dense backward, with
    ``torch.get_num_threads()``.

    Rule: ``"embedding_bag"`` when the table fits in ``8 MiB`` and the rows read in ``16 MiB``
    on one thread, or when rows are at least ``2 KiB`` wide and read ``1`` to ``8`` times each on
    average (the README layer: 131,072 reads of a 65,536 x 512 float32 table); ``"sorted"``
    otherwise. Measured with ``benchmarks/read_backward_routes.py`` (forward + backward,
    ``m = 128`` reads per bag, median of 5, ratio = embedding_bag / sorted time, > 1 means sorted
    wins; an Intel Xeon with AVX-512, 2 cores, torch 2.13.0), 1 thread | 2 threads:

    ========  ====  ==================================================================
    slots     dim   reads 4,096 / 32,768 / 131,072 / 524,288
    ========  ====  ==================================================================
    16,384    128   0.78 / 0.84 / 1.06 / 1.43   |   1.15 / 1.26 / 1.67 / 1.89
    16,384    512   1.57 / 1.18 / 0.98 / 1.16   |   0.81 / 0.89 / 1.03 / 1.30
    65,536    128   1.12 / 0.96 / 0.99 / 1.11   |   1.00 / 1.44 / 1.49 / 1.55
    65,536    512   1.87 / 1.39 / 0.85 / 0.95   |   2.13 / 1.45 / 0.90 / 0.92
    262,144   128   2.12 / 1.99 / 1.36 / 1.03   |   2.00 / 1.94 / 1.67 / 1.13
    262,144   512   2.15 / 1.69 / 1.07 / 0.85   |   1.45 / 1.85 / 1.06 / 0.85
    ========  ====  ==================================================================

    Ratios within about 0.1 of 1 are within the run-to-run spread; the rule follows the
    clear wins. ``dtype`` scales the byte sizes.
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
