"""Triton kernels run on CPU tensors under the interpreter when there is no CUDA device.

``TRITON_INTERPRET`` must be set before any kernel is defined, so it is set here, before
the test modules import ``product_key_memory.ops.triton.*``. The other tests never
import triton, so the variable changes nothing for them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
