"""The query network: tokens ``(N, dim)`` -> half-queries ``(N, heads, 2, dim_head)``.

:class:`QueryNetwork` computes ``dropout(norm(to_queries(hidden(dropout(pre_norm(x))))))``:
``hidden`` is an optional :class:`QueryMLP`, ``to_queries`` a linear map to
``2 * heads * dim_head`` features ordered ``(half, head, d)``, ``norm`` one of
:data:`QUERY_NORMS` (built by :func:`query_norm`). Every norm takes the token mask so
padding never enters batch statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .._checks import check_choice, check_positive_int, check_probability
from .norms import MaskedBatchNorm, QueryLayerNorm

__all__ = ["QueryNetwork", "QueryMLP", "ChannelBatchNorm", "IdentityNorm", "query_norm", "QUERY_NORMS"]

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


class QueryNetwork(nn.Module):
    r"""The query network of a product-key memory: one query per head, split in two halves.

    Args:
        dim: input features.
        heads: queries per token.
        dim_head: size of each half-query.

    Keyword-only args:
        pre_norm: LayerNorm the input first (``pre_layernorm``).
        input_dropout: dropout on the (normalised) input (``0`` leaves the piece out: ``None``).
        hidden: sizes of hidden layers before the projection, each ``Linear, [BatchNorm], ReLU``.
        hidden_batchnorm: a masked batch norm after each hidden linear layer.
        bias: biases in the projection and hidden layers.
        norm: the query norm, one of :data:`QUERY_NORMS`.
        query_dropout: dropout on the normalised queries (``0`` leaves the piece out: ``None``).
        device, dtype: factory kwargs.

    Its pieces keep product-key-memory 0.3.0's names (``pre_layernorm``, ``to_queries``,
    ``norm``, plus ``query_hidden``); a :class:`~product_key_memory.PKM` holds them under
    those names, so its state dict is 0.3.0's.

    Shape:
        - x: ``(N, dim)``; mask: ``(N,)`` bool or ``None`` (padding, left out of batch statistics).
        - output: ``(N, heads, 2, dim_head)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        *,
        pre_norm: bool = False,
        input_dropout: float = 0.0,
        hidden: Sequence[int] = (),
        hidden_batchnorm: bool = False,
        bias: bool = False,
        norm: str = "layernorm",
        query_dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            check_positive_int(name, value)
        check_probability("input_dropout", input_dropout)
        check_probability("query_dropout", query_dropout)
        check_choice("norm", norm, QUERY_NORMS)
        if not isinstance(hidden, (list, tuple)):
            raise TypeError(f"hidden must be a list or tuple of hidden sizes, got {hidden!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.heads, self.dim_head, self.norm_kind = dim, heads, dim_head, norm
        self.pre_layernorm = nn.LayerNorm(dim, **factory) if pre_norm else nn.Identity()
        # a dropout of p = 0 is an absent piece (None), as an absent hidden network is
        self.register_module("input_dropout", nn.Dropout(input_dropout) if input_dropout > 0 else None)
        hidden_layers = QueryMLP(dim, hidden, bias=bias, batchnorm=hidden_batchnorm, **factory) if hidden else None
        self.register_module("query_hidden", hidden_layers)  # registered even when absent (None)
        query_in = dim if self.query_hidden is None else self.query_hidden.out_features
        self.to_queries = nn.Linear(query_in, 2 * heads * dim_head, bias=bias, **factory)  # rows (half, head, d)
        self.norm = query_norm(norm, heads, dim_head, **factory)
        self.register_module("query_dropout", nn.Dropout(query_dropout) if query_dropout > 0 else None)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x = self.pre_layernorm(x)
        if self.input_dropout is not None:
            x = self.input_dropout(x)
        if self.query_hidden is not None:
            x = self.query_hidden(x, mask)
        q = self.to_queries(x).unflatten(-1, (2, self.heads, self.dim_head))  # (N, 2, H, d)
        q = self.norm(q, mask)
        if self.query_dropout is not None:
            q = self.query_dropout(q)
        return q.transpose(1, 2)  # (N, H, 2, d)

    def reset_parameters(self) -> None:
        for module in (self.pre_layernorm, self.query_hidden, self.to_queries, self.norm):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, norm={self.norm_kind!r}"
