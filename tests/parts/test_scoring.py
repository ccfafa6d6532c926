"""Scoring on its own: slot scores -> weights, against functional.rescore written out plainly here."""

import pytest
import torch

from product_key_memory import Scoring

# weights are float32 for every input below float64; float64 stays float64
OUT_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64,
             torch.bfloat16: torch.float32, torch.float16: torch.float32}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


def rescore(scores, temperature, activation, subtract, normalize):
    """Temperature, activation, subtract, normalize, in that order (arXiv 1907.05242's reference code)."""
    s = scores.to(OUT_DTYPE[scores.dtype]) / temperature
    if activation == "softmax":
        e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        s = e / e.sum(dim=-1, keepdim=True)
    elif activation == "relu":
        s = torch.where(s > 0, s, torch.zeros_like(s))
    if subtract == "min":
        s = s - s.min(dim=-1, keepdim=True).values
    elif subtract == "mean":
        s = s - s.sum(dim=-1, keepdim=True) / s.shape[-1]
    elif subtract == "median":  # the lower middle for an even count
        s = s - s.sort(dim=-1).values[..., (s.shape[-1] - 1) // 2 : (s.shape[-1] - 1) // 2 + 1]
    if normalize:
        s = s / s.abs().sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["softmax", "relu", "none"])
@pytest.mark.parametrize("subtract", [None, "min", "mean", "median"])
def test_weights_equal_the_plain_rescore(dtype, activation, subtract):
    scores = (torch.randn(3, 5, 2, 6) * 2).to(dtype)  # (..., topk), even topk for the median's lower middle
    for temperature in (1.0, 0.3):
        for normalize in (False, True):
            scoring = Scoring(temperature=temperature, activation=activation, subtract=subtract, normalize=normalize)
            got = scoring(scores)
            what = f"{dtype} {activation} subtract={subtract} temperature={temperature} normalize={normalize}"
            assert got.dtype == OUT_DTYPE[dtype], f"{what}: weights are {got.dtype}"
            assert got.shape == scores.shape, f"{what}: shape {tuple(got.shape)}"
            want = rescore(scores, temperature, activation, subtract, normalize)
            torch.testing.assert_close(got, want, **TOL[got.dtype], msg=what)


def test_odd_topk_median_is_the_middle():
    scores = torch.tensor([[3.0, -1.0, 7.0, 0.5, 2.0]])
    got = Scoring(activation="none", subtract="median")(scores)
    torch.testing.assert_close(got, scores - 2.0, rtol=0, atol=0)


def test_gradient_equals_the_plain_rescore_gradient():
    scores = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scoring = Scoring(temperature=0.7, subtract="mean", normalize=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    (got,) = torch.autograd.grad((scoring(scores) * g).sum(), scores)
    (want,) = torch.autograd.grad((rescore(scores, 0.7, "softmax", "mean", True) * g).sum(), scores)
    torch.testing.assert_close(got, want, **TOL[torch.float64], msg="gradient of the scores")
    assert torch.autograd.gradcheck(scoring, (scores,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_scores_give_float32_weights_that_sum_to_one(dtype):
    got = Scoring()(torch.randn(5, 8).to(dtype) * 10)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(-1), torch.ones(5), **TOL[torch.float32], msg=f"softmax of {dtype} scores")


def test_dropout_only_in_training():
    scores = torch.randn(64, 8)
    scoring = Scoring(dropout=0.5)
    plain = Scoring()(scores)
    torch.testing.assert_close(scoring.eval()(scores), plain, rtol=0, atol=0, msg="dropout in eval")
    dropped = scoring.train()(scores)
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1, "training dropout kept all or none of the weights"
    torch.testing.assert_close(dropped[kept], plain[kept] * 2, **TOL[torch.float32], msg="kept weights are not scaled")
    assert isinstance(scoring.attn_dropout, torch.nn.Dropout) and scoring.attn_dropout.p == 0.5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ValueError, r"^temperature must be a positive float, got 0.0"),
    (dict(temperature=True), ValueError, r"^temperature must be a positive float, got True"),
    (dict(activation="gelu"), ValueError, r"^activation must be one of \('softmax', 'relu', 'none'\), got 'gelu'"),
    (dict(subtract="max"), ValueError, r"^subtract / PKM's score_subtract must be one of \(None, 'min', 'mean', 'median'\)"),
    (dict(dropout=1.0), ValueError, r"^dropout / PKM's attn_dropout must be a float in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), ValueError, r"^dropout / PKM's attn_dropout must be a float in \[0, 1\), got -0.1"),
])
def test_argument_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        Scoring(**kwargs)


def test_extra_repr_shows_changed_options():
    assert repr(Scoring()) == "Scoring(\n  activation='softmax'\n  (attn_dropout): None\n)"
    assert "activation='relu', temperature=0.5, subtract='min', normalize=True" in repr(
        Scoring(activation="relu", temperature=0.5, subtract="min", normalize=True)
    )
