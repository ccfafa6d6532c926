"""Parts of the query network: hidden layers before the query projection and the query norms.

The PKM computes ``norm(to_queries(hidden(x)))``: ``hidden`` is an optional
:class:`QueryMLP`, ``to_queries`` a linear map to ``2 * heads * dim_head`` features
ordered ``(half, head, d)``, ``norm`` one of :data:`QUERY_NORMS` (built by
:func:`query_norm`). Every norm takes the token mask so padding never enters
batch statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .norms import MaskedBatchNorm, QueryLayerNorm

__all__ = ["QueryMLP", "ChannelBatchNorm", "IdentityNorm", "query_norm", "QUERY_NORMS"]

QUERY_NORMS = ("layernorm", "batchnorm", "channel_batchnorm", "none")


class QueryMLP(nn.Module):
    """Hidden layers of the query network: ``(Linear, [MaskedBatchNorm], ReLU)`` per size.

    The query network of arXiv 1907.05242's reference code with hidden sizes
    ``h1, h2, ...`` is this module followed by the query projection (and its norm).

    Args:
        dim: input features.
        hidden: sizes of the hidden layers (at least one).

    Keyword-only args:
        bias: give every linear layer a bias.
        batchnorm: a batch norm (padding excluded) after every linear layer.
        device, dtype: factory kwargs.

    Shape:
        - x: ``(N, dim)``; mask: ``(N,)`` bool or ``None``.
        - output: ``(N, hidden[-1])``.
    """

    def __init__(
        self, dim: int, hidden: Sequence[int], *, bias: bool = False, batchnorm: bool = False, device=None, dtype=None
    ):
        super().__init__()
        sizes = tuple(hidden)
        if not sizes or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in sizes):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        factory = dict(device=device, dtype=dtype)
        layers = []
        for d_in, d_out in zip((dim,) + sizes[:-1], sizes):
            layers.append(nn.Linear(d_in, d_out, bias=bias, **factory))
            if batchnorm:
                layers.append(MaskedBatchNorm(d_out, **factory))
            layers.append(nn.ReLU())
        self.layers = nn.ModuleList(layers)
        self.sizes = sizes
        self.out_features = sizes[-1]

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask) if isinstance(layer, MaskedBatchNorm) else layer(x)
        return x

    def reset_parameters(self) -> None:
        for layer in self.layers:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


class ChannelBatchNorm(MaskedBatchNorm):
    """Batch norm with one statistic per query channel (every head, half and feature).

    The query norm of arXiv 1907.05242's reference code (``BatchNorm1d(heads * k_dim)``),
    padding excluded. Channels are ordered like ``to_queries`` rows: ``(half, head, d)``.

    Shape:
        - x: ``(N, 2, heads, dim_head)``; mask: ``(N,)`` bool or ``None``.
        - output: same shape as ``x``.
    """

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return super().forward(x.flatten(-3), mask).view_as(x)


class IdentityNorm(nn.Module):
    """No query norm; takes (and ignores) the mask like the other norms."""

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return x


def query_norm(kind: str, heads: int, dim_head: int, *, device=None, dtype=None) -> nn.Module:
    """The query norm ``kind`` for queries ``(N, 2, heads, dim_head)``.

    * ``"layernorm"``: LayerNorm over each half-query's ``dim_head`` features.
    * ``"batchnorm"``: batch norm over ``dim_head`` features, statistics shared by
      all heads and halves (product-key-memory 0.3.0 with ``use_layernorm=False``).
    * ``"channel_batchnorm"``: batch norm per query channel, ``2 * heads * dim_head``
      statistics (the paper's reference code).
    * ``"none"``.
    """
    factory = dict(device=device, dtype=dtype)
    if kind == "layernorm":
        return QueryLayerNorm(dim_head, **factory)
    if kind == "batchnorm":
        return MaskedBatchNorm(dim_head, **factory)
    if kind == "channel_batchnorm":
        return ChannelBatchNorm(2 * heads * dim_head, **factory)
    if kind == "none":
        return IdentityNorm()
    raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {kind!r}")
