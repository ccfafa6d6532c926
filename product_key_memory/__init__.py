"""Product-key memory layers for PyTorch (Lample et al. 2019, arXiv 1907.05242).

``import product_key_memory`` loads the core: the layers (:mod:`.layers`), their parts
(:mod:`.parts`), the value tables (:mod:`.tables`), the ops (:mod:`.ops`), the functional core
and the optimizer helpers (:mod:`.training`). The add-ons (KNN memory, the language model,
quantized tables, sharding helpers, clipping, usage statistics, the XLM converter) load on
first use of one of their names. Module paths of earlier versions (``product_key_memory.pkm``,
``product_key_memory.knn``, ``product_key_memory.transformer``, 0.3.0's
``product_key_memory.product_key_memory``, ...) still import: each is the module at its new path.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from . import functional, ops
from .layers import PEER, PKM, MemoryPlus, ProductKeyMemory, UltraMem
from .ops import use_backend
from .parts import MaskedBatchNorm, MemoryOutput, ProductKeys, QueryLayerNorm, QueryNetwork, Scoring
from .tables import EmbeddingValues, ExpertValues, ShardedValues, ValuePool, ValueTable
from .training import SparseRowAdam, build_optimizer, fetch_optimizer_parameters, fetch_pkm_value_parameters

__version__ = "0.4.0"

# public name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "KNNMemory": ".knn",
    "KNNAttention": ".knn",
    "TransformerLM": ".models",
    "lm_loss": ".models",
    "QuantizedValues": ".tables.quantized",
    "quantize_values_": ".tables.quantized",
    "shard_values": ".training.distributed",
    "sharded_parameters": ".training.distributed",
    "clip_grad_norm_": ".training.clip",
    "MemoryUsageTracker": ".diagnostics",
    "usage_statistics": ".diagnostics",
    "save_usage_plot": ".diagnostics",
    "from_xlm": ".integrations.xlm",
    "distributed": ".training.distributed",
}

# module path of an earlier version -> where it lives now
_MOVED = {
    "product_key_memory": "_compat030",  # 0.3.0
    "pkm": "layers.pkm",
    "memory_plus": "layers.memory_plus",
    "query": "parts.query",
    "norms": "parts.norms",
    "keys": "parts.keys",
    "scoring": "parts.scoring",
    "output": "parts.output",
    "pool": "tables.pool",
    "quantized": "tables.quantized",
    "optim": "training.optim",
    "clip": "training.clip",
    "distributed": "training.distributed",
    "knn_attention": "knn.attention",
    "transformer": "models.transformer",
    "xlm": "integrations.xlm",
    "usage": "diagnostics.usage",
}


def __getattr__(name):
    if name in _LAZY:
        value = importlib.import_module(_LAZY[name], __name__)
        if name != "distributed":
            value = getattr(value, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``product_key_memory.<old path>`` as the module now at its new path (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.partition(".")
        if package != __name__ or old not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def __init__(self):
        self._own_specs = {}

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the import machinery gave the module the alias's spec: give it back its own
        module.__spec__ = self._own_specs.pop(module.__spec__.name)


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.append(_Alias())

__all__ = [
    "PKM",
    "ProductKeyMemory",
    "PEER",
    "UltraMem",
    "QueryNetwork",
    "ProductKeys",
    "Scoring",
    "MemoryOutput",
    "ValueTable",
    "EmbeddingValues",
    "ExpertValues",
    "MemoryPlus",
    "ValuePool",
    "QuantizedValues",
    "quantize_values_",
    "ShardedValues",
    "shard_values",
    "sharded_parameters",
    "MaskedBatchNorm",
    "QueryLayerNorm",
    "TransformerLM",
    "KNNMemory",
    "KNNAttention",
    "lm_loss",
    "fetch_pkm_value_parameters",
    "fetch_optimizer_parameters",
    "distributed",
    "SparseRowAdam",
    "build_optimizer",
    "clip_grad_norm_",
    "functional",
    "ops",
    "use_backend",
    "from_xlm",
    "MemoryUsageTracker",
    "usage_statistics",
    "save_usage_plot",
]
