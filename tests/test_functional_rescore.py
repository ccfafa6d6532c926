"""functional.rescore: each step against its definition on hand-checkable rows."""

import pytest
import torch

import product_key_memory.functional as PF


def test_each_step():
    s = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    torch.testing.assert_close(PF.rescore(s), torch.softmax(s, -1))
    torch.testing.assert_close(PF.rescore(s, temperature=0.5), torch.softmax(s * 2, -1))
    torch.testing.assert_close(PF.rescore(s, activation="relu"), torch.tensor([[2.0, 1.0, 0.5, 0.0]]))
    raw = dict(activation="none")
    torch.testing.assert_close(PF.rescore(s, subtract="min", **raw), torch.tensor([[3.0, 2.0, 1.5, 0.0]]))
    torch.testing.assert_close(PF.rescore(s, subtract="mean", **raw), s - 0.625)
    # even length: the lower of the two middle values (torch.median), here 0.5
    torch.testing.assert_close(PF.rescore(s, subtract="median", **raw), s - 0.5)
    torch.testing.assert_close(PF.rescore(s, normalize=True, **raw), s / 4.5)
    w = PF.rescore(s, subtract="mean", normalize=True)
    torch.testing.assert_close(w.abs().sum(-1), torch.ones(1))
    torch.testing.assert_close(w.sum(-1), torch.zeros(1), atol=1e-7, rtol=0)


def test_dtypes_and_validation():
    s = torch.randn(3, 5, dtype=torch.bfloat16)
    assert PF.rescore(s).dtype == torch.float32
    assert PF.rescore(s.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="activation"):
        PF.rescore(s, activation="sigmoid")
    with pytest.raises(ValueError, match="subtract"):
        PF.rescore(s, subtract="max")


def test_gradcheck():
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda t: PF.rescore(t, temperature=0.7, subtract="mean", normalize=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))
