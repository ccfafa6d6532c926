"""Training helpers: the optimizer and its parameter groups (``optim.py``), gradient clipping
that knows sharded tables (``clip.py``), the sharding helpers (``distributed.py``) and learning-rate
schedules (``schedules.py``: UltraMem's decaying value learning rate)."""

from .optim import SparseRowAdam, build_optimizer, fetch_optimizer_parameters, fetch_pkm_value_parameters
from .schedules import value_lr_multiplier, value_lr_scheduler

__all__ = ["SparseRowAdam", "build_optimizer", "fetch_optimizer_parameters", "fetch_pkm_value_parameters",
           "value_lr_multiplier", "value_lr_scheduler"]
