"""Memory+: a product-key memory with a gated output (Berges et al. 2024, arXiv 2412.09764)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from .pkm import PKM, real_tokens

__all__ = ["MemoryPlus"]


class MemoryPlus(nn.Module):
    r"""A memory read gated by the input and projected: ``W_out(memory(x) * silu(W_gate(x)))``.

    The "swilu" output of Memory+ (arXiv 2412.09764), which the paper found to train more
    stably than the bare read. The memory is a :class:`PKM`, built here from ``pkm_kwargs``
    or passed in, so its options compose: ``values=ValuePool(...)`` shares one table between
    layers, ``qk_norm=True`` normalises queries and keys (both as Memory+).

    Args:
        dim: size of the input and output features.

    Keyword-only args:
        memory: the memory to wrap, a module mapping ``(..., dim)`` to ``(..., dim)`` with
            :class:`PKM`'s ``forward`` arguments and a ``dim`` attribute. Without it a
            ``PKM(dim, **pkm_kwargs)`` is built.
        device, dtype: factory kwargs (also passed to the PKM built here).
        **pkm_kwargs: arguments of :class:`PKM` (``heads``, ``num_keys``, ``topk``, ``dim_head``,
            ``values``, ``qk_norm``, ...); only without ``memory``.

    Attributes:
        memory: the wrapped memory.
        to_gate, to_out: ``dim -> dim`` linear maps without bias, initialised as ``nn.Linear``.

    Shape:
        - x: ``(..., dim)``; ``input_mask``: ``x.shape[:-1]``, bool, ``True`` for real tokens (or
          ``padding_mask``, ``True`` for padding, PyTorch's polarity).
        - output: ``(..., dim)``; zero where ``input_mask`` is ``False``.

    Examples::

        >>> layer = MemoryPlus(512, heads=4, num_keys=256, topk=32, qk_norm=True)
        >>> layer(torch.randn(2, 128, 512)).shape
        torch.Size([2, 128, 512])
    """

    def __init__(self, dim: int, *, memory: Optional[nn.Module] = None, device=None, dtype=None, **pkm_kwargs):
        super().__init__()
        check_positive_int("dim", dim)
        if memory is None:
            memory = PKM(dim, device=device, dtype=dtype, **pkm_kwargs)
        elif pkm_kwargs:
            raise ValueError(f"pass either memory or PKM arguments, got memory and {sorted(pkm_kwargs)}")
        elif not isinstance(memory, nn.Module):
            raise TypeError(f"memory must be an nn.Module, got {type(memory).__name__}")
        elif getattr(memory, "dim", None) != dim:
            raise ValueError(f"memory.dim must equal dim={dim}, got {getattr(memory, 'dim', None)!r}")
        self.dim = dim
        self.memory = memory
        self.to_gate = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_out = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """The gate and output maps as ``nn.Linear``; the memory keeps its own parameters."""
        self.to_gate.reset_parameters()
        self.to_out.reset_parameters()

    def forward(
        self,
        x: Tensor,
        input_mask: Optional[Tensor] = None,
        mem_trainable_mask: Optional[Tensor] = None,
        gumbel_noise_scale: float = 0.0,
        *,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``x (..., dim)`` -> ``(..., dim)``; the masks as :meth:`PKM.forward`'s."""
        input_mask = real_tokens(input_mask, padding_mask)
        read = self.memory(x, input_mask, mem_trainable_mask, gumbel_noise_scale)  # checks the arguments
        if input_mask is not None:
            x = torch.where(input_mask.unsqueeze(-1), x, 0.0)  # padded garbage (even NaN) stays out of the gate
        # the read is zero on padded tokens and the maps have no bias, so those outputs stay zero
        return self.to_out(read * F.silu(self.to_gate(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
