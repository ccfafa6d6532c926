"""A whole training step (forward, backward, ``build_optimizer``'s step) of a PKM on the triton
backend reads nothing back from the device: no op whose result size or value the host must wait
for.

On CPU the Triton kernels run under the interpreter, and a ``TorchDispatchMode`` records every op
that would force a device-to-host read on a GPU (``nonzero``, ``.item()``, ``unique``, boolean-mask
indexing, ...). The optimizer takes its GPU branch (``_host_reads_free`` patched to ``False``): on
the CPU it may take cheaper data-dependent branches, which cost nothing there. With
``capturable=True`` not even the step counts are read (they live on the device). The ``cuda`` tests
run the same step under ``torch.cuda.set_sync_debug_mode("error")`` and inside a CUDA graph
(tests/training/test_step_capture.py replays it against eager steps).
"""

import pytest
from .._extras import importorskip
import torch
from torch.utils._python_dispatch import TorchDispatchMode

importorskip("triton")

from product_key_memory import PKM, build_optimizer, use_backend  # noqa: E402
from product_key_memory.training import optim as optim_module  # noqa: E402

aten = torch.ops.aten

# ops whose output size depends on the data, or that hand a tensor's value to Python
SYNCING = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
    aten._coalesce.default,
    aten.allclose.default,
}


class SyncRecorder(TorchDispatchMode):
    """Records the ops of :data:`SYNCING` run inside it, and indexing by a boolean mask.

    ``allowed``: tensors whose ``.item()`` is fine (the optimizer's step counters, which live on
    the CPU on every device, as in ``torch.optim.Adam`` without ``capturable``)."""

    def __init__(self, allowed=()):
        super().__init__()
        self.allowed = {id(t) for t in allowed}
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING and not (func is aten._local_scalar_dense.default and id(args[0]) in self.allowed):
            self.seen.append(str(func))
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(i is not None and i.dtype == torch.bool for i in args[1]):
                self.seen.append(f"{func} with a boolean mask")
        if func.namespace == "pkm":  # run the custom op's CPU implementation with this mode on, to see inside it
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)


def _model(device, sparse_dim=16):
    torch.manual_seed(0)
    return PKM(sparse_dim, heads=2, num_keys=8, topk=4, dim_head=8).to(device)


def _step(model, opt, x):
    out = model(x)
    out.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("catch_up", [False, True])
def test_training_step_has_no_host_sync(monkeypatch, catch_up, capturable):
    model = _model("cpu")
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2, catch_up=catch_up,
                          decoupled_weight_decay=catch_up, capturable=capturable)
    x = torch.randn(3, 5, 16)
    monkeypatch.setattr(optim_module, "_host_reads_free", lambda device: False)
    with use_backend("triton"):
        _step(model, opt, x)  # the optimizer's state is made in the first step
        # capturable: the counts live on the device, and nothing at all is read back (no .item())
        steps = [] if capturable else [s["step"] for s in opt.state.values()]
        with SyncRecorder(allowed=steps) as rec:
            _step(model, opt, x)
    assert rec.seen == [], f"ops that read back from the device: {sorted(set(rec.seen))}"


def test_capturable_amsgrad_step_has_no_host_sync(monkeypatch):
    """amsgrad's rows take the torch row update, which with a capturable count keeps its padding
    rows instead of dropping them with a host read."""
    model = _model("cpu")
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2, capturable=True)
    for group in opt.param_groups:
        group["amsgrad"] = True
    x = torch.randn(3, 5, 16)
    monkeypatch.setattr(optim_module, "_host_reads_free", lambda device: False)
    with use_backend("triton"):
        _step(model, opt, x)
        with SyncRecorder() as rec:
            _step(model, opt, x)
    assert rec.seen == [], f"ops that read back from the device: {sorted(set(rec.seen))}"


def test_recorder_sees_a_step_count_read():
    """Without ``capturable`` the step reads each count with ``.item()``, which the recorder sees
    when the counts are not allowed (as they are not with ``capturable=True`` above)."""
    model = _model("cpu")
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)
    x = torch.randn(3, 5, 16)
    with use_backend("triton"):
        _step(model, opt, x)
        with SyncRecorder() as rec:
            _step(model, opt, x)
    assert "aten._local_scalar_dense.default" in rec.seen, rec.seen


def test_training_step_on_triton_equals_torch_backend():
    """The triton step (one sparse entry per read, merged without a sync) moves the PKM as the
    torch backend's step (coalesced gradient) does."""
    x = torch.randn(3, 5, 16)
    models = []
    for backend in ("torch", "triton"):
        model = _model("cpu")
        opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)
        with use_backend(backend):
            for _ in range(3):
                _step(model, opt, x)
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.cuda
def test_cuda_training_step_has_no_sync_and_captures_in_a_cuda_graph():
    model = _model("cuda", sparse_dim=64)
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2, capturable=True)
    x = torch.randn(4, 32, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: compile the kernels, make the optimizer state
            _step(model, opt, x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, opt, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # entering synchronizes the device on purpose: the mode is set inside
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(model, opt, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_recorder_sees_inside_the_custom_ops(monkeypatch):
    """The check above can fail: the torch backend's sparse backward compacts its rows
    (``unique_consecutive`` inside ``pkm::value_read_backward_rows``), which the recorder sees."""
    model = _model("cpu")
    opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)
    x = torch.randn(3, 5, 16)
    monkeypatch.setattr(optim_module, "_host_reads_free", lambda device: False)
    with use_backend("torch"):
        _step(model, opt, x)
        with SyncRecorder(allowed=[s["step"] for s in opt.state.values()]) as rec:
            _step(model, opt, x)
    assert "aten.unique_consecutive.default" in rec.seen, rec.seen
