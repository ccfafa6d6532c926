"""The tie-ruled top-k: every implementation and every route of the entry against :mod:`reference`.

On equal values the lower index wins. Values are compared exactly (a top-k picks values, it does
not compute them), except that ``-0.0`` and ``+0.0`` are one value.
"""

import pytest
import torch

from product_key_memory.ops import topk as entry
from product_key_memory.ops.topk import export, reference, torch_impl

from ..._extras import given, settings, st
from .._tracing import call_targets

HYP = settings(max_examples=40, deadline=None)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def tied(shape, dtype, levels=4, gen=None):
    """Values from a few levels (``-0.0`` and ``+0.0`` among them): ties in every row."""
    x = torch.randint(-levels, levels + 1, shape, generator=gen).to(dtype) / 2
    return torch.where(torch.rand(shape, generator=gen) < 0.2, -0.0, x).to(dtype)


def distinct_index(shape, gen=None):
    """Distinct ints in ``[0, 2 ** 32)`` per row, not in position order."""
    n = shape[-1]
    base = torch.randint(0, 2**32 - 2**16, (*shape[:-1], 1), generator=gen)
    perm = torch.rand(shape, generator=gen).argsort(-1) * 7  # distinct, and spread out
    return base - base % 8 + perm


def check(got, want, what):
    (gv, gi), (wv, wi) = got, want
    assert gi.dtype == torch.long, f"{what}: index dtype {gi.dtype}"
    assert torch.equal(gi, wi), f"{what}: indices differ from the reference\n{gi}\n{wi}"
    assert gv.dtype == wv.dtype, f"{what}: values dtype {gv.dtype}, want {wv.dtype}"
    assert torch.equal(gv, wv), f"{what}: values differ from the reference"


def implementations(x, k, index):
    """``name -> (values, indices)`` for every implementation that takes ``x``."""
    out = {"export": export.topk_lower_index(x, k, index), "entry": entry.topk_lower_index(x, k, index)}
    if x.dtype != torch.float64:
        out["torch_impl.topk_keyed"] = torch_impl.topk_keyed(x, k, index)
    if x.dtype == torch.float32 and k < x.shape[-1] and x.numel() > 0:  # its preconditions
        out["torch_impl.topk_distinct_first"] = torch_impl.topk_distinct_first(x, k, index)
        v, i = torch_impl.topk_distinct_first(x, k, index, wide=True)
        out["torch_impl.topk_distinct_first(wide)"] = (v[..., :k], i[..., :k])
    return out


@HYP
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    n=st.integers(1, 40),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    with_index=st.booleans(),
    levels=st.sampled_from([0, 2, 50, 10**6]),
    seed=st.integers(0, 2**16),
)
def test_every_implementation_equals_reference(lead, n, k_frac, dtype, with_index, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(k_frac * n))
    x = tied((*lead, n), dtype, levels, gen)
    index = distinct_index((*lead, n), gen) if with_index else None
    want = reference.topk_lower_index(x, k, index)
    assert want[0].shape == want[1].shape == (*lead, k)
    for name, got in implementations(x, k, index).items():
        check(got, want, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [False, True])
def test_all_equal_row_takes_the_lowest_indices(dtype, with_index):
    x = torch.zeros(3, 10, dtype=dtype)
    x[1] = -0.0  # -0.0 ties with +0.0
    x[2, ::2] = -0.0
    index = torch.arange(10).flip(0).expand(3, 10) * 5 + 3 if with_index else None
    want_index = torch.arange(4) if index is None else index[0].sort().values[:4]
    for name, (v, i) in implementations(x, 4, index).items():
        assert torch.equal(i, want_index.expand(3, 4)), f"{name}: {i}"
        assert torch.equal(v, torch.zeros(3, 4, dtype=dtype)), name


def test_wide_answer_holds_k_plus_one_best_first():
    x = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.0]])
    v, i = torch_impl.topk_distinct_first(x, 2, None, wide=True)
    assert v.shape[-1] in (2, 3)
    assert torch.equal(i[..., :2], torch.tensor([[1, 3]]))
    v, i = entry.topk_lower_index(x, 2, wide=True)
    assert torch.equal(i[..., :2], torch.tensor([[1, 3]])) and torch.equal(v[..., :2], torch.tensor([[3.0, 2.0]]))


# -- the entry's routes -------------------------------------------------------------------------------


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(f"{module.__name__}.{name}") or real(*a, **k))


@pytest.fixture
def routes(monkeypatch):
    calls = []
    _spy(monkeypatch, entry, "topk_distinct_first", calls)
    _spy(monkeypatch, entry, "topk_keyed", calls)
    _spy(monkeypatch, entry.reference, "topk_lower_index", calls)
    _spy(monkeypatch, entry.export, "topk_lower_index", calls)
    return calls


@pytest.mark.parametrize(
    "dtype, grad, want",
    [
        (torch.float32, False, "topk_distinct_first"),
        (torch.bfloat16, False, "topk_keyed"),
        (torch.float64, False, "reference.topk_lower_index"),
        (torch.float32, True, "reference.topk_lower_index"),
    ],
)
def test_entry_routes(routes, dtype, grad, want):
    x = tied((4, 12), dtype).requires_grad_(grad)
    got = entry.topk_lower_index(x, 5)
    assert routes and routes[0].endswith(want), routes
    check(tuple(t.detach() for t in got), reference.topk_lower_index(x.detach(), 5), want)


