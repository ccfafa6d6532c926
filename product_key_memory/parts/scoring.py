"""Scoring: the scores of the chosen slots -> the weights their value rows are summed with."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional as PF
from .._checks import check_choice, check_positive_float, check_probability

__all__ = ["Scoring"]


class Scoring(nn.Module):
    r"""Slot scores ``(..., topk)`` -> slot weights, in float32 (float64 stays float64).

    :func:`functional.rescore` (temperature, then the activation, then ``subtract``, then
    ``normalize``, the order of the paper's reference code), then dropout on the weights.

    Keyword-only args:
        temperature: scores are divided by it.
        activation: ``"softmax"`` (default), ``"relu"`` (non-competitive gates,
            arXiv 2310.10837) or ``"none"``.
        subtract: ``None``, ``"min"``, ``"mean"`` or ``"median"`` of each row, subtracted last
            but one.
        normalize: L1-normalise each row last.
        dropout: dropout on the weights (``attn_dropout``; ``0`` leaves the piece out: ``None``).
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        activation: str = "softmax",
        subtract: Optional[str] = None,
        normalize: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive_float("temperature", temperature)
        check_choice("activation", activation, PF.SCORE_ACTIVATIONS)
        # errors name this part's argument and the PKM option that sets it
        check_choice("subtract / PKM's score_subtract", subtract, (None,) + PF.SCORE_SUBTRACTS)
        check_probability("dropout / PKM's attn_dropout", dropout)
        self.temperature, self.activation = float(temperature), activation
        self.subtract, self.normalize = subtract, bool(normalize)
        self.register_module("attn_dropout", nn.Dropout(dropout) if dropout > 0 else None)  # p = 0: absent

    def forward(self, scores: Tensor) -> Tensor:
        weights = PF.rescore(
            scores,
            temperature=self.temperature,
            activation=self.activation,
            subtract=self.subtract,
            normalize=self.normalize,
        )
        return weights if self.attn_dropout is None else self.attn_dropout(weights)

    def extra_repr(self) -> str:
        s = f"activation={self.activation!r}"
        for name, value, default in (("temperature", self.temperature, 1.0), ("subtract", self.subtract, None),
                                     ("normalize", self.normalize, False)):
            if value != default:
                s += f", {name}={value!r}"
        return s
