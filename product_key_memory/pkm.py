"""The product-key memory layer (Lample et al. 2019, arXiv 1907.05242)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import functional as PF
from ._checks import check_positive_int, check_probability
from .query import QUERY_NORMS, QueryMLP, query_norm as make_query_norm

__all__ = ["PKM", "ProductKeyMemory"]


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


KEY_INITS = ("normal", "uniform")
VALUE_INITS = ("normal", "zeros")


class PKM(nn.Module):
    r"""Product-key memory: a drop-in replacement for a transformer feedforward.

    Each token makes ``heads`` queries. A query is split into two halves; each half
    scores its own ``num_keys`` sub-keys, the ``topk`` best of each half combine into
    candidates over a table of ``num_keys ** 2`` slots, the best ``topk`` slots are
    weighted by a softmax over their scores, and their value rows are summed over all
    heads.

    Args:
        dim: size of the input and output features.
        heads: number of query heads, each selecting its own ``topk`` slots.
        num_keys: sub-keys per half; the table holds ``num_keys ** 2`` slots.
        topk: slots read per head (``1 <= topk <= num_keys``).
        dim_head: size of each half-query and sub-key.
        input_dropout, query_dropout, value_dropout, attn_dropout: dropout on the
            input, the normalised queries, the output and the slot weights.
        use_layernorm: normalise each half-query with a LayerNorm (default). With
            ``False``, a batch norm over the query features whose statistics leave
            out padded tokens (the paper's setting; it mixes tokens of a batch, so
            it is not causal at training time).
        pre_layernorm: LayerNorm the input first.
        differentiable_topk: select sub-keys with the coordinate-descent top-k of
            ``colt5_attention``, which passes gradient to the sub-key scores.
        concat_values_and_combine: each head reads its own ``dim_head``-wide values;
            the heads are concatenated and projected to ``dim``.
        norm_output: LayerNorm the output (arXiv 2302.06461).
        non_competitive_gates: ReLU instead of a softmax over the slot scores
            (Csordas et al. 2023, arXiv 2310.10837).

    Keyword-only args (the defaults are product-key-memory 0.3.0; see the README's
    "Reproducing the paper's layer" for the settings of the paper's reference code):
        values: a module whose ``weight`` is the ``(num_keys ** 2, value_dim)`` value
            table, to share one table between layers (see :class:`ValuePool`). It is used
            as given, not re-initialised; its ``sparse`` attribute decides the gradient
            layout. A module with a ``read(indices, weights, *, trainable)`` method and
            ``num_embeddings``/``embedding_dim`` sizes (e.g. :class:`ShardedValues`, a
            table split over processes) does the read itself.
        qk_norm: score with normalised half-queries and sub-keys (:func:`functional.qk_normalize`,
            as Memory+, arXiv 2412.09764). Parameter-free: the state dict is unchanged.
        query_bias: give the query projection (and hidden layers) a bias.
        query_hidden: sizes of hidden layers before the query projection, each
            ``Linear, [BatchNorm], ReLU`` (:class:`~product_key_memory.query.QueryMLP`).
        query_hidden_batchnorm: a masked batch norm after each hidden linear layer.
        query_norm: ``"layernorm"``, ``"batchnorm"`` (over ``dim_head`` features, shared
            by heads and halves), ``"channel_batchnorm"`` (one statistic per query
            channel, as the paper's code) or ``"none"``; ``None`` follows ``use_layernorm``.
            Batch norms leave padded tokens out of their statistics.
        temperature: slot scores are divided by it before the softmax.
        score_softmax: softmax over the ``topk`` slot scores (``False``: raw scores).
        score_subtract: ``None``, ``"min"``, ``"mean"`` or ``"median"``, subtracted
            from the weights after the softmax.
        score_normalize: L1-normalise the weights last.
        value_dim: width of the value rows (default ``dim``, or ``dim_head`` with
            ``concat_values_and_combine``); a linear ``value_proj`` maps them to ``dim``
            when they differ.
        key_init: ``"normal"`` (std ``dim_head ** -0.5``, 0.3.0) or ``"uniform"``
            (``±dim_head ** -0.5``, the paper's code).
        value_init: ``"normal"`` (std ``value_dim ** -0.5``) or ``"zeros"``.
        freeze_keys: keys get no gradient (``requires_grad=False``).
        sparse_values: sparse value gradients, for ``torch.optim.SparseAdam``.
        device, dtype: factory kwargs for every parameter.

    Attributes:
        usage_hook: ``None``, or a callable ``(indices, weights, mask)`` called after each
            search with slots and weights ``(N, heads, topk)`` and the token mask ``(N,)``
            (or ``None``); :class:`~product_key_memory.usage.MemoryUsageTracker` sets it.

    Shape:
        - x: ``(..., dim)``; ``input_mask``: ``x.shape[:-1]``, bool, ``True`` for real tokens.
        - ``mem_trainable_mask``: ``(num_keys ** 2,)`` bool, the value rows that may learn.
        - output: ``(..., dim)``; zero where ``input_mask`` is ``False``.

    Examples::

        >>> pkm = PKM(dim=512, heads=4, num_keys=256, topk=32, dim_head=128)
        >>> x = torch.randn(2, 1024, 512)
        >>> pkm(x).shape
        torch.Size([2, 1024, 512])
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        num_keys: int = 128,
        topk: int = 32,
        dim_head: int = 128,
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        use_layernorm: bool = True,
        pre_layernorm: bool = False,
        differentiable_topk: bool = False,
        concat_values_and_combine: bool = False,
        norm_output: bool = False,
        non_competitive_gates: bool = False,
        *,
        values: Optional[nn.Module] = None,
        query_bias: bool = False,
        query_hidden: Sequence[int] = (),
        query_hidden_batchnorm: bool = False,
        query_norm: Optional[str] = None,
        temperature: float = 1.0,
        score_softmax: bool = True,
        score_subtract: Optional[str] = None,
        score_normalize: bool = False,
        value_dim: Optional[int] = None,
        key_init: str = "normal",
        value_init: str = "normal",
        freeze_keys: bool = False,
        sparse_values: bool = False,
        qk_norm: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("num_keys", num_keys), ("topk", topk), ("dim_head", dim_head)):
            check_positive_int(name, value)
        if topk > num_keys:
            raise ValueError(f"topk must be at most num_keys={num_keys}, got topk={topk}")
        for name, value in (
            ("input_dropout", input_dropout),
            ("query_dropout", query_dropout),
            ("value_dropout", value_dropout),
            ("attn_dropout", attn_dropout),
        ):
            check_probability(name, value)
        if query_norm is None:
            query_norm = "layernorm" if use_layernorm else "batchnorm"
        _check_choice("query_norm", query_norm, QUERY_NORMS)
        if not use_layernorm and query_norm != "batchnorm":
            raise ValueError(
                f"use_layernorm=False means query_norm='batchnorm', got query_norm={query_norm!r}: pass only query_norm"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        _check_choice("score_subtract", score_subtract, (None,) + PF.SCORE_SUBTRACTS)
        if non_competitive_gates and not score_softmax:
            raise ValueError(
                "non_competitive_gates replaces the softmax by a ReLU; it cannot be combined with score_softmax=False"
            )
        _check_choice("key_init", key_init, KEY_INITS)
        _check_choice("value_init", value_init, VALUE_INITS)
        if value_dim is not None:
            check_positive_int("value_dim", value_dim)
        if not isinstance(query_hidden, (list, tuple)):
            raise TypeError(f"query_hidden must be a list or tuple of hidden sizes, got {query_hidden!r}")
        factory = dict(device=device, dtype=dtype)

        self.dim = dim
        self.heads = heads
        self.num_keys = num_keys
        self.topk = topk
        self.dim_head = dim_head
        self.num_memories = num_keys**2
        self.use_layernorm = query_norm == "layernorm"
        self.query_norm = query_norm
        self.temperature = float(temperature)
        self.score_activation = "relu" if non_competitive_gates else ("softmax" if score_softmax else "none")
        self.score_subtract = score_subtract
        self.score_normalize = score_normalize
        self.key_init = key_init
        self.value_init = value_init
        self.usage_hook: Optional[Callable[[Tensor, Tensor, Optional[Tensor]], None]] = None
        self.differentiable_topk = differentiable_topk
        self.concat_values_and_combine = concat_values_and_combine
        self.non_competitive_gates = non_competitive_gates
        if not isinstance(qk_norm, bool):
            raise TypeError(f"qk_norm must be a bool, got {qk_norm!r}")
        self.qk_norm = qk_norm

        self.pre_layernorm = nn.LayerNorm(dim, **factory) if pre_layernorm else nn.Identity()
        self.input_dropout = nn.Dropout(input_dropout)
        hidden_options = dict(bias=query_bias, batchnorm=query_hidden_batchnorm, **factory)
        self.query_hidden = QueryMLP(dim, query_hidden, **hidden_options) if query_hidden else None
        query_in = dim if self.query_hidden is None else self.query_hidden.out_features
        self.to_queries = nn.Linear(query_in, 2 * heads * dim_head, bias=query_bias, **factory)  # rows (half, head, d)
        self.norm = make_query_norm(query_norm, heads, dim_head, **factory)
        self.query_dropout = nn.Dropout(query_dropout)
        # 0.3.0 layout (heads, num_keys, half, dim_head); searched through a transposed view
        self.keys = nn.Parameter(torch.empty(heads, num_keys, 2, dim_head, **factory), requires_grad=not freeze_keys)
        self.attn_dropout = nn.Dropout(attn_dropout)

        if value_dim is None:
            value_dim = dim_head if concat_values_and_combine else dim
        self.value_dim = value_dim
        self._owns_values = values is None
        if values is None:
            values = nn.EmbeddingBag(self.num_memories, value_dim, mode="sum", sparse=sparse_values, **factory)
        else:
            if sparse_values and not getattr(values, "sparse", False):
                raise ValueError("sparse_values=True needs the shared values module to have sparse=True")
            weight = getattr(values, "weight", None)
            got = None if not isinstance(weight, Tensor) else tuple(weight.shape)
            if callable(getattr(values, "read", None)):  # reads itself; weight may be a slice
                got = (getattr(values, "num_embeddings", None), getattr(values, "embedding_dim", None))
            if got != (self.num_memories, value_dim):
                raise ValueError(
                    f"values must be a module whose weight has shape (num_keys ** 2, {value_dim}) = "
                    f"({self.num_memories}, {value_dim}), got table shape {got}"
                )
        self.values = values
        self.combine = nn.Linear(heads * value_dim, dim, bias=False, **factory) if concat_values_and_combine else None
        project = not concat_values_and_combine and value_dim != dim
        self.value_proj = nn.Linear(value_dim, dim, bias=False, **factory) if project else None
        self.value_dropout = nn.Dropout(value_dropout)
        self.output_norm = nn.LayerNorm(dim, **factory) if norm_output else nn.Identity()

        self.register_buffer("pairs", PF.candidate_pairs(topk, device=device), persistent=False)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keys ~ N(0, 1 / dim_head) (``key_init="normal"``, as 0.3.0) or U(±dim_head ** -0.5)
        (``"uniform"``); owned values ~ N(0, 1 / value_dim) (as 0.3.0) or zeros; linear
        layers as ``nn.Linear``."""
        bound = 1.0 / math.sqrt(self.dim_head)
        if self.key_init == "uniform":
            nn.init.uniform_(self.keys, -bound, bound)
        else:
            nn.init.normal_(self.keys, std=bound)
        if self._owns_values:
            if self.value_init == "zeros":
                nn.init.zeros_(self.values.weight)
            else:
                nn.init.normal_(self.values.weight, std=1.0 / math.sqrt(self.values.weight.shape[-1]))
        self.to_queries.reset_parameters()
        parts = (self.query_hidden, self.pre_layernorm, self.norm, self.combine, self.value_proj, self.output_norm)
        for module in parts:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    # -- the three stages, usable on their own -------------------------------------------------

    def queries(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Flat tokens ``(N, dim)`` -> normalised queries ``(N, heads, 2, dim_head)``."""
        x = self.input_dropout(self.pre_layernorm(x))
        if self.query_hidden is not None:
            x = self.query_hidden(x, mask)
        q = self.to_queries(x).unflatten(-1, (2, self.heads, self.dim_head))  # (N, 2, H, d)
        q = self.query_dropout(self.norm(q, mask))
        return q.transpose(1, 2)  # (N, H, 2, d)

    def search(self, queries: Tensor, gumbel_noise_scale: float = 0.0):
        """Queries ``(N, heads, 2, dim_head)`` -> slot weights and slots, ``(N, heads, topk)``."""
        keys = self.keys.transpose(1, 2)  # (H, 2, num_keys, d), a view: no copy
        if self.qk_norm:
            queries, keys = PF.qk_normalize(queries, keys)
        subkey_topk = _coor_descent_topk if self.differentiable_topk else None
        if gumbel_noise_scale > 0.0 and self.training:
            sub = PF.subkey_scores(queries, keys)  # (N, H, 2, num_keys)
            sub = sub + PF.gumbel_noise_like(sub) * gumbel_noise_scale
            scores, indices = PF.product_topk(sub, self.topk, subkey_topk=subkey_topk, pairs=self.pairs)
        else:
            scores, indices = PF.product_key_search(queries, keys, self.topk, subkey_topk=subkey_topk, pairs=self.pairs)
        weights = PF.rescore(
            scores,
            temperature=self.temperature,
            activation=self.score_activation,
            subtract=self.score_subtract,
            normalize=self.score_normalize,
        )
        return self.attn_dropout(weights), indices

    def read(self, indices: Tensor, weights: Tensor, mem_trainable_mask: Optional[Tensor] = None) -> Tensor:
        """Slots and weights ``(N, heads, topk)`` -> output ``(N, dim)`` before dropout and norm."""
        if self.combine is not None:
            per_head = self._value_read(indices, weights, mem_trainable_mask)  # (N, H, d)
            return self.combine(per_head.flatten(-2))
        out = self._value_read(indices.flatten(-2), weights.flatten(-2), mem_trainable_mask)  # reads (N, H * topk)
        return out if self.value_proj is None else self.value_proj(out)

    def _value_read(self, indices: Tensor, weights: Tensor, trainable: Optional[Tensor]) -> Tensor:
        read = getattr(self.values, "read", None)
        if callable(read):  # e.g. ShardedValues: its columns live on several processes
            return read(indices, weights, trainable=trainable)
        sparse = bool(getattr(self.values, "sparse", False))
        return PF.value_read(self.values.weight, indices, weights, trainable=trainable, sparse=sparse)

    def forward(
        self,
        x: Tensor,
        input_mask: Optional[Tensor] = None,
        mem_trainable_mask: Optional[Tensor] = None,
        gumbel_noise_scale: float = 0.0,
    ) -> Tensor:
        lead = self._check_input(x, input_mask, mem_trainable_mask, gumbel_noise_scale)
        x = x.reshape(-1, self.dim)  # (N, dim)
        mask = None
        if input_mask is not None:
            mask = input_mask.reshape(-1)
            x = torch.where(mask.unsqueeze(-1), x, 0.0)  # padded garbage (even NaN) never flows anywhere

        q = self.queries(x, mask)
        weights, indices = self.search(q, gumbel_noise_scale)
        if mask is not None:
            weights = torch.where(mask.view(-1, 1, 1), weights, 0.0)
        if self.usage_hook is not None:
            self.usage_hook(indices, weights, mask)
        out = self.read(indices, weights.to(self.values.weight.dtype), mem_trainable_mask)
        out = self.output_norm(self.value_dropout(out))
        if mask is not None:
            out = torch.where(mask.unsqueeze(-1), out, 0.0)
        return out.view(*lead, self.dim)

    def _check_input(self, x, input_mask, mem_trainable_mask, gumbel_noise_scale):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., dim={self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
        lead = x.shape[:-1]
        if input_mask is not None:
            if not isinstance(input_mask, Tensor) or input_mask.dtype != torch.bool:
                got = input_mask.dtype if isinstance(input_mask, Tensor) else type(input_mask).__name__
                raise TypeError(f"input_mask must be a bool tensor, got {got}")
            if input_mask.shape != lead:
                raise ValueError(
                    f"input_mask must have shape x.shape[:-1] = {tuple(lead)}, got {tuple(input_mask.shape)}"
                )
        if mem_trainable_mask is not None:
            if not isinstance(mem_trainable_mask, Tensor) or mem_trainable_mask.dtype != torch.bool:
                got = mem_trainable_mask.dtype if isinstance(mem_trainable_mask, Tensor) else type(mem_trainable_mask).__name__
                raise TypeError(f"mem_trainable_mask must be a bool tensor, got {got}")
            if mem_trainable_mask.shape != (self.num_memories,):
                raise ValueError(
                    f"mem_trainable_mask must have shape (num_keys ** 2,) = ({self.num_memories},), "
                    f"got {tuple(mem_trainable_mask.shape)}"
                )
        if isinstance(gumbel_noise_scale, bool) or not isinstance(gumbel_noise_scale, (int, float)) or gumbel_noise_scale < 0:
            raise ValueError(f"gumbel_noise_scale must be a non-negative float, got {gumbel_noise_scale!r}")
        return lead

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, heads={self.heads}, num_keys={self.num_keys}, topk={self.topk}, dim_head={self.dim_head}"
        for flag in ("differentiable_topk", "concat_values_and_combine", "non_competitive_gates", "qk_norm"):
            if getattr(self, flag):
                s += f", {flag}=True"
        default_value_dim = self.dim_head if self.concat_values_and_combine else self.dim
        options = (
            ("query_hidden", None if self.query_hidden is None else self.query_hidden.sizes, None),
            ("query_bias", self.to_queries.bias is not None, False),
            ("query_norm", self.query_norm, "layernorm"),
            ("temperature", self.temperature, 1.0),
            ("score_softmax", self.score_activation != "none", True),
            ("score_subtract", self.score_subtract, None),
            ("score_normalize", self.score_normalize, False),
            ("value_dim", self.value_dim, default_value_dim),
            ("key_init", self.key_init, "normal"),
            ("value_init", self.value_init, "normal"),
            ("freeze_keys", not self.keys.requires_grad, False),
            ("sparse_values", bool(getattr(self.values, "sparse", False)), False),
        )
        for name, value, default in options:
            if value != default:
                s += f", {name}={value!r}"
        return s


ProductKeyMemory = PKM


def _coor_descent_topk(scores: Tensor, k: int):
    from colt5_attention import topk as coor_descent_topk

    values, indices, *_ = coor_descent_topk(scores, k=k, fused=True)
    return values, indices


_LEGACY_NAMES = {"maybe_concat_combine.2.weight": "combine.weight"}


def _rename_legacy_keys(state_dict, prefix, *args):
    # product-key-memory 0.3.0 kept the concat projection inside an nn.Sequential
    for old, new in _LEGACY_NAMES.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
