"""Convert a memory of the paper's reference code (XLM's ``HashingMemoryProductFast``) to a :class:`PKM`.

Written from the description of its computation and state dict (arXiv 1907.05242 and
this project's issue 3); no code of XLM (CC-BY-NC) is used.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..parts.norms import MaskedBatchNorm
from ..layers.pkm import PKM

__all__ = ["from_xlm", "XLM_OPTIONS"]

# PKM arguments that may accompany a conversion: they add no parameter, so the
# state dict still fills the layer exactly.
XLM_OPTIONS = (
    "input_dropout",
    "query_dropout",
    "value_dropout",
    "attn_dropout",
    "temperature",
    "score_softmax",
    "score_subtract",
    "score_normalize",
    "freeze_keys",
    "sparse_values",
    "values",
    "device",
    "dtype",
)

_HEAD = "query_proj.query_mlps."
_BN_REQUIRED = ("weight", "bias", "running_mean", "running_var")  # num_batches_tracked is optional
Layer = Tuple[str, Dict[str, Tensor], str]  # kind ("linear" or "batchnorm"), entries, full name prefix


def _query_layers(sd: Mapping[str, Tensor], prefix: str) -> Optional[List[Layer]]:
    """The reference's query MLP as its layers in order, checked complete; ``None`` for no query network.

    Reference layout: with no hidden layer one ``nn.Sequential`` under ``query_mlps.{i}``; with
    hidden layers an ``nn.ModuleList`` of them, ``query_mlps.{net}.{i}`` (``2 * heads`` nets with
    ``mem_multi_query_net``). A Sequential is Linear, [BatchNorm1d], ReLU, ..., Linear, [BatchNorm1d].
    """
    nets: Dict[str, Dict[int, Dict[str, Tensor]]] = {}
    for name, t in sd.items():
        if not name.startswith(_HEAD):
            continue
        parts = name[len(_HEAD):].split(".")
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            net, index, entry = f"{_HEAD}{parts[0]}.", int(parts[1]), parts[2]
        elif len(parts) == 2 and parts[0].isdigit():
            net, index, entry = _HEAD, int(parts[0]), parts[1]
        else:
            raise ValueError(
                f"unexpected query network entry {prefix + name!r}: only the reference's MLP query network "
                "(QueryMLP without grouped convolutions) converts"
            )
        nets.setdefault(net, {}).setdefault(index, {})[entry] = t
    if not nets:
        return None
    if len(nets) > 1:
        names = sorted(prefix + n for n in nets)
        raise ValueError(
            f"state_dict has {len(nets)} query networks ({names}), as mem_multi_query_net makes (one per head and "
            "half): a PKM has one query network, not convertible"
        )
    (net, layers), = nets.items()
    if net != _HEAD and net != f"{_HEAD}0.":
        raise ValueError(f"the query network must be at {prefix}{_HEAD}0., found {prefix}{net}")
    has_bn = any("running_mean" in e for e in layers.values())
    stride = 3 if has_bn else 2  # Linear, [BatchNorm1d], ReLU (parameter-free)
    count = max(layers) // stride + 1
    has_bias = any("bias" in layers.get(j * stride, {}) for j in range(count))
    expected = {}
    for j in range(count):
        expected[j * stride] = ("linear", {"weight"} | ({"bias"} if has_bias else set()), set())
        if has_bn:
            expected[j * stride + 1] = ("batchnorm", set(_BN_REQUIRED), {"num_batches_tracked"})
    out: List[Layer] = []
    missing, unexpected = [], []
    for index in sorted(set(expected) | set(layers)):
        entries, where = layers.get(index, {}), f"{prefix}{net}{index}."
        if index not in expected:
            unexpected += [where + e for e in sorted(entries)]
            continue
        kind, required, optional = expected[index]
        missing += [where + e for e in sorted(required - set(entries))]
        unexpected += [where + e for e in sorted(set(entries) - required - optional)]
        if kind == "linear" and "weight" in entries and entries["weight"].dim() != 2:
            shape = tuple(entries["weight"].shape)
            raise ValueError(f"{where}weight must be a Linear weight (out, in), got shape {shape}")
        out.append((kind, entries, where))
    if unexpected:
        raise ValueError(
            f"query network entries {unexpected} do not fit the reference's MLP (Linear, "
            f"{'BatchNorm1d, ' if has_bn else ''}ReLU, ..., Linear{', BatchNorm1d' if has_bn else ''})"
        )
    if missing:
        raise ValueError(
            f"state_dict is incomplete: the query network lacks {missing} (the reference's MLP has "
            f"{'a BatchNorm1d after every Linear' if has_bn else 'these entries'}{' and biases' if has_bias else ''})"
        )
    return out


def _as_tensor(name: str, value) -> Tensor:
    # checkpoints converted through numpy hold arrays; anything else is not a state dict entry
    if isinstance(value, Tensor):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return torch.as_tensor(value)
    raise TypeError(f"state_dict[{name!r}] must be a tensor (or a numpy array), got {type(value).__name__}")


def from_xlm(state_dict: Mapping[str, Tensor], *, topk: int, prefix: str = "", **options) -> PKM:
    r"""A :class:`PKM` computing what a memory of the paper's reference code computes.

    The sizes are read from the state dict; ``options`` carry the reference code's
    non-default flags under this library's names. The result is in eval mode and
    matches the reference forward in eval mode (float32, to 1e-5).

    Mapping of the reference code's flags to arguments:

    ===========================  ================================================
    reference flag                ``PKM`` argument
    ===========================  ================================================
    ``mem_heads``                 ``heads`` (from ``keys``)
    ``mem_k_dim``                 ``2 * dim_head`` (from ``keys``)
    ``mem_n_keys``                ``num_keys`` (from ``keys``)
    ``mem_knn``                   ``topk`` (pass it: not in the state dict)
    ``mem_v_dim``                 ``value_dim`` (from ``values.weight``; must equal the input dim)
    ``mem_query_bias``            ``query_bias`` (from the state dict)
    ``mem_query_layer_sizes``     ``query_hidden`` (from the state dict)
    ``mem_query_batchnorm``       ``query_hidden_batchnorm`` and
                                  ``query_norm="channel_batchnorm"`` (from the state dict)
    ``mem_temperature``           ``temperature``
    ``mem_score_softmax``         ``score_softmax``
    ``mem_score_subtract``        ``score_subtract`` (``"min"``, ``"mean"``, ``"median"``)
    ``mem_score_normalize``       ``score_normalize``
    ``mem_sparse``                ``sparse_values``
    input/query/value dropout     ``input_dropout``, ``query_dropout``, ``value_dropout``
    keys not learned              ``freeze_keys=True``
    ``mem_share_values``          ``values=`` the shared table (an ``EmbeddingValues``
                                  or ``ValuePool`` holding the reference table, made once)
    ===========================  ================================================

    Layouts: the reference keys ``(heads, 2, n_keys, k_dim / 2)`` become ``keys``
    ``(heads, n_keys, 2, dim_head)``; the reference query channels are ordered
    ``(head, half, d)``, this library's ``(half, head, d)``, so the rows of the last
    query linear layer and the channels of its BatchNorm are permuted.

    Query networks (the reference's ``QueryMLP``): a single Linear (and BatchNorm1d) under
    ``query_proj.query_mlps.{i}``; hidden layers under ``query_proj.query_mlps.0.{i}``, with or
    without batch norm and biases. No query network (``mem_query_layer_sizes=''``) converts
    for ``heads=1`` only, as a query Linear initialised to the identity (learned from then
    on; freeze ``to_queries`` to keep it fixed). Not convertible (``ValueError``): several
    query networks (``mem_multi_query_net``), grouped or convolutional ones, an identity
    query with several heads (the state dict does not record ``mem_shuffle_query``).
    A checkpoint with a layer or entry missing (a batch norm, a bias) or of the wrong shape
    is refused with a ``ValueError`` naming the entries, never converted to another network.

    Args:
        state_dict: the memory's state dict (``keys``, ``values.weight``,
            ``query_proj.query_mlps.*``), optionally under ``prefix``; tensors or numpy arrays.
        topk: the reference code's ``mem_knn``.
        prefix: leading part of the names to use (e.g. ``"memories.0."``); entries
            outside it are ignored, every entry inside it must be understood.
        options: any of :data:`XLM_OPTIONS`. With ``values=`` (a module holding the
            ``(n_keys ** 2, v_dim)`` table shared by several memories) the state dict
            must not have its own ``values.weight``.

    Raises:
        ValueError: the state dict is not a memory of the reference code this
            converter supports (e.g. a convolutional query network, or a value dim
            different from the input dim), or its sizes disagree with each other.
        TypeError: an option outside :data:`XLM_OPTIONS`, or an entry that is neither a
            tensor nor a numpy array.
    """
    unknown = sorted(set(options) - set(XLM_OPTIONS))
    if unknown:
        raise TypeError(
            f"from_xlm got unsupported options {unknown}: sizes and the query network come from the state dict, "
            f"and options that add parameters have none to load; allowed: {list(XLM_OPTIONS)}"
        )
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    sd = {k[len(prefix):]: _as_tensor(k, v) for k, v in state_dict.items() if k.startswith(prefix)}
    shared = options.get("values")
    if shared is not None and "values.weight" in sd:
        raise ValueError(
            f"state_dict has its own {prefix}values.weight; pass values= only for a memory whose table is shared"
        )
    for name in ("keys",) + (() if shared is not None else ("values.weight",)):
        if name not in sd:
            raise ValueError(f"state_dict has no {prefix + name!r}: not a product-key memory of the reference code")
    for name, t in sd.items():
        # an int or bool table would reach nn.Parameter's "Only Tensors of floating point ..." instead
        if not name.endswith("num_batches_tracked") and not t.is_floating_point():
            raise ValueError(f"state_dict entry {prefix + name!r} must be a float tensor, got {t.dtype}")
    keys = sd["keys"]
    table = sd["values.weight"] if shared is None else getattr(shared, "weight", None)
    if not isinstance(table, Tensor):
        raise TypeError(f"values must be a module with a weight tensor, got {type(shared).__name__}")
    if keys.dim() != 4 or keys.shape[1] != 2:
        raise ValueError(f"keys must have shape (heads, 2, n_keys, k_dim / 2), got {tuple(keys.shape)}")
    heads, _, num_keys, dim_head = keys.shape
    if table.dim() != 2 or table.shape[0] != num_keys**2:
        raise ValueError(
            f"values.weight must have shape (n_keys ** 2, v_dim) = ({num_keys ** 2}, v_dim), got {tuple(table.shape)}"
        )

    layers = _query_layers(sd, prefix)
    used = {"keys", "values.weight"} | {n for n in sd if n.startswith(_HEAD)}
    extra = sorted(prefix + n for n in set(sd) - used)
    if extra:
        raise ValueError(
            f"state_dict has entries this converter does not understand: {extra}; "
            "pass prefix= (e.g. 'memories.0.') to convert one memory out of a larger state dict"
        )
    if layers is None:
        # mem_query_layer_sizes='': the query is the input itself, repeated per head or, with
        # mem_shuffle_query, permuted per head, which the state dict does not record
        if heads != 1:
            raise ValueError(
                f"state_dict has no query network (an identity query) and {heads} heads: whether the reference "
                "permuted the input per head (mem_shuffle_query) is not in the state dict, so not convertible; "
                f"only heads=1 is (expected entries {prefix}{_HEAD}0.weight ... for a query MLP)"
            )
        layers = [("linear", {"weight": torch.eye(2 * dim_head, dtype=keys.dtype, device=keys.device)}, "")]
    linears: List[Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]] = []
    for kind, entries, where in layers:
        if kind == "linear":
            linears.append((entries, None))
        else:
            linears[-1] = (linears[-1][0], entries)
        features = linears[-1][0]["weight"].shape[0]
        for entry, t in entries.items():
            if entry != "num_batches_tracked" and (entry != "weight" or kind != "linear") and t.shape != (features,):
                raise ValueError(f"{where}{entry} must have shape ({features},), got {tuple(t.shape)}")
    for (w_prev, _), (w_next, _) in zip(linears, linears[1:]):
        if w_next["weight"].shape[1] != w_prev["weight"].shape[0]:
            shapes = (tuple(w_prev["weight"].shape), tuple(w_next["weight"].shape))
            raise ValueError(f"query network sizes do not chain: {shapes[0]} then {shapes[1]}")
    dim = linears[0][0]["weight"].shape[1]
    query_features = linears[-1][0]["weight"].shape[0]
    if query_features != heads * 2 * dim_head:
        raise ValueError(
            f"the query network gives {query_features} features, keys {tuple(keys.shape)} need heads * k_dim = "
            f"{heads * 2 * dim_head}"
        )
    if table.shape[1] != dim:
        raise ValueError(
            f"values.weight has v_dim={table.shape[1]} but the input dim is {dim}: such a memory outputs v_dim "
            "features, a PKM outputs its input dim; not convertible"
        )
    biases = {"bias" in w for w, _ in linears}
    hidden_bns = {bn is not None for _, bn in linears[:-1]}

    options.setdefault("dtype", table.dtype)
    options.setdefault("device", table.device)
    pkm = PKM(
        dim,
        heads=heads,
        num_keys=num_keys,
        topk=topk,
        dim_head=dim_head,
        query_bias=biases.pop(),
        query_hidden=tuple(w["weight"].shape[0] for w, _ in linears[:-1]),
        query_hidden_batchnorm=bool(hidden_bns and hidden_bns.pop()),
        query_norm="none" if linears[-1][1] is None else "channel_batchnorm",
        key_init="uniform",
        **options,
    )

    # reference query channel (head, half, d) for each of ours (half, head, d)
    perm = torch.arange(heads * 2 * dim_head).view(heads, 2, dim_head).transpose(0, 1).reshape(-1)
    # a shared table is used as given (load_state_dict copies it onto itself)
    ours: Dict[str, Tensor] = {"product_keys.keys": keys.transpose(1, 2), "values.weight": table.detach()}
    query = pkm.query
    hidden_modules = [] if query.query_hidden is None else list(query.query_hidden.layers)
    hidden_linears = [m for m in hidden_modules if isinstance(m, nn.Linear)]
    hidden_bn_modules = [m for m in hidden_modules if isinstance(m, MaskedBatchNorm)]
    names = {id(m): n for n, m in pkm.named_modules()}
    for i, (w, bn) in enumerate(linears[:-1]):
        for entry, t in w.items():
            ours[f"{names[id(hidden_linears[i])]}.{entry}"] = t
        if bn is not None:
            for entry, t in bn.items():
                ours[f"{names[id(hidden_bn_modules[i])]}.fn.{entry}"] = t
    last, last_bn = linears[-1]
    for entry, t in last.items():
        ours[f"{names[id(query.to_queries)]}.{entry}"] = t[perm]
    if last_bn is not None:
        for entry, t in last_bn.items():
            ours[f"{names[id(query.norm)]}.fn.{entry}"] = t if entry == "num_batches_tracked" else t[perm]
    for entry, t in pkm.state_dict().items():  # a BatchNorm saved without num_batches_tracked
        if entry.endswith("num_batches_tracked") and entry not in ours:
            ours[entry] = t
    pkm.load_state_dict(ours, strict=True)
    return pkm.eval()
