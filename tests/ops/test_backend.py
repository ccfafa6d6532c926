"""The backend switch (ops/backend.py), and what it promises seen from a whole layer: every backend
gives the reference's outputs and gradients, in eager, compiled and exported code."""

import threading

import pytest
import torch
from torch.testing import assert_close

from product_key_memory import PKM, ops, use_backend
from product_key_memory import functional as PF
from product_key_memory.ops import backend

from ._tracing import GraphCapture, call_targets

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# -- the switch ---------------------------------------------------------------------------------------


def test_backend_choice_and_errors():
    assert ops.backend_for(torch.device("cpu")) == "torch"
    with use_backend("reference"):
        assert ops.backend_for(torch.device("cpu")) == "reference"
        assert not PF.fast_path_enabled()
        with use_backend(None):
            assert ops.backend_for(torch.device("cpu")) == "torch"
    message = r"backend must be one of \('reference', 'torch', 'triton'\) or None, got 'cuda'"
    with pytest.raises(ValueError, match=message):
        with use_backend("cuda"):
            pass


def test_device_picks_the_backend(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert backend.backend_for(torch.device("cuda")) == "triton"
    assert backend.backend_for(torch.device("cpu")) == "torch"
    with use_backend("torch"):
        assert backend.backend_for(torch.device("cuda")) == "torch"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert backend.backend_for(torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError, match="the triton backend needs Triton"):
        with use_backend("triton"):
            pass


def test_reference_path_is_scoped_and_restored():
    assert PF.fast_path_enabled()
    with PF.reference_path():
        assert not PF.fast_path_enabled()
        with PF.reference_path(False):
            assert PF.fast_path_enabled()
        assert not PF.fast_path_enabled()
    assert PF.fast_path_enabled()
    with pytest.raises(RuntimeError):
        with PF.reference_path():
            raise RuntimeError("boom")
    assert PF.fast_path_enabled()


def test_forcing_is_per_thread():
    seen = []
    with use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.append(ops.backend_for(torch.device("cpu"))))
        worker.start()
        worker.join()
        assert ops.backend_for(torch.device("cpu")) == "reference"
    assert seen == ["torch"]


def test_use_backend_reaches_inside_compiled_code():
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8)
    x = torch.randn(4, 16)
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True)
    with use_backend("reference"):
        ref = compiled(x)
    torch.testing.assert_close(compiled(x), ref)


# -- a whole layer: the fast backend against the reference, outputs and every gradient -----------------

MODULE_CASES = {
    "default": dict(),
    "concat": dict(concat_values_and_combine=True),
    "batchnorm": dict(use_layernorm=False),
    "relu_gates": dict(non_competitive_gates=True),
    "pre_and_output_norm": dict(pre_layernorm=True, norm_output=True),
}


def _run(pkm, x, ref, **kw):
    pkm.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with PF.reference_path(ref):
        out = pkm(x, **kw)
        out.backward(torch.ones_like(out) + torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    grads = {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in pkm.named_parameters() if p.grad is not None
    }
    return out.detach(), x.grad, grads


def _compare(pkm, x, dtype=torch.float32, **kw):
    out, gx, grads = _run(pkm, x, False, **kw)
    r_out, r_gx, r_grads = _run(pkm, x, True, **kw)
    tol = TOL[dtype] if dtype in TOL else dict(atol=2e-2, rtol=2e-2)
    assert_close(out, r_out, **tol, msg="output")
    assert_close(gx, r_gx, **tol, msg="grad of input")
    assert grads.keys() == r_grads.keys()
    for name in grads:
        assert_close(grads[name], r_grads[name], **tol, msg=f"grad of {name}")
    return out


@pytest.mark.parametrize("case", list(MODULE_CASES))
@pytest.mark.parametrize("sparse", [False, True])
def test_module_fast_equals_reference(case, sparse):
    pkm = PKM(32, heads=2, num_keys=12, topk=5, dim_head=8, **MODULE_CASES[case])
    pkm.values.sparse = sparse
    x = torch.randn(3, 4, 32)
    mask = torch.rand(3, 4) > 0.3
    trainable = torch.rand(144) > 0.5
    _compare(pkm, x, input_mask=mask, mem_trainable_mask=trainable)
    _compare(pkm, x)


def test_module_eval_no_grad_equals_reference():
    pkm = PKM(32, heads=2, num_keys=12, topk=5, dim_head=8).eval()
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        out = pkm(x)
        with use_backend("reference"):
            ref = pkm(x)
    assert_close(out, ref, **TOL[torch.float32])


def test_module_shared_values_and_zero_tokens():
    first = PKM(16, heads=2, num_keys=8, topk=3, dim_head=4)
    second = PKM(16, heads=2, num_keys=8, topk=3, dim_head=4, values=first.values)
    model = torch.nn.Sequential(first, second)
    model[0].values.sparse = True
    x = torch.randn(2, 5, 16)

    def run(ref):
        model.zero_grad(set_to_none=True)
        with PF.reference_path(ref):
            out = model(x)
            out.square().sum().backward()
        return out.detach(), {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in model.named_parameters()}

    (out, grads), (r_out, r_grads) = run(False), run(True)
    assert_close(out, r_out)
    for name in grads:
        assert_close(grads[name], r_grads[name], msg=f"grad of {name}")
    empty = torch.randn(0, 3, 16, requires_grad=True)
    y = first(empty)
    y.sum().backward()
    assert y.shape == (0, 3, 16)


def test_module_float64_gradcheck_through_fast_path():
    pkm = PKM(8, heads=2, num_keys=6, topk=3, dim_head=4, dtype=torch.float64)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pkm(t), (x,))
    _compare(pkm, x, dtype=torch.float64)


