"""Swap the feedforward of chosen blocks of a Hugging Face ``transformers`` model for a PKM.

Works with any architecture whose blocks sit in one ``nn.ModuleList`` of
``config.num_hidden_layers`` modules that call ``self.mlp(hidden_states)`` on the
normalised hidden states (GPT-2, Llama, Mistral, Qwen2, Gemma, GPT-NeoX, ...). The swap
is recorded in ``model.config.pkm``, so it is saved by ``save_pretrained``; load such a
checkpoint with :func:`from_pretrained`, which puts the PKMs back before the weights load::

    from transformers import AutoModelForCausalLM
    from product_key_memory.integrations.hf import add_pkm, from_pretrained

    model = AutoModelForCausalLM.from_pretrained("gpt2")
    add_pkm(model, layers=[6], num_keys=256, topk=32)  # block 6 (0-based) now reads a PKM
    ...train...
    model.save_pretrained("gpt2-pkm")
    model = from_pretrained(AutoModelForCausalLM, "gpt2-pkm")
"""

from __future__ import annotations

from typing import Iterable, Union

from torch import nn

from ..layers import MEMORY_KINDS, build_memory

__all__ = ["add_pkm", "apply_pkm_from_config", "find_blocks", "from_pretrained", "CONFIG_KEY"]

CONFIG_KEY = "pkm"  # model.config.pkm = {"layers": [...], "mlp_attr": "mlp", "kwargs": {...}}


def find_blocks(model: nn.Module, mlp_attr: str = "mlp") -> nn.ModuleList:
    """The ``nn.ModuleList`` of the model's ``config.num_hidden_layers`` blocks, each with a ``mlp_attr`` child."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if depth is None:
        raise TypeError(f"model must be a transformers model with config.num_hidden_layers, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and all(hasattr(b, mlp_attr) for b in module):
            return module
    raise ValueError(
        f"found no nn.ModuleList of {depth} blocks with a '{mlp_attr}' attribute in {type(model).__name__}; "
        f"pass mlp_attr= the name of the feedforward inside a block"
    )


def _layer_list(layers, depth: int) -> list:
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in layers):
        raise ValueError(f"layers must be 0-based block indices in [0, {depth}), got {layers!r}")
    return sorted(set(layers))


def _swap(model: nn.Module, layers: list, mlp_attr: str, kwargs: dict, memory: str = "pkm") -> None:
    blocks = find_blocks(model, mlp_attr)
    layers = _layer_list(layers, len(blocks))
    ref = next(model.parameters())
    for i in layers:
        layer = build_memory(memory, model.config.hidden_size, **kwargs, device=ref.device, dtype=ref.dtype)
        setattr(blocks[i], mlp_attr, layer)


def add_pkm(
    model: nn.Module, layers: Union[int, Iterable[int]], *, mlp_attr: str = "mlp", memory: str = "pkm", **pkm_kwargs
) -> nn.Module:
    """Replaces the feedforward of blocks ``layers`` (0-based, as ``model.model.layers[i]``) by new PKMs, in place.

    Args:
        model: a ``transformers`` model (``PreTrainedModel``).
        layers: 0-based block indices, an int or an iterable of ints: Python indices into the
            model's list of blocks, as in its module names (``model.layers.2.mlp``) and in
            :class:`MemoryUsageTracker`'s layer names. (``TransformerLM(pkm_layers=...)`` counts
            from 1, as product-key-memory 0.3.0 did.)
        mlp_attr: name of the feedforward inside a block.
        memory: the kind of memory put in, a key of :data:`~product_key_memory.layers.MEMORY_KINDS`
            (``"pkm"``, ``"memory_plus"``, ``"peer"``, ``"ultramem"``); recorded in the config with the
            arguments.
        pkm_kwargs: arguments of :class:`~product_key_memory.PKM` besides ``dim`` (taken from
            ``config.hidden_size``); plain values only, since they are saved in the config.
            Not ``values``, ``device`` or ``dtype`` (``TypeError``): the PKMs follow the model.

    Returns:
        ``model``, whose ``config.pkm`` records the swap. The new PKMs are freshly
        initialised, on the device and in the dtype of the model's first parameter.
    """
    if getattr(model.config, CONFIG_KEY, None):
        raise ValueError(f"model already has PKM layers {getattr(model.config, CONFIG_KEY)}; call add_pkm once")
    if "values" in pkm_kwargs:
        raise TypeError("add_pkm does not take values= (a shared table cannot be saved in the config)")
    placed = sorted({"device", "dtype"} & set(pkm_kwargs))
    if placed:
        # from_pretrained(torch_dtype=...) and model.to(...) place every module alike, so a PKM-only
        # dtype or device could not survive a save and load
        raise TypeError(
            f"add_pkm does not take {' or '.join(placed)}=: the PKMs are made on the device and in the dtype of the "
            "model's parameters; move or cast the model (model.to(...)) before or after add_pkm"
        )
    if memory not in MEMORY_KINDS:
        raise ValueError(f"memory must be one of {tuple(MEMORY_KINDS)}, got {memory!r}")
    depth = len(find_blocks(model, mlp_attr))
    layers = _layer_list(layers, depth)
    _swap(model, layers, mlp_attr, pkm_kwargs, memory)
    spec = {"layers": layers, "mlp_attr": mlp_attr, "kwargs": dict(pkm_kwargs)}
    if memory != "pkm":  # configs saved before other kinds existed hold PKMs
        spec["memory"] = memory
    setattr(model.config, CONFIG_KEY, spec)
    return model


def apply_pkm_from_config(model: nn.Module) -> nn.Module:
    """Puts in the PKMs recorded in ``model.config.pkm`` (freshly initialised); a no-op without a record.

    Use it on a model built from a saved config (``Model(config)``) before loading its state dict.
    """
    spec = getattr(model.config, CONFIG_KEY, None)
    if spec:
        _swap(model, spec["layers"], spec.get("mlp_attr", "mlp"), spec.get("kwargs", {}), spec.get("memory", "pkm"))
    return model


def from_pretrained(model_cls, pretrained_model_name_or_path, *args, **kwargs):
    """``model_cls.from_pretrained(...)`` for a checkpoint saved after :func:`add_pkm`.

    The model is built, the recorded PKMs are put in, and only then the weights load, so
    every PKM parameter comes from the checkpoint. ``model_cls`` is a concrete model class
    (``GPT2LMHeadModel``) or an auto class (``AutoModelForCausalLM``); other arguments go to
    ``from_pretrained`` unchanged. Checkpoints without a PKM record load as usual.
    """
    if hasattr(model_cls, "_model_mapping"):  # an Auto class: resolve the concrete class from the config
        from transformers import AutoConfig

        config = kwargs.get("config") or AutoConfig.from_pretrained(pretrained_model_name_or_path)
        model_cls = model_cls._model_mapping[type(config)]
    return _with_pkm(model_cls).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _with_pkm(model_cls):
    # a subclass whose constructor applies config.pkm, so from_pretrained fills the PKMs from the checkpoint
    def __init__(self, config, *args, **kwargs):
        model_cls.__init__(self, config, *args, **kwargs)
        apply_pkm_from_config(self)

    return type(model_cls.__name__, (model_cls,), {"__init__": __init__, "__module__": model_cls.__module__})
