"""Parameter groups: value tables learn with their own learning rate (arXiv 1907.05242, sec. 4.2)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import nn

__all__ = ["fetch_pkm_value_parameters", "fetch_optimizer_parameters"]


def _value_tables(module: nn.Module) -> List[nn.Parameter]:
    from .pkm import PKM

    seen, tables = set(), []
    for m in module.modules():
        if isinstance(m, PKM):
            w = m.values.weight
            if id(w) not in seen:
                seen.add(id(w))
                tables.append(w)
    return tables


def fetch_pkm_value_parameters(module: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Split ``module``'s parameters into (value tables of every PKM, everything else).

    Each parameter appears once, also when several layers share one table.
    """
    values = _value_tables(module)
    value_ids = {id(p) for p in values}
    rest = [p for p in module.parameters() if id(p) not in value_ids]
    return values, rest


def fetch_optimizer_parameters(
    module: nn.Module, pkm_learning_rate: float = 1e-2, *, pkm_weight_decay: Optional[float] = None
) -> List[Dict]:
    """Optimizer groups ``[{'params': rest}, {'params': values, 'lr': pkm_learning_rate}]``.

    ``pkm_weight_decay`` (e.g. ``0.0``) gives the value group its own weight decay.
    """
    values, rest = fetch_pkm_value_parameters(module)
    value_group = {"params": values, "lr": pkm_learning_rate}
    if pkm_weight_decay is not None:
        value_group["weight_decay"] = pkm_weight_decay
    return [{"params": rest}, value_group]
