"""Memory layers, one file each, built from the shared parts, tables and ops."""

from .memory_plus import MemoryPlus
from .peer import PEER
from .pkm import PKM, ProductKeyMemory

__all__ = ["PKM", "ProductKeyMemory", "MemoryPlus", "PEER"]
