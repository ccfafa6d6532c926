"""The output of a memory layer: the value read -> ``(N, dim)``, projected, dropped out, normalised."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import check_bool, check_positive_int, check_probability

__all__ = ["MemoryOutput"]


class MemoryOutput(nn.Module):
    r"""Maps what a memory read to the layer's output.

    Two layouts of the read:

    * summed heads (default): all heads' slots are read as one bag, ``(N, value_dim)``;
      a linear ``value_proj`` maps it to ``dim`` when ``value_dim != dim``;
    * ``concat_heads``: each head reads its own bag, ``(N, heads, value_dim)``; the heads
      are concatenated and ``combine`` maps them to ``dim``.

    Then dropout, then an optional LayerNorm (``norm``, arXiv 2302.06461). The pieces keep
    product-key-memory 0.3.0's names (``combine``, ``value_proj``, ``output_norm``).

    Args:
        dim: output features.
        value_dim: width of a value row.
        heads: heads read (used by ``concat_heads``).

    Keyword-only args:
        concat_heads: per-head reads, concatenated and projected.
        dropout: dropout on the output (``value_dropout``; ``0`` leaves the piece out: ``None``).
        norm: LayerNorm the output.
        device, dtype: factory kwargs.
    """

    def __init__(
        self,
        dim: int,
        value_dim: int,
        heads: int = 1,
        *,
        concat_heads: bool = False,
        dropout: float = 0.0,
        norm: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("value_dim", value_dim), ("heads", heads)):
            check_positive_int(name, value)
        # errors name this part's argument and the PKM option that sets it
        check_bool("concat_heads / PKM's concat_values_and_combine", concat_heads)
        check_bool("norm / PKM's norm_output", norm)
        check_probability("dropout / PKM's value_dropout", dropout)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.value_dim, self.heads, self.concat_heads = dim, value_dim, heads, concat_heads
        project = not concat_heads and value_dim != dim
        # registered even when absent (None), so a layer holding these pieces shows them
        self.register_module("combine", nn.Linear(heads * value_dim, dim, bias=False, **factory) if concat_heads else None)
        self.register_module("value_proj", nn.Linear(value_dim, dim, bias=False, **factory) if project else None)
        self.register_module("value_dropout", nn.Dropout(dropout) if dropout > 0 else None)  # p = 0: absent
        self.output_norm = nn.LayerNorm(dim, **factory) if norm else nn.Identity()

    def project(self, read: Tensor) -> Tensor:
        """The read ``(N, value_dim)`` (or ``(N, heads, value_dim)`` with ``concat_heads``) -> ``(N, dim)``."""
        if self.combine is not None:
            return self.combine(read.flatten(-2))
        return read if self.value_proj is None else self.value_proj(read)

    def forward(self, read: Tensor) -> Tensor:
        out = self.project(read)
        if self.value_dropout is not None:
            out = self.value_dropout(out)
        return self.output_norm(out)

    def reset_parameters(self) -> None:
        for module in (self.combine, self.value_proj, self.output_norm):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, value_dim={self.value_dim}"
        return s + (f", heads={self.heads}, concat_heads=True" if self.concat_heads else "")
