"""PEER: a mixture of a million single-neuron experts chosen by product keys (He 2024, arXiv 2407.04153)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_positive_int, check_probability
from ..parts.keys import ProductKeys
from ..parts.scoring import Scoring
from ..tables.experts import ExpertValues

__all__ = ["PEER", "PeerRMSNorm"]


class PeerRMSNorm(nn.Module):
    """``normalize(x) * sqrt(dim) * (gamma + 1)``, PEER-pytorch 0.2.2's pre-norm (``gamma`` starts at 0)."""

    def __init__(self, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.gamma = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * math.sqrt(self.dim) * (self.gamma + 1)


class PEER(nn.Module):
    r"""Parameter Efficient Expert Retrieval (arXiv 2407.04153, Algorithm 1).

    Each of ``heads`` heads searches ``num_experts`` experts by product keys and keeps the best
    few; expert ``i`` is one hidden neuron, ``x -> act(x . down[i]) * up[i]``, and the output is
    the gated sum over every head's kept experts:
    ``sum_{h,j} gate(s_hj) * act(x . down[i_hj]) * up[i_hj]``.

    Built from the shared parts: the queries are one ``nn.Linear``, the search is
    :class:`~product_key_memory.ProductKeys` (``pkm::search``, exact over all ``num_experts`` slots),
    the gates are :class:`~product_key_memory.Scoring` (softmax, or ReLU for non-competing
    scores, arXiv 2310.10837), and the experts are an :class:`~product_key_memory.ExpertValues`
    table whose down and up projections are value reads (``pkm::value_read``) with row-sparse
    gradients under :func:`~product_key_memory.build_optimizer`.

    The constructor and ``forward`` are PEER-pytorch 0.2.2's, and its ``state_dict`` loads with
    ``strict=True`` (keys renamed on load: ``keys`` -> ``keys.keys``, ``weight_down_embed.weight``
    -> ``experts.down``, ``weight_up_embed.weight`` -> ``experts.up``, ``to_queries.0.weight`` ->
    ``to_queries.weight``), giving the same outputs and gradients.

    Args:
        dim: size of the input and output features (even).

    Keyword-only args:
        heads: product-key searches per token.
        num_experts: experts per set, a square (``num_keys ** 2``).
        num_experts_per_head: experts each head keeps (``<= sqrt(num_experts)``).
        activation: a module class (called with no arguments) for the hidden neuron, ``nn.GELU``.
        dim_key: width of a half-query and sub-key; ``dim // 2`` by default.
        product_key_topk: sub-keys kept per half in PEER-pytorch's two-stage search. The search
            here is exact, which the two-stage search also is whenever
            ``product_key_topk >= experts kept``; smaller values are refused.
        separate_embed_per_head: each head reads its own set of ``num_experts`` experts.
        pre_rmsnorm: :class:`PeerRMSNorm` on the input (else ``nn.Identity``).
        non_competing_scores: gates are ``relu(score)`` instead of a softmax over each head's experts.
        dropout: dropout on the hidden activations.
        non_competing_single_expert: with ``non_competing_scores=True``, PEER-pytorch 0.2.2 keeps
            one expert per head whatever ``num_experts_per_head`` says (PEER-pytorch#4). ``True``
            (default) reproduces 0.2.2, so its checkpoints give the same outputs; ``False`` keeps
            ``num_experts_per_head`` experts per head. No effect with softmax gates.
        device, dtype: factory kwargs.

    Attributes:
        experts_per_head: experts each head actually keeps.
        norm, to_queries, keys, scoring, activation, dropout, experts: the parts, called in this order.

    Shape:
        - x: ``(..., dim)``; ``train_mem_mask``: bool ``(num_experts,)`` (or ``(heads * num_experts,)``
          with separate sets), experts outside it get no gradient.
        - output: ``(..., dim)``.

    Examples::

        >>> layer = PEER(256, heads=8, num_experts=128 * 128, num_experts_per_head=16)
        >>> layer(torch.randn(2, 64, 256)).shape
        torch.Size([2, 64, 256])
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        num_experts: int = 1_000_000,
        num_experts_per_head: int = 16,
        activation: Callable[[], nn.Module] = nn.GELU,
        dim_key: Optional[int] = None,
        product_key_topk: Optional[int] = None,
        separate_embed_per_head: bool = False,
        pre_rmsnorm: bool = False,
        non_competing_scores: bool = True,
        dropout: float = 0.0,
        non_competing_single_expert: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("num_experts", num_experts),
                            ("num_experts_per_head", num_experts_per_head)):
            check_positive_int(name, value)
        if dim % 2:
            raise ValueError(f"dim must be even, got dim={dim}")
        num_keys = math.isqrt(num_experts)
        if num_keys * num_keys != num_experts:
            raise ValueError(f"num_experts must be a square (num_keys ** 2), got num_experts={num_experts}")
        dim_key = dim // 2 if dim_key is None else dim_key
        check_positive_int("dim_key", dim_key)
        for name, value in (("separate_embed_per_head", separate_embed_per_head), ("pre_rmsnorm", pre_rmsnorm),
                            ("non_competing_scores", non_competing_scores),
                            ("non_competing_single_expert", non_competing_single_expert)):
            check_bool(name, value)
        check_probability("dropout", dropout)
        if not callable(activation):
            raise TypeError(f"activation must be a module class (called with no arguments), got {activation!r}")
        kept = 1 if non_competing_scores and non_competing_single_expert else num_experts_per_head
        if kept > num_keys:
            raise ValueError(f"num_experts_per_head must be at most sqrt(num_experts)={num_keys}, got {kept}")
        product_key_topk = num_experts_per_head if product_key_topk is None else product_key_topk
        check_positive_int("product_key_topk", product_key_topk)
        if product_key_topk < kept:
            raise ValueError(
                f"product_key_topk must be at least the experts kept per head ({kept}), got {product_key_topk}: "
                "the search here is exact, and PEER-pytorch's two-stage search is not below that"
            )
        self.dim, self.heads, self.num_experts, self.num_keys, self.dim_key = dim, heads, num_experts, num_keys, dim_key
        self.num_experts_per_head, self.product_key_topk = num_experts_per_head, product_key_topk
        self.separate_embed_per_head, self.non_competing_scores = separate_embed_per_head, non_competing_scores
        self.non_competing_single_expert = non_competing_single_expert
        self.experts_per_head = kept
        factory = {"device": device, "dtype": dtype}

        self.norm = PeerRMSNorm(dim, **factory) if pre_rmsnorm else nn.Identity()
        # queries laid out (2, heads, dim_key) as PEER-pytorch's, so its weight loads unchanged
        self.to_queries = nn.Linear(dim, 2 * heads * dim_key, bias=False, **factory)
        self.keys = ProductKeys(heads, num_keys, dim_key, kept, **factory)
        self.scoring = Scoring(activation="relu" if non_competing_scores else "softmax")
        self.activation = activation()
        self.dropout = nn.Dropout(dropout)
        self.experts = ExpertValues(num_experts * (heads if separate_embed_per_head else 1), dim, **factory)
        self._register_load_state_dict_pre_hook(_rename_peer_pytorch_keys)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As PEER-pytorch 0.2.2: sub-keys ``N(0, 0.02**2)``, experts ``N(0, 1)``, queries as ``nn.Linear``."""
        self.to_queries.reset_parameters()
        nn.init.normal_(self.keys.keys, std=0.02)
        self.experts.reset_parameters()
        if isinstance(self.norm, PeerRMSNorm):
            self.norm.reset_parameters()

    def forward(self, x: Tensor, train_mem_mask: Optional[Tensor] = None) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim {self.dim}, got shape {tuple(x.shape)}")
        trainable = self._trainable(train_mem_mask)
        lead, heads, kept = x.shape[:-1], self.heads, self.experts_per_head
        x = self.norm(x).reshape(-1, self.dim)  # (N, dim)
        queries = self.to_queries(x).view(-1, 2, heads, self.dim_key).transpose(1, 2)  # (N, H, 2, dk)
        scores, slots = self.keys(queries)  # (N, H, k)
        if self.separate_embed_per_head:
            slots = slots + torch.arange(heads, device=slots.device).unsqueeze(-1) * self.num_experts
        slots = slots.reshape(-1, heads * kept)  # (N, H*k)
        hidden = self.experts.project(x, slots, trainable=trainable)  # (N, H*k), x . down[slot]
        hidden = self.dropout(self.activation(hidden))
        gates = self.scoring(scores).reshape(-1, heads * kept)  # fp32 softmax or relu
        out = self.experts(slots, hidden * gates.type_as(hidden), trainable=trainable)  # sum of gated up rows
        return out.view(*lead, self.dim)

    def _trainable(self, train_mem_mask: Optional[Tensor]) -> Optional[Tensor]:
        if train_mem_mask is None:
            return None
        n = self.experts.num_slots
        if train_mem_mask.dtype != torch.bool or train_mem_mask.dim() != 1 or (
            train_mem_mask.shape[0] not in (self.num_experts, n)
        ):
            raise ValueError(
                f"train_mem_mask must be a bool tensor of shape ({self.num_experts},) or ({n},), "
                f"got {train_mem_mask.dtype} of shape {tuple(train_mem_mask.shape)}"
            )
        # one mask for every head's set of experts
        return train_mem_mask.repeat(n // train_mem_mask.shape[0]) if train_mem_mask.shape[0] != n else train_mem_mask

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, heads={self.heads}, num_experts={self.num_experts}"
        s += f", experts_per_head={self.experts_per_head}"
        if self.separate_embed_per_head:
            s += ", separate_embed_per_head=True"
        return s


# PEER-pytorch 0.2.2's state-dict names -> this layer's
_PEER_PYTORCH_NAMES = {
    "keys": "keys.keys",
    "weight_down_embed.weight": "experts.down",
    "weight_up_embed.weight": "experts.up",
    "to_queries.0.weight": "to_queries.weight",
}


def _rename_peer_pytorch_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for old, new in _PEER_PYTORCH_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
