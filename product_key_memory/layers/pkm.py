"""The product-key memory layer (Lample et al. 2019, arXiv 1907.05242), assembled from its parts.

A token's way through :meth:`PKM.forward`: the query network (``parts/query.py``), the product
keys and their search (``parts/keys.py``, the op ``ops/search``), scoring (``parts/scoring.py``),
the value table (``tables/``, the op ``ops/value_read``) and the output (``parts/output.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_positive_int
from ..parts.keys import ProductKeys
from ..parts.output import MemoryOutput
from ..parts.query import QUERY_NORMS, QueryNetwork
from ..parts.scoring import Scoring
from ..tables.base import ValueTable
from ..tables.embedding import VALUE_INITS, EmbeddingValues

__all__ = ["PKM", "ProductKeyMemory"]

# product-key-memory 0.3.0's attribute names for pieces that now live in a part
_PIECES = {
    "pre_layernorm": "query",
    "input_dropout": "query",
    "query_hidden": "query",
    "to_queries": "query",
    "norm": "query",
    "query_dropout": "query",
    "combine": "output",
    "value_proj": "output",
    "value_dropout": "output",
    "output_norm": "output",
}


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
        query, product_keys, scoring, values, output: parts to use instead of building them
            from the options (:class:`~product_key_memory.QueryNetwork`,
            :class:`~product_key_memory.ProductKeys`, :class:`~product_key_memory.Scoring`, a
            :class:`~product_key_memory.ValueTable`, :class:`~product_key_memory.MemoryOutput`).
            A part passed in is used as given (not re-initialised; the options that would build
            it are not read); its sizes must agree with the layer's (``dim``, ``heads``,
            ``num_keys``, ``topk``, ``dim_head``, ``value_dim``). Pass one :class:`ValuePool` to
            several layers to share it.
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
        query, product_keys, scoring, values, output: the parts, the layer's children; the
            forward calls exactly these modules, so a part or a piece of one replaced by
            assignment (``layer.query.to_queries = lora(...)``) takes effect, and hooks on
            any of them fire on every call.
        keys: the sub-keys, ``(heads, num_keys, 2, dim_head)`` (``product_keys.keys``).
        to_queries, norm, pre_layernorm, query_hidden, combine, value_proj, output_norm:
            product-key-memory 0.3.0's names of the pieces, which now live in ``query`` and
            ``output``; reading or assigning them reaches the piece in its part.

    State dict: the parts' keys (``query.to_queries.weight``, ``product_keys.keys``,
    ``values.weight``, ...). A state dict of product-key-memory 0.3.0 (``keys``,
    ``to_queries.weight``, ``norm.*``, ``maybe_concat_combine.2.weight``, ...) or of the flat
    layout of earlier 0.4 builds loads as it is (``strict=True``), renamed on load.

    Shape:
        - x: ``(..., dim)``; ``input_mask``: ``x.shape[:-1]``, bool, ``True`` for real tokens; or,
          instead of it, ``padding_mask``: the same with PyTorch's polarity (``True`` for padding,
          as ``src_key_padding_mask`` of ``nn.TransformerEncoderLayer``).
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
        query: Optional[QueryNetwork] = None,
        product_keys: Optional[ProductKeys] = None,
        scoring: Optional[Scoring] = None,
        values: Optional[ValueTable] = None,
        output: Optional[MemoryOutput] = None,
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
        for name, value in (("dim", dim), ("heads", heads), ("num_keys", num_keys), ("topk", topk),
                            ("dim_head", dim_head)):
            check_positive_int(name, value)
        factory = dict(device=device, dtype=dtype)
        self.dim = dim
        if value_dim is None:
            value_dim = dim_head if concat_values_and_combine else dim
        check_positive_int("value_dim", value_dim)

        # the one builder: each 0.3.0 option goes to the part it configures
        if query is None:
            query = QueryNetwork(
                dim, heads, dim_head, pre_norm=pre_layernorm, input_dropout=input_dropout, hidden=query_hidden,
                hidden_batchnorm=query_hidden_batchnorm, bias=query_bias,
                norm=_query_norm(query_norm, use_layernorm, query_hidden), query_dropout=query_dropout, **factory,
            )
        if scoring is None:
            scoring = Scoring(
                temperature=temperature, activation=_activation(score_softmax, non_competitive_gates),
                subtract=score_subtract, normalize=score_normalize, dropout=attn_dropout,
            )
        self._built_values = values is None
        if values is None:
            if value_init not in VALUE_INITS:
                raise ValueError(f"value_init must be one of {VALUE_INITS}, got {value_init!r}")
            check_bool("sparse_values", sparse_values)
            values = EmbeddingValues(num_keys**2, value_dim, sparse=sparse_values, init=value_init, **factory)
        elif sparse_values and isinstance(values, ValueTable) and not values.sparse:
            raise ValueError("sparse_values=True needs the values table passed in to have sparse=True")
        if output is None:
            output = MemoryOutput(
                dim, value_dim, heads, concat_heads=concat_values_and_combine, dropout=value_dropout,
                norm=norm_output, **factory,
            )
        if product_keys is None:  # last: the random draws come in the order of earlier versions
            product_keys = ProductKeys(
                heads, num_keys, dim_head, topk, init=key_init, freeze=freeze_keys, qk_norm=qk_norm,
                differentiable_topk=differentiable_topk, **factory,
            )
        _check_parts(query, product_keys, scoring, values, output, dict(
            dim=dim, heads=heads, num_keys=num_keys, topk=topk, dim_head=dim_head, value_dim=value_dim,
            concat_values_and_combine=concat_values_and_combine,
        ))
        self.query = query
        self.product_keys = product_keys
        self.scoring = scoring
        self.values = values
        self.output = output
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def reset_parameters(self) -> None:
        """Every part's ``reset_parameters``; the values table only when this layer built it (a
        table passed in, e.g. a shared :class:`ValuePool`, is left as it is)."""
        self.query.reset_parameters()
        self.product_keys.reset_parameters()
        self.output.reset_parameters()
        if self._built_values:
            self.values.reset_parameters()

    # -- 0.3.0's names, reaching the pieces in their parts ----------------------------------------

    def __setattr__(self, name: str, value) -> None:
        part = _PIECES.get(name)
        if part is not None and part in self._modules:  # pkm.to_queries = lora(...) replaces the piece it names
            setattr(self._modules[part], name, value)
        elif name == "keys" and "product_keys" in self._modules:
            self._modules["product_keys"].keys = value
        else:
            super().__setattr__(name, value)

    # 0.3.0's names of the pieces (product_keys.keys and each of _PIECES) are properties set below
    # the class, read from the parts that hold them: no __getattr__ runs on every attribute of the forward
    keys = property(lambda self: self.product_keys.keys)

    # sizes and options, read from the parts that hold them
    heads = property(lambda self: self.product_keys.heads)
    num_keys = property(lambda self: self.product_keys.num_keys)
    topk = property(lambda self: self.product_keys.topk)
    dim_head = property(lambda self: self.product_keys.dim_head)
    num_memories = property(lambda self: self.values.num_slots)
    value_dim = property(lambda self: self.values.dim)
    query_norm = property(lambda self: self.query.norm_kind)
    use_layernorm = property(lambda self: self.query.norm_kind == "layernorm")
    qk_norm = property(lambda self: self.product_keys.qk_norm)
    differentiable_topk = property(lambda self: self.product_keys.differentiable_topk)
    non_competitive_gates = property(lambda self: self.scoring.activation == "relu")
    temperature = property(lambda self: self.scoring.temperature)
    score_activation = property(lambda self: self.scoring.activation)
    score_subtract = property(lambda self: self.scoring.subtract)
    score_normalize = property(lambda self: self.scoring.normalize)
    key_init = property(lambda self: self.product_keys.init)
    concat_values_and_combine = property(lambda self: self.output.concat_heads)

    # -- the stages, usable on their own ------------------------------------------------------

    def queries(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Flat tokens ``(N, dim)`` -> normalised queries ``(N, heads, 2, dim_head)`` (``self.query``)."""
        return self.query(x, mask)

    def search(self, queries: Tensor, gumbel_noise_scale: float = 0.0):
        """Queries ``(N, heads, 2, dim_head)`` -> slot weights and slots, ``(N, heads, topk)``
        (``self.product_keys``, then ``self.scoring``)."""
        scores, indices = self.product_keys(queries, gumbel_noise_scale)
        return self.scoring(scores), indices

    def read(self, indices: Tensor, weights: Tensor, mem_trainable_mask: Optional[Tensor] = None) -> Tensor:
        """Slots and weights ``(N, heads, topk)`` -> ``(N, dim)``: the value read (``self.values``)
        projected by ``self.output.project``, before the output's dropout and norm."""
        return self.output.project(self._read_values(indices, weights, mem_trainable_mask))

    def _read_values(self, indices: Tensor, weights: Tensor, trainable: Optional[Tensor]) -> Tensor:
        if not self.output.concat_heads:  # every head's slots in one bag per token
            indices, weights = indices.flatten(-2), weights.flatten(-2)  # (N, heads * topk)
        return self.values(indices, weights, trainable=trainable)  # (N, value_dim) or (N, heads, value_dim)

    def forward(
        self,
        x: Tensor,
        input_mask: Optional[Tensor] = None,
        mem_trainable_mask: Optional[Tensor] = None,
        gumbel_noise_scale: float = 0.0,
        *,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``x (..., dim)`` -> ``(..., dim)``: query, search, scoring, value read, output.

        ``input_mask`` is ``True`` for real tokens; ``padding_mask`` (keyword only) is ``True`` for
        padding, PyTorch's polarity. Give at most one of them.
        """
        input_mask = real_tokens(input_mask, padding_mask)
        lead = self._check_input(x, input_mask, mem_trainable_mask, gumbel_noise_scale)
        x = x.reshape(-1, self.dim)  # (N, dim)
        mask = None
        if input_mask is not None:
            mask = input_mask.reshape(-1)
            x = torch.where(mask.unsqueeze(-1), x, 0.0)  # padded garbage (even NaN) never flows anywhere
        q = self.query(x, mask)  # (N, heads, 2, dim_head)
        weights, indices = self.search(q, gumbel_noise_scale)  # (N, heads, topk)
        if mask is not None:
            weights = torch.where(mask.view(-1, 1, 1), weights, 0.0)
        out = self.output(self._read_values(indices, weights, mem_trainable_mask))  # (N, dim)
        if mask is not None:
            out = torch.where(mask.unsqueeze(-1), out, 0.0)
        return out.view(*lead, self.dim)

    def _check_input(self, x, input_mask, mem_trainable_mask, gumbel_noise_scale):
        keys = self.product_keys.keys
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., dim={self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
        if x.device != keys.device:
            raise ValueError(f"x is on {x.device} but the layer is on {keys.device}: move one to the other")
        if x.dtype != keys.dtype and not torch.is_autocast_enabled(x.device.type):
            # nn.Linear's rule, said plainly
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {keys.dtype}: cast one to the other "
                f"(x.to({keys.dtype}) or layer.to({x.dtype})), or run under torch.autocast"
            )
        lead = x.shape[:-1]
        if input_mask is not None:
            _check_mask("input_mask", input_mask, tuple(lead), "x.shape[:-1]", x.device)
        if mem_trainable_mask is not None:
            _check_mask("mem_trainable_mask", mem_trainable_mask, (self.num_memories,), "(num_keys ** 2,)", keys.device)
        if (
            isinstance(gumbel_noise_scale, bool) or not isinstance(gumbel_noise_scale, (int, float))
            or not gumbel_noise_scale >= 0
        ):
            raise ValueError(f"gumbel_noise_scale must be a non-negative float, got {gumbel_noise_scale!r}")
        return lead

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _piece(part: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, part), name), doc=f"``{part}.{name}`` (0.3.0's name)")


for _name, _part in _PIECES.items():
    setattr(PKM, _name, _piece(_part, _name))

ProductKeyMemory = PKM


def _query_norm(query_norm: Optional[str], use_layernorm: bool, query_hidden) -> str:
    # one option, one meaning: use_layernorm is the old spelling of query_norm
    check_choice("query_norm", query_norm, (None,) + QUERY_NORMS)
    check_bool("use_layernorm", use_layernorm)
    if not isinstance(query_hidden, (list, tuple)):
        raise TypeError(f"query_hidden must be a list or tuple of hidden sizes, got {query_hidden!r}")
    if query_norm is None:
        return "layernorm" if use_layernorm else "batchnorm"
    if not use_layernorm and query_norm != "batchnorm":
        raise ValueError(
            f"use_layernorm=False means query_norm='batchnorm', got query_norm={query_norm!r}: pass only query_norm"
        )
    return query_norm


def _activation(score_softmax: bool, non_competitive_gates: bool) -> str:
    # one option, one meaning: score_softmax and non_competitive_gates choose one activation
    if non_competitive_gates and not score_softmax:
        raise ValueError(
            "non_competitive_gates replaces the softmax by a ReLU; it cannot be combined with score_softmax=False"
        )
    return "relu" if non_competitive_gates else ("softmax" if score_softmax else "none")


def _check_parts(query, product_keys, scoring, values, output, sizes: dict) -> None:
    """Each part of the right type, and their sizes chained: query -> keys -> table -> output."""
    for name, part, cls in (
        ("query", query, QueryNetwork), ("product_keys", product_keys, ProductKeys), ("scoring", scoring, Scoring),
        ("values", values, ValueTable), ("output", output, MemoryOutput),
    ):
        if not isinstance(part, cls):
            hint = " (ValuePool(num_keys, dim) is a table to share between layers)" if cls is ValueTable else ""
            raise TypeError(f"{name} must be a {cls.__name__}{hint}, got {type(part).__name__}")
    expected = (
        ("query", query, "dim", sizes["dim"]), ("query", query, "heads", sizes["heads"]),
        ("query", query, "dim_head", sizes["dim_head"]),
        ("product_keys", product_keys, "heads", sizes["heads"]),
        ("product_keys", product_keys, "num_keys", sizes["num_keys"]),
        ("product_keys", product_keys, "dim_head", sizes["dim_head"]),
        ("product_keys", product_keys, "topk", sizes["topk"]),
        ("values", values, "num_slots", sizes["num_keys"] ** 2), ("values", values, "dim", sizes["value_dim"]),
        ("output", output, "dim", sizes["dim"]), ("output", output, "value_dim", sizes["value_dim"]),
        ("output", output, "heads", sizes["heads"]),
        ("output", output, "concat_heads", sizes["concat_values_and_combine"]),
    )
    for name, part, size, want in expected:
        got = getattr(part, size)
        if got != want:
            what = "num_keys ** 2" if size == "num_slots" else size
            raise ValueError(f"{name}.{size} is {got!r} but the layer has {what}={want!r}; pass matching sizes")


def real_tokens(input_mask: Optional[Tensor], padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask of real tokens from either polarity: ``input_mask`` (``True`` = a real token) or
    ``padding_mask`` (``True`` = padding, as PyTorch's ``src_key_padding_mask``); not both."""
    if padding_mask is None:
        return input_mask
    if input_mask is not None:
        raise ValueError(
            "pass input_mask (True for real tokens) or padding_mask (True for padding, PyTorch's polarity), not both"
        )
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
        raise TypeError(f"padding_mask must be a bool tensor, got {got}")
    return ~padding_mask


def _check_mask(name: str, mask, shape: tuple, shape_name: str, device: torch.device) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor, got {got}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_name} = {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but must be on {device}, with the layer")


# where a key of an earlier layout lives now: product-key-memory 0.3.0 (and the flat 0.4 builds)
# kept the query and output pieces and the keys on the layer itself, the concat projection inside
# an nn.Sequential
_LEGACY_PREFIXES = (
    ("keys", "product_keys.keys"),
    ("maybe_concat_combine.2.", "output.combine."),
) + tuple((f"{piece}.", f"{part}.{piece}.") for piece, part in _PIECES.items())


def _rename_legacy_keys(state_dict, prefix, *args):
    for name in [k for k in state_dict if k.startswith(prefix)]:
        local = name[len(prefix):]
        for old, new in _LEGACY_PREFIXES:
            if local == old or (old.endswith(".") and local.startswith(old)):
                renamed = prefix + new + local[len(old):]
                if renamed in state_dict:
                    raise ValueError(
                        f"state_dict holds both {name!r} (an earlier layout's name) and {renamed!r}: keep one"
                    )
                state_dict[renamed] = state_dict.pop(name)
                break
