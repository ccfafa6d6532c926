"""Triton kernels run on CPU tensors under the interpreter when there is no CUDA device.

``TRITON_INTERPRET`` must be set before any kernel is defined, so it is set here, before the
test modules of tests/ops and its subfolders (one per op) run a kernel: the kernel modules
(``ops/<op>/triton_impl.py``) are imported at their first launch. Tests that never launch a
kernel never import triton, so the variable changes nothing for them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
