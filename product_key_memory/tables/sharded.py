"""A value table split by columns over processes (the parallel memory of arXiv 2412.09764).

Every rank of a process group holds a slice of columns of every slot of the table. The
product-key search stays where the tokens are (each rank searches for its own tokens, once);
a read then

1. sends every rank's slot indices and weights to every rank (``all_to_all``),
2. sums the rank's column slice of the chosen rows, for the tokens of all ranks,
3. returns each token's slice to the rank that owns the token (``all_to_all``), where the
   slices are put side by side into full rows.

The backward runs the same exchanges in reverse: a rank's value gradient only touches its own
columns (it sees the output gradient of every token for those columns), and the gradient of a
token's weights is summed over the column slices of all ranks. Under data parallelism each rank
has its own tokens and loss, so by default the table's gradient is divided by the world size,
the mean over ranks that ``DistributedDataParallel`` and ``fully_shard`` give every other
parameter.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as PF
from .._checks import check_bool, check_positive_int
from .base import ValueTable

__all__ = ["ShardedValues", "sharded_value_read", "column_sizes"]


def column_sizes(dim: int, world_size: int) -> List[int]:
    """Columns held by each rank: ``dim // world_size``, the first ``dim % world_size`` ranks one more."""
    q, r = divmod(dim, world_size)
    return [q + (i < r) for i in range(world_size)]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a flat tensor; the gradient goes back the way the data came."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def sharded_value_read(
    shard: Tensor,
    indices: Tensor,
    weights: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    trainable: Optional[Tensor] = None,
    sparse: bool = False,
    average_grads: bool = True,
) -> Tensor:
    """:func:`functional.value_read` of a table whose columns are spread over ``group``.

    Collective: every rank of ``group`` must call it, in the same order as its other
    collectives, with the same ``m`` and number of slots (token counts may differ).

    Args:
        shard: this rank's columns of the table, ``(num_slots, cols)``; the columns of ranks
            ``0, 1, ...`` side by side make the table ``(num_slots, dim)``.
        indices, weights: ``(..., m)`` slots and weights of this rank's own tokens.
        group: the process group holding the table (default: the world).
        trainable: optional bool ``(num_slots,)`` rows that may learn (same on every rank).
        sparse: sparse gradient for ``shard``.
        average_grads: divide ``shard``'s gradient by the world size (the mean over ranks'
            losses, as DDP/FSDP average); ``False`` keeps the sum.

    Returns:
        ``(..., dim)``, equal to ``value_read(table, indices, weights)`` on one process.
    """
    if shard.dim() != 2:
        raise ValueError(f"shard must be a (num_slots, cols) table, got shape {tuple(shard.shape)}")
    if weights.shape != indices.shape or indices.dim() < 1:
        raise ValueError(
            f"indices and weights must have one shape (..., m), got {tuple(indices.shape)} and {tuple(weights.shape)}"
        )
    world = dist.get_world_size(group)
    lead, m = indices.shape[:-1], indices.shape[-1]
    idx = indices.reshape(-1, m)
    n = idx.shape[0]

    sizes = torch.tensor([n, m, shard.shape[0], shard.shape[1]], device=shard.device)
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes, group=group)
    counts, ms, slots, cols = (list(col) for col in zip(*(t.tolist() for t in every)))
    if len(set(ms)) != 1 or len(set(slots)) != 1:  # every rank sees the same lists, so all raise together
        raise ValueError(
            f"every rank must read the same number of slots m and hold the same rows, got m={ms}, rows={slots}"
        )

    # 1. every rank gets the (indices, weights) of every rank's tokens
    send, recv = [n * m] * world, [c * m for c in counts]
    idx_all = _AllToAll.apply(idx.reshape(-1).repeat(world), recv, send, group).view(-1, m)  # (sum(counts), m)
    w_all = _AllToAll.apply(weights.reshape(-1).to(shard.dtype).repeat(world), recv, send, group).view(-1, m)

    # 2. this rank's columns of the rows they read, for all tokens
    if average_grads and world > 1:
        # the table's gradient / world: scale the small output gradient and undo it for the
        # weights, rather than scaling (and copying) a table-sized gradient
        w_all = _ScaleGrad.apply(w_all, float(world))
        part = _ScaleGrad.apply(PF.value_read(shard, idx_all, w_all, trainable=trainable, sparse=sparse), 1.0 / world)
    else:
        part = PF.value_read(shard, idx_all, w_all, trainable=trainable, sparse=sparse)  # (sum(counts), cols_me)

    # 3. each token's slices go home and sit side by side
    mine = dist.get_rank(group)
    send, recv = [c * cols[mine] for c in counts], [n * c for c in cols]
    back = _AllToAll.apply(part.reshape(-1), recv, send, group).split(recv)
    out = torch.cat([b.view(n, c) for b, c in zip(back, cols)], dim=-1)  # (n, dim)
    return out.view(*lead, sum(cols))


