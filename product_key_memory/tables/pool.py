"""A value table shared by several memory layers (the memory pool of arXiv 2412.09764)."""

from __future__ import annotations

from .._checks import check_bool, check_positive_int
from .embedding import EmbeddingValues

__all__ = ["ValuePool"]


class ValuePool(EmbeddingValues):
    r"""One ``(num_keys ** 2, dim)`` value table for several layers, each with its own keys.

    Memory+ (Berges et al. 2024, arXiv 2412.09764) lets every memory layer of a model read
    one shared pool of values while keeping its own queries and sub-keys. Pass the pool as
    ``values=`` to each :class:`PKM` (or :class:`MemoryPlus`); the layers then hold the same
    ``Parameter``, which collects gradient from every layer that reads it and which
    :func:`fetch_optimizer_parameters` counts once. Nothing is shared behind your back:
    two models that are given two pools share nothing.

    Args:
        num_keys: sub-keys per half of the layers that read the pool; it holds ``num_keys ** 2`` slots.
        dim: width of a value row, the ``value_dim`` of the layers that read it (their ``dim``
            by default, ``dim_head`` with ``concat_values_and_combine``).

    Keyword-only args:
        sparse: make the gradient of the table sparse (for ``torch.optim.SparseAdam``).
        device, dtype: factory kwargs.

    Shape:
        - weight: ``(num_keys ** 2, dim)``, initialised ``N(0, 1 / dim)`` as a layer's own table.

    Examples::

        >>> pool = ValuePool(num_keys=128, dim=512)
        >>> layers = [PKM(512, num_keys=128, values=pool) for _ in range(3)]
        >>> layers[0].values.weight is layers[2].values.weight
        True
    """

    def __init__(self, num_keys: int, dim: int, *, sparse: bool = False, device=None, dtype=None):
        for name, value in (("num_keys", num_keys), ("dim", dim)):
            check_positive_int(name, value)
        check_bool("sparse", sparse)
        self.num_keys = num_keys
        super().__init__(num_keys**2, dim, sparse=sparse, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"num_keys={self.num_keys}, dim={self.dim}" + (", sparse=True" if self.sparse else "")
