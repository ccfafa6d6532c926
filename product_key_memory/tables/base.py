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

from torch import Tensor, nn

from .._checks import check_positive_int

__all__ = ["ValueTable"]


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
