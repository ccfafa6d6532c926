"""Memory layers, one file each, built from the shared parts, tables and ops.

:data:`MEMORY_KINDS` names each layer that can stand where a feedforward was (``(..., dim)`` in and
out); :func:`build_memory` builds one by name, as ``TransformerLM(memory=...)`` and the Hugging
Face helper do.
"""

from typing import Dict

from torch import nn

from .memory_plus import MemoryPlus
from .peer import PEER
from .pkm import PKM, ProductKeyMemory
from .ultramem import UltraMem

__all__ = ["PKM", "ProductKeyMemory", "MemoryPlus", "PEER", "UltraMem", "MEMORY_KINDS", "build_memory"]

MEMORY_KINDS: Dict[str, type] = {"pkm": PKM, "memory_plus": MemoryPlus, "peer": PEER, "ultramem": UltraMem}


def build_memory(kind: str, dim: int, **kwargs) -> nn.Module:
    """The memory layer ``kind`` (a key of :data:`MEMORY_KINDS`) of width ``dim``, built with ``kwargs``."""
    if kind not in MEMORY_KINDS:
        raise ValueError(f"memory must be one of {tuple(MEMORY_KINDS)}, got {kind!r}")
    return MEMORY_KINDS[kind](dim, **kwargs)
