"""Diagnostics: how a trained memory uses its slots (``usage.py``)."""

from .usage import MemoryUsageTracker, save_usage_plot, usage_statistics

__all__ = ["MemoryUsageTracker", "usage_statistics", "save_usage_plot"]
