"""product-key-memory 0.3.0's module ``product_key_memory.product_key_memory``: its public names."""

from .layers.pkm import PKM
from .training.optim import fetch_optimizer_parameters, fetch_pkm_value_parameters

__all__ = ["PKM", "fetch_pkm_value_parameters", "fetch_optimizer_parameters"]
