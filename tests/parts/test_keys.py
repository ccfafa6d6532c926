"""ProductKeys on its own: its search equals scoring every one of the ``num_keys ** 2`` slots.

The reference below is written out here and shares no code with the library: each slot
``i1 * num_keys + i2`` is scored by the sum of the two half dot products, and a stable sort
keeps the lower slot first on ties.
"""

import math

import pytest
import torch
from torch.func import functional_call

import product_key_memory.ops.search as search_op
from product_key_memory import ProductKeys

HEADS, NUM_KEYS, DIM_HEAD, TOPK = 2, 8, 4, 5

# scores are computed in float32 (float64 for float64) from the keys' and queries' values
SCORE_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def brute_force(queries, keys, topk):
    """``queries (..., heads, 2, d)``, ``keys (heads, num_keys, 2, d)`` -> ``scores, slots (..., heads, topk)``."""
    dtype = SCORE_DTYPE[torch.promote_types(queries.dtype, keys.dtype)]
    q, k = queries.to(dtype), keys.to(dtype)
    s1 = torch.einsum("...hd,hkd->...hk", q[..., 0, :], k[:, :, 0])  # (..., heads, num_keys)
    s2 = torch.einsum("...hd,hkd->...hk", q[..., 1, :], k[:, :, 1])
    slot_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., heads, num_keys ** 2)
    order = torch.sort(slot_scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    return slot_scores.gather(-1, order), order


def check_search(got, want, dtype, what):
    (scores, slots), (want_scores, want_slots) = got, want
    assert slots.dtype == torch.long, f"{what}: slots are {slots.dtype}"
    assert scores.dtype == SCORE_DTYPE[dtype], f"{what}: scores are {scores.dtype} for {dtype} keys"
    assert torch.equal(slots, want_slots), f"{what}: slots differ from the brute-force search"
    torch.testing.assert_close(scores, want_scores, **TOL[scores.dtype], msg=f"{what}: scores")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("lead", [(7,), (2, 3), ()], ids=["N", "B,T", "one"])
def test_search_equals_brute_force(dtype, grad, lead):
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK, dtype=dtype)
    queries = torch.randn(*lead, HEADS, 2, DIM_HEAD, dtype=dtype)
    with torch.set_grad_enabled(grad):
        got = keys(queries)
    assert got[0].shape == got[1].shape == (*lead, HEADS, TOPK)
    check_search(got, brute_force(queries, keys.keys.detach(), TOPK), dtype, f"{dtype}, lead {lead}")


@pytest.mark.parametrize("topk", [1, 3, NUM_KEYS])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_ties_go_to_the_lower_slot(topk, grad):
    # small integer keys and queries: every score is exact and most slots share a score with others
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, topk)
    with torch.no_grad():
        keys.keys.copy_(torch.randint(-1, 2, keys.keys.shape))
    queries = torch.randint(-1, 2, (40, HEADS, 2, DIM_HEAD)).float()
    want = brute_force(queries, keys.keys.detach(), topk)
    beyond = brute_force(queries, keys.keys.detach(), topk + 1)[0]
    assert (beyond[..., topk - 1] == beyond[..., topk]).any(), "the test data has no tie across the top-k boundary"
    with torch.set_grad_enabled(grad):
        got = keys(queries)
    assert torch.equal(got[1], want[1]), "tied slots are not in the order lower slot first"
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, msg="scores of integer data are not exact")


def test_qk_norm_searches_normalised_queries_and_scaled_keys():
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK, qk_norm=True)
    queries = torch.randn(9, HEADS, 2, DIM_HEAD) * 3
    k = keys.keys.detach()
    want = brute_force(
        queries / queries.norm(dim=-1, keepdim=True),
        k / k.norm(dim=-1, keepdim=True) * math.sqrt(DIM_HEAD),
        TOPK,
    )
    check_search(keys(queries), want, torch.float32, "qk_norm")
    # scores are sqrt(dim_head) * (cos + cos): bounded by 2 * sqrt(dim_head) whatever the scale of the input
    assert keys(queries * 1e3)[0].abs().max() <= 2 * math.sqrt(DIM_HEAD) + 1e-4


