"""Where a kernel can run: CUDA tensors, or CPU tensors when the kernels were defined under
Triton's interpreter (``TRITON_INTERPRET=1`` when the kernel module was imported).

Without this check a CPU tensor reaches Triton's launcher, which fails with its raw
``RuntimeError: 0 active drivers``; this says what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from torch import Tensor

__all__ = ["interpreted", "check_device", "CompileCase"]


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


@dataclass(frozen=True)
class CompileCase:
    """One kernel variant to build ahead of time for a GPU target, without a GPU.

    Each ``ops/<op>/triton_impl.py`` lists its variants in a ``compile_cases()`` function (the
    configurations a launch would use at the README layer, the test sizes and the extremes);
    ``tests/ops/test_triton_compile.py`` builds every case for sm_90 and sm_80 and reports
    registers and spills. ``default`` marks a configuration the library launches by default, which
    must not spill.
    """

    name: str
    kernel: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    # positions (in ``signature`` order) of arguments a launch sees as multiples of 16
    divisible: Tuple[int, ...] = ()
    default: bool = True
