"""UltraMem: an ultra-sparse memory layer (Huang et al. 2024, arXiv 2411.12364; UltraMemV2, arXiv 2508.18756).

Formulas from the official code, ZihaoHuang-notabot/Ultra-Sparse-Memory-Network at commit 041104b
(Apache-2.0): ``olmo/ultramem_layer.py`` (cited ``ultramem_layer.py:LINE``), ``olmo/ultramem_layer_v2.py``
(``ultramem_layer_v2.py:LINE``) and ``olmo/optim.py`` (``optim.py:LINE``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_positive_int
from .. import functional as PF
from ..parts.scoring import Scoring
from ..parts.tucker import FIRST_STAGES, TuckerKeys
from ..tables.base import ValueTable
from ..tables.ive import ImplicitValues

__all__ = ["UltraMem", "ultramem_aux_loss"]


class UltraMem(nn.Module):
    r"""UltraMem (arXiv 2411.12364): Tucker-decomposed retrieval over implicitly expanded values.

    A token's way through the layer, each step a submodule:

    1. ``to_queries`` (``nn.Linear``) then ``query_norm`` (``nn.LayerNorm`` on each half-query,
       ``ultramem_layer.py:175-178``): ``heads`` pairs of half-queries;
    2. ``keys``: a :class:`~product_key_memory.parts.tucker.TuckerKeys` (TDQKR): row and column scores
       combined through ``cores`` rank-``rank`` Tucker cores, a first selection on the cores' rank-1
       approximation, the exact core scores on the candidates, the ``topk`` best of ``num_keys ** 2``
       virtual slots per head, with each core's score;
    3. ``scoring``: a :class:`~product_key_memory.Scoring` over each head's ``topk`` scores of each core
       (``"none"`` by default: the official code weights values by the raw scores, ``ultramem_layer.py:262``);
    4. ``values``: an :class:`~product_key_memory.tables.ive.ImplicitValues` (IVE): the ``num_keys ** 2``
       virtual slots are ``num_keys ** 2 // value_expansion`` stored rows, each seen through one of
       ``value_expansion`` projections; a row is cut into ``cores`` pieces, piece ``c`` weighted by core
       ``c``'s score (``ultramem_layer.py:241, 261-262``; the table's slot ``s * cores + c`` is piece ``c``
       of virtual slot ``s``). Every head's reads are summed.

    The auxiliary loss on the cores (:meth:`aux_loss`, ``ultramem_layer.py:152``) depends on the
    parameters only: add ``coef * layer.aux_loss()`` (or :func:`ultramem_aux_loss` of the model) to the
    training loss. The value learning rate's decaying multiplier is
    :func:`~product_key_memory.training.schedules.value_lr_multiplier`.

    Args:
        dim: size of the input and output features.

    Keyword-only args:
        heads: searches per token (``head``), summed.
        num_keys: sub-keys per half: ``num_keys ** 2`` virtual slots.
        topk: slots kept per head (``knn``).
        dim_key: width of a half-query and sub-key (``kdim``), ``dim // 2`` by default.
        rank: Tucker rank (``tucker_rank``).
        cores: Tucker cores (``tucker_multihead``); ``value_dim`` must be a multiple of it.
        value_expansion: virtual slots per stored row (``value_expand_time``); divides ``num_keys ** 2``.
        value_dim: width of a stored row (``vdim``), ``dim`` by default (``values.dim`` with ``values``).
        candidates, first_stage, aux_threshold: of :class:`~product_key_memory.parts.tucker.TuckerKeys`.
        score_activation: ``"none"``, ``"softmax"`` or ``"relu"`` (:class:`~product_key_memory.Scoring`).
        values: a :class:`~product_key_memory.ValueTable` of stored rows shared with other layers (e.g. a
            :class:`~product_key_memory.ValuePool`); ``None`` makes this layer's own.
        value_offset: where this layer's rows start in ``values`` (UltraMemV2's ``layer_id * knum ** 2``,
            ``ultramem_layer_v2.py:126``).
        device, dtype: factory kwargs.

    Shape:
        - x: ``(..., dim)``; output ``(..., dim)``.

    Examples::

        >>> layer = UltraMem(256, num_keys=64, topk=16, rank=2, cores=2, value_expansion=4)
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
        >>> pool = EmbeddingValues(2 * 64 * 64 // 4, 256)  # two layers' rows in one table
        >>> a, b = UltraMem(256, num_keys=64, values=pool), UltraMem(256, num_keys=64, values=pool, value_offset=1024)
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 1,
        num_keys: int = 64,
        topk: int = 16,
        dim_key: Optional[int] = None,
        rank: int = 2,
        cores: int = 2,
        value_expansion: int = 4,
        value_dim: Optional[int] = None,
        candidates: Optional[int] = None,
        first_stage: str = "two_sided",
        aux_threshold: float = 0.15,
        score_activation: str = "none",
        values: Optional[ValueTable] = None,
        value_offset: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("num_keys", num_keys), ("topk", topk),
                            ("value_expansion", value_expansion)):
            check_positive_int(name, value)
        dim_key = max(1, dim // 2) if dim_key is None else dim_key
        check_positive_int("dim_key", dim_key)
        check_choice("score_activation", score_activation, PF.SCORE_ACTIVATIONS)
        check_choice("first_stage", first_stage, FIRST_STAGES)
        if (num_keys**2) % value_expansion:
            raise ValueError(f"value_expansion must divide num_keys ** 2={num_keys ** 2}, got {value_expansion}")
        self.dim, self.heads, self.num_keys, self.topk, self.dim_key = dim, heads, num_keys, topk, dim_key
        factory = {"device": device, "dtype": dtype}
        self.to_queries = nn.Linear(dim, heads * 2 * dim_key, bias=False, **factory)
        self.query_norm = nn.LayerNorm(dim_key, **factory)
        self.keys = TuckerKeys(heads, num_keys, dim_key, topk, rank=rank, cores=cores, candidates=candidates,
                               first_stage=first_stage, aux_threshold=aux_threshold, **factory)
        self.scoring = Scoring(activation=score_activation)
        self.values = ImplicitValues(num_keys**2, dim, expansion=value_expansion, value_dim=value_dim, chunks=cores,
                                     values=values, offset=value_offset, **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As ``ultramem_layer.py:111-127``: queries ``N(0, 1 / dim_key)``, the query norm's weight
        ``dim_key ** -0.33``; the keys and values as their parts' ``reset_parameters``."""
        nn.init.normal_(self.to_queries.weight, std=self.dim_key**-0.5)
        nn.init.constant_(self.query_norm.weight, self.dim_key**-0.33)
        nn.init.zeros_(self.query_norm.bias)
        self.keys.reset_parameters()
        self.values.reset_parameters()

    def aux_loss(self) -> Tensor:
        """The cores' auxiliary loss (:meth:`TuckerKeys.aux_loss`), a scalar to add to the training loss."""
        return self.keys.aux_loss()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim {self.dim}, got shape {tuple(x.shape)}")
        lead, heads, k = x.shape[:-1], self.heads, self.topk
        x = x.reshape(-1, self.dim)  # (N, dim)
        queries = self.query_norm(self.to_queries(x).view(-1, heads, 2, self.dim_key))  # (N, H, 2, dk)
        scores, slots = self.keys(queries)  # (N, H, k, C), (N, H, k)
        weights = self.scoring(scores.transpose(-1, -2)).transpose(-1, -2)  # over each core's k slots, fp32
        cores = weights.shape[-1]
        pieces = slots.unsqueeze(-1) * cores + torch.arange(cores, device=slots.device)  # piece c of each slot
        # every piece of each slot, in order: the table reads each stored row once per slot
        out = self.values(pieces.reshape(-1, heads * k * cores), weights.reshape(-1, heads * k * cores),
                          whole_slots=True)
        return out.view(*lead, self.dim)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, heads={self.heads}, num_keys={self.num_keys}, topk={self.topk}"
        if self.dim_key != max(1, self.dim // 2):
            s += f", dim_key={self.dim_key}"
        return s


def ultramem_aux_loss(module: nn.Module) -> Tensor:
    """The sum of :meth:`UltraMem.aux_loss` over ``module``'s UltraMem layers (0 when it has none)."""
    losses = [m.aux_loss() for m in module.modules() if isinstance(m, UltraMem)]
    return torch.stack(losses).sum() if losses else torch.zeros(())
