"""The custom ops: registered, checked by opcheck, kept whole by torch.compile, plain under export."""

import pytest
import torch
from torch.library import opcheck

from product_key_memory import PKM, functional as PF, ops, use_backend


def _search_args(n=5, heads=2, num_keys=8, dim=4, dtype=torch.float32):
    q = torch.randn(n, heads, 2, dim, dtype=dtype, requires_grad=True)
    keys = torch.randn(heads, num_keys, 2, dim, dtype=dtype).transpose(1, 2).requires_grad_()  # the module's view
    return q, keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_search(dtype):
    q, keys = _search_args(dtype=dtype)
    opcheck(torch.ops.pkm.search, (q, keys, 3))


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("trainable", [True, False])
def test_opcheck_value_read(weighted, trainable):
    values = torch.randn(20, 6, requires_grad=True)
    idx = torch.randint(0, 20, (7, 3))
    w = torch.rand(7, 3, requires_grad=True) if weighted else None
    mask = torch.rand(20) > 0.5 if trainable else None
    opcheck(torch.ops.pkm.value_read, (values, idx, w, mask, False))
    g = torch.randn(7, 6)
    opcheck(torch.ops.pkm.value_read_backward, (g, values.detach(), idx, None if w is None else w.detach(), mask, True, weighted))


def test_the_sparse_rows_op_matches_the_dense_one():
    # its output size depends on the data, which opcheck's fake-tensor checks cannot follow; it is an
    # eager-only op (compiled graphs take pkm::value_read_backward), so check it against that one
    values, idx, w = torch.randn(20, 6), torch.randint(0, 20, (7, 3)), torch.rand(7, 3)
    w[0] = 0  # padding: its rows get no gradient
    g = torch.randn(7, 6)
    rows_idx, rows, gw = torch.ops.pkm.value_read_backward_rows(g, values, idx, w, None, True)
    dense, gw_dense = torch.ops.pkm.value_read_backward(g, values, idx, w, None, True, True)
    touched = idx[1:].unique()
    assert torch.equal(rows_idx, touched)
    torch.testing.assert_close(rows, dense[touched])
    torch.testing.assert_close(gw, gw_dense)


class _GraphCapture:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _targets(gm):
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


def test_compiled_layer_calls_the_ops_in_one_graph_and_its_gradients_equal_eager():
    torch.manual_seed(0)
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8)
    x = torch.randn(3, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    capture = _GraphCapture()
    compiled = torch.compile(pkm, backend=capture, fullgraph=True)
    out = compiled(x, input_mask=mask)
    out.square().sum().backward()
    compiled_grads = {n: p.grad.clone() for n, p in pkm.named_parameters()}
    assert len(capture.graphs) == 1
    targets = _targets(capture.graphs[0])
    assert "pkm.search.default" in targets and "pkm.value_read.default" in targets, targets

    pkm.zero_grad()
    eager = pkm(x, input_mask=mask)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in pkm.named_parameters():
        torch.testing.assert_close(compiled_grads[n], p.grad, msg=f"gradient of {n}")


def test_compiled_sparse_table_gets_a_dense_gradient_equal_to_eager_sparse():
    torch.manual_seed(0)
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8, sparse_values=True)
    x = torch.randn(4, 16)
    torch.compile(pkm, backend="aot_eager", fullgraph=True)(x).sum().backward()
    compiled = pkm.values.weight.grad.clone()
    pkm.zero_grad()
    pkm(x).sum().backward()
    assert pkm.values.weight.grad.is_sparse and not compiled.is_sparse
    torch.testing.assert_close(compiled, pkm.values.weight.grad.to_dense())


def test_use_backend_reaches_inside_compiled_code():
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8)
    x = torch.randn(4, 16)
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True)
    with use_backend("reference"):
        ref = compiled(x)
    torch.testing.assert_close(compiled(x), ref)


def test_exported_graph_holds_plain_ops_only():
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8).eval()
    ep = torch.export.export(pkm, (torch.randn(3, 16),))
    assert not any(t.startswith("pkm.") for t in _targets(ep.graph_module))


def test_backend_choice_and_errors():
    assert ops.backend_for(torch.device("cpu")) == "torch"
    with use_backend("reference"):
        assert ops.backend_for(torch.device("cpu")) == "reference"
        assert not PF.fast_path_enabled()
        with use_backend(None):
            assert ops.backend_for(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match=r"backend must be one of \('reference', 'torch', 'triton'\) or None, got 'cuda'"):
        with use_backend("cuda"):
            pass
