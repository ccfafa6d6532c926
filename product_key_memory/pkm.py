"""The product-key memory layer (Lample et al. 2019, arXiv 1907.05242), assembled from its parts.

A token's way through :meth:`PKM.forward`: the query network (``query.py``), the product
keys and their search (``keys.py``), scoring (``scoring.py``), the value table
(``tables.py``) and the output (``output.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from ._checks import check_bool, check_choice, check_positive_int
from .keys import ProductKeys
from .output import MemoryOutput
from . import functional as PF, ops
from .norms import QueryLayerNorm
from .query import QUERY_NORMS, IdentityNorm, QueryNetwork
from .scoring import Scoring
from .tables import VALUE_INITS, EmbeddingValues, ValueTable

__all__ = ["PKM", "ProductKeyMemory"]


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
            A part passed in must agree with the sizes given, and the options that would
            build it must stay at their defaults. A table passed in is used as given (not
            re-initialised): pass one :class:`ValuePool` to several layers to share it.
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
        query, product_keys, scoring, values, output: the parts. ``query`` and ``output``
            keep their pieces under product-key-memory 0.3.0's names on the layer itself
            (``to_queries``, ``norm``, ``combine``, ...), so the state dict is 0.3.0's.
        keys: the sub-keys, ``(heads, num_keys, 2, dim_head)``.

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
        check_positive_int("dim", dim)
        factory = dict(device=device, dtype=dtype)
        self.dim = dim

        # one option, one meaning: use_layernorm is the old spelling of query_norm
        check_choice("query_norm", query_norm, (None,) + QUERY_NORMS)
        if not isinstance(query_hidden, (list, tuple)):
            raise TypeError(f"query_hidden must be a list or tuple of hidden sizes, got {query_hidden!r}")
        if query_norm is None:
            query_norm = "layernorm" if use_layernorm else "batchnorm"
        elif not use_layernorm and query_norm != "batchnorm":
            raise ValueError(
                f"use_layernorm=False means query_norm='batchnorm', got query_norm={query_norm!r}: pass only query_norm"
            )
        if query is None:
            query = QueryNetwork(
                dim, heads, dim_head, pre_norm=pre_layernorm, input_dropout=input_dropout, hidden=query_hidden,
                hidden_batchnorm=query_hidden_batchnorm, bias=query_bias, norm=query_norm,
                query_dropout=query_dropout, **factory,
            )
        else:
            _check_part("query", query, QueryNetwork, dict(dim=dim, heads=heads, dim_head=dim_head), dict(
                input_dropout=(input_dropout, 0.0), query_dropout=(query_dropout, 0.0),
                pre_layernorm=(pre_layernorm, False), query_bias=(query_bias, False), query_hidden=(query_hidden, ()),
                query_hidden_batchnorm=(query_hidden_batchnorm, False), query_norm=(query_norm, "layernorm"),
            ))

        if product_keys is None:
            product_keys = ProductKeys(
                heads, num_keys, dim_head, topk, init=key_init, freeze=freeze_keys, qk_norm=qk_norm,
                differentiable_topk=differentiable_topk,
            )
        else:
            sizes = dict(heads=heads, num_keys=num_keys, dim_head=dim_head, topk=topk)
            _check_part("product_keys", product_keys, ProductKeys, sizes, dict(
                key_init=(key_init, "normal"), freeze_keys=(freeze_keys, False), qk_norm=(qk_norm, False),
                differentiable_topk=(differentiable_topk, False),
            ))

        # one option, one meaning: score_softmax and non_competitive_gates choose one activation
        if non_competitive_gates and not score_softmax:
            raise ValueError(
                "non_competitive_gates replaces the softmax by a ReLU; it cannot be combined with score_softmax=False"
            )
        if scoring is None:
            activation = "relu" if non_competitive_gates else ("softmax" if score_softmax else "none")
            scoring = Scoring(
                temperature=temperature, activation=activation, subtract=score_subtract, normalize=score_normalize,
                dropout=attn_dropout,
            )
        else:
            _check_part("scoring", scoring, Scoring, {}, dict(
                temperature=(temperature, 1.0), score_softmax=(score_softmax, True),
                non_competitive_gates=(non_competitive_gates, False), score_subtract=(score_subtract, None),
                score_normalize=(score_normalize, False), attn_dropout=(attn_dropout, 0.0),
            ))

        if value_dim is None:
            value_dim = dim_head if concat_values_and_combine else dim
        check_positive_int("value_dim", value_dim)
        if value_init not in VALUE_INITS:
            raise ValueError(f"value_init must be one of {VALUE_INITS}, got {value_init!r}")
        check_bool("sparse_values", sparse_values)
        self._built_values = values is None
        if values is None:
            values = EmbeddingValues(num_keys**2, value_dim, sparse=sparse_values, init=value_init, **factory)
        else:
            _check_part("values", values, ValueTable, dict(num_slots=num_keys**2, dim=value_dim), dict(
                value_init=(value_init, "normal"),
            ))
            if sparse_values and not values.sparse:  # one meaning: the table's own layout decides
                raise ValueError("sparse_values=True needs the values table passed in to have sparse=True")

        if output is None:
            output = MemoryOutput(
                dim, value_dim, heads, concat_heads=concat_values_and_combine, dropout=value_dropout,
                norm=norm_output, **factory,
            )
        else:
            _check_part("output", output, MemoryOutput, dict(
                dim=dim, value_dim=value_dim, heads=heads, concat_heads=concat_values_and_combine
            ), dict(value_dropout=(value_dropout, 0.0), norm_output=(norm_output, False)))

        self._adopt("query", query)
        self.keys = product_keys.new_keys(**factory)  # (heads, num_keys, 2, dim_head), 0.3.0's layout
        self.product_keys = product_keys
        self.scoring = scoring
        self.values = values
        self._adopt("output", output)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def _adopt(self, name: str, part: nn.Module) -> None:
        # The query network and the output hold their pieces under 0.3.0's names (to_queries,
        # norm, combine, ...). Registering those pieces on the layer itself, rather than the part
        # as a child, keeps the state dict's keys and their attribute paths what 0.3.0 saved (and
        # what DCP, FSDP and Hugging Face loading walk). The part keeps the same module objects,
        # which moving, sharding or loading never replace; a part with state of its own is an
        # ordinary child.
        if part._parameters or part._buffers:
            self.add_module(name, part)
            return
        object.__setattr__(self, name, part)
        for child_name, child in part._modules.items():  # absent pieces (None) too: pkm.value_proj is None
            if child_name in self._modules or hasattr(type(self), child_name):
                raise ValueError(f"{name} has a piece named {child_name!r}, which the layer already uses")
            self.add_module(child_name, child)

    def train(self, mode: bool = True) -> "PKM":
        super().train(mode)
        for part in (self.query, self.output):  # adopted parts are not children: keep their flag in step
            part.training = mode
        return self

    def reset_parameters(self) -> None:
        """Keys as :meth:`ProductKeys.reset_keys_`; the query network and output as their own
        ``reset_parameters``; the values table too when this layer built it (a table passed
        in is left as it is)."""
        self.product_keys.reset_keys_(self.keys)
        self.query.reset_parameters()
        self.output.reset_parameters()
        if self._built_values:
            self.values.reset_parameters()

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

    # -- the stages, usable on their own -------------------------------------------------------

    def queries(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Flat tokens ``(N, dim)`` -> normalised queries ``(N, heads, 2, dim_head)``."""
        return self.query(x, mask)

    def search(self, queries: Tensor, gumbel_noise_scale: float = 0.0):
        """Queries ``(N, heads, 2, dim_head)`` -> slot weights and slots, ``(N, heads, topk)``."""
        scores, indices = self.product_keys(queries, self.keys, gumbel_noise_scale)
        return self.scoring(scores), indices

    def read(self, indices: Tensor, weights: Tensor, mem_trainable_mask: Optional[Tensor] = None) -> Tensor:
        """Slots and weights ``(N, heads, topk)`` -> output ``(N, dim)`` before dropout and norm."""
        if not self.output.concat_heads:  # every head's slots in one bag per token
            indices, weights = indices.flatten(-2), weights.flatten(-2)
        return self.output.project(self.values(indices, weights, trainable=mem_trainable_mask))

    def forward(
        self,
        x: Tensor,
        input_mask: Optional[Tensor] = None,
        mem_trainable_mask: Optional[Tensor] = None,
        gumbel_noise_scale: float = 0.0,
    ) -> Tensor:
        lead = self._check_input(x, input_mask, mem_trainable_mask, gumbel_noise_scale)
        if not self.training and not torch.compiler.is_compiling() and not self._needs_grad(x):
            return self._lean_forward(x, input_mask, mem_trainable_mask).view(*lead, self.dim)
        x = x.reshape(-1, self.dim)  # (N, dim)
        mask = None
        if input_mask is not None:
            mask = input_mask.reshape(-1)
            x = torch.where(mask.unsqueeze(-1), x, 0.0)  # padded garbage (even NaN) never flows anywhere

        q = self.query(x, mask)  # (N, heads, 2, dim_head)
        scores, indices = self.product_keys(q, self.keys, gumbel_noise_scale)  # (N, heads, topk)
        weights = self.scoring(scores)
        if mask is not None:
            weights = torch.where(mask.view(-1, 1, 1), weights, 0.0)
        if not self.output.concat_heads:
            indices, weights = indices.flatten(-2), weights.flatten(-2)  # (N, heads * topk)
        out = self.output(self.values(indices, weights, trainable=mem_trainable_mask))  # (N, dim)
        if mask is not None:
            out = torch.where(mask.unsqueeze(-1), out, 0.0)
        return out.view(*lead, self.dim)

    def _needs_grad(self, x: Tensor) -> bool:
        # eval mode alone is no promise: a frozen-dropout finetune runs in eval with gradients on
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _lean_forward(self, x: Tensor, input_mask: Optional[Tensor], mem_trainable_mask: Optional[Tensor]) -> Tensor:
        """:meth:`forward` in eval mode when no gradient is wanted: the same stages and kernels
        (so the same slots and outputs), less what only training or autograd needs: identity
        modules (eval dropouts, ``nn.Identity``), the parts' module calls and the custom ops'
        dispatch. On the torch backend the search runs from the projection's and the keys'
        own layouts (:func:`ops.cpu.search_heads_first`). The projection, a LayerNorm query
        norm and the default table run as their functions when they are exactly ``nn.Linear``,
        :class:`QueryLayerNorm` and :class:`EmbeddingValues` with no hooks; any other piece,
        or one with a hook, is called as a module, so its hooks see every call."""
        x = x.reshape(-1, self.dim)  # (N, dim)
        mask = None
        if input_mask is not None:
            mask = input_mask.reshape(-1)
            x = torch.where(mask.unsqueeze(-1), x, 0.0)
        n = x.shape[0]
        parts, keys = self._modules, self._parameters["keys"]  # dicts, not a Module.__getattr__ each
        qn, pk, sc, values, o = self.query, parts["product_keys"], parts["scoring"], parts["values"], self.output
        if type(qn) is QueryNetwork:
            q = _lean_queries(qn, x, mask)  # (N, 2, H, d)
        else:
            q = qn(x, mask).transpose(1, 2)
        heads_first = False  # whether scores and slots below are (H, N, topk) rather than (N, H, topk)
        if type(pk) is ProductKeys and not pk.differentiable_topk:
            if not pk.qk_norm and n > 0 and ops.backend_for(x.device) == "torch":
                # the search straight from the projection's and the parameter's layouts: no views
                # to the op's layouts and back, which cost more than the search at a decoding step
                scores, indices = ops.cpu.search_heads_first(q, keys, pk.topk)
                heads_first = True
            else:
                q, keys = q.transpose(1, 2), keys.transpose(1, 2)  # (N, H, 2, d), (H, 2, K, d)
                if pk.qk_norm:
                    q, keys = PF.qk_normalize(q, keys)
                scores, indices = ops.search_no_grad(q, keys, pk.topk)  # (N, heads, topk)
        else:
            scores, indices = pk(q.transpose(1, 2), keys)
        if type(sc) is Scoring:
            weights = PF.rescore(
                scores, temperature=sc.temperature, activation=sc.activation, subtract=sc.subtract,
                normalize=sc.normalize,
            )
            dropout = sc._modules["attn_dropout"]
            weights = dropout(weights) if dropout.training else weights
        else:
            weights = sc(scores)
        if heads_first:
            indices, weights = indices.transpose(0, 1), weights.transpose(0, 1)  # (N, H, topk) views
        if mask is not None:
            weights = torch.where(mask.view(-1, 1, 1), weights, 0.0)
        if heads_first and not o.concat_heads and type(values) is EmbeddingValues and not _hooked(values):
            # what the module call would run on the torch backend, less its four Python layers; a
            # token's bag is its heads' slots, flattened straight from (N, H, topk) (one copy each)
            read = ops.cpu.value_read_flat(values._parameters["weight"], indices.reshape(-1), weights.reshape(-1), n)
        else:
            if not o.concat_heads:  # (N, heads * topk): a copy from the heads-first layout, a view otherwise
                indices, weights = indices.reshape(n, -1), weights.reshape(n, -1)
            read = values(indices, weights, trainable=mem_trainable_mask)
        if type(o) is MemoryOutput:
            pieces = o._modules
            out = read if pieces["combine"] is None and pieces["value_proj"] is None else o.project(read)  # (N, dim)
            for name in ("value_dropout", "output_norm"):
                if _live(pieces[name]):
                    out = pieces[name](out)
        else:
            out = o(read)
        if mask is not None:
            out = torch.where(mask.unsqueeze(-1), out, 0.0)
        return out

    def _check_input(self, x, input_mask, mem_trainable_mask, gumbel_noise_scale):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., dim={self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
        if x.device != self.keys.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.keys.device}: move one to the other")
        if x.dtype != self.keys.dtype and not torch.is_autocast_enabled(x.device.type):
            # nn.Linear's rule, said plainly
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {self.keys.dtype}: cast one to the other "
                f"(x.to({self.keys.dtype}) or layer.to({x.dtype})), or run under torch.autocast"
            )
        lead = x.shape[:-1]
        if input_mask is not None:
            _check_mask("input_mask", input_mask, tuple(lead), "x.shape[:-1]", x.device)
        if mem_trainable_mask is not None:
            _check_mask(
                "mem_trainable_mask", mem_trainable_mask, (self.num_memories,), "(num_keys ** 2,)", self.keys.device
            )
        if isinstance(gumbel_noise_scale, bool) or not isinstance(gumbel_noise_scale, (int, float)) or not gumbel_noise_scale >= 0:
            raise ValueError(f"gumbel_noise_scale must be a non-negative float, got {gumbel_noise_scale!r}")
        return lead

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, heads={self.heads}, num_keys={self.num_keys}, topk={self.topk}, dim_head={self.dim_head}"
        for flag in ("differentiable_topk", "concat_values_and_combine", "non_competitive_gates", "qk_norm"):
            if getattr(self, flag):
                s += f", {flag}=True"
        default_value_dim = self.dim_head if self.concat_values_and_combine else self.dim
        hidden = self.query.query_hidden
        options = (
            ("query_hidden", None if hidden is None else hidden.sizes, None),
            ("query_norm", self.query_norm, "layernorm"),
            ("temperature", self.temperature, 1.0),
            ("score_softmax", self.score_activation != "none", True),
            ("score_subtract", self.score_subtract, None),
            ("score_normalize", self.score_normalize, False),
            ("value_dim", self.value_dim, default_value_dim),
            ("key_init", self.key_init, "normal"),
            ("freeze_keys", self.product_keys.freeze, False),
            ("sparse_values", self.values.sparse, False),
        )
        return s + "".join(f", {name}={value!r}" for name, value, default in options if value != default)