def test_entry_gradient_is_the_reference_gather():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad(entry.topk_lower_index(x, 4)[0], x, up)
    (want,) = torch.autograd.grad(reference.topk_lower_index(x, 4)[0], x, up)
    assert torch.equal(g, want)
    assert torch.autograd.gradcheck(lambda t: entry.topk_lower_index(t, 4)[0], (x,))


@pytest.mark.parametrize("with_index", [False, True])
def test_compiled_entry_keeps_the_tie_rule(routes, with_index):
    x = tied((5, 16), torch.float32, 2)
    index = distinct_index((5, 16)) if with_index else None
    compiled = torch.compile(entry.topk_lower_index, backend="eager", fullgraph=True)
    check(compiled(x, 6, index), reference.topk_lower_index(x, 6, index), "compiled")
    assert "topk_distinct_first" not in " ".join(routes), "a data-dependent branch under torch.compile"


class _TopK(torch.nn.Module):
    def forward(self, x, index=None):
        return entry.topk_lower_index(x, 6, index)


@pytest.mark.parametrize("with_index", [False, True])
def test_exported_entry_keeps_the_tie_rule(with_index):
    x = tied((5, 16), torch.float32, 2)
    index = distinct_index((5, 16)) if with_index else None
    ep = torch.export.export(_TopK(), (x,) if index is None else (x, index))
    assert not any(t.startswith("pkm.") for t in call_targets(ep.graph_module))
    assert "aten.sort.stable" not in call_targets(ep.graph_module), "ONNX has no stable sort"
    other = tied((5, 16), torch.float32, 1, torch.Generator().manual_seed(1))  # other ties, same graph
    for t in (x, other):
        got = ep.module()(t) if index is None else ep.module()(t, index)
        check(got, reference.topk_lower_index(t, 6, index), "exported")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [5, 40])
def test_entry_keeps_the_tie_rule_for_indices_past_32_bits(dtype, width):
    # the slots of a search with num_keys > 65536 (which ProductKeys refuses) and any index a caller passes
    gen = torch.Generator().manual_seed(0)
    x = tied((3, width), dtype, levels=1, gen=gen)
    index = torch.randperm(width, generator=gen).expand(3, -1) * 70001 + torch.tensor([[0], [2**32 - 5], [5 * 2**32]])
    want = reference.topk_lower_index(x, 4, index)
    check(entry.topk_lower_index(x, 4, index), want, "entry")
    check(export.topk_lower_index(x, 4, index), want, "export")


def with_non_finite(shape, dtype, gen):
    """Tied values with NaN (both signs, two payloads), +inf and -inf mixed in."""
    x = tied(shape, dtype, levels=2, gen=gen).float()
    pick = torch.randint(0, 8, shape, generator=gen)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan")])
    x = torch.where(pick < 4, specials[pick.clamp(max=3)], x)
    bits = x.view(torch.int32)
    x = torch.where((pick == 2) & (torch.rand(shape, generator=gen) < 0.5), (bits | 0x1234).view(torch.float32), x)
    return x.to(dtype)


def check_nan(got, want, what):
    (gv, gi), (wv, wi) = got, want
    assert torch.equal(gi, wi), f"{what}: indices differ from the reference\n{gi}\n{wi}"
    assert gv.dtype == wv.dtype and torch.equal(gv.isnan(), wv.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(gv.nan_to_num(0.0), wv.nan_to_num(0.0)), f"{what}: values differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [False, True])
def test_non_finite_rule_every_implementation_equals_reference(dtype, with_index):
    gen = torch.Generator().manual_seed(1)
    x = with_non_finite((6, 17), dtype, gen)
    index = distinct_index((6, 17), gen) if with_index else None
    for k in (1, 5, 16, 17):
        want = reference.topk_lower_index(x, k, index)
        for name, got in implementations(x, k, index).items():
            if name != "export":  # the exportable top-k is for exported searches, whose scores are finite
                check_nan(got, want, f"{name}, k={k}")


def test_non_finite_rule_nan_ranks_below_minus_inf_and_nans_are_equal():
    nan, inf = float("nan"), float("inf")
    neg_nan = torch.tensor(nan).neg().item()
    x = torch.tensor([[nan, -inf, 1.0, neg_nan, inf, -0.0, 0.0, nan]])
    values, idx = reference.topk_lower_index(x, 8)
    assert idx.tolist() == [[4, 2, 5, 6, 1, 0, 3, 7]]  # +inf, numbers, -inf, then every NaN by index
    for dtype in DTYPES:
        check_nan(entry.topk_lower_index(x.to(dtype), 6), reference.topk_lower_index(x.to(dtype), 6), str(dtype))


def test_an_index_bound_spares_the_range_check(monkeypatch):
    # the search and the KNN memory know their slots' bound: no read back to the host (a sync on a GPU)
    import product_key_memory.ops.topk as topk_entry

    calls = []
    real = topk_entry._fits_32_bits
    monkeypatch.setattr(topk_entry, "_fits_32_bits", lambda index: calls.append(1) or real(index))
    x = torch.randn(3, 40)
    index = torch.randperm(40).expand(3, 40).contiguous()
    want = topk_entry.reference.topk_lower_index(x, 5, index)
    got = topk_entry.topk_lower_index(x, 5, index, index_bound=40)
    assert calls == [] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    topk_entry.topk_lower_index(x, 5, index)
    assert calls == [1]
    topk_entry.topk_lower_index(x, 5, index, index_bound=2**33)  # a bound past 32 bits: checked
    assert calls == [1, 1]
