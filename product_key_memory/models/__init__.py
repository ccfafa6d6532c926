"""Models with memory layers: a decoder-only transformer LM (``transformer.py``)."""

from .transformer import TransformerLM, lm_loss

__all__ = ["TransformerLM", "lm_loss"]
