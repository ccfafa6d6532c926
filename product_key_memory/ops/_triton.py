"""Where a kernel can run: CUDA tensors, or CPU tensors when the kernels were defined under
Triton's interpreter (``TRITON_INTERPRET=1`` when the kernel module was imported).

Without this check a CPU tensor reaches Triton's launcher, which fails with its raw
``RuntimeError: 0 active drivers``; this says what to do instead.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

__all__ = ["interpreted", "check_device"]


def interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs under the interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a triton without the interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


def check_device(op: str, kernel, **tensors: Optional[Tensor]) -> None:
    """Raise a ``RuntimeError`` naming ``op`` and the first tensor ``kernel`` cannot run on."""
    for name, t in tensors.items():
        if t is None or t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreted(kernel):
            continue
        if t.device.type == "cpu":
            raise RuntimeError(
                f"the triton backend's {op} got {name} on cpu, but its kernels were not defined under Triton's "
                "interpreter, so they run only on CUDA tensors: set TRITON_INTERPRET=1 before importing "
                "product_key_memory to run them on CPU, or use CUDA tensors, or use_backend('torch')"
            )
        raise RuntimeError(
            f"the triton backend's {op} got {name} on {t.device}; its kernels run on CUDA tensors (or on CPU "
            "under TRITON_INTERPRET=1): use CUDA tensors, or use_backend('torch')"
        )
