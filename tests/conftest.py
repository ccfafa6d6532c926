"""Triton kernels run on CPU tensors under the interpreter when there is no CUDA device.

``TRITON_INTERPRET`` must be set before Triton first reads its settings (``import torch._dynamo``
and ``torch.compile`` import Triton), so it is set here, before any test module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
