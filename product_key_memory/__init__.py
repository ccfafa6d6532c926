"""Product-key memory layers for PyTorch (Lample et al. 2019, arXiv 1907.05242)."""

from . import distributed, functional
from .distributed import ShardedValues, shard_values, sharded_parameters
from .knn import KNNMemory
from .knn_attention import KNNAttention
from .memory_plus import MemoryPlus
from .norms import MaskedBatchNorm, QueryLayerNorm
from .optim import SparseRowAdam, build_optimizer, fetch_optimizer_parameters, fetch_pkm_value_parameters
from .pkm import PKM, ProductKeyMemory
from .pool import ValuePool
from .transformer import TransformerLM, lm_loss
from .usage import MemoryUsageTracker, save_usage_plot, usage_statistics
from .xlm import from_xlm

__version__ = "0.4.0"

__all__ = [
    "PKM",
    "ProductKeyMemory",
    "MemoryPlus",
    "ValuePool",
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
    "functional",
    "from_xlm",
    "MemoryUsageTracker",
    "usage_statistics",
    "save_usage_plot",
]