class ShardedValues(ValueTable):
    r"""A ``(num_slots, dim)`` value table whose columns are spread over processes.

    Rank ``r`` of ``group`` holds ``weight``, the columns ``[column_start, column_start + cols_r)``
    of every slot, with ``cols_r`` about ``dim / world_size``. Give it to a :class:`PKM` (or
    :class:`MemoryPlus`) as ``values=`` and the layer reads through :func:`sharded_value_read`;
    the layer's outputs, and the gradients of everything but the table, are those of the
    unsharded layer.

    The table is not data parallel: exclude ``weight`` from DDP's gradient all-reduce and from
    ``fully_shard`` (:func:`~product_key_memory.shard_values` does the former;
    :func:`~product_key_memory.sharded_parameters` lists the tables for
    ``fully_shard(..., ignored_params=...)``). Every rank must run every read.

    Collective: every rank of ``group`` builds it, in the same order, with the same
    ``num_slots``, ``dim`` and ``average_grads`` (checked on construction; a mismatch raises
    ``ValueError`` on every rank).

    Args:
        num_slots: slots (``num_keys ** 2``); ``num_embeddings`` is its earlier name.
        dim: full width of a row; ``embedding_dim`` is its earlier name.

    Keyword-only args:
        group: process group over which the columns are spread (default: the world).
        average_grads: divide the gradient by the world size (DDP's mean over ranks).
        sparse: sparse gradient (for :class:`~product_key_memory.SparseRowAdam`).
        device, dtype: factory kwargs.

    Shape:
        - weight: ``(num_slots, cols_r)``, initialised ``N(0, 1 / dim)`` like the full table
          (each rank draws its own columns from its own generator).

    ``load_state_dict`` takes either this rank's columns or the whole table (a checkpoint
    saved by one process), of which it keeps this rank's columns; :meth:`full_weight`
    gathers the whole table.
    """

    def __init__(
        self,
        num_slots: Optional[int] = None,
        dim: Optional[int] = None,
        *,
        group: Optional[dist.ProcessGroup] = None,
        average_grads: bool = True,
        sparse: bool = False,
        num_embeddings: Optional[int] = None,
        embedding_dim: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        num_slots = _one_of("num_slots", num_slots, "num_embeddings", num_embeddings)
        dim = _one_of("dim", dim, "embedding_dim", embedding_dim)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ShardedValues needs an initialised process group (torch.distributed.init_process_group)"
            )
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        # before any check that could fail on one rank only: the others would wait here for it
        everyone = [None] * world
        dist.all_gather_object(everyone, (num_slots, dim, average_grads), group=group)
        if len(set(everyone)) != 1:
            raise ValueError(
                "every rank must build ShardedValues with the same num_slots, dim and average_grads, "
                f"got (num_slots, dim, average_grads) = {everyone} on ranks 0..{world - 1}"
            )
        for name, value in (("num_slots", num_slots), ("dim", dim)):
            check_positive_int(name, value)
        check_bool("average_grads", average_grads)
        super().__init__(num_slots, dim, sparse=sparse)
        if dim < world:
            raise ValueError(f"dim must be at least the world size {world}, got {dim}")
        sizes = column_sizes(dim, world)
        self.column_start = sum(sizes[:rank])
        self.group = group
        self.average_grads = average_grads
        self.weight = nn.Parameter(torch.empty(num_slots, sizes[rank], device=device, dtype=dtype))
        self._register_load_state_dict_pre_hook(self._slice_full_table)
        self.reset_parameters()

    # nn.Embedding's names, the earlier ones of num_slots and dim
    num_embeddings = property(lambda self: self.num_slots)
    embedding_dim = property(lambda self: self.dim)

    def _slice_full_table(self, state_dict, prefix, *args) -> None:
        # a whole (num_slots, dim) table, e.g. from one process or a 0.3.0
        # checkpoint, loads as this rank's columns
        full = state_dict.get(prefix + "weight")
        if isinstance(full, Tensor) and tuple(full.shape) == (self.num_slots, self.dim):
            stop = self.column_start + self.weight.shape[1]
            state_dict[prefix + "weight"] = full[:, self.column_start : stop]

    def reset_parameters(self) -> None:
        """Values ~ ``N(0, 1 / dim)``: the full table's init, column by column."""
        nn.init.normal_(self.weight, std=self.dim**-0.5)

    @classmethod
    def from_full(
        cls,
        weight: Tensor,
        *,
        group: Optional[dist.ProcessGroup] = None,
        average_grads: bool = True,
        sparse: bool = False,
    ) -> "ShardedValues":
        """This rank's columns of a full ``(num_slots, dim)`` table, identical on every rank."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D table, got {getattr(weight, 'shape', type(weight).__name__)}")
        factory = dict(device=weight.device, dtype=weight.dtype)
        new = cls(*weight.shape, group=group, average_grads=average_grads, sparse=sparse, **factory)
        with torch.no_grad():
            new.weight.copy_(weight[:, new.column_start : new.column_start + new.weight.shape[1]])
        return new

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None) -> Tensor:
        """Indices and weights ``(..., m)`` of this rank's tokens -> ``(..., dim)`` (collective)."""
        if weights is None:
            weights = torch.ones(indices.shape, dtype=self.weight.dtype, device=indices.device)
        return sharded_value_read(
            self.weight,
            indices,
            weights,
            group=self.group,
            trainable=trainable,
            sparse=self.sparse,
            average_grads=self.average_grads,
        )

    @torch.no_grad()
    def full_weight(self) -> Tensor:
        """The whole table ``(num_slots, dim)`` on every rank (collective; small tables only)."""
        world = dist.get_world_size(self.group)
        cols = column_sizes(self.dim, world)
        sizes = [self.num_slots * c for c in cols]
        mine = self.weight.reshape(-1)
        # an all_to_all of the whole slice to everyone: gloo has no all_gather of uneven sizes
        pieces = _AllToAll.apply(mine.repeat(world), sizes, [mine.numel()] * world, self.group).split(sizes)
        return torch.cat([p.view(self.num_slots, c) for p, c in zip(pieces, cols)], dim=-1)

    def extra_repr(self) -> str:
        stop = self.column_start + self.weight.shape[1]
        s = f"{self.num_slots}, {self.dim}, columns=[{self.column_start}:{stop})"
        if not self.average_grads:
            s += ", average_grads=False"
        return s + (", sparse=True" if self.sparse else "")


def _one_of(name: str, value, old_name: str, old_value):
    """``value``, or its earlier name's ``old_value``: exactly one of the two."""
    if value is not None and old_value is not None:
        raise TypeError(f"pass {name} or {old_name} (its earlier name), not both")
    if value is None and old_value is None:
        raise TypeError(f"missing argument {name}")
    return value if value is not None else old_value
