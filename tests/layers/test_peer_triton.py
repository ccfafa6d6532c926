"""A whole ``PEER`` layer under ``use_backend("triton")`` and ``"reference"`` against the ``torch`` backend.

Forward output, every parameter gradient (sparse expert gradients from ``build_optimizer``) and one
``SparseRowAdam`` step. Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` at
small sizes, as tests/layers/test_pkm_triton.py does; the ``cuda`` case repeats it at a real size.
"""

import copy
import os

import pytest
import torch
from torch.testing import assert_close

if not torch.cuda.is_available():
    # before any kernel is defined (the kernel modules are imported at their first launch)
    os.environ["TRITON_INTERPRET"] = "1"

from product_key_memory import PEER, build_optimizer, use_backend  # noqa: E402

from .._extras import importorskip

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SIZES = [
    pytest.param(dict(dim=32, heads=2, num_experts=16 * 16, num_experts_per_head=4), (2, 5), id="small"),
    pytest.param(dict(dim=256, heads=8, num_experts=512 * 512, num_experts_per_head=16), (2, 16), id="bench",
                 marks=pytest.mark.cuda),
]


def _step(layer, x, backend):
    opt = build_optimizer(layer, lr=1e-3, pkm_learning_rate=1e-2)
    with use_backend(backend):
        out = layer(x)
        out.square().mean().backward()
        grads = {n: p.grad.to_dense().clone() for n, p in layer.named_parameters()}
        opt.step()
    return out.detach(), grads, {n: p.detach().clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("sizes, shape", SIZES)
def test_backend_matches_torch(backend, sizes, shape):
    if backend == "triton":
        importorskip("triton")
    torch.manual_seed(0)
    layer = PEER(non_competing_scores=False, device=DEVICE, **sizes)
    x = torch.randn(*shape, sizes["dim"], device=DEVICE)
    want = _step(copy.deepcopy(layer), x, "torch")
    got = _step(layer, x, backend)
    assert_close(got[0], want[0], atol=1e-4, rtol=1e-4, msg=f"{backend}: output")
    for what, g, w in (("gradient", got[1], want[1]), ("after one step", got[2], want[2])):
        for name in w:
            assert_close(g[name], w[name], atol=1e-4, rtol=1e-4, msg=f"{backend}: {what} of {name}")