ProductKeyMemory = PKM


def _live(module: nn.Module) -> bool:
    """Whether calling ``module`` can change its input: not an ``nn.Identity``, nor a dropout in eval."""
    if type(module) is nn.Identity:
        return False
    return not (isinstance(module, nn.Dropout) and not module.training)


def _lean_queries(qn: QueryNetwork, x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``QueryNetwork.forward`` without its identity pieces, and before its last transpose:
    ``(N, dim)`` -> ``(N, 2, heads, dim_head)``.

    The projection and a LayerNorm query norm run as their functions when they are exactly
    ``nn.Linear`` and :class:`QueryLayerNorm` with no hooks (what their modules would run).
    """
    pieces = qn._modules  # one dict, not a Module.__getattr__ per piece (a decoding step is that short)
    for name in ("pre_layernorm", "input_dropout"):
        if _live(pieces[name]):
            x = pieces[name](x)
    hidden, lin, norm = pieces["query_hidden"], pieces["to_queries"], pieces["norm"]
    if hidden is not None:
        x = hidden(x, mask)
    if type(lin) is nn.Linear and not _hooked(lin):
        w = lin._parameters
        q = F.linear(x, w["weight"], w["bias"]).view(-1, 2, qn.heads, qn.dim_head)  # (N, 2, H, d)
    else:
        q = lin(x).unflatten(-1, (2, qn.heads, qn.dim_head))
    if type(norm) is QueryLayerNorm and not _hooked(norm):
        w = norm._parameters
        q = F.layer_norm(q, norm.normalized_shape, w["weight"], w["bias"], norm.eps)
    elif type(norm) is not IdentityNorm:
        q = norm(q, mask)
    if _live(pieces["query_dropout"]):
        q = pieces["query_dropout"](q)
    return q


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) besides its forward."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
        or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks
    )


def _check_mask(name: str, mask, shape: tuple, shape_name: str, device: torch.device) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor, got {got}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_name} = {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but must be on {device}, with the layer")


def _check_part(name: str, part, cls: type, sizes: dict, options: dict) -> None:
    """A part passed in: the right type, the sizes given, and no options that would build it."""
    if not isinstance(part, cls):
        hint = " (ValuePool(num_keys, dim) is a table to share between layers)" if cls is ValueTable else ""
        raise TypeError(f"{name} must be a {cls.__name__}{hint}, got {type(part).__name__}")
    for size, expected in sizes.items():
        got = getattr(part, size)
        if got != expected:
            raise ValueError(f"{name}.{size} is {got!r} but the layer has {size}={expected!r}; pass matching sizes")
    given = sorted(option for option, (value, default) in options.items() if value != default)
    if given:
        raise ValueError(f"pass either {name}= or the options that build it, got {name}= and {given}")


_LEGACY_NAMES = {"maybe_concat_combine.2.weight": "combine.weight"}


def _rename_legacy_keys(state_dict, prefix, *args):
    # product-key-memory 0.3.0 kept the concat projection inside an nn.Sequential
    for old, new in _LEGACY_NAMES.items():
        if prefix + old in state_dict:
            if prefix + new in state_dict:
                raise ValueError(
                    f"state_dict holds both {prefix + old!r} (product-key-memory 0.3.0's name) and {prefix + new!r}: "
                    "keep one"
                )
            state_dict[prefix + new] = state_dict.pop(prefix + old)
