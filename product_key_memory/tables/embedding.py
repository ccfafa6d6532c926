"""The default value table: one ``(num_slots, dim)`` float parameter."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as PF
from .base import ValueTable
from .sharded import ShardedValues

__all__ = ["EmbeddingValues", "VALUE_INITS"]

VALUE_INITS = ("normal", "zeros")


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
        return ShardedValues.from_full(self.weight.detach(), group=group, average_grads=average_grads, sparse=self.sparse)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", init={self.init!r}" if self.init != "normal" else "")
