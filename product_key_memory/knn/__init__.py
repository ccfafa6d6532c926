"""KNN memory (Memorizing Transformers, arXiv 2203.08913): the memory (``memory.py``) and the
attention that reads and writes it (``attention.py``)."""

from .attention import KNNAttention
from .memory import KNNMemory, KNNMemoryList, exact_search

__all__ = ["KNNMemory", "KNNMemoryList", "KNNAttention", "exact_search"]
