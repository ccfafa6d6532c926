"""Product keys and their search: half-queries -> the ``topk`` best of ``num_keys ** 2`` slots."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import functional as PF
from .._checks import check_bool, check_choice, check_positive_int
from ..ops.search import check_num_keys

__all__ = ["ProductKeys", "KEY_INITS"]

KEY_INITS = ("normal", "uniform")


class ProductKeys(nn.Module):
    r"""The sub-keys of a product-key memory and their search (arXiv 1907.05242, sec. 3.2).

    Each of ``heads`` heads has two sets of ``num_keys`` sub-keys of size ``dim_head``; a
    slot ``i1 * num_keys + i2`` is the pair of sub-key ``i1`` of the first half and ``i2`` of
    the second, scored by the sum of the two half-query dot products. The search finds the
    ``topk`` best slots exactly while scoring only the sub-keys and about ``topk * ln(topk)``
    candidate pairs (:func:`functional.product_key_search`, the op ``pkm::search``).

    Args:
        heads, num_keys, dim_head: sizes; ``topk``: slots chosen per head (``<= num_keys``).
            ``num_keys`` is at most 65536 (``ops.search.MAX_NUM_KEYS``; a slot is held in 32 bits
            on every backend): larger raises ``ValueError``.

    Keyword-only args:
        init: ``"normal"`` (std ``dim_head ** -0.5``, 0.3.0) or ``"uniform"``
            (``±dim_head ** -0.5``, the paper's code).
        freeze: the keys get no gradient (``requires_grad=False``).
        qk_norm: score with normalised half-queries and sub-keys (:func:`functional.qk_normalize`,
            as Memory+, arXiv 2412.09764). Parameter-free.
        differentiable_topk: select sub-keys with the coordinate-descent top-k of
            ``colt5_attention``, which passes gradient to the sub-key scores.
        device, dtype: factory kwargs.

    Attributes:
        keys: the sub-keys, ``(heads, num_keys, 2, dim_head)`` (product-key-memory 0.3.0's layout).

    Shape:
        - queries: ``(..., heads, 2, dim_head)``.
        - output: ``scores`` (float32, float64 for float64 input) and ``slots`` (long),
          ``(..., heads, topk)``, best first, the lower slot first on ties (not with
          ``differentiable_topk``, whose sub-key selection breaks ties as ``torch.topk``).
    """

    def __init__(
        self,
        heads: int,
        num_keys: int,
        dim_head: int,
        topk: int,
        *,
        init: str = "normal",
        freeze: bool = False,
        qk_norm: bool = False,
        differentiable_topk: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("heads", heads), ("num_keys", num_keys), ("dim_head", dim_head), ("topk", topk)):
            check_positive_int(name, value)
        if topk > num_keys:
            raise ValueError(f"topk must be at most num_keys={num_keys}, got topk={topk}")
        check_num_keys(num_keys)
        # errors name this part's argument and the PKM option that sets it
        check_choice("init / PKM's key_init", init, KEY_INITS)
        for name, value in (("freeze / PKM's freeze_keys", freeze), ("qk_norm", qk_norm),
                            ("differentiable_topk", differentiable_topk)):
            check_bool(name, value)
        self.heads, self.num_keys, self.dim_head, self.topk = heads, num_keys, dim_head, topk
        self.init, self.qk_norm, self.differentiable_topk = init, qk_norm, differentiable_topk
        keys = torch.empty(heads, num_keys, 2, dim_head, device=device, dtype=dtype)
        self.keys = nn.Parameter(keys, requires_grad=not freeze)
        self.reset_parameters()

    @property
    def num_slots(self) -> int:
        return self.num_keys**2

    @property
    def freeze(self) -> bool:
        """Whether the keys are frozen (no gradient); follows ``keys.requires_grad``."""
        return not self.keys.requires_grad

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the keys: ``N(0, 1 / dim_head)`` (``init="normal"``) or ``U(±dim_head ** -0.5)``."""
        bound = 1.0 / math.sqrt(self.dim_head)
        if self.init == "uniform":
            nn.init.uniform_(self.keys, -bound, bound)
        else:
            nn.init.normal_(self.keys, std=bound)

    def forward(self, queries: Tensor, gumbel_noise_scale: float = 0.0) -> Tuple[Tensor, Tensor]:
        """Queries ``(..., heads, 2, dim_head)`` -> ``scores, slots`` ``(..., heads, topk)``.

        ``gumbel_noise_scale`` adds Gumbel noise to the sub-key scores in training (exploration).
        """
        keys = self.keys.transpose(1, 2)  # (H, 2, num_keys, d), a view: no copy
        if self.qk_norm:
            queries, keys = PF.qk_normalize(queries, keys)
        return PF.product_key_search(
            queries, keys, self.topk, subkey_topk=_coor_descent_topk if self.differentiable_topk else None,
            gumbel_noise_scale=gumbel_noise_scale if self.training else 0.0,
        )

    def extra_repr(self) -> str:
        s = f"heads={self.heads}, num_keys={self.num_keys}, dim_head={self.dim_head}, topk={self.topk}"
        for name, value, default in (
            ("init", self.init, "normal"),
            ("freeze", self.freeze, False),
            ("qk_norm", self.qk_norm, False),
            ("differentiable_topk", self.differentiable_topk, False),
        ):
            if value != default:
                s += f", {name}={value!r}"
        return s


def _coor_descent_topk(scores: Tensor, k: int) -> Tuple[Tensor, Optional[Tensor]]:
    from colt5_attention import topk as coor_descent_topk  # only layers that use it pay for its import

    values, indices, *_ = coor_descent_topk(scores, k=k, fused=True)
    return values, indices
