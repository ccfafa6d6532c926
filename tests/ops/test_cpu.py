"""Fast paths (product_key_memory.ops, chosen by functional) against the references, side by side."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from product_key_memory import PKM
from product_key_memory import functional as PF
from product_key_memory import ops

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}
HYP = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def _grads(outputs, inputs, upstream):
    grads = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)
    return [None if g is None else (g.to_dense() if g.is_sparse else g) for g in grads]


# -- search ------------------------------------------------------------------------------------


@HYP
@given(
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=2),
    heads=st.integers(1, 3),
    num_keys=st.integers(1, 24),
    topk_frac=st.floats(0.0, 1.0),
    dim_key=st.integers(1, 9),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_search_fast_equals_reference(lead, heads, num_keys, topk_frac, dim_key, double, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    topk = max(1, round(topk_frac * num_keys))
    q = torch.randn(*lead, heads, 2, dim_key, generator=g, dtype=dtype, requires_grad=True)
    keys = torch.randn(heads, num_keys, 2, dim_key, generator=g, dtype=dtype, requires_grad=True)
    kview = keys.transpose(1, 2)  # the module's strided view

    scores, idx = PF.product_key_search(q, kview, topk)
    with PF.reference_path():
        ref_scores, ref_idx = PF.product_key_search(q, kview, topk)
    ref2_scores, ref2_idx = PF.product_topk_reference(PF.subkey_scores(q, kview), topk)
    brute_scores, _ = PF.brute_force_search(q, kview, topk)

    assert idx.shape == (*lead, heads, topk)
    assert torch.equal(idx, ref_idx), "slots differ from the reference path"
    assert torch.equal(idx, ref2_idx), "slots differ from product_topk_reference"
    assert_close(scores, ref_scores, **TOL[dtype], msg="scores")
    assert_close(scores, brute_scores, **TOL[dtype], msg="scores vs brute force")
    up = torch.randn(scores.shape, generator=g, dtype=dtype)
    if scores.numel():
        got = _grads(scores, (q, keys), up)
        want = _grads(ref_scores, (q, keys), up)
        for name, a, b in zip(("queries", "keys"), got, want):
            assert_close(a, b, **TOL[dtype], msg=f"grad of {name}")


def test_subkey_scores_match_einsum():
    q = torch.randn(5, 3, 2, 8)
    keys = torch.randn(3, 16, 2, 8).transpose(1, 2)
    assert_close(PF.subkey_scores(q, keys), torch.einsum("nhpd,hpkd->nhpk", q, keys))


def test_search_custom_subkey_topk_takes_reference_route():
    q, keys = torch.randn(4, 2, 2, 8), torch.randn(2, 2, 16, 8)
    calls = []

    def my_topk(s, k):
        calls.append(k)
        return s.topk(k, dim=-1)

    s, i = PF.product_key_search(q, keys, 5, subkey_topk=my_topk)
    s_ref, i_ref = PF.product_topk(PF.subkey_scores(q, keys), 5)
    assert calls == [5]
    assert torch.equal(i, i_ref) and torch.equal(s, s_ref)


def test_search_gradcheck_float64():
    q = torch.randn(3, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: PF.product_key_search(a, b, 3)[0], (q, keys))


# -- value read --------------------------------------------------------------------------------


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
def test_value_read_fast_equals_reference(lead, m, num_slots, dim, weighted, with_trainable, zero_frac, sparse, double, seed):
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


@pytest.mark.parametrize("weighted", [True, False])
def test_value_read_gradcheck_float64(weighted):
    values = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 12, (4, 3))
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True) if weighted else None
    fn = lambda v, *ws: ops.value_read(v, idx, ws[0] if ws else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values,) + ((w,) if weighted else ()))
    # a trainable mask blocks value gradients on purpose; the weight gradient stays exact
    trainable = torch.rand(12) < 0.5
    if weighted:
        fn = lambda ws: ops.value_read(values.detach(), idx, ws, trainable)  # noqa: E731
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
        assert_close(PF.value_read(values, idx, weights), got, rtol=0, atol=0)  # the cached offsets again


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


# -- the module: fast vs reference, outputs and every gradient ---------------------------------

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
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in pkm.named_parameters() if p.grad is not None}
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_rows_are_weighted_sums_of_bag_gradients(dtype):
    g = torch.randn(6, 5, dtype=dtype)
    counts = torch.tensor([2, 1, 3])
    bag_of_read = torch.tensor([0, 4, 5, 1, 1, 3])
    psw = torch.randn(6, dtype=dtype)
    want = torch.stack([psw[0] * g[0] + psw[1] * g[4], psw[2] * g[5], psw[3] * g[1] + psw[4] * g[1] + psw[5] * g[3]])
    assert_close(ops.cpu._rows_from_bags(g, counts, bag_of_read, psw), want, **TOL[dtype])


def test_empty_hugepage_is_an_ordinary_tensor():
    t = ops.empty_hugepage(4096, 1024, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (4096, 1024) and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()


@pytest.mark.parametrize(
    "shape, dtype", [((3, 5), torch.float32), ((4096, 1024), torch.float32), ((20480, 1024), torch.bfloat16)]
)
def test_zeros_hugepage_is_zeros(shape, dtype):
    # up to 32 MiB: zeroed in place; over it (on Linux): fresh anonymous pages, zero without a pass over them
    t = ops.cpu.zeros_hugepage(*shape, dtype=dtype, device=torch.device("cpu"))
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    t[1].fill_(3.0)  # writable, and only where written
    assert float(t.float().sum()) == 3.0 * shape[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_zeros_hugepage_memory_is_returned_when_freed():
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = rss_mib()
    for _ in range(12):  # 12 x 64 MiB, every page touched: kept mappings would add 768 MiB
        t = ops.cpu.zeros_hugepage(16384, 1024, dtype=torch.float32, device=torch.device("cpu"))
        t.fill_(1.0)
        view = t[::2]
        del t, view
    assert rss_mib() - before < 256


def test_dense_backward_of_a_large_table_matches_reference():
    # a table past the fresh-pages threshold (40 MiB > 32 MiB), on the slot-sorted route
    g = torch.Generator().manual_seed(3)
    values = torch.randn(40960, 256, generator=g, requires_grad=True)
    idx = torch.randint(0, 40960, (300, 8), generator=g)
    w = torch.rand(300, 8, generator=g, requires_grad=True)
    up = torch.randn(300, 256, generator=g)
    got_v, got_w = ops.cpu.value_read_backward_sorted(up, values.detach(), idx, w.detach(), None, True, True)
    want_v, want_w = torch.autograd.grad(PF.value_read_reference(values, idx, w), (values, w), up)
    assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
    assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
