"""Triton kernels of the product-key memory ops (GPU backend; CPU under ``TRITON_INTERPRET=1``).

One file per op, each holding its kernels, a plain launch wrapper that takes and
returns tensors, and a naive PyTorch version beside it (the specification):

* :mod:`.search`: ``product_key_search(queries, keys, topk) -> (scores, indices)``
* :mod:`.value_read`: ``value_read(values, indices, weights)`` and
  ``value_read_backward(grad_out, values, indices, weights, trainable, *, need_values_grad,
  need_weights_grad, sparse)``

Nothing here imports triton at package import time: ``import product_key_memory`` works
without it. Each submodule imports triton when it is imported, so import them lazily
(``from product_key_memory.ops.triton import search`` inside the function that needs it).

:mod:`.backend` adapts them to the ``triton`` backend of :mod:`product_key_memory.ops`.
:mod:`product_key_memory.ops._triton` checks each launch's tensors: CUDA, or CPU when the kernels
were defined under the interpreter (``TRITON_INTERPRET=1`` before importing :mod:`product_key_memory`);
anything else is a ``RuntimeError`` that says so instead of Triton's "0 active drivers".
The sparse Adam kernel lives in :mod:`product_key_memory.ops.sparse_adam`.
"""

import importlib.util

__all__ = ["is_available"]


def is_available() -> bool:
    """``True`` when triton can be imported (kernels still need a CUDA device or the interpreter)."""
    return importlib.util.find_spec("triton") is not None
