"""pkm::value_read and its backward ops: :mod:`torch_impl` and the entry in every mode and on every
backend against :mod:`reference`. The Triton kernels' own tests are in test_value_read_triton.py; the
size rule that picks the torch backward's route in test_routes.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.testing import assert_close

from product_key_memory import functional as PF
from product_key_memory import use_backend
from product_key_memory.ops import value_read as entry
from product_key_memory.ops.value_read import reference, torch_impl

from ..._extras import given, needs, settings, st
from .._tracing import GraphCapture, dispatched_pkm_ops, pkm_targets

HYP = settings(max_examples=25, deadline=None)
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),  # one bf16 rounding of a sum, in another order
}
BACKENDS = ["reference", "torch", pytest.param("triton", marks=needs("triton"))]


def _dense(g):
    return None if g is None else (g.to_dense() if g.is_sparse else g)


def read_inputs(S=20, D=6, B=7, m=3, dtype=torch.float32, weighted=True, masked=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(S, D, generator=gen).to(dtype)
    idx = torch.randint(0, S, (B, m), generator=gen)
    w = None
    if weighted:
        w = torch.randn(B, m, generator=gen).to(dtype)
        w[::2, : m // 2] = 0.0  # padding: read, weight 0
    trainable = torch.rand(S, generator=gen) < 0.6 if masked else None
    return values, idx, w, trainable


# -- implementations against the reference ------------------------------------------------------------


@HYP
@given(
    lead=st.lists(st.integers(0, 3), min_size=1, max_size=2),
    m=st.integers(1, 6),
    num_slots=st.integers(1, 40),
    dim=st.integers(1, 7),
    weighted=st.booleans(),
    with_trainable=st.booleans(),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
    sparse=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_value_read_fast_equals_reference(
    lead, m, num_slots, dim, weighted, with_trainable, zero_frac, sparse, double, seed
):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    values = torch.randn(num_slots, dim, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, num_slots, (*lead, m), generator=g)
    w = None
    if weighted:
        w = torch.randn(*lead, m, generator=g, dtype=dtype)
        w = torch.where(torch.rand(w.shape, generator=g) < zero_frac, 0.0, w).requires_grad_()
    trainable = torch.rand(num_slots, generator=g) < 0.5 if with_trainable else None

    out = PF.value_read(values, idx, w, trainable=trainable, sparse=sparse)
    ref = PF.value_read_reference(values, idx, w, trainable=trainable)
    assert_close(out, ref, **TOL[dtype], msg="output")
    assert_close(ref, reference.value_read(values, idx, w, trainable), **TOL[dtype], msg="functional reference")
    flat_w = None if w is None else w.detach().reshape(-1, m)
    impl = torch_impl.value_read(values.detach(), idx.reshape(-1, m), flat_w)
    assert_close(impl.view(out.shape), ref.detach(), **TOL[dtype], msg="torch_impl.value_read")
    up = torch.randn(out.shape, generator=g, dtype=dtype)
    inputs = (values,) if w is None else (values, w)
    got = torch.autograd.grad(out, inputs, up)
    want = torch.autograd.grad(ref, inputs, up)
    gv = got[0]
    if sparse:
        assert gv.is_sparse, "sparse=True gives a sparse value gradient"
        rows = gv._indices()[0]
        assert bool((rows[1:] > rows[:-1]).all()), "rows sorted and unique"
        read = torch.zeros(num_slots, dtype=torch.bool)
        used = idx.reshape(-1) if w is None else idx.reshape(-1)[w.detach().reshape(-1) != 0]
        read[used] = True
        if trainable is not None:
            read &= trainable
        assert torch.equal(torch.sort(rows).values, read.nonzero().squeeze(1)), "exactly the rows read with a gradient"
        gv = gv.to_dense()
    assert_close(gv, want[0], **TOL[dtype], msg="grad of values")
    if w is not None:
        assert_close(got[1], want[1], **TOL[dtype], msg="grad of weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_torch_impl_backward_equals_reference(dtype, weighted, masked, need):
    values, idx, w, trainable = read_inputs(30, 5, 9, 4, dtype, weighted, masked)
    g = torch.randn(9, 5).to(dtype)
    want = reference.value_read_backward(g, values, idx, w, trainable, *need)
    for name, fn in (("value_read_backward", torch_impl.value_read_backward),
                     ("value_read_backward_sorted", torch_impl.value_read_backward_sorted)):
        got = fn(g, values, idx, w, trainable, *need)
        for what, a, b in zip(("values", "weights"), got, want):
            if b is None:
                assert a is None, f"{name}: a {what} gradient not asked for"
            else:
                assert a.dtype == b.dtype, f"{name}: {what} gradient dtype"
                assert_close(a, b, **TOL[dtype], msg=f"{name}: {what} gradient")
    if need[0]:
        rows_idx, rows, gw = torch_impl.value_read_backward_rows(g, values, idx, w, trainable, need[1])
        r_idx, r_rows, r_gw = reference.value_read_backward_rows(g, values, idx, w, trainable, need[1])
        assert torch.equal(rows_idx, r_idx), "value_read_backward_rows: the touched rows"
        assert_close(rows, r_rows, **TOL[dtype], msg="value_read_backward_rows: rows")
        assert (gw is None) == (r_gw is None)
        if gw is not None:
            assert_close(gw, r_gw, **TOL[dtype], msg="value_read_backward_rows: weights gradient")


def test_reference_backward_equals_autograd_of_reference_read():
    values, idx, w, trainable = read_inputs(12, 6, 5, 4, torch.float64, masked=True)
    v, wt = values.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(5, 6, dtype=torch.float64)
    want = torch.autograd.grad(reference.value_read(v, idx, wt, trainable), (v, wt), g)
    got = reference.value_read_backward(g, values, idx, w, trainable, True, True)
    for name, a, b in zip(("values", "weights"), got, want):
        assert_close(a, b, **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("weighted", [True, False])
def test_value_read_gradcheck_float64(weighted):
    values = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 12, (4, 3))
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True) if weighted else None
    fn = lambda v, *ws: entry.value_read(v, idx, ws[0] if ws else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values,) + ((w,) if weighted else ()))
    # a trainable mask blocks value gradients on purpose; the weight gradient stays exact
    trainable = torch.rand(12) < 0.5
    if weighted:
        fn = lambda ws: entry.value_read(values.detach(), idx, ws, trainable)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (w,))


def test_value_read_without_grad_is_embedding_bag():
    values, idx, w = torch.randn(20, 4), torch.randint(0, 20, (6, 3)), torch.randn(6, 3)
    assert torch.equal(PF.value_read(values, idx, w), F.embedding_bag(idx, values, mode="sum", per_sample_weights=w))


@pytest.mark.parametrize("bags, m", [(6, 3), (1, 128), (3, 0), (0, 5)])
def test_value_read_without_grad_matches_reference_at_edge_sizes(bags, m):
    # the wrapper-free embedding_bag with cached offsets: empty bags sum to zero, no bags give no rows
    values, idx, w = torch.randn(20, 4), torch.randint(0, 20, (bags, m)), torch.randn(bags, m)
    for weights in (w, None):
        got = PF.value_read(values, idx, weights)
        assert got.shape == (bags, 4)
        assert_close(got, PF.value_read_reference(values, idx, weights), rtol=1e-6, atol=1e-6)
        assert_close(got, reference.value_read(values, idx, weights), rtol=1e-6, atol=1e-6)
        assert_close(PF.value_read(values, idx, weights), got, rtol=0, atol=0)  # the cached offsets again


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_rows_are_weighted_sums_of_bag_gradients(dtype):
    g = torch.randn(6, 5, dtype=dtype)
    counts = torch.tensor([2, 1, 3])
    bag_of_read = torch.tensor([0, 4, 5, 1, 1, 3])
    psw = torch.randn(6, dtype=dtype)
    want = torch.stack([psw[0] * g[0] + psw[1] * g[4], psw[2] * g[5], psw[3] * g[1] + psw[4] * g[1] + psw[5] * g[3]])
    assert_close(torch_impl._rows_from_bags(g, counts, bag_of_read, psw), want, **TOL[dtype])


def test_dense_backward_of_a_large_table_matches_reference():
    # a table past the fresh-pages threshold (40 MiB > 32 MiB), on the slot-sorted route
    g = torch.Generator().manual_seed(3)
    values = torch.randn(40960, 256, generator=g, requires_grad=True)
    idx = torch.randint(0, 40960, (300, 8), generator=g)
    w = torch.rand(300, 8, generator=g, requires_grad=True)
    up = torch.randn(300, 256, generator=g)
    got_v, got_w = torch_impl.value_read_backward_sorted(up, values.detach(), idx, w.detach(), None, True, True)
    want_v, want_w = torch.autograd.grad(reference.value_read(values, idx, w), (values, w), up)
    assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
    assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)


# -- the custom ops -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("trainable", [True, False])
def test_opcheck_value_read(weighted, trainable):
    values = torch.randn(20, 6, requires_grad=True)
    idx = torch.randint(0, 20, (7, 3))
    w = torch.rand(7, 3, requires_grad=True) if weighted else None
    mask = torch.rand(20) > 0.5 if trainable else None
    opcheck(torch.ops.pkm.value_read, (values, idx, w, mask, False))
    opcheck(torch.ops.pkm.value_read, (values, idx, w, mask, True))
    g = torch.randn(7, 6)
    w_ = None if w is None else w.detach()
    opcheck(torch.ops.pkm.value_read_backward, (g, values.detach(), idx, w_, mask, True, weighted))
    opcheck(torch.ops.pkm.value_read_backward, (g, values.detach(), idx, w_, mask, False, weighted))
    opcheck(torch.ops.pkm.value_read_backward_rows, (g, values.detach(), idx, w_, mask, weighted))


def test_the_sparse_rows_op_matches_the_dense_one():
    # its output size depends on the data; compiled graphs take pkm::value_read_backward, so check it
    # against that one too
    values, idx, w = torch.randn(20, 6), torch.randint(0, 20, (7, 3)), torch.rand(7, 3)
    w[0] = 0  # padding: its rows get no gradient
    g = torch.randn(7, 6)
    rows_idx, rows, gw = torch.ops.pkm.value_read_backward_rows(g, values, idx, w, None, True)
    dense, gw_dense = torch.ops.pkm.value_read_backward(g, values, idx, w, None, True, True)
    touched = idx[1:].unique()
    assert torch.equal(rows_idx, touched)
    torch.testing.assert_close(rows, dense[touched])
    torch.testing.assert_close(gw, gw_dense)


# -- the entry: every mode, every backend -------------------------------------------------------------


def _entry_modes(values, idx, w, trainable, up):
    """``mode -> (output, grad_values, grad_weights)`` from the entry in each of its modes."""
    out = {}
    with torch.no_grad():
        out["no_grad"] = (entry.value_read(values, idx, w, trainable), None, None)
    for sparse in (False, True):
        v = values.clone().requires_grad_()
        wt = None if w is None else w.clone().requires_grad_()
        o = entry.value_read(v, idx, wt, trainable, sparse)
        grads = torch.autograd.grad(o, (v,) if wt is None else (v, wt), up)
        out[f"grad, sparse={sparse}"] = (o.detach(), _dense(grads[0]), grads[1] if wt is not None else None)
    return out


def _reference_result(values, idx, w, trainable, up):
    v = values.clone().requires_grad_()
    wt = None if w is None else w.clone().requires_grad_()
    o = reference.value_read(v, idx, wt, trainable)
    grads = torch.autograd.grad(o, (v,) if wt is None else (v, wt), up)
    return o.detach(), grads[0], grads[1] if wt is not None else None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weighted, masked", [(True, True), (True, False), (False, False)])
def test_entry_equals_reference_in_every_mode(backend, dtype, weighted, masked):
    values, idx, w, trainable = read_inputs(20, 6, 7, 3, dtype, weighted, masked)
    up = torch.randn(7, 6).to(dtype)
    want = _reference_result(values, idx, w, trainable, up)
    with use_backend(backend):
        for mode, got in _entry_modes(values, idx, w, trainable, up).items():
            for what, a, b in zip(("output", "values gradient", "weights gradient"), got, want):
                if a is None:
                    continue
                assert a.dtype == b.dtype, f"{backend}, {mode}: {what} dtype {a.dtype}, want {b.dtype}"
                assert_close(a, b, **TOL[dtype], msg=f"{backend}, {mode}: {what}")


def test_compiled_entry_keeps_the_custom_op_and_equals_reference():
    values, idx, w, trainable = read_inputs(20, 6, 7, 3, masked=True)
    up = torch.randn(7, 6)
    capture = GraphCapture()
    compiled = torch.compile(entry.value_read, backend=capture, fullgraph=True)
    want = _reference_result(values, idx, w, trainable, up)
    for backend in ("torch", "reference"):
        with use_backend(backend):
            v, wt = values.clone().requires_grad_(), w.clone().requires_grad_()
            o = compiled(v, idx, wt, trainable)
            gv, gw = torch.autograd.grad(o, (v, wt), up)
            for what, a, b in zip(("output", "values gradient", "weights gradient"), (o, gv, gw), want):
                assert_close(a, b, **TOL[torch.float32], msg=f"compiled, {backend}: {what}")
            with torch.no_grad():
                assert_close(compiled(values, idx, w, trainable), want[0], **TOL[torch.float32])
    assert capture.graphs and all(pkm_targets(gm) == {"pkm.value_read.default"} for gm in capture.graphs)


def test_reference_backend_runs_reference_py(monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("torch_impl ran")

    for name in ("value_read", "value_read_backward", "value_read_backward_rows"):
        monkeypatch.setattr(torch_impl, name, broken)
    values, idx, w, trainable = read_inputs(20, 6, 7, 3, masked=True)
    up = torch.randn(7, 6)
    want = _reference_result(values, idx, w, trainable, up)
    with use_backend("reference"):
        for mode, got in _entry_modes(values, idx, w, trainable, up).items():
            for what, a, b in zip(("output", "values gradient", "weights gradient"), got, want):
                if a is not None:
                    assert_close(a, b, **TOL[torch.float32], msg=f"reference backend, {mode}: {what}")
    with pytest.raises(AssertionError, match="torch_impl ran"):  # the patch is in the path
        entry.value_read(values, idx, w)


def test_no_grad_shortcut_skips_the_dispatcher():
    values, idx, w, _ = read_inputs()
    _, names = dispatched_pkm_ops(entry.value_read, values, idx, w)
    assert names == [], names
    with torch.no_grad():
        _, names = dispatched_pkm_ops(entry.value_read, values.clone().requires_grad_(), idx, w)
    assert names == [], names
    _, names = dispatched_pkm_ops(entry.value_read, values.clone().requires_grad_(), idx, w)
    assert names == ["pkm.value_read.default"], names


class _Read(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = torch.nn.Parameter(values)

    def forward(self, idx, w):
        return entry.value_read(self.values, idx, w)


def test_exported_read_holds_no_custom_op():
    values, idx, w, _ = read_inputs()
    ep = torch.export.export(_Read(values), (idx, w))
    assert pkm_targets(ep.graph_module) == set()
    assert_close(ep.module()(idx, w), reference.value_read(values, idx, w), **TOL[torch.float32])


# -- torch.func -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_value_read_under_torch_func_grad_and_vmap(backend, masked):
    values, idx, w, trainable = read_inputs(masked=masked)
    up = torch.randn(idx.shape[0], values.shape[1])
    with use_backend(backend):
        vg, wg = values.clone().requires_grad_(), w.clone().requires_grad_()
        want = torch.autograd.grad(entry.value_read(vg, idx, wg, trainable), (vg, wg), up)
        got = torch.func.grad(lambda v, ww: (entry.value_read(v, idx, ww, trainable) * up).sum(), argnums=(0, 1))(
            values, w
        )
        for g, ww, name in zip(got, want, ("values", "weights")):
            assert_close(g, _dense(ww), msg=f"{backend}: grad of {name}")
        batched = torch.func.vmap(lambda i, ww: entry.value_read(values, i, ww, trainable))(
            idx.unsqueeze(1), w.unsqueeze(1)
        )
        assert_close(batched.squeeze(1), entry.value_read(values, idx, w, trainable), msg=f"{backend}: vmap")