def test_module_autocast_bf16_matches_reference():
    pkm = PKM(32, heads=2, num_keys=12, topk=5, dim_head=8)
    x = torch.randn(2, 6, 32)

    def run(ref):
        pkm.zero_grad(set_to_none=True)
        with PF.reference_path(ref), torch.autocast("cpu", dtype=torch.bfloat16):
            out = pkm(x)
        out.float().square().sum().backward()
        return out.detach().float(), {n: p.grad.clone() for n, p in pkm.named_parameters()}

    (out, grads), (r_out, r_grads) = run(False), run(True)
    assert_close(out, r_out, atol=2e-2, rtol=2e-2)
    for name in grads:
        assert_close(grads[name], r_grads[name], atol=2e-2, rtol=2e-2, msg=f"grad of {name}")


def test_module_fallbacks_still_run():
    pytest.importorskip("colt5_attention")
    pkm = PKM(16, heads=2, num_keys=8, topk=3, dim_head=4, differentiable_topk=True)
    x = torch.randn(2, 3, 16)
    out = pkm(x)
    with PF.reference_path():
        assert_close(out, pkm(x))
    pkm = PKM(16, heads=2, num_keys=8, topk=3, dim_head=4)
    pkm(x, gumbel_noise_scale=1.0).sum().backward()  # gumbel noise: sub-scores, then product_topk


# -- a whole layer, compiled and exported ---------------------------------------------------------------


def test_compiled_layer_calls_the_ops_in_one_graph_and_its_gradients_equal_eager():
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8)
    x = torch.randn(3, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    capture = GraphCapture()
    compiled = torch.compile(pkm, backend=capture, fullgraph=True)
    out = compiled(x, input_mask=mask)
    out.square().sum().backward()
    compiled_grads = {n: p.grad.clone() for n, p in pkm.named_parameters()}
    assert len(capture.graphs) == 1
    targets = call_targets(capture.graphs[0])
    assert "pkm.search.default" in targets and "pkm.value_read.default" in targets, targets

    pkm.zero_grad()
    eager = pkm(x, input_mask=mask)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in pkm.named_parameters():
        torch.testing.assert_close(compiled_grads[n], p.grad, msg=f"gradient of {n}")


def test_compiled_sparse_table_gets_a_dense_gradient_equal_to_eager_sparse():
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8, sparse_values=True)
    x = torch.randn(4, 16)
    torch.compile(pkm, backend="aot_eager", fullgraph=True)(x).sum().backward()
    compiled = pkm.values.weight.grad.clone()
    pkm.zero_grad()
    pkm(x).sum().backward()
    assert pkm.values.weight.grad.is_sparse and not compiled.is_sparse
    torch.testing.assert_close(compiled, pkm.values.weight.grad.to_dense())


def test_exported_graph_holds_plain_ops_only():
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8).eval()
    x = torch.randn(3, 16)
    x[1] = 0.0  # a zero token: every slot ties
    ep = torch.export.export(pkm, (x,))
    assert not any(t.startswith("pkm.") for t in call_targets(ep.graph_module))
    with torch.no_grad():
        assert_close(ep.module()(x), pkm(x), **TOL[torch.float32])
