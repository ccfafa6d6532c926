"""SparseRowAdam's value-table steps through the Triton kernel equal those through torch ops
(CPU tensors under TRITON_INTERPRET=1; CUDA when present), lazy and with catch-up."""

import copy

import pytest
import torch
from torch.testing import assert_close

from ..._extras import importorskip
importorskip("triton")

from product_key_memory import PKM, build_optimizer, use_backend  # noqa: E402
from product_key_memory.ops.sparse_adam import triton_impl as kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("catch_up", [False, True])
def test_triton_steps_equal_torch_steps(catch_up, monkeypatch):
    calls = []
    launch = kernel.sparse_adam_step_
    monkeypatch.setattr(kernel, "sparse_adam_step_", lambda *a, **k: calls.append(a) or launch(*a, **k))
    torch.manual_seed(0)
    start = PKM(dim=16, heads=2, num_keys=8, topk=4, dim_head=8).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 16, generator=gen).to(DEVICE) for _ in range(5)]
    results = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(start)
        # eps 1e-3 as in test_triton_layer: fp32 rounding must not flip a tiny key gradient's sign
        opt = build_optimizer(model, pkm_learning_rate=1e-2, eps=1e-3, weight_decay=0.01,
                              decoupled_weight_decay=True, catch_up=catch_up)
        with use_backend(backend):
            for x in batches:
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
            opt.catch_up_() if catch_up else None
        results[backend] = model.values.weight.detach().clone()
    assert calls, "the triton backend stepped the table in the kernel"
    if catch_up:
        assert any(a[5] is not None for a in calls), "catch-up coefficients reached the kernel"
    assert_close(results["triton"], results["torch"], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_catch_up_read_and_catch_up_all_without_host_sync():
    """On CUDA the pre-hook's catch-up (sort, masked repeats, the kernel) and catch_up_() never wait
    for the device: torch.cuda's sync debug mode 'error' fails any synchronizing call."""
    torch.manual_seed(0)
    model = PKM(dim=64, heads=4, num_keys=64, topk=8, dim_head=32).cuda()
    opt = build_optimizer(model, pkm_learning_rate=1e-2, catch_up=True)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 64, device="cuda")).square().mean().backward()
        opt.step()
    indices = torch.randint(0, 64 * 64, (256, 32), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.catch_up_read_(model.values.weight, indices)
        opt.catch_up_()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    state = opt.state[model.values.weight]
    assert bool((state["catch_up_row_step"] == state["catch_up_clock"]).all())
