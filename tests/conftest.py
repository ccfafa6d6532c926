"""Triton kernels run on CPU tensors under the interpreter when there is no CUDA device.

``TRITON_INTERPRET`` must be set before Triton first reads its settings (``import torch._dynamo``
and ``torch.compile`` import Triton), so it is set here, before any test module is imported.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # compiled code objects are shared by every test of the process: without a reset, a test's
    # compiles count toward the recompile limit of the tests before it (fullgraph then raises)
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
