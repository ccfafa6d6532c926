"""pkm::search: :mod:`torch_impl` and the entry in every mode and on every backend against :mod:`reference`.

The Triton kernel's own tests are in test_search_triton.py; here the ``triton`` backend runs through
the entry (under the interpreter on CPU) at one small size.
"""

import pytest
import torch
from torch.library import opcheck
from torch.testing import assert_close

from product_key_memory import functional as PF
from product_key_memory import ops, use_backend
from product_key_memory.ops import search as entry
from product_key_memory.ops.search import reference, torch_impl
from product_key_memory.ops.topk.reference import topk_lower_index as stable_topk

from ..._extras import given, needs, settings, st
from .._tracing import GraphCapture, dispatched_pkm_ops, pkm_targets

HYP = settings(max_examples=25, deadline=None)
# scores: float32 sums in another order (float64 for float64 input)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}
BACKENDS = ["reference", "torch", pytest.param("triton", marks=needs("triton"))]


def _grads(outputs, inputs, upstream):
    grads = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)
    return [None if g is None else (g.to_dense() if g.is_sparse else g) for g in grads]


def exact_inputs(n=4, heads=2, num_keys=8, dim_key=4, dtype=torch.float32, lo=-2, hi=2, seed=0):
    """Small-integer queries ``(n, heads, 2, d)`` and the module's keys view ``(heads, 2, K, d)``:
    every score is exact in float32, so all implementations agree bit for bit, and ties are frequent."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (n, heads, 2, dim_key), generator=gen).to(dtype)
    keys = torch.randint(lo, hi + 1, (heads, num_keys, 2, dim_key), generator=gen).to(dtype).transpose(1, 2)
    return q, keys


def check_exact(got, want, what):
    assert torch.equal(got[1], want[1]), f"{what}: slots differ from reference.search\n{got[1]}\n{want[1]}"
    assert got[0].dtype == want[0].dtype, f"{what}: score dtype {got[0].dtype}, want {want[0].dtype}"
    assert torch.equal(got[0].detach(), want[0]), f"{what}: scores differ from reference.search"


# -- implementations against the reference ------------------------------------------------------------


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
    ref2_scores, ref2_idx = reference.product_topk(reference.subkey_scores(q, kview), topk)
    brute_scores, _ = reference.brute_force_search(q, kview, topk)
    flat = q.detach().reshape(-1, heads, 2, dim_key)
    impl_scores, impl_idx = torch_impl.search(flat, kview.detach(), topk)

    assert idx.shape == (*lead, heads, topk)
    assert torch.equal(idx, ref_idx), "slots differ from the reference path"
    assert torch.equal(idx, ref2_idx), "slots differ from reference.product_topk"
    assert torch.equal(impl_idx.reshape(idx.shape), ref_idx), "torch_impl.search: slots differ from the reference"
    assert_close(scores, ref_scores, **TOL[dtype], msg="scores")
    assert_close(scores, brute_scores, **TOL[dtype], msg="scores vs brute force")
    assert_close(impl_scores.reshape(scores.shape), ref_scores.detach(), **TOL[dtype], msg="torch_impl.search: scores")
    up = torch.randn(scores.shape, generator=g, dtype=dtype)
    if scores.numel():
        got = _grads(scores, (q, keys), up)
        want = _grads(ref_scores, (q, keys), up)
        for name, a, b in zip(("queries", "keys"), got, want):
            assert_close(a, b, **TOL[dtype], msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_implementations_equal_reference_exactly_on_ties(dtype):
    """Small-integer inputs, so every score is exact and ties are everywhere: slots and scores bit for bit,
    and the scores in the reference's dtype (``score_dtype``: float32, float64 for float64)."""
    q, keys = exact_inputs(6, 3, 10, 5, dtype)
    want = reference.search(q, keys, 7)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert want[0].dtype == reference.score_dtype(q, keys) == want_dtype
    check_exact(torch_impl.search(q, keys, 7), want, "torch_impl.search")
    s, i = torch_impl.search_heads_first(q.transpose(1, 2), keys.transpose(1, 2), 7)  # the layer's layouts
    check_exact((s.transpose(0, 1), i.transpose(0, 1)), want, "torch_impl.search_heads_first")
    check_exact(reference.brute_force_search(q, keys, 7), want, "reference.brute_force_search")
    one = torch_impl.search(q[:1], keys, 7)  # one token: both halves in one GEMM per head
    check_exact(one, reference.search(q[:1], keys, 7), "torch_impl.search, one token")


