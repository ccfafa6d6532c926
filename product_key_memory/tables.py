"""Value tables: what a memory layer reads once its search has chosen slots and weights.

Every table is a :class:`ValueTable`. The rest of the library finds tables through this
class alone: optimizer groups (:func:`~product_key_memory.fetch_optimizer_parameters`,
:func:`~product_key_memory.build_optimizer`), usage statistics
(:class:`~product_key_memory.MemoryUsageTracker`), sharding
(:func:`~product_key_memory.shard_values`) and gradient clipping. A table of your own
(two matrices, a quantized store, rows on another device) subclasses it and works with
all of them.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from . import functional as PF
from ._checks import check_positive_int

__all__ = ["ValueTable", "EmbeddingValues", "VALUE_INITS"]

VALUE_INITS = ("normal", "zeros")


class ValueTable(nn.Module):
    r"""A table of ``num_slots`` value rows of width ``dim``, read as weighted sums of rows.

    Subclasses set ``num_slots`` and ``dim`` and implement :meth:`read` and
    :meth:`reset_parameters`. Calling the module is :meth:`read`, so forward hooks see
    every read (:class:`~product_key_memory.MemoryUsageTracker` counts slots that way).

    Attributes:
        num_slots: rows of the table.
        dim: width of a row, and of the output of :meth:`read`.
        sparse: the layout of the table's gradient: ``True`` for a row-sparse (COO)
            gradient holding just the rows read, ``False`` for a dense one. Tables that
            cannot learn, or cannot give sparse gradients, refuse ``sparse = True``.
    """

    num_slots: int
    dim: int

    def __init__(self, num_slots: int, dim: int, *, sparse: bool = False):
        super().__init__()
        check_positive_int("num_slots", num_slots)
        check_positive_int("dim", dim)
        self.num_slots = num_slots
        self.dim = dim
        self._sparse = False
        self.sparse = sparse

    @property
    def sparse(self) -> bool:
        return self._sparse

    @sparse.setter
    def sparse(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"sparse must be a bool, got {value!r}")
        if value and not self.supports_sparse_grad:
            raise ValueError(f"{type(self).__name__} does not give sparse gradients; sparse must be False")
        self._sparse = value

    #: whether ``sparse = True`` is allowed; a read-only table sets this to ``False``
    supports_sparse_grad: bool = True

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None) -> Tensor:
        """``out[..., :] = sum_j weights[..., j] * row(indices[..., j])``.

        Args:
            indices: ``(..., m)`` long or int slots in ``[0, num_slots)``.
            weights: ``(..., m)`` float, or ``None`` for an unweighted sum. A table
                computes in its own precision; the output has the table's float dtype.
            trainable: optional bool ``(num_slots,)``: rows outside it get no gradient
                (sparse memory finetuning); the output and the weights' gradient are unchanged.

        Returns:
            ``(..., dim)``.
        """
        raise NotImplementedError

    def forward(self, indices: Tensor, weights: Optional[Tensor] = None, *, trainable: Optional[Tensor] = None) -> Tensor:
        return self.read(indices, weights, trainable=trainable)

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def value_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that learn at the value learning rate (by default: all of the table's)."""
        return self.parameters()

    def shard(self, *, group=None, average_grads: bool = True) -> "ValueTable":
        """This process's share of the table for :func:`~product_key_memory.shard_values`, a
        table whose rows are spread over ``group``. Tables that can be split override it."""
        raise TypeError(f"{type(self).__name__} cannot be sharded: it does not implement ValueTable.shard")

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, dim={self.dim}" + (", sparse=True" if self.sparse else "")


class EmbeddingValues(ValueTable):
    r"""The default table: one ``(num_slots, dim)`` float parameter ``weight``.

    The read is :func:`functional.value_read` (``torch.ops.pkm.value_read``): one pass over
    the rows read, and a backward that touches only those rows, giving a dense or a
    row-sparse gradient as :attr:`sparse` says.

    Args:
        num_slots: rows (``num_keys ** 2`` for a product-key memory).
        dim: width of a row.

    Keyword-only args:
        sparse: row-sparse gradient (for :class:`~product_key_memory.SparseRowAdam` or
            ``torch.optim.SparseAdam``).
        init: ``"normal"``, rows ~ ``N(0, 1 / dim)`` (product-key-memory 0.3.0), or ``"zeros"``.
        device, dtype: factory kwargs.

    Shape:
        - weight: ``(num_slots, dim)``.
    """

    def __init__(self, num_slots: int, dim: int, *, sparse: bool = False, init: str = "normal", device=None, dtype=None):
        super().__init__(num_slots, dim, sparse=sparse)
        if init not in VALUE_INITS:
            raise ValueError(f"init must be one of {VALUE_INITS}, got {init!r}")
        self.init = init
        self.weight = nn.Parameter(torch.empty(num_slots, dim, device=device, dtype=dtype))
        self.reset_parameters()

    # nn.EmbeddingBag's names, which code written for product-key-memory 0.3.0 reads
    @property
    def num_embeddings(self) -> int:
        return self.num_slots

    @property
    def embedding_dim(self) -> int:
        return self.dim

    def reset_parameters(self) -> None:
        """Rows ~ ``N(0, 1 / dim)`` (``init="normal"``) or zeros."""
        if self.init == "zeros":
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=self.dim**-0.5)

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None) -> Tensor:
        return PF.value_read(self.weight, indices, weights, trainable=trainable, sparse=self.sparse)

    def shard(self, *, group=None, average_grads: bool = True) -> ValueTable:
        """This rank's columns of the table (:class:`~product_key_memory.ShardedValues`); collective."""
        from .distributed import ShardedValues

        return ShardedValues.from_full(self.weight.detach(), group=group, average_grads=average_grads, sparse=self.sparse)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", init={self.init!r}" if self.init != "normal" else "")
