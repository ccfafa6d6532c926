"""A whole training step (forward, backward, ``build_optimizer(capturable=True)``'s step) of a PKM
on the triton backend, captured in a CUDA graph and replayed, moves the model as the same steps run
eagerly (by an ordinary optimizer) do: the replays read the current step count, so the bias
correction advances, and nothing in the step waits for the device
(``torch.cuda.set_sync_debug_mode("error")`` around the eager step, the capture and the replays).
Without ``capturable`` the capture is refused. The CPU tests of the same path: test_step_no_sync.py
(no host read) and test_optim_capturable.py (capturable steps equal ordinary ones)."""

import copy

import pytest
from .._extras import importorskip
import torch
from torch.testing import assert_close

importorskip("triton")

from product_key_memory import PKM, build_optimizer, use_backend  # noqa: E402

WARMUP, REPLAYS = 3, 4


def _loss_backward_step(model, opt, x):
    model(x).float().pow(2).mean().backward()
    opt.step()


class _SyncsRaise:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block: any synchronizing call raises."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


def _optimizer(model, amsgrad, **kw):
    opt = build_optimizer(model, **kw)
    for group in opt.param_groups:  # amsgrad's rows take the torch row update (padding kept, no host read)
        group["amsgrad"] = amsgrad
    return opt


@pytest.mark.cuda
@pytest.mark.parametrize("catch_up,amsgrad", [(False, False), (True, False), (False, True)],
                         ids=["lazy", "catch-up", "amsgrad"])
def test_captured_training_step_replays_as_eager_steps(catch_up, amsgrad):
    torch.manual_seed(0)
    start = PKM(64, heads=2, num_keys=16, topk=4, dim_head=16).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(4, 32, 64, device="cuda", generator=gen) for _ in range(WARMUP + 1 + REPLAYS)]
    kw = dict(lr=1e-3, pkm_learning_rate=1e-2, weight_decay=0.01, decoupled_weight_decay=True, catch_up=catch_up)

    eager = copy.deepcopy(start)
    eager_opt = _optimizer(eager, amsgrad, **kw)  # the ordinary optimizer: the count on the host
    with use_backend("triton"):
        for x in xs:
            _loss_backward_step(eager, eager_opt, x)
            eager_opt.zero_grad(set_to_none=True)

    model = copy.deepcopy(start)
    opt = _optimizer(model, amsgrad, capturable=True, **kw)
    static_x = torch.empty_like(xs[0])
    with use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: compile the kernels, make the optimizer state
            for x in xs[:WARMUP]:
                static_x.copy_(x)
                _loss_backward_step(model, opt, static_x)
                opt.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        with _SyncsRaise():  # one eager step on the default stream
            static_x.copy_(xs[WARMUP])
            _loss_backward_step(model, opt, static_x)
        opt.zero_grad(set_to_none=True)  # the captured backward then makes the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # capture records the step; it does not run it
            with _SyncsRaise():
                _loss_backward_step(model, opt, static_x)
        with _SyncsRaise():
            for x in xs[WARMUP + 1:]:
                static_x.copy_(x)
                graph.replay()
    torch.cuda.synchronize()
    if catch_up:  # every row to the last step, on both sides
        opt.catch_up_()
        eager_opt.catch_up_()
    for p in model.parameters():
        assert float(opt.state[p]["step"]) == len(xs), "each replay counted a step"
    # the same kernels and numbers, but atomics in the backward add in varying order
    for (name, got), (_, want) in zip(model.named_parameters(), eager.named_parameters()):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
def test_capturing_a_step_that_is_not_capturable_raises():
    torch.manual_seed(0)
    model = PKM(64, heads=2, num_keys=16, topk=4, dim_head=16).cuda()
    opt = build_optimizer(model)
    x = torch.randn(4, 32, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _loss_backward_step(model, opt, x)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable is False"):
        with torch.cuda.graph(graph):
            _loss_backward_step(model, opt, x)
