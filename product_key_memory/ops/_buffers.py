"""Buffers the ops allocate: large fresh CPU buffers and cached constant tensors.

* :func:`empty_hugepage` / :func:`zeros_hugepage`: a value gradient or an optimizer state is
  tens of MiB to GiB of fresh memory; these ask Linux for transparent huge pages and skip a
  pass of zeros where the kernel already gives zeroed pages.
* :func:`outside_inference_mode`: where a cached tensor is made.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch
from torch import Tensor

__all__ = ["empty_hugepage", "zeros_hugepage", "outside_inference_mode"]


def outside_inference_mode():
    """Where a cached tensor is made: outside inference mode, even when the first call is inside it.

    An inference tensor cannot be saved for backward, so a cache filled by a first call under
    ``torch.inference_mode()`` would fail every later training step that uses it.
    """
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()

_HUGE_PAGE = 2 << 20
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # glibc on 64-bit: larger allocations are always fresh mappings
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty_hugepage(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` that asks Linux to back a large CPU buffer with transparent huge pages.

    ``shape`` on ``device``, uninitialised. A value gradient or an optimizer state is tens of MiB
    to GiB of freshly mapped memory; on Linux a CPU buffer of at least 8 MiB is ``madvise``d to
    2 MiB pages, which fault in faster than 4 KiB ones and make later random row accesses miss the
    TLB less (what ``THP_MEM_ALLOC_ENABLE=1`` does for every torch allocation, here only for these
    buffers). A hint only: elsewhere, or if the kernel declines, this is ``torch.empty``.
    """
    t = torch.empty(*shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if t.device.type == "cpu" and nbytes >= 4 * _HUGE_PAGE else None
    if madvise is not None:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        madvise(start, end - start, _MADV_HUGEPAGE)  # failure leaves ordinary pages: nothing to handle
    return t


def zeros_hugepage(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros(*shape, dtype=dtype, device=device)`` for a large CPU gradient, without a pass
    that writes the zeros.

    On Linux a buffer over 32 MiB is fresh anonymous memory (``mmap``), which the kernel hands out
    zeroed page by page as it is first touched, hinted to huge pages: ``zeros`` would fault the pages
    in (the kernel zeroes each) and then write every byte again. glibc maps every allocation over
    32 MiB afresh anyway, so the faults are paid either way and the second pass is saved. Smaller
    buffers may come back from memory glibc already holds, where zeroing in place beats faulting
    fresh pages, so they are ``empty_hugepage(...).zero_()`` (both measured in benchmarks/README.md).
    The memory is returned to the system when the tensor is freed. Off Linux, or off the CPU,
    ``torch.zeros``.
    """
    device = torch.device(device)
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return torch.zeros(*shape, dtype=dtype, device=device)
    if nbytes <= _GLIBC_MMAP_THRESHOLD_MAX:
        return empty_hugepage(*shape, dtype=dtype, device=device).zero_()
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return torch.zeros(*shape, dtype=dtype, device=device)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # a hint only
        pass
    # the tensor holds the mapping: it is unmapped when the tensor (and every view of it) is freed
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(*shape)

