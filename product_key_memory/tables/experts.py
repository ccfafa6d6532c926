"""A table of single-neuron experts: two ``(num_slots, dim)`` matrices, ``down`` and ``up`` (PEER)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as PF
from .base import ValueTable
from .sharded import ShardedValues

__all__ = ["ExpertValues", "ShardedExpertValues"]


class ExpertValues(ValueTable):
    r"""The experts of PEER (He 2024, arXiv 2407.04153): expert ``i`` is the MLP of one hidden
    neuron, ``x -> act(x . down[i]) * up[i]``.

    Both projections are value reads (:func:`functional.value_read`, ``torch.ops.pkm.value_read``),
    so both tables get row-sparse gradients with :attr:`sparse`, learn at the value learning rate
    (:func:`~product_key_memory.build_optimizer`) and are found as one :class:`ValueTable`:

    * :meth:`project` ``(x, indices)``: the down read gathers each chosen row (one row per bag)
      and takes its dot product with ``x``, ``(..., m)``;
    * :meth:`read` ``(indices, weights)`` (calling the module): the up read,
      ``sum_j weights[..., j] * up[indices[..., j]]``, with the layer's gated activations as
      weights. Forward hooks (:class:`~product_key_memory.MemoryUsageTracker`) see this call.

    Args:
        num_slots: experts (rows of each matrix).
        dim: width of a row (the layer's ``dim``).

    Keyword-only args:
        sparse: row-sparse gradients for both matrices.
        device, dtype: factory kwargs.

    Shape:
        - down, up: ``(num_slots, dim)``, drawn ``N(0, 1)`` as ``nn.Embedding`` (PEER-pytorch 0.2.2).
    """

    def __init__(self, num_slots: int, dim: int, *, sparse: bool = False, device=None, dtype=None):
        super().__init__(num_slots, dim, sparse=sparse)
        self.down = nn.Parameter(torch.empty(num_slots, dim, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(num_slots, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Both matrices ~ ``N(0, 1)`` (``nn.Embedding``'s init, which PEER-pytorch 0.2.2 uses)."""
        nn.init.normal_(self.down)
        nn.init.normal_(self.up)

    def project(self, x: Tensor, indices: Tensor, *, trainable: Optional[Tensor] = None) -> Tensor:
        """``out[..., j] = x[..., :] . down[indices[..., j]]``.

        ``x (..., dim)`` and ``indices (..., m)`` -> ``(..., m)``.
        """
        if x.shape[:-1] != indices.shape[:-1] or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be (..., {self.dim}) with the leading dims of indices {tuple(indices.shape)}, "
                f"got {tuple(x.shape)}"
            )
        # one row per bag: a gather with the value read's (sparse) backward
        rows = PF.value_read(self.down, indices.reshape(-1, 1), None, trainable=trainable, sparse=self.sparse)
        return dot_rows(x, rows, indices)

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None) -> Tensor:
        return PF.value_read(self.up, indices, weights, trainable=trainable, sparse=self.sparse)

    def shard(self, *, group=None, average_grads: bool = True) -> "ShardedExpertValues":
        """This rank's columns of both matrices (:class:`ShardedExpertValues`); collective."""
        down, up = (ShardedValues.from_full(w.detach(), group=group, average_grads=average_grads, sparse=self.sparse)
                    for w in (self.down, self.up))
        return ShardedExpertValues(down, up)


class ShardedExpertValues(ValueTable):
    r"""Experts whose two matrices are spread by columns over processes: ``down`` and ``up`` are
    :class:`~product_key_memory.ShardedValues`, made by :func:`~product_key_memory.shard_values`
    (:meth:`ExpertValues.shard`).

    A read hands back whole rows for this rank's tokens (:func:`sharded_value_read`), so the down
    projection is the same dot product as :class:`ExpertValues`'s and the layer's outputs, and the
    gradients of everything but the tables, are those of the unsharded layer. Collective: every rank
    runs every read.
    """

    def __init__(self, down: ShardedValues, up: ShardedValues):
        if (down.num_slots, down.dim) != (up.num_slots, up.dim):
            raise ValueError(f"down and up must have the same sizes, got {(down.num_slots, down.dim)} "
                             f"and {(up.num_slots, up.dim)}")
        super().__init__(up.num_slots, up.dim, sparse=up.sparse)
        self.down, self.up = down, up

    @ValueTable.sparse.setter
    def sparse(self, value: bool) -> None:
        ValueTable.sparse.fset(self, value)
        if hasattr(self, "up"):  # build_optimizer sets it on every table
            self.down.sparse = self.up.sparse = value

    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        self.up.reset_parameters()

    def project(self, x: Tensor, indices: Tensor, *, trainable: Optional[Tensor] = None) -> Tensor:
        """As :meth:`ExpertValues.project` (collective)."""
        # the sharded tables' reads, not their module calls: hooks count the experts' up reads once
        return dot_rows(x, self.down.read(indices.reshape(-1, 1), None, trainable=trainable), indices)

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None) -> Tensor:
        return self.up.read(indices, weights, trainable=trainable)


def dot_rows(x: Tensor, rows: Tensor, indices: Tensor) -> Tensor:
    """``rows (N * m, dim)`` read for ``indices (..., m)``, dotted with ``x (..., dim)`` -> ``(..., m)``."""
    rows = rows.view(-1, indices.shape[-1], rows.shape[-1])  # (N, m, dim)
    out = torch.bmm(rows, x.reshape(-1, rows.shape[-1], 1).to(rows.dtype))  # (N, m, 1)
    return out.view(indices.shape)
