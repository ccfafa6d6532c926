"""Value tables: what a memory layer reads once its search has chosen slots and weights.

Every table is a :class:`ValueTable` (``base.py``); the rest of the library finds tables
through that class alone (optimizer groups, usage statistics, sharding, clipping,
quantization). :class:`EmbeddingValues` (``embedding.py``) is the default table, :class:`ExpertValues`
(``experts.py``) PEER's experts (a down and an up matrix),
:class:`ValuePool` (``pool.py``) one table shared by several layers,
:class:`ImplicitValues` (``ive.py``) UltraMem's virtual slots over fewer stored rows, :class:`ShardedValues`
(``sharded.py``) a table split by columns over processes, and :class:`QuantizedValues`
(``quantized.py``, loaded on first use) a read-only table in fewer bytes per row.
"""

import importlib

from .base import ValueTable
from .embedding import VALUE_INITS, EmbeddingValues
from .experts import ExpertValues, ShardedExpertValues
from .ive import ImplicitValues
from .pool import ValuePool
from .sharded import ShardedValues

_LAZY = {"QuantizedValues": ".quantized", "QuantizedExpertValues": ".quantized", "quantize_values_": ".quantized"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ValueTable", "EmbeddingValues", "ExpertValues", "ShardedExpertValues", "VALUE_INITS", "ValuePool", "ImplicitValues",
           "ShardedValues", "QuantizedValues", "QuantizedExpertValues", "quantize_values_"]
