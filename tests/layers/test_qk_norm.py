"""qk-norm: normalised half-queries and sub-keys (arXiv 2412.09764), a parameter-free PKM option."""

import pytest
import torch

from product_key_memory import PKM
from product_key_memory import functional as PF

SIZES = dict(heads=2, num_keys=8, topk=4, dim_head=8)
DIM = 16


def test_scores_are_scaled_cosines():
    q = torch.randn(5, 2, 2, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    scores = PF.subkey_scores(*PF.qk_normalize(q, k))
    cos = torch.nn.functional.cosine_similarity(q.unsqueeze(-2), k, dim=-1)  # (5, 2, 2, 7)
    torch.testing.assert_close(scores, cos * 8**0.5)


def test_low_precision_inputs_are_normalised_in_float32():
    q, k = torch.randn(3, 2, 2, 8).bfloat16(), torch.randn(2, 2, 7, 8).bfloat16()
    nq, nk = PF.qk_normalize(q, k)
    assert nq.dtype == nk.dtype == torch.float32
    torch.testing.assert_close(nq, PF.qk_normalize(q.float(), k.float())[0], rtol=0, atol=0)


def test_gradcheck():
    q = torch.randn(3, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: PF.subkey_scores(*PF.qk_normalize(q, k)), (q, k))


def test_search_is_the_brute_force_search_of_normalised_queries_and_keys():
    pkm = PKM(DIM, qk_norm=True, **SIZES)
    q = pkm.queries(torch.randn(20, DIM))
    weights, indices = pkm.search(q)
    scores, expected = PF.brute_force_search(*PF.qk_normalize(q, pkm.keys.transpose(1, 2)), SIZES["topk"])
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)
    torch.testing.assert_close(weights, scores.softmax(-1))


def test_output_ignores_the_scale_of_the_keys():
    pkm = PKM(DIM, qk_norm=True, **SIZES)
    x = torch.randn(4, 6, DIM)
    out = pkm(x)
    with torch.no_grad():
        pkm.keys.mul_(3.0)
    torch.testing.assert_close(pkm(x), out)


def test_state_dict_is_unchanged():
    plain, normed = PKM(DIM, **SIZES), PKM(DIM, qk_norm=True, **SIZES)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in normed.state_dict().items()}
    normed.load_state_dict(plain.state_dict(), strict=True)
    assert "qk_norm" not in repr(plain) and "qk_norm=True" in repr(normed)


def test_qk_norm_must_be_a_bool():
    with pytest.raises(TypeError, match="qk_norm"):
        PKM(DIM, qk_norm=1, **SIZES)
