"""The ops of the memory layers, one folder each, and the backend switch.

Each op's folder holds ``reference.py`` (the specification, plain PyTorch), ``torch_impl.py`` (fast
PyTorch ops, the default off CUDA), ``triton_impl.py`` where there is a kernel (the default for CUDA
tensors), and an ``__init__.py`` with its ``torch.library.custom_op`` registration (namespace
``pkm``, fake and autograd functions) and the one entry function that routes it:

* :func:`product_key_memory.ops.search.search`: the product-key search (``pkm::search``);
* :func:`product_key_memory.ops.value_read.value_read`: weighted sums of value rows
  (``pkm::value_read`` and its backward ops);
* :func:`product_key_memory.ops.quantized_read.quantized_read`: the read of a quantized table
  (``pkm::quantized_read``);
* :func:`product_key_memory.ops.sparse_adam.sparse_adam_step_`: Adam on the rows of a sparse
  gradient (``pkm::sparse_adam_step_``);
* :func:`product_key_memory.ops.topk.topk_lower_index`: the tie-ruled top-k they share.
* :func:`product_key_memory.ops.tucker_search.tucker_search`: UltraMem's Tucker-decomposed search (plain
  autograd through torch ops; no custom op and no kernel yet).

Backends (:mod:`.backend`): chosen by device, forced with :func:`use_backend`. Every backend
selects the same slots: on equal scores the lower index wins.
"""

from __future__ import annotations

from ._buffers import empty_hugepage, zeros_hugepage
from .backend import BACKENDS, backend_for, triton_available, use_backend
from .topk import topk_lower_index

__all__ = [
    "BACKENDS",
    "use_backend",
    "backend_for",
    "triton_available",
    "topk_lower_index",
    "empty_hugepage",
    "zeros_hugepage",
]
