"""Implicit value expansion (IVE, UltraMem, arXiv 2411.12364 sec. 3.3): more slots than stored rows.

Formulas from the official code, ZihaoHuang-notabot/Ultra-Sparse-Memory-Network at commit 041104b
(Apache-2.0): ``olmo/ultramem_layer.py`` (cited ``ultramem_layer.py:LINE``) and
``olmo/ultramem_layer_v2.py`` (``ultramem_layer_v2.py:LINE``).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from .base import ValueTable
from .embedding import EmbeddingValues

__all__ = ["ImplicitValues"]


class ImplicitValues(ValueTable):
    r"""``virtual_slots`` value slots read from ``virtual_slots // expansion`` physical rows.

    A virtual slot ``s`` is mapped once, at random, to ``p = mapping[s]`` (``ultramem_layer.py:248``),
    which names the physical row ``(p % rows + offset) % store.num_slots`` and the group
    ``g = p // rows`` (``ultramem_layer_v2.py:499-500``; ``rows = virtual_slots // expansion``). The value of
    the virtual slot is that row seen through its group's projection, ``W_g row`` (``W_g``: the
    ``value_dim`` columns ``g`` of :attr:`proj`), so a read is

        ``out = sum_j w_j W_{g_j} row_j = proj(concat_g sum_{j: g_j = g} w_j row_j)``

    (the grouped sum then one linear map, ``ultramem_layer.py:257-270``): ``expansion`` times the slots
    for one table of rows and one ``(dim, expansion * value_dim)`` projection.

    With ``chunks > 1`` (UltraMem's several Tucker cores, each weighting its own piece of the row,
    ``ultramem_layer.py:261-262``) a row is cut into ``chunks`` equal pieces and a slot of this table is a
    piece: index ``s * chunks + c`` is piece ``c`` of virtual slot ``s`` (``W_g`` times the row with the
    other pieces zeroed), so ``num_slots = virtual_slots * chunks`` and a read keeps the
    :class:`ValueTable` contract (``(..., m)`` indices and weights, one weight per piece read).

    Sharing: pass ``values=`` a table (e.g. a :class:`ValuePool`) to several of these, each with its
    own ``offset`` (UltraMemV2's per-layer offsets, ``ultramem_layer_v2.py:126``). The physical rows
    are read through that table (``pkm::value_read``, row-sparse gradients under
    :func:`~product_key_memory.build_optimizer`); :meth:`value_parameters` are its parameters, so
    :attr:`proj` learns at the ordinary learning rate.

    Args:
        virtual_slots: virtual slots (``num_keys ** 2`` of the search), a multiple of ``expansion``.
        dim: width of the output.

    Keyword-only args:
        expansion: virtual slots per physical row (``value_expand_time``, 4 by default in ``ultramem_layer.py:74``).
        value_dim: width of a physical row (``values.dim`` when ``values`` is given, else ``dim``).
        chunks: pieces a row is cut into, one weight each.
        values: the physical table (a new :class:`EmbeddingValues` of ``virtual_slots // expansion`` rows,
            ``N(0, 1 / value_dim)``, by default).
        offset: where this table's rows start in ``values`` (modulo its size).
        device, dtype: factory kwargs.

    Attributes:
        store: the physical table (``values``, or the one made here).
        proj: ``nn.Linear(expansion * value_dim, dim, bias=False)``, the projections side by side.
        mapping: the buffer ``(virtual_slots,)``, a random permutation (redrawn by :meth:`reset_parameters`).

    Shape:
        - indices and weights ``(..., m)`` (weights ``None``: all ones); output ``(..., dim)``.

    A physical row is read once per piece read (``pkm::value_read`` of single rows; once per slot with
    ``whole_slots=True``), then grouped by projection and piece with one batched matmul against the
    weighted one-hot groups: no fused kernel.
    """

    supports_sparse_grad = False  # the rows' table takes sparse gradients itself; proj is dense

    def __init__(
        self,
        virtual_slots: int,
        dim: int,
        *,
        expansion: int = 4,
        value_dim: Optional[int] = None,
        chunks: int = 1,
        values: Optional[ValueTable] = None,
        offset: int = 0,
        device=None,
        dtype=None,
    ):
        check_positive_int("virtual_slots", virtual_slots)
        check_positive_int("chunks", chunks)
        super().__init__(virtual_slots * chunks, dim)
        check_positive_int("expansion", expansion)
        if virtual_slots % expansion:
            raise ValueError(f"virtual_slots must be a multiple of expansion={expansion}, got {virtual_slots}")
        if values is not None and not isinstance(values, ValueTable):
            raise TypeError(f"values must be a ValueTable, got {type(values).__name__}")
        if values is not None and value_dim is not None and value_dim != values.dim:
            raise ValueError(f"value_dim must be values.dim={values.dim} when values is given, got {value_dim}")
        value_dim = (values.dim if values is not None else dim) if value_dim is None else value_dim
        check_positive_int("value_dim", value_dim)
        if value_dim % chunks:
            raise ValueError(f"value_dim must be a multiple of chunks={chunks}, got value_dim={value_dim}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        self.expansion, self.value_dim, self.chunks, self.offset = expansion, value_dim, chunks, offset
        self.virtual_slots, self.rows = virtual_slots, virtual_slots // expansion
        factory = {"device": device, "dtype": dtype}
        self._owns_values = values is None
        self.store = EmbeddingValues(self.rows, value_dim, **factory) if values is None else values
        self.proj = nn.Linear(expansion * value_dim, dim, bias=False, **factory)
        self.register_buffer("mapping", torch.empty(virtual_slots, dtype=torch.long, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``proj ~ N(0, 1 / (expansion * value_dim))`` (``ultramem_layer.py:116``), a new random
        ``mapping``, and the rows if this table made them (a table passed in is left as it is)."""
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.expansion * self.value_dim))
        self.mapping.copy_(torch.randperm(self.virtual_slots, device=self.mapping.device))
        if self._owns_values:
            self.store.reset_parameters()

    def physical(self, virtual: Tensor):
        """Virtual slots -> ``(row, group)``: the physical row in :attr:`store` and the projection group."""
        p = self.mapping[virtual]
        return (p % self.rows + self.offset) % self.store.num_slots, p // self.rows

    def forward(self, indices: Tensor, weights: Optional[Tensor] = None, *, trainable: Optional[Tensor] = None,
                whole_slots: bool = False) -> Tensor:
        return self.read(indices, weights, trainable=trainable, whole_slots=whole_slots)

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None,
             whole_slots: bool = False) -> Tensor:
        """:meth:`ValueTable.read`; with ``whole_slots=True`` the caller promises that ``indices`` hold every
        piece of each slot in order (``(..., S * chunks)``: ``s * chunks + 0, ..., s * chunks + chunks - 1``,
        as :class:`~product_key_memory.UltraMem` reads), and each stored row is then read once per slot
        instead of once per piece (the same output; nothing checks the promise)."""
        if trainable is not None:
            raise ValueError("trainable is not supported by ImplicitValues (its rows are shared by several slots); "
                             "pass trainable=None")
        if weights is not None and weights.shape != indices.shape:
            raise ValueError(f"weights must have the shape of indices {tuple(indices.shape)}, "
                             f"got {tuple(weights.shape)}")
        c = self.chunks
        if whole_slots and indices.shape[-1] % c:
            raise ValueError(f"with whole_slots=True indices must have a multiple of chunks={c} columns, "
                             f"got shape {tuple(indices.shape)}")
        if whole_slots:
            virtual = indices[..., ::c] // c  # (..., S)
            mask = None if weights is None else weights.unflatten(-1, (-1, c))  # (..., S, C): piece c's weight
        else:
            virtual = indices // c  # (..., m)
            mask = F.one_hot(indices % c, c)  # (..., m, C): only its own piece of the row
            mask = mask if weights is None else mask * weights.unsqueeze(-1)
        row, group = self.physical(virtual)
        rows = self.store(row.unsqueeze(-1))  # (..., S, value_dim): one read of one row each, through the table
        at = F.one_hot(group, self.expansion).to(rows.dtype)  # (..., S, E)
        if mask is None:  # every piece at weight 1: the whole rows, grouped
            return self.proj(torch.matmul(at.transpose(-1, -2), rows).flatten(-2))  # (..., E * value_dim)
        # the pieces' weights go into the grouping matmul, (E * C) sums of whole rows, of which the sum for
        # piece c keeps piece c: C times the matmul's work, but no weighted copy of the rows
        a = (at.unsqueeze(-1) * mask.to(rows.dtype).unsqueeze(-2)).flatten(-2)  # (..., S, E * C)
        sums = torch.matmul(a.transpose(-1, -2), rows)  # (..., E * C, value_dim)
        sums = sums.unflatten(-1, (c, self.value_dim // c)).unflatten(-3, (self.expansion, c))  # (..., E, C, C, vd/C)
        grouped = sums.diagonal(dim1=-3, dim2=-2).transpose(-1, -2)  # (..., E, C, vd/C): piece c of sum c
        return self.proj(grouped.flatten(-3))

    def quantized(self, format: str) -> "ImplicitValues":
        """For :func:`~product_key_memory.quantize_values_`: this table itself, unchanged. The stored rows
        are its child :attr:`store`, which ``quantize_values_`` quantizes as every table it finds (a pool
        shared by several layers once); :attr:`proj` stays in float."""
        return self

    def value_parameters(self) -> Iterator[nn.Parameter]:
        """The physical rows' parameters (not :attr:`proj`): these learn at the value learning rate."""
        return self.store.value_parameters()

    def extra_repr(self) -> str:
        s = f"virtual_slots={self.virtual_slots}, dim={self.dim}, expansion={self.expansion}"
        s += f", value_dim={self.value_dim}"
        if self.chunks != 1:
            s += f", chunks={self.chunks}"
        if self.offset:
            s += f", offset={self.offset}"
        return s
