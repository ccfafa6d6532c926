"""TuckerKeys (UltraMem's TDQKR): against a brute-force search over all ``num_keys ** 2`` slots written here."""

import pytest
import torch
from torch.testing import assert_close

from product_key_memory.parts import TuckerKeys

HEADS, NUM_KEYS, DIM_HEAD, TOPK = 2, 12, 6, 5


def brute_force(part: TuckerKeys, queries):
    """Every slot ``i * K + j`` scored ``sum_c r_i^T C_c c_j``; the ``topk`` best, with each core's score."""
    keys = torch.nn.functional.layer_norm(part.keys, (part.dim_head,), part.key_norm.weight, part.key_norm.bias)
    rows = torch.einsum("nhd,hrkd->nhkr", queries[:, :, 0], keys[:, 0])  # (N, H, K, r)
    cols = torch.einsum("nhd,hrkd->nhkr", queries[:, :, 1], keys[:, 1])
    per_core = torch.einsum("nhir,chrs,nhjs->nhijc", rows, part.core, cols).flatten(2, 3)  # (N, H, K*K, C)
    _, slots = per_core.sum(-1).topk(part.topk, dim=-1)
    return per_core.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, part.cores)), slots


def _part(**kwargs):
    part = TuckerKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # signed cores and key-norm weights: scores of both signs
        part.core.normal_()
        part.key_norm.weight.normal_()
        part.key_norm.bias.normal_()
    return part


def _queries(n=64):
    return torch.randn(n, HEADS, 2, DIM_HEAD, dtype=torch.float64)


@pytest.mark.parametrize("cores", [1, 2])
def test_rank_one_core_is_brute_force(cores):
    part = _part(rank=1, cores=cores)
    q = _queries()
    scores, slots = part(q)
    want_scores, want_slots = brute_force(part, q)
    assert torch.equal(slots, want_slots), "rank 1: the same slots as a search over all num_keys ** 2"
    assert_close(scores, want_scores, msg="rank 1: the same per-core scores")


@pytest.mark.parametrize("rank", [2, 3])
def test_full_candidate_grid_is_brute_force_at_any_rank(rank):
    part = _part(rank=rank, cores=2, candidates=NUM_KEYS // 2)  # both ends cover every row and column
    q = _queries()
    scores, slots = part(q)
    want_scores, want_slots = brute_force(part, q)
    assert torch.equal(slots, want_slots)
    assert_close(scores, want_scores)


@pytest.mark.parametrize("first_stage", ["two_sided", "top"])
@pytest.mark.parametrize("rank", [2, 4])
def test_recall_against_brute_force_is_measured(rank, first_stage):
    part = _part(rank=rank, cores=2, first_stage=first_stage)
    q = _queries(256)
    _, slots = part(q)
    _, want = brute_force(part, q)
    recall = (slots.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).double().mean().item()
    print(f"TDQKR rank={rank} {first_stage}: recall@{TOPK} vs brute force over {NUM_KEYS ** 2} slots = {recall:.3f}")
    assert 0.0 < recall <= 1.0
    assert all(s.unique().numel() == TOPK for s in slots.reshape(-1, TOPK)), "a slot twice in one head"


def test_rank_one_vectors_are_the_first_singular_pair():
    part = _part(rank=3, cores=2)
    u, v = part.rank_one()
    total = part.core.sum(0)  # (H, r, r)
    s = torch.linalg.svdvals(total)[:, :1]
    assert_close(torch.einsum("hrs,hs->hr", total, v), s * u, msg="C v = s u")
    assert_close(torch.einsum("hrs,hr->hs", total, u), s * v, msg="C^T u = s v")


def test_aux_loss_is_the_direct_formula():
    part = _part(rank=3, cores=2)
    core = part.core.detach().clone().requires_grad_()
    total = core.sum(0)
    sv = torch.linalg.eigvalsh(total.transpose(-1, -2) @ total).flip(-1).sqrt()  # singular values, descending
    want = torch.clamp(sv[:, 1:] - 0.15, min=0).square().mean()
    got = part.aux_loss()
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, part.core)[0], torch.autograd.grad(want, core)[0], msg="aux loss gradient")
    assert _part(rank=1).aux_loss().item() == 0.0


def test_gradcheck_float64():
    part = TuckerKeys(2, 4, 3, 3, rank=2, cores=2, candidates=2, dtype=torch.float64)  # candidates: half the rows
    q = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [q, part.keys, part.core, part.key_norm.weight]
    assert torch.autograd.gradcheck(lambda *a: part(q)[0], params, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(cores=0), "cores"), (dict(candidates=NUM_KEYS + 1), "candidates"),
    (dict(candidates=2), "topk"), (dict(first_stage="bottom"), "first_stage"), (dict(aux_threshold=0), "aux_threshold"),
])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TuckerKeys(HEADS, NUM_KEYS, DIM_HEAD, TOPK, **kwargs)
