"""The TDQKR search op: :mod:`.reference` against a brute force over all slots, :mod:`.torch_impl` and the
entry against :mod:`.reference` (slots, per-core scores and every gradient)."""

import pytest
import torch
from torch.testing import assert_close

from product_key_memory.ops import use_backend
from product_key_memory.ops.tucker_search import tucker_search
from product_key_memory.ops.tucker_search import reference, torch_impl

HEADS, NUM_KEYS, DIM = 2, 12, 6


def _inputs(rank, cores, n=40, dtype=torch.float64, lead=()):
    q = torch.randn(*lead, n, HEADS, 2, DIM, dtype=dtype, requires_grad=True)
    keys = torch.randn(HEADS, 2, rank, NUM_KEYS, DIM, dtype=dtype, requires_grad=True)
    core = torch.randn(cores, HEADS, rank, rank, dtype=dtype, requires_grad=True)  # signed: scores of both signs
    return q, keys, core


def brute_force(q, keys, core, topk):
    """Every slot ``i * K + j`` scored ``sum_c r_i^T C_c c_j``; the ``topk`` best, with each core's score."""
    rows = torch.einsum("nhd,hrkd->nhkr", q[:, :, 0], keys[:, 0])  # (N, H, K, r)
    cols = torch.einsum("nhd,hrkd->nhkr", q[:, :, 1], keys[:, 1])
    per_core = torch.einsum("nhir,chrs,nhjs->nhijc", rows, core, cols).flatten(2, 3)  # (N, H, K*K, C)
    _, slots = per_core.sum(-1).topk(topk, dim=-1)
    return per_core.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, core.shape[0])), slots


@pytest.mark.parametrize("cores", [1, 2])
def test_reference_rank_one_is_brute_force(cores):
    q, keys, core = _inputs(1, cores)
    scores, slots = reference.tucker_search(q, keys, core, 5, candidates=5)
    want_scores, want_slots = brute_force(q, keys, core, 5)
    assert torch.equal(slots, want_slots), "rank 1, two-sided: the search over all num_keys ** 2 slots"
    assert_close(scores, want_scores)


def _compare(got, want, params, what):
    (gs, gi), (ws, wi) = got, want
    assert torch.equal(gi, wi), f"{what}: slots"
    assert_close(gs, ws, msg=f"{what}: per-core scores")
    probe = torch.randn_like(ws)
    # float32: the gradients sum the same terms in another order (each core's over N * topk picks)
    tol = {} if ws.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, a, b in zip(("queries", "keys", "core"), torch.autograd.grad((gs * probe).sum(), params),
                          torch.autograd.grad((ws * probe).sum(), params)):
        assert_close(a, b, msg=f"{what}: gradient of {name}", **tol)


@pytest.mark.parametrize("rank, cores, topk, candidates, first_stage", [
    (1, 2, 5, 5, "two_sided"),
    (2, 2, 5, 5, "two_sided"),  # 2 * 5 of 12 rows: the two ends
    (3, 1, 4, 6, "two_sided"),  # both ends cover every row
    (2, 2, 5, 5, "top"),
    (4, 3, 7, 3, "top"),  # topk close to candidates ** 2
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_impl_is_the_reference(rank, cores, topk, candidates, first_stage, dtype):
    q, keys, core = _inputs(rank, cores, dtype=dtype)
    got = torch_impl.tucker_search(q, keys, core, topk, candidates=candidates, first_stage=first_stage)
    want = reference.tucker_search(q, keys, core, topk, candidates=candidates, first_stage=first_stage)
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype == torch.long
    _compare(got, want, (q, keys, core), f"{dtype} rank {rank} {first_stage}")


def test_entry_any_leading_dims_and_routes():
    q, keys, core = _inputs(2, 2, n=5, lead=(3,))
    got = tucker_search(q, keys, core, 4, candidates=4)
    assert got[0].shape == (3, 5, HEADS, 4, 2) and got[1].shape == (3, 5, HEADS, 4)
    with use_backend("reference"):
        want = tucker_search(q, keys, core, 4, candidates=4)
    _compare(got, want, (q, keys, core), "entry vs use_backend('reference')")


def test_entry_under_torch_func_grad_is_the_reference():
    q, keys, core = _inputs(2, 2, n=6)
    q = q.detach()

    def loss(c):
        return tucker_search(q, keys.detach(), c, 3, candidates=3)[0].square().sum()

    want = torch.autograd.grad(loss(core), core)[0]
    assert_close(torch.func.grad(loss)(core.detach()), want)


def test_gradcheck_float64():
    q = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    core = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: tucker_search(*a, 3, candidates=2)[0], (q, keys, core),
                                    eps=1e-6, atol=1e-5, fast_mode=True)


def test_empty_batch():
    q, keys, core = _inputs(2, 2, n=0)
    scores, slots = tucker_search(q, keys, core, 3, candidates=3)
    assert scores.shape == (0, HEADS, 3, 2) and slots.shape == (0, HEADS, 3)