@pytest.mark.parametrize("init, draw", [
    ("normal", lambda t: t.normal_(std=DIM_HEAD**-0.5)),
    ("uniform", lambda t: t.uniform_(-(DIM_HEAD**-0.5), DIM_HEAD**-0.5)),
])
def test_inits_and_reset_parameters(init, draw):
    torch.manual_seed(3)
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK, init=init, dtype=torch.float64)
    torch.manual_seed(3)
    want = draw(torch.empty(HEADS, NUM_KEYS, 2, DIM_HEAD, dtype=torch.float64))
    assert keys.keys.shape == (HEADS, NUM_KEYS, 2, DIM_HEAD) and keys.keys.dtype == torch.float64
    torch.testing.assert_close(keys.keys.detach(), want, rtol=0, atol=0, msg=f"{init} init is not the documented draw")
    if init == "uniform":
        assert keys.keys.abs().max() <= DIM_HEAD**-0.5, "uniform keys outside +-dim_head ** -0.5"

    with torch.no_grad():
        keys.keys.zero_()
    torch.manual_seed(4)
    keys.reset_parameters()
    torch.manual_seed(4)
    want = draw(torch.empty_like(want))
    torch.testing.assert_close(keys.keys.detach(), want, rtol=0, atol=0, msg="reset_parameters is not a fresh draw")
    assert keys.keys.requires_grad, "reset_parameters changed requires_grad"


def test_freeze_keys_get_no_gradient_queries_do():
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK, freeze=True)
    assert keys.freeze and not keys.keys.requires_grad
    assert "freeze=True" in repr(keys)
    queries = torch.randn(6, HEADS, 2, DIM_HEAD, requires_grad=True)
    scores, slots = keys(queries)
    check_search((scores, slots), brute_force(queries.detach(), keys.keys.detach(), TOPK), torch.float32, "frozen")
    scores.sum().backward()
    assert keys.keys.grad is None, "frozen keys got a gradient"
    assert queries.grad is not None and queries.grad.abs().sum() > 0, "queries of frozen keys got no gradient"
    keys.keys.requires_grad_(True)
    assert not keys.freeze, "freeze does not follow keys.requires_grad"


@pytest.mark.parametrize("qk_norm", [False, True])
def test_gradcheck_scores_wrt_queries_and_keys(qk_norm):
    keys = ProductKeys(2, 5, 3, 3, qk_norm=qk_norm, dtype=torch.float64)
    queries = torch.randn(4, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    k = keys.keys.detach().clone().requires_grad_(True)

    def scores(q, k):
        return functional_call(keys, {"keys": k}, (q,))[0]

    assert torch.autograd.gradcheck(scores, (queries, k), eps=1e-6, atol=1e-8)


def test_scores_gradient_equals_brute_force_gradient():
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK, dtype=torch.float64)
    queries = torch.randn(5, HEADS, 2, DIM_HEAD, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, HEADS, TOPK, dtype=torch.float64)
    got = torch.autograd.grad((keys(queries)[0] * g).sum(), (queries, keys.keys))
    want = torch.autograd.grad((brute_force(queries, keys.keys, TOPK)[0] * g).sum(), (queries, keys.keys))
    for name, a, b in zip(("queries", "keys"), got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=f"gradient of {name}")


def test_gumbel_noise_is_added_to_subkey_scores_in_training_only(monkeypatch):
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK)
    queries = torch.randn(6, HEADS, 2, DIM_HEAD)
    noise = torch.randn(6, HEADS, 2, NUM_KEYS)  # known noise in place of the Gumbel draw
    calls = []

    def fixed_noise(sub):
        calls.append(sub.shape)
        return noise.clone()

    monkeypatch.setattr(search_op, "gumbel_noise_like", fixed_noise)
    plain = brute_force(queries, keys.keys.detach(), TOPK)

    keys.eval()
    state = torch.get_rng_state()
    check_search(keys(queries, gumbel_noise_scale=0.7), plain, torch.float32, "eval ignores the noise scale")
    assert not calls and torch.equal(torch.get_rng_state(), state), "eval drew noise"

    keys.train()
    check_search(keys(queries, gumbel_noise_scale=0.0), plain, torch.float32, "scale 0 in training")
    assert not calls, "scale 0 drew noise"
    # the noisy search is the brute force over sub-key scores + scale * noise
    k = keys.keys.detach()
    s1 = torch.einsum("nhd,hkd->nhk", queries[:, :, 0], k[:, :, 0]) + 0.7 * noise[:, :, 0]
    s2 = torch.einsum("nhd,hkd->nhk", queries[:, :, 1], k[:, :, 1]) + 0.7 * noise[:, :, 1]
    slot_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    order = torch.sort(slot_scores, dim=-1, descending=True, stable=True).indices[..., :TOPK]
    with torch.no_grad():
        got = keys(queries, gumbel_noise_scale=0.7)
    assert calls == [(6, HEADS, 2, NUM_KEYS)], f"noise drawn as {calls}"
    check_search(got, (slot_scores.gather(-1, order), order), torch.float32, "gumbel noise in training")


