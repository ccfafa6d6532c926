"""The ops' buffers (ops/_buffers.py): huge-page CPU buffers and where cached tensors are made."""

import os
import sys

import pytest
import torch

from product_key_memory import ops
from product_key_memory.ops._buffers import empty_hugepage, outside_inference_mode, zeros_hugepage


def test_empty_hugepage_is_an_ordinary_tensor():
    t = ops.empty_hugepage(4096, 1024, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (4096, 1024) and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()
    small = empty_hugepage(3, 5, dtype=torch.bfloat16, device="cpu")  # below the hint's size: torch.empty
    assert small.shape == (3, 5) and small.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "shape, dtype", [((3, 5), torch.float32), ((4096, 1024), torch.float32), ((20480, 1024), torch.bfloat16)]
)
def test_zeros_hugepage_is_zeros(shape, dtype):
    # up to 32 MiB: zeroed in place; over it (on Linux): fresh anonymous pages, zero without a pass over them
    t = zeros_hugepage(*shape, dtype=dtype, device=torch.device("cpu"))
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    t[1].fill_(3.0)  # writable, and only where written
    assert float(t.float().sum()) == 3.0 * shape[1]
    assert ops.zeros_hugepage is zeros_hugepage


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_zeros_hugepage_memory_is_returned_when_freed():
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = rss_mib()
    for _ in range(12):  # 12 x 64 MiB, every page touched: kept mappings would add 768 MiB
        t = zeros_hugepage(16384, 1024, dtype=torch.float32, device=torch.device("cpu"))
        t.fill_(1.0)
        view = t[::2]
        del t, view
    assert rss_mib() - before < 256


def test_cached_tensors_are_made_outside_inference_mode():
    with torch.inference_mode():
        with outside_inference_mode():
            t = torch.ones(3)
        u = torch.ones(3)
    assert not t.is_inference() and u.is_inference()
    x = torch.ones(3, requires_grad=True)
    (x * t).sum().backward()  # usable in training
    with outside_inference_mode():  # outside inference mode already: nothing changes
        assert not torch.ones(1).is_inference()