def test_score_dtype_is_one_rule():
    for a, b in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                 (torch.float64, torch.float32), (torch.bfloat16, torch.float64)]:
        want = torch.promote_types(torch.promote_types(a, b), torch.float32)
        assert reference.score_dtype(torch.empty(0, dtype=a), torch.empty(0, dtype=b)) == want
        assert reference.score_dtype(a, b) == want
        assert torch_impl._score_dtype(a, b) == want  # the cached copy asks the reference


def test_subkey_scores_match_einsum():
    q = torch.randn(5, 3, 2, 8)
    keys = torch.randn(3, 16, 2, 8).transpose(1, 2)
    want = torch.einsum("nhpd,hpkd->nhpk", q, keys)
    assert_close(PF.subkey_scores(q, keys), want)
    assert_close(reference.subkey_scores(q, keys), want)
    with use_backend("reference"):
        assert_close(entry.subkey_scores(q, keys), want)


def test_subkey_scores_stay_float32_under_autocast():
    q, keys = torch.randn(5, 3, 2, 8), torch.randn(3, 2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for backend in ("torch", "reference"):
            with use_backend(backend):
                s = entry.subkey_scores(q, keys)
            assert s.dtype == torch.float32, backend
            assert_close(s, reference.subkey_scores(q, keys), **TOL[torch.float32])


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
    s_spec, i_spec = reference.product_topk(reference.subkey_scores(q, keys), 5, subkey_topk=my_topk)
    assert torch.equal(i, i_spec), "the pruned product_topk selects the reference's grid search slots"
    assert_close(s, s_spec, **TOL[torch.float32])


def test_search_gradcheck_float64():
    q = torch.randn(3, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: PF.product_key_search(a, b, 3)[0], (q, keys))
    assert torch.autograd.gradcheck(lambda a, b: entry.search(a, b, 3)[0], (q, keys))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_search(dtype):
    q, keys = exact_inputs(5, 2, 8, 4, dtype)
    q, keys = q.requires_grad_(), keys.detach().requires_grad_()
    opcheck(torch.ops.pkm.search, (q, keys, 3))
    opcheck(torch.ops.pkm.search, (torch.randn(0, 2, 2, 4, dtype=dtype), keys.detach(), 3))  # no tokens


# -- the entry: every mode, every backend -------------------------------------------------------------


def _modes(q, keys, topk):
    """``mode -> (scores, slots)`` from the entry: grad (the custom op), no grad (the direct call),
    compiled (the custom op inside a graph) and each fallback route."""
    out = {
        "grad": entry.search(q.detach().requires_grad_(), keys.detach().requires_grad_(), topk),
        "no_grad": entry.search(q, keys, topk),
        "subkey_topk": entry.search(q, keys, topk, subkey_topk=stable_topk),
    }
    with torch.no_grad():
        out["no_grad, grad inputs"] = entry.search(q.requires_grad_(), keys, topk)
    q.requires_grad_(False)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entry_equals_reference_in_every_mode(backend, dtype):
    q, keys = exact_inputs(3, 2, 9, 4, dtype)
    want = reference.search(q, keys, 5)
    with use_backend(backend):
        for mode, got in _modes(q, keys, 5).items():
            check_exact(got, want, f"{backend}, {mode}")


def test_compiled_entry_keeps_the_custom_op_and_equals_reference():
    q, keys = exact_inputs(3, 2, 9, 4)
    capture = GraphCapture()
    compiled = torch.compile(lambda a, b: entry.search(a, b, 5), backend=capture, fullgraph=True)
    want = reference.search(q, keys, 5)
    for backend in ("torch", "reference"):  # the switch is read at run time, inside the op: no recompile
        with use_backend(backend):
            check_exact(compiled(q, keys), want, f"compiled, {backend}")
            check_exact(compiled(torch.zeros_like(q), keys), reference.search(torch.zeros_like(q), keys, 5),
                        f"compiled ties, {backend}")
    assert len(capture.graphs) == 1, "one graph for every backend"
    assert pkm_targets(capture.graphs[0]) == {"pkm.search.default"}


def test_compiled_search_with_gradient_equals_eager():
    q, keys = torch.randn(3, 2, 2, 4, requires_grad=True), torch.randn(2, 2, 9, 4, requires_grad=True)
    capture = GraphCapture()
    compiled = torch.compile(lambda a, b: entry.search(a, b, 5), backend=capture, fullgraph=True)
    s, i = compiled(q, keys)
    up = torch.randn(s.shape)
    got = _grads(s, (q, keys), up)
    rs, ri = reference.search(q, keys, 5)
    want = _grads(rs, (q, keys), up)
    assert torch.equal(i, ri)
    assert "pkm.search.default" in pkm_targets(capture.graphs[0])
    for name, a, b in zip(("queries", "keys"), got, want):
        assert_close(a, b, **TOL[torch.float32], msg=f"grad of {name}")


def test_reference_backend_runs_reference_py(monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("torch_impl ran")

    for name in ("search", "search_heads_first", "half_scores"):
        monkeypatch.setattr(torch_impl, name, broken)
    q, keys = exact_inputs(3, 2, 9, 4)
    want = reference.search(q, keys, 5)
    with use_backend("reference"):
        for mode, got in _modes(q, keys, 5).items():
            check_exact(got, want, f"reference backend, {mode}")
        entry.search(q, keys, 5, gumbel_noise_scale=1.0)
    with pytest.raises(AssertionError, match="torch_impl ran"):  # the patch is in the path
        entry.search(q, keys, 5)


def test_no_grad_shortcut_skips_the_dispatcher():
    q, keys = exact_inputs(3, 2, 9, 4)
    _, ops = dispatched_pkm_ops(entry.search, q, keys, 5)
    assert ops == [], ops
    with torch.no_grad():
        _, ops = dispatched_pkm_ops(entry.search, q.clone().requires_grad_(), keys, 5)
    assert ops == [], ops
    _, ops = dispatched_pkm_ops(entry.search, q.clone().requires_grad_(), keys, 5)
    assert ops == ["pkm.search.default"], ops


class _Search(torch.nn.Module):
    def __init__(self, keys):
        super().__init__()
        self.keys = torch.nn.Parameter(keys)

    def forward(self, q):
        return entry.search(q, self.keys, 5)


def test_exported_search_holds_no_custom_op_and_keeps_the_tie_rule():
    q, keys = exact_inputs(3, 2, 9, 4)
    ep = torch.export.export(_Search(keys.contiguous()), (q,))
    assert pkm_targets(ep.graph_module) == set()
    for x in (q, torch.zeros_like(q), exact_inputs(3, 2, 9, 4, seed=1)[0]):
        check_exact(ep.module()(x), reference.search(x, keys, 5), "exported")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_queries_take_the_lowest_slots_on_every_route(backend):
    _, keys = exact_inputs(2, 2, 9, 4)
    q = torch.zeros(2, 2, 2, 4)
    q[1] = -0.0
    with use_backend(backend):
        for mode, (s, i) in _modes(q, keys, 6).items():
            assert torch.equal(i, torch.arange(6).expand(2, 2, 6)), f"{backend}, {mode}: {i}"


# -- candidate pairs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 2, 7, 32])
def test_candidate_pairs_are_those_that_can_win(topk):
    a, b = entry.candidate_pairs(topk)
    assert torch.equal(((a + 1) * (b + 1) <= topk), torch.ones_like(a, dtype=torch.bool))
    assert a.numel() == sum(topk // (i + 1) for i in range(topk))


def test_candidate_pairs_returns_a_copy():
    """Writing to the returned tensor changes no later search (it was the library's cache)."""
    q, keys = torch.randn(4, 2, 2, 8), torch.randn(2, 2, 16, 8)
    before = entry.search(q, keys, 5)
    for fn in (PF.candidate_pairs, entry.candidate_pairs):
        pairs = fn(5)
        pairs.zero_()
        assert not torch.equal(fn(5), pairs), "a later call hands out the pairs, not the written tensor"
        for got in (entry.search(q, keys, 5), PF.product_key_search(q, keys, 5),
                    PF.product_topk(PF.subkey_scores(q, keys), 5)):
            check_exact(got, before, "search after writing to candidate_pairs")


# -- limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_keys_at_the_limit_keeps_the_tie_rule_and_past_it_is_refused(backend):
    num_keys = entry.MAX_NUM_KEYS  # slots up to 2 ** 32 - 1
    keys = torch.zeros(1, num_keys, 2, 1)
    keys[0, -6:, 0], keys[0, -3:, 1] = 1.0, 1.0  # 18 slots tie at the top, near 2 ** 32
    keys = keys.transpose(1, 2)  # (1, 2, K, 1)
    q = torch.ones(2, 1, 2, 1)
    want = reference.search(q, keys, 4)
    assert int(want[1].min()) > 2**32 - 6 * num_keys
    with use_backend(backend):
        for mode, got in _modes(q, keys, 4).items():
            check_exact(got, want, f"{backend}, {mode}")
        too_many = torch.zeros(1, 2, num_keys + 1, 1)
        with pytest.raises(ValueError, match=r"num_keys must be at most 65536 .* got num_keys=65537"):
            entry.search(q, too_many, 4)


# -- non-finite inputs: one rule on every backend (reference.py) -----------------------------------------


def non_finite_cases():
    inf, nan = float("inf"), float("nan")
    q, keys = exact_inputs(3, 2, 9, 4)
    cases = {}
    k = keys.clone()
    k[0, 0, 4, 1] = inf  # an inf sub-key: inf or -inf or NaN (inf * 0) scores
    k[1, 1, 2, 0] = -inf
    cases["inf sub-keys"] = (q, k)
    qq = q.clone()
    qq[0, 0, 0, 2] = inf  # an inf half-query
    qq[1, 1, 1, 0] = -inf
    qq[2, 0, :, 1] = inf
    cases["inf half-queries"] = (qq, keys)
    qq = q.clone()
    qq[0, 1, 0, 0] = nan  # NaN scores
    k = keys.clone()
    k[0, 1, 3, 2] = nan
    cases["NaN scores"] = (qq, k)
    k = keys.clone()
    k[:, 0, ::2] = inf
    k[:, 1, 1::2] = -inf  # inf + -inf sums in the grid
    cases["inf plus -inf"] = (q, k)
    k = keys.clone() * 3e37  # finite, but sums past float32
    cases["huge finite"] = (q, k)
    return cases


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 under the interpreter
@pytest.mark.parametrize("case", list(non_finite_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_select_the_same_slots_on_every_backend(case, backend):
    q, keys = non_finite_cases()[case]
    want = reference.search(q, keys, 5)
    assert torch.isfinite(want[0]).all(), f"{case}: the rule gives finite scores"
    for topk in (1, 5, 9):
        want = reference.search(q, keys, topk)
        with use_backend(backend):
            for mode, got in _modes(q, keys, topk).items():
                check_exact(got, want, f"{case}, {backend}, {mode}, topk={topk}")
            check_exact(entry.product_topk(reference.subkey_scores(q, keys), topk), want, f"{backend}: product_topk")


def test_non_finite_rule_equals_brute_force_where_no_sum_absorbs():
    # NaN and inf sub-keys of a half whose other half's scores are all zero: no bounded score absorbs one
    q, keys = exact_inputs(3, 2, 9, 4)
    keys = keys.clone()
    keys[:, 1] = 0.0
    keys[0, 0, 2, 0], keys[1, 0, 5, 1], keys[0, 0, 7, 3] = float("inf"), float("nan"), -float("inf")
    for topk in (1, 5, 9):
        check_exact(reference.search(q, keys, topk), reference.brute_force_search(q, keys, topk), f"topk={topk}")


# -- torch.func -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_under_torch_func_grad_and_vmap(backend):
    q, keys = exact_inputs(3, 2, 9, 4)
    q = q + 0.1 * torch.randn(q.shape, generator=torch.Generator().manual_seed(0))  # distinct scores
    up = torch.randn(3, 2, 5)
    with use_backend(backend):
        want = entry.search(q, keys, 5)
        qg, kg = q.clone().requires_grad_(), keys.clone().requires_grad_()
        want_grads = torch.autograd.grad(entry.search(qg, kg, 5)[0], (qg, kg), up)
        got_grads = torch.func.grad(lambda a, b: (entry.search(a, b, 5)[0] * up).sum(), argnums=(0, 1))(q, keys)
        for g, w, name in zip(got_grads, want_grads, ("queries", "keys")):
            assert_close(g, w, msg=f"{backend}: grad of {name}")
        # vmap over a leading batch of query sets: each as its own search
        scores, slots = torch.func.vmap(lambda a: entry.search(a, keys, 5))(q.unsqueeze(1))
    check_exact((scores.squeeze(1), slots.squeeze(1)), want, f"{backend}: vmap")
