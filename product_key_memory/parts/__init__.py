"""The parts a product-key memory layer is assembled from, one module each.

A token's way through a layer: :class:`QueryNetwork` (``query.py``, with the norms of
``norms.py``) -> :class:`ProductKeys` (``keys.py``: the sub-keys and their search) ->
:class:`Scoring` (``scoring.py``) -> a value table (:mod:`product_key_memory.tables`) ->
:class:`MemoryOutput` (``output.py``). UltraMem's search is :class:`TuckerKeys` (``tucker.py``).
"""

from .keys import KEY_INITS, ProductKeys
from .norms import MaskedBatchNorm, QueryLayerNorm
from .output import MemoryOutput
from .query import QUERY_NORMS, ChannelBatchNorm, IdentityNorm, QueryMLP, QueryNetwork, query_norm
from .scoring import Scoring
from .tucker import FIRST_STAGES, TuckerKeys

__all__ = [
    "QueryNetwork", "QueryMLP", "ChannelBatchNorm", "IdentityNorm", "query_norm", "QUERY_NORMS",
    "QueryLayerNorm", "MaskedBatchNorm", "ProductKeys", "KEY_INITS", "Scoring", "MemoryOutput", "TuckerKeys", "FIRST_STAGES",
]
