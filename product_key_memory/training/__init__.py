"""Training helpers: the optimizer and its parameter groups (``optim.py``), gradient clipping
that knows sharded tables (``clip.py``) and the sharding helpers (``distributed.py``)."""

from .optim import SparseRowAdam, build_optimizer, fetch_optimizer_parameters, fetch_pkm_value_parameters

__all__ = ["SparseRowAdam", "build_optimizer", "fetch_optimizer_parameters", "fetch_pkm_value_parameters"]