def test_real_gumbel_noise_changes_the_search_in_training():
    keys = ProductKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK).train()
    queries = torch.randn(32, HEADS, 2, DIM_HEAD)
    _, slots = keys(queries, gumbel_noise_scale=5.0)
    assert not torch.equal(slots, keys(queries)[1]), "Gumbel noise of scale 5 changed no slot"


def test_differentiable_topk_passes_gradient_to_unselected_subkeys():
    hard = ProductKeys(1, NUM_KEYS, DIM_HEAD, 3)
    soft = ProductKeys(1, NUM_KEYS, DIM_HEAD, 3, differentiable_topk=True)
    soft.load_state_dict(hard.state_dict())
    # small scores keep the coordinate-descent gates off saturation, so their gradient is not 0
    queries = 0.1 * torch.randn(2, 1, 2, DIM_HEAD)
    got, want = soft(queries), hard(queries)
    check_search(got, want, torch.float32, "differentiable_topk forward")
    got[0].sum().backward()
    want[0].sum().backward()
    # a sub-key's gradient is sum over tokens of d(scores)/d(its sub-score) * half-query
    selected = hard.keys.grad.abs().sum(-1) > 0  # (1, num_keys, 2)
    assert selected.sum(1).le(2 * 3).all(), "the hard search sent gradient beyond its top-k sub-keys"
    soft_reached = soft.keys.grad.abs().sum(-1) > 0
    assert (soft_reached & ~selected).any(), "differentiable_topk sent no gradient to an unselected sub-key"


@pytest.mark.xfail(strict=True, reason="colt5_attention's topk breaks ties by torch.topk, not lower slot first")
def test_differentiable_topk_ties_go_to_the_lower_slot():
    keys = ProductKeys(1, 6, 3, 4, differentiable_topk=True)
    with torch.no_grad():
        keys.keys.copy_(torch.randint(-1, 2, keys.keys.shape))
    queries = torch.randint(-1, 2, (20, 1, 2, 3)).float()
    assert torch.equal(keys(queries)[1], brute_force(queries, keys.keys.detach(), 4)[1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(heads=0), ValueError, r"^heads must be a positive int, got 0"),
    (dict(num_keys=2.0), ValueError, r"^num_keys must be a positive int, got 2.0"),
    (dict(dim_head=True), ValueError, r"^dim_head must be a positive int, got True"),
    (dict(topk=-1), ValueError, r"^topk must be a positive int, got -1"),
    (dict(topk=NUM_KEYS + 1), ValueError, rf"^topk must be at most num_keys={NUM_KEYS}, got topk={NUM_KEYS + 1}"),
    (dict(init="xavier"), ValueError, r"^init / PKM's key_init must be one of \('normal', 'uniform'\), got 'xavier'"),
    (dict(freeze=1), TypeError, r"^freeze / PKM's freeze_keys must be a bool, got 1"),
    (dict(qk_norm="yes"), TypeError, r"^qk_norm must be a bool, got 'yes'"),
    (dict(differentiable_topk=None), TypeError, r"^differentiable_topk must be a bool, got None"),
])
def test_argument_errors_name_the_argument(kwargs, error, match):
    sizes = dict(heads=HEADS, num_keys=NUM_KEYS, dim_head=DIM_HEAD, topk=TOPK)
    with pytest.raises(error, match=match):
        ProductKeys(**{**sizes, **{k: v for k, v in kwargs.items() if k in sizes}},
                    **{k: v for k, v in kwargs.items() if k not in sizes})


def test_extra_repr_shows_sizes_and_changed_options():
    assert repr(ProductKeys(2, 8, 4, 5)) == "ProductKeys(heads=2, num_keys=8, dim_head=4, topk=5)"
    assert repr(ProductKeys(2, 8, 4, 5, init="uniform", qk_norm=True)).endswith("init='uniform', qk_norm=True)")
    assert ProductKeys(2, 8, 4, 5).num_slots == 64


def test_product_keys_refuse_num_keys_past_the_limit_of_every_backend():
    from product_key_memory.ops.search import MAX_NUM_KEYS

    assert MAX_NUM_KEYS == 65536
    with pytest.raises(ValueError, match=r"num_keys must be at most 65536 .* got num_keys=65537"):
        ProductKeys(heads=1, num_keys=65537, dim_head=1, topk=1, device="meta")
    ProductKeys(heads=1, num_keys=65536, dim_head=1, topk=1, device="meta")  # the limit itself is held
