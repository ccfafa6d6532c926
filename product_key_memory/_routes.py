"""Size rules that pick between equivalent implementations (issue 12, item 3).

Pure functions of sizes: no tensors, no timing at run time, so a compiled or exported
model takes the same route every call. The ops package calls them; the numbers behind
each rule are in its docstring and reproduce with the named benchmark.
"""

from __future__ import annotations

import torch

__all__ = ["choose_read_backward", "READ_BACKWARDS"]

READ_BACKWARDS = ("sorted", "embedding_bag")

# a table this small sits in the last-level cache: the slot-sorted walk saves nothing
_SMALL_TABLE_BYTES = 8 << 20
# ... and with this few bytes of rows read, its sort / unique / index_copy cost more than they save
_FEW_READ_BYTES = 16 << 20


def choose_read_backward(num_reads: int, num_slots: int, dim: int, dtype: torch.dtype, threads: int) -> str:
    """The faster backward of a value read with a dense table gradient.

    ``"sorted"``: :func:`ops.cpu.value_read_backward` (the backward of ``ops.value_read`` on the
    ``torch`` backend), reads sorted by slot once, the weight gradient and the touched rows
    computed in slot order (also the only route to a sparse gradient).
    ``"embedding_bag"``: :func:`ops.cpu.value_read_backward_bag`, the kernels autograd of
    ``F.embedding_bag`` runs (product-key-memory 0.3.0's route). ``ops.cpu.value_read_backward``
    asks this rule on every dense backward, with ``torch.get_num_threads()``.

    Rule: ``"embedding_bag"`` when the table fits in ``8 MiB`` and the rows read in
    ``16 MiB``; ``"sorted"`` otherwise. Measured with ``benchmarks/read_backward_routes.py``
    (forward + backward, ``m = 128`` reads per bag, 1 thread, median of 5, ratio =
    embedding_bag / sorted time, > 1 means sorted wins):

    ========  ====  =====================================================
    slots     dim   reads 128 / 4,096 / 32,768 / 131,072 / 524,288
    ========  ====  =====================================================
    16,384    128   0.41 / 0.85 / 0.71 / 1.22 / 1.17   (8 MiB table)
    16,384    512   2.36 / 1.03 / 1.17 / 1.56 / 1.58
    65,536    128   0.97 / 2.22 / 1.56 / 1.86 / 1.77
    65,536    512   2.77 / 3.05 / 1.77 / 1.05 / 1.11
    1M        128   3.07 / 2.25 / 3.05 / 1.06 / 0.80
    1M        512   0.89 / 0.79 (both ~3-10 s: the 2 GiB dense gradient's page faults)
    ========  ====  =====================================================

    The crossover: the sorted route loses on the 8 MiB table up to 32,768 reads
    (16 MiB of rows) and wins from 131,072 reads (64 MiB). At 1M slots the dense
    gradient's allocation dominates both routes (ratios 0.8-1.06 at many reads are
    within that noise), so the rule keeps ``"sorted"`` there. ``threads`` is accepted for
    the rule's signature: the 2-thread runs were taken on an oversubscribed machine
    (load 6 on 2 cores) and did not change the picture reliably, so the rule does not use it
    yet. ``dtype`` scales the byte sizes.
    """
    for name, value in (("num_reads", num_reads), ("num_slots", num_slots), ("dim", dim), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    table_bytes = num_slots * dim * itemsize
    read_bytes = num_reads * dim * itemsize
    if table_bytes <= _SMALL_TABLE_BYTES and read_bytes <= _FEW_READ_BYTES:
        return "embedding_bag"
    return "sorted"
