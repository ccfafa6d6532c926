"""The search kernel (:mod:`product_key_memory.ops.search.triton_impl`) against :mod:`reference`.

Without CUDA it runs on CPU tensors under ``TRITON_INTERPRET=1`` (set in tests/ops/conftest.py) at
small shapes chosen to cross its blocks: ``BLOCK_K = 128`` keys and ``BLOCK_D = 64`` features.
Tests marked ``cuda`` repeat them at real sizes on a GPU. Inputs are small integers, so every
score is exact and ties are frequent: slots and scores must equal the reference bit for bit.
"""

import pytest
import torch
from torch.testing import assert_close

from ..._extras import importorskip
importorskip("triton")

from product_key_memory import functional as PF  # noqa: E402
from product_key_memory.ops.search import reference  # noqa: E402
from product_key_memory.ops.search.triton_impl import search  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}


def exact_inputs(N, H, K, d, dtype, lo=-3, hi=3, gen=None):
    """Small-integer queries and keys: every fp32 sum is exact, and ties are frequent."""
    q = torch.randint(lo, hi + 1, (N, 2, H, d), generator=gen).to(dtype).transpose(1, 2)  # (N, H, 2, d), strided
    keys = torch.randint(lo, hi + 1, (H, K, 2, d), generator=gen).to(dtype)
    return q.to(DEVICE), keys.to(DEVICE).transpose(1, 2)  # the module's (H, 2, K, d) view


def check_search(q, keys, topk):
    scores, idx = search(q, keys, topk)
    want_scores, want_idx = reference.brute_force_search(q.cpu(), keys.cpu(), topk)  # all K * K slots
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert scores.shape == idx.shape == (q.shape[0], q.shape[1], topk)
    assert torch.equal(idx.cpu(), want_idx), "slots differ from the tie-rule brute force"
    assert torch.equal(scores.cpu(), want_scores), "scores differ from the brute force"
    two_stage = reference.search(q.cpu(), keys.cpu(), topk)
    assert torch.equal(idx.cpu(), two_stage[1]), "slots differ from reference.search"


@pytest.mark.parametrize(
    "N,H,K,d,topk",
    [
        (3, 2, 5, 3, 1),  # tiny: topk 1, blocks larger than the data
        (4, 3, 20, 5, 7),  # topk not a power of two
        (2, 1, 130, 70, 33),  # crosses BLOCK_K = 128 and BLOCK_D = 64, topk just over 32
        (1, 2, 256, 8, 16),  # K a multiple of BLOCK_K
        (1, 1, 1024, 4, 64),  # the largest table and topk of the contract
        (1, 1, 16, 256, 16),  # d = 256, topk = K
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_search_equals_tie_rule_brute_force(N, H, K, d, topk, dtype):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    check_search(*exact_inputs(N, H, K, d, dtype, gen=gen), topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_ties(dtype):
    """All-zero queries tie every slot: the lowest slots win; duplicated keys tie in pairs."""
    q, keys = exact_inputs(2, 2, 40, 6, dtype)
    check_search(torch.zeros_like(q), keys, 10)
    scores, idx = search(torch.zeros_like(q), keys, 10)
    assert torch.equal(idx.cpu(), torch.arange(10).expand(2, 2, 10)), "all ties: slots 0..9 in order"
    keys_dup = keys[:, :, :4].repeat(1, 1, 10, 1)  # (H, 2, 40, d): every key 10 times
    check_search(q, keys_dup, 25)
    check_search(-torch.zeros_like(q), keys, 10)  # -0.0 scores count as +0.0


def test_search_single_and_many_heads():
    check_search(*exact_inputs(5, 1, 12, 4, torch.float32), 3)
    check_search(*exact_inputs(2, 8, 12, 4, torch.float32), 5)


def test_search_random_matches_functional_fast_path():
    """Random fp32 (no exact ties): the library's own search selects the same slots."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 2, 16, generator=g).to(DEVICE)
    keys = torch.randn(2, 150, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    scores, idx = search(q, keys, 12)
    want_scores, want_idx = PF.product_key_search(q, keys, 12)
    assert torch.equal(idx, want_idx), "slots differ from functional.product_key_search"
    assert_close(scores, want_scores, **TOL[torch.float32], msg="scores")
    ref_scores, ref_idx = reference.search(q.cpu(), keys.cpu(), 12)
    assert torch.equal(idx.cpu(), ref_idx), "slots differ from reference.search"
    assert_close(scores.cpu(), ref_scores, **TOL[torch.float32], msg="scores vs reference.search")


def test_search_empty_and_bad_args():
    q, keys = exact_inputs(0, 2, 10, 4, torch.float32)
    scores, idx = search(q, keys, 3)
    assert scores.shape == idx.shape == (0, 2, 3)
    q, keys = exact_inputs(2, 2, 10, 4, torch.float32)
    with pytest.raises(ValueError, match="topk"):
        search(q, keys, 11)
    with pytest.raises(ValueError, match="keys"):
        search(q, keys[:1], 3)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "K,topk,dtype", [(256, 32, torch.float32), (1024, 32, torch.bfloat16), (512, 64, torch.float16)]
)
def test_cuda_search_real_sizes(K, topk, dtype):
    check_search(*exact_inputs(64, 4, K, 128, dtype, lo=-2, hi=2), topk)
    check_search(*exact_inputs(8, 4, K, 128, dtype, lo=0, hi=0), topk)  # all ties
