"""The one switch that picks a backend for the ops: by device, or forced with :func:`use_backend`.

Backends: ``reference`` (each op's ``reference.py``, plain PyTorch, the specification),
``torch`` (each op's ``torch_impl.py``, the default off CUDA) and ``triton`` (each op's
``triton_impl.py``, the default for CUDA tensors when Triton imports). Each op's entry function
asks :func:`backend_for` outside traced code only (inside a custom op's implementation, or
in eager mode), so compiled graphs never read the switch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from typing import Iterator, Optional

import torch

__all__ = ["BACKENDS", "use_backend", "backend_for", "triton_available", "functorch_active"]

BACKENDS = ("reference", "torch", "triton")

# set only by use_backend, which restores it; a ContextVar is per thread and per task
_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("product_key_memory_backend", default=None)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is running.

    The entries then take their ``reference.py`` in plain ops, which the transforms differentiate
    and batch: a custom op's autograd (``register_autograd``) raises under them, and the fast
    implementations use ``out=`` calls and read values back (``.item()``), which ``vmap`` cannot batch.
    """
    # what torch.autograd.Function asks before it refuses a transform (PyTorch has no public spelling)
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (it ships with PyTorch's CUDA wheels)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Within this block, every op runs on backend ``name`` (``None``: chosen by device again).

    ``"reference"`` debugs a suspected fast-path problem; ``"triton"`` on CPU tensors runs
    the kernels under Triton's interpreter (set ``TRITON_INTERPRET=1`` before importing
    :mod:`product_key_memory`), so the kernels can be checked without a GPU.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("the triton backend needs Triton: pip install triton (it ships with CUDA builds of torch)")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def backend_for(device: torch.device) -> str:
    """The backend an op runs on for tensors on ``device``: the forced one, else ``triton``
    for CUDA when Triton imports, else ``torch``."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    return "triton" if device.type == "cuda" and triton_available() else "torch"
