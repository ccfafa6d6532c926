"""Product-key memory layers for PyTorch (Lample et al. 2019, arXiv 1907.05242).

The core (the layer, its parts, the ops, the tables, the optimizer helpers) imports
nothing else of the package; the language model, the XLM converter and the
integrations load on first use.
"""

import importlib

from . import distributed, functional, ops
from .clip import clip_grad_norm_
from .distributed import ShardedValues, shard_values, sharded_parameters
from .keys import ProductKeys
from .knn import KNNMemory
from .knn_attention import KNNAttention
from .memory_plus import MemoryPlus
from .norms import MaskedBatchNorm, QueryLayerNorm
from .ops import use_backend
from .optim import SparseRowAdam, build_optimizer, fetch_optimizer_parameters, fetch_pkm_value_parameters
from .output import MemoryOutput
from .pkm import PKM, ProductKeyMemory
from .pool import ValuePool
from .quantized import QuantizedValues, quantize_values_
from .query import QueryNetwork
from .scoring import Scoring
from .tables import EmbeddingValues, ValueTable
from .usage import MemoryUsageTracker, save_usage_plot, usage_statistics

__version__ = "0.4.0"

# name -> module, imported on first access (PEP 562)
_LAZY = {"TransformerLM": ".transformer", "lm_loss": ".transformer", "from_xlm": ".xlm"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PKM",
    "ProductKeyMemory",
    "QueryNetwork",
    "ProductKeys",
    "Scoring",
    "MemoryOutput",
    "ValueTable",
    "EmbeddingValues",
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
