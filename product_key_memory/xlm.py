"""Convert a memory of the paper's reference code (XLM's ``HashingMemoryProductFast``) to a :class:`PKM`.

Written from the description of its computation and state dict (arXiv 1907.05242 and
this project's issue 3); no code of XLM (CC-BY-NC) is used.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .norms import MaskedBatchNorm
from .pkm import PKM

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

_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _query_layers(sd: Mapping[str, Tensor], prefix: str) -> List[Tuple[str, Dict[str, Tensor]]]:
    """``query_proj.query_mlps.{i}.*`` grouped by ``i`` in order, each tagged "linear" or "batchnorm"."""
    head = "query_proj.query_mlps."
    groups: Dict[int, Dict[str, Tensor]] = {}
    for name, t in sd.items():
        if not name.startswith(head):
            continue
        index, _, entry = name[len(head):].partition(".")
        if not index.isdigit() or not entry:
            raise ValueError(f"unexpected query network entry {prefix + name!r}")
        groups.setdefault(int(index), {})[entry] = t
    if not groups:
        raise ValueError(f"no query network found: expected entries {prefix + head}0.weight ...")
    layers = []
    for index in sorted(groups):
        entries = groups[index]
        if "running_mean" in entries:
            missing = set(_BN_ENTRIES) - set(entries) - {"num_batches_tracked"}
            if missing or set(entries) - set(_BN_ENTRIES):
                raise ValueError(f"{prefix}{head}{index} looks like a BatchNorm1d but has entries {sorted(entries)}")
            layers.append(("batchnorm", entries))
        elif "weight" in entries and entries["weight"].dim() == 2 and set(entries) <= {"weight", "bias"}:
            layers.append(("linear", entries))
        else:
            raise ValueError(
                f"{prefix}{head}{index} is neither a Linear nor a BatchNorm1d (entries {sorted(entries)}); "
                "only the MLP query network of the reference code converts"
            )
    return layers


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

    Args:
        state_dict: the memory's state dict (``keys``, ``values.weight``,
            ``query_proj.query_mlps.{i}.*``), optionally under ``prefix``.
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
        TypeError: an option outside :data:`XLM_OPTIONS`.
    """
    unknown = sorted(set(options) - set(XLM_OPTIONS))
    if unknown:
        raise TypeError(
            f"from_xlm got unsupported options {unknown}: sizes and the query network come from the state dict, "
            f"and options that add parameters have none to load; allowed: {list(XLM_OPTIONS)}"
        )
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    shared = options.get("values")
    if shared is not None and "values.weight" in sd:
        raise ValueError(
            f"state_dict has its own {prefix}values.weight; pass values= only for a memory whose table is shared"
        )
    for name in ("keys",) + (() if shared is not None else ("values.weight",)):
        if name not in sd:
            raise ValueError(f"state_dict has no {prefix + name!r}: not a product-key memory of the reference code")
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
    used = {"keys", "values.weight"} | {n for n in sd if n.startswith("query_proj.query_mlps.")}
    extra = sorted(prefix + n for n in set(sd) - used)
    if extra:
        raise ValueError(
            f"state_dict has entries this converter does not understand: {extra}; "
            "pass prefix= (e.g. 'memories.0.') to convert one memory out of a larger state dict"
        )
    if layers[0][0] != "linear":
        raise ValueError("the query network must start with a Linear layer")
    linears: List[Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]] = []
    for kind, entries in layers:
        if kind == "linear":
            linears.append((entries, None))
        elif linears[-1][1] is None:
            linears[-1] = (linears[-1][0], entries)
        else:
            raise ValueError("two BatchNorm layers follow one Linear layer in the query network")
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
    if len(biases) != 1:
        raise ValueError("some query Linear layers have a bias and some do not")
    hidden_bns = {bn is not None for _, bn in linears[:-1]}
    if len(hidden_bns) > 1:
        raise ValueError("some hidden query layers have a BatchNorm and some do not")

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
    ours: Dict[str, Tensor] = {"keys": keys.transpose(1, 2), "values.weight": table.detach()}
    hidden_modules = [] if pkm.query_hidden is None else list(pkm.query_hidden.layers)
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
        ours[f"to_queries.{entry}"] = t[perm]
    if last_bn is not None:
        for entry, t in last_bn.items():
            ours[f"norm.fn.{entry}"] = t if entry == "num_batches_tracked" else t[perm]
    for entry, t in pkm.state_dict().items():  # a BatchNorm saved without num_batches_tracked
        if entry.endswith("num_batches_tracked") and entry not in ours:
            ours[entry] = t
    pkm.load_state_dict(ours, strict=True)
    return pkm.eval()
