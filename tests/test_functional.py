import pytest
import torch

from product_key_memory import functional as PF

from ._extras import given, settings, st


def random_search_inputs(lead, heads, num_keys, dim_key, dtype=torch.float64):
    queries = torch.randn(*lead, heads, 2, dim_key, dtype=dtype)
    keys = torch.randn(heads, 2, num_keys, dim_key, dtype=dtype)
    return queries, keys


@pytest.mark.parametrize("topk", [1, 2, 3, 5, 8, 13, 32, 64])
def test_candidate_pairs_are_exactly_the_pairs_that_can_win(topk):
    pairs = PF.candidate_pairs(topk)
    got = set(map(tuple, pairs.t().tolist()))
    want = {(a, b) for a in range(topk) for b in range(topk) if (a + 1) * (b + 1) <= topk}
    assert got == want
    assert len(got) == pairs.shape[1]


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    heads=st.integers(1, 3),
    num_keys=st.integers(1, 24),
    dim_key=st.integers(1, 6),
    data=st.data(),
)
def test_two_stage_search_equals_brute_force(lead, heads, num_keys, dim_key, data):
    topk = data.draw(st.integers(1, num_keys))
    queries, keys = random_search_inputs(lead, heads, num_keys, dim_key)
    want_scores, want_slots = PF.brute_force_search(queries, keys, topk)
    for search in (PF.product_topk, PF.product_topk_reference):
        scores, slots = search(PF.subkey_scores(queries, keys), topk)
        assert scores.shape == slots.shape == (*lead, heads, topk)
        torch.testing.assert_close(scores, want_scores, rtol=0, atol=0, msg=search.__name__)
        assert torch.equal(slots, want_slots), search.__name__


def test_search_slot_numbering_and_scores_are_what_they_claim():
    queries, keys = random_search_inputs((5,), 2, 7, 3)
    scores, slots = PF.product_key_search(queries, keys, 4)
    i1, i2 = slots // 7, slots % 7
    for n in range(5):
        for h in range(2):
            direct = queries[n, h, 0] @ keys[h, 0, i1[n, h]].t() + queries[n, h, 1] @ keys[h, 1, i2[n, h]].t()
            torch.testing.assert_close(scores[n, h], direct)


def test_search_gradient_equals_reference_gradient():
    queries, keys = random_search_inputs((6,), 2, 10, 4)
    queries.requires_grad_()
    keys.requires_grad_()
    grads = []
    for search in (PF.product_topk, PF.product_topk_reference):
        scores, _ = search(PF.subkey_scores(queries, keys), 5)
        grads.append(torch.autograd.grad((scores * torch.arange(5.0, dtype=scores.dtype)).sum(), (queries, keys)))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref)


def test_search_gradcheck_float64():
    queries, keys = random_search_inputs((3,), 2, 6, 3)
    queries.requires_grad_()
    keys.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: PF.product_key_search(q, k, 3)[0], (queries, keys))


def test_subkey_scores_stay_float32_under_autocast():
    queries = torch.randn(4, 2, 2, 8)
    keys = torch.randn(2, 2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sub = PF.subkey_scores(queries.bfloat16(), keys)
    assert sub.dtype == torch.float32
    torch.testing.assert_close(sub, PF.subkey_scores(queries.bfloat16().float(), keys))


def read_inputs(lead=(4, 3), m=5, slots=20, dim=6, dtype=torch.float64):
    values = torch.randn(slots, dim, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, slots, (*lead, m))
    weights = torch.randn(*lead, m, dtype=dtype, requires_grad=True)
    return values, indices, weights


@pytest.mark.parametrize("lead", [(), (0,), (7,), (2, 3)])
@pytest.mark.parametrize("weighted", [True, False])
def test_value_read_equals_reference_with_gradients(lead, weighted):
    values, indices, weights = read_inputs(lead)
    w = weights if weighted else None
    out = PF.value_read(values, indices, w)
    ref = PF.value_read_reference(values, indices, w)
    assert out.shape == (*lead, 6)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    inputs = (values, weights) if weighted else (values,)
    fast = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    slow = torch.autograd.grad(ref, inputs, grad_out, allow_unused=True)
    for name, a, b in zip(("values", "weights"), fast, slow):
        torch.testing.assert_close(a, b, msg=name)


def test_value_read_is_the_weighted_sum_of_rows():
    values, indices, weights = read_inputs((3,), m=4)
    out = PF.value_read(values, indices, weights)
    for n in range(3):
        want = sum(weights[n, j] * values[indices[n, j]] for j in range(4))
        torch.testing.assert_close(out[n], want)


@pytest.mark.parametrize("read", [PF.value_read, PF.value_read_reference])
def test_trainable_rows_only_learn(read):
    values, indices, weights = read_inputs((8,), m=6)
    trainable = torch.rand(20) < 0.5
    out = read(values, indices, weights, trainable=trainable)
    torch.testing.assert_close(out, PF.value_read_reference(values, indices, weights))
    grad_out = torch.randn_like(out)
    g_values, g_weights = torch.autograd.grad(out, (values, weights), grad_out)
    full_values, full_weights = torch.autograd.grad(PF.value_read_reference(values, indices, weights), (values, weights), grad_out)
    assert torch.all(g_values[~trainable] == 0)
    torch.testing.assert_close(g_values[trainable], full_values[trainable])
    torch.testing.assert_close(g_weights, full_weights)


def test_value_read_sparse_gradient_holds_the_dense_gradient():
    values, indices, weights = read_inputs((5,), m=3)
    out = PF.value_read(values, indices, weights, sparse=True)
    out.sum().backward()
    assert values.grad.is_sparse
    dense = torch.autograd.grad(PF.value_read_reference(values, indices, weights).sum(), values)[0]
    torch.testing.assert_close(values.grad.to_dense(), dense)


def test_value_read_gradcheck_float64():
    values, indices, weights = read_inputs((3,), m=4)
    assert torch.autograd.gradcheck(lambda v, w: PF.value_read(v, indices, w), (values, weights))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(values=torch.randn(3)), "values must be a"),
        (dict(weights=torch.randn(2, 2)), "weights must have the shape"),
        (dict(trainable=torch.ones(5, dtype=torch.bool)), "trainable must be a bool tensor of shape"),
        (dict(trainable=torch.ones(20)), "trainable must be a bool tensor"),
    ],
)
def test_value_read_rejects_bad_arguments(kwargs, match):
    args = dict(values=torch.randn(20, 4), indices=torch.zeros(3, 2, dtype=torch.long), weights=torch.ones(3, 2))
    args.update(kwargs)
    for read in (PF.value_read, PF.value_read_reference):
        with pytest.raises(ValueError, match=match):
            read(args["values"], args["indices"], args["weights"], trainable=args.get("trainable"))
