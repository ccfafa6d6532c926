"""Sharding helpers: put a model's value tables on a process group (:func:`shard_values`) and
list them for wrappers that must leave them alone (:func:`sharded_parameters`).

The table itself is :class:`~product_key_memory.tables.sharded.ShardedValues`.
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch.distributed as dist
from torch import Tensor, nn

from ..tables.base import ValueTable
from ..tables.sharded import ShardedValues, column_sizes, sharded_value_read
from .clip import clip_grad_norm_ as _clip_grad_norm

__all__ = ["ShardedValues", "sharded_value_read", "column_sizes", "shard_values", "sharded_parameters", "clip_grad_norm_"]


def shard_values(
    model: nn.Module, *, group: Optional[dist.ProcessGroup] = None, average_grads: bool = True
) -> nn.Module:
    """Replace every value table in ``model`` by this rank's share of it (:meth:`ValueTable.shard`:
    for :class:`~product_key_memory.EmbeddingValues`, e.g. a :class:`PKM`'s own table or a
    :class:`ValuePool`, this rank's columns in a :class:`ShardedValues`).

    A table read by several layers becomes one :class:`ShardedValues` that they keep sharing.
    The tables are marked for DDP to ignore (they must not be all-reduced nor broadcast from
    rank 0), so wrap ``model`` itself in DDP afterwards. Every rank must hold the same tables
    (same seed or checkpoint). For a table too big for one process, build the layer with
    ``values=ShardedValues(...)`` instead. A table that cannot be split raises a ``TypeError``.

    Returns:
        ``model``, changed in place.
    """
    sharded = {}
    for parent in list(model.modules()):
        for name, table in list(parent.named_children()):
            if not isinstance(table, ValueTable) or isinstance(table, ShardedValues):
                continue
            if id(table) not in sharded:
                sharded[id(table)] = table.shard(group=group, average_grads=average_grads)
            setattr(parent, name, sharded[id(table)])
    names = [
        f"{name}.{pname}" if name else pname
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, ShardedValues)
        for pname, _ in module.named_parameters(recurse=False)
    ]
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
    return model


def sharded_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The :class:`ShardedValues` tables in ``model``, once each.

    For ``fully_shard(..., ignored_params=set(sharded_parameters(model)))`` and anything else
    that must leave them alone.
    """
    seen, tables = set(), []
    for module in model.modules():
        if isinstance(module, ShardedValues) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            tables.append(module.weight)
    return tables


def clip_grad_norm_(
    model: nn.Module, max_norm: float, *, group: Optional[dist.ProcessGroup] = None
) -> Tensor:
    """Deprecated: use :func:`product_key_memory.clip_grad_norm_` ``(model, max_norm)``.

    It finds the :class:`ShardedValues` tables in ``model`` and reduces each over its own
    group; ``group``, if given, must be that group.
    """
    warnings.warn(
        "product_key_memory.distributed.clip_grad_norm_ is deprecated: use "
        "product_key_memory.clip_grad_norm_(model, max_norm), which also takes norm_type and error_if_nonfinite",
        DeprecationWarning,
        stacklevel=2,
    )
    if group is not None:
        world = dist.group.WORLD
        other = [m for m in model.modules() if isinstance(m, ShardedValues) and (world if m.group is None else m.group) is not group]
        if other:
            raise ValueError(f"group is not the process group of the tables {other}; leave group=None")
    return _clip_grad_norm(model, max_norm)
