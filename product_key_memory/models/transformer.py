"""A small decoder-only transformer language model with PKM layers (arXiv 1907.05242, sec. 3.3).

Chosen blocks swap their feedforward for a :class:`~product_key_memory.PKM`, and chosen blocks their
attention for a :class:`~product_key_memory.KNNAttention` (arXiv 2203.08913); the rest is
a plain pre-norm GPT: learned positions, causal attention through
``F.scaled_dot_product_attention``, GELU feedforwards, an untied output head.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from ..cuda_graphs import GraphedForward
from ..knn.memory import KNNMemory, KNNMemoryList
from ..knn.attention import KNNAttention
from ..layers import MEMORY_KINDS, build_memory

__all__ = ["TransformerLM", "lm_loss"]


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy in nats of ``logits (..., num_tokens)`` against ``targets (...)``, in float32.

    Divide by ``math.log(2)`` for bits per token (bits per byte for a byte-level model).
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over ``(..., seq, dim)``."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False, device=device, dtype=dtype)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, self.dim_head)).movedim(-3, 0)  # (..., T, H, d) each
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))  # (..., H, T, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.to_out(out.transpose(-2, -3).flatten(-2))  # (..., T, H * d) -> (..., T, dim)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, *, device=None, dtype=None):
        super().__init__(
            nn.Linear(dim, hidden, device=device, dtype=dtype),
            nn.GELU(),
            nn.Linear(hidden, dim, device=device, dtype=dtype),
            nn.Dropout(dropout),
        )


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + ff(norm(x))`` (``ff`` a feedforward or a PKM)."""

    def __init__(self, attn: nn.Module, ff: nn.Module, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, device=device, dtype=dtype)
        self.attn = attn
        self.ff_norm = nn.LayerNorm(dim, device=device, dtype=dtype)
        self.ff = ff

    def forward(self, x: Tensor, **attn_kwargs) -> Tensor:
        x = x + self.attn(self.attn_norm(x), **attn_kwargs)
        return x + self.ff(self.ff_norm(x))


def _layer_set(name: str, layers, depth: int) -> frozenset:
    given = layers
    layers = (layers,) if isinstance(layers, (int, float, str)) else tuple(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
            raise ValueError(f"{name} must be 1-based block numbers in [1, depth={depth}], got {given!r}")
    return frozenset(layers)


def _pkm_layer_set(pkm_layers, depth: int) -> frozenset:
    if pkm_layers is None:
        return frozenset({(depth + 1) // 2})
    return _layer_set("pkm_layers", pkm_layers, depth)


def _memory_kinds(memory, layers: tuple) -> dict:
    """``{block: kind}`` for the memory blocks: one kind for all (a str) or a kind per block (a dict)."""
    if isinstance(memory, str):
        memory = dict.fromkeys(layers, memory)
    elif isinstance(memory, dict):
        extra = sorted(set(memory) - set(layers))
        if extra:
            raise ValueError(f"memory names blocks {extra} that are not memory blocks (pkm_layers={layers})")
        memory = {layer: memory.get(layer, "pkm") for layer in layers}
    else:
        raise TypeError(f"memory must be a memory kind or a dict of block -> kind, got {type(memory).__name__}")
    for layer, kind in memory.items():
        if kind not in MEMORY_KINDS:
            raise ValueError(f"memory of block {layer} must be one of {tuple(MEMORY_KINDS)}, got {kind!r}")
    return memory


def _since_last_token(tokens: Tensor, token_id: Optional[int]) -> Tensor:
    """``(batch, seq)`` bool: True from the last ``token_id`` of each row on (everywhere in rows without one)."""
    if token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    hits = tokens == token_id
    # a position is past the last hit when no hit follows it: reversed cumulative count of hits after it is 0
    after = hits.flip(-1).cumsum(-1).flip(-1) - hits.long()
    return after == 0


class TransformerLM(nn.Module):
    r"""Decoder-only transformer whose blocks ``pkm_layers`` use a PKM instead of a feedforward, ``knn_layers`` a KNN attention.

    Args:
        num_tokens: vocabulary size (256 for bytes).
        dim: model width.
        depth: number of blocks.
        seq_len: longest context (learned positions); :meth:`generate` keeps the last ``seq_len`` tokens.

    Keyword-only args:
        pkm_layers: 1-based numbers of the blocks that get a PKM (as product-key-memory 0.3.0),
            an int or an iterable of ints; ``()`` for a dense model; ``None`` (default) for the
            middle block ``(depth + 1) // 2``. Block ``i`` is ``self.blocks[i - 1]``: module paths,
            and so the layer names of :class:`MemoryUsageTracker`, count from 0 (block 3's PKM is
            ``blocks.2.ff``). :func:`~product_key_memory.integrations.hf.add_pkm` counts from 0.
        pkm_kwargs: keyword arguments of every memory layer (besides ``dim``). The default
            PKM normalises queries with a LayerNorm, which is causal; ``use_layernorm=False``
            (batch-norm queries) mixes statistics across the tokens of a batch at training
            time, so a token's output then depends on later tokens.
        memory: the kind of memory in the ``pkm_layers`` blocks, a key of
            :data:`~product_key_memory.layers.MEMORY_KINDS` (``"pkm"``, ``"memory_plus"``, ``"peer"``,
            ``"ultramem"``), or a dict ``{block: kind}`` (blocks it leaves out get ``"pkm"``).
        memory_kwargs: ``{kind: kwargs}``, arguments for the blocks of one kind, over ``pkm_kwargs``.
        knn_layers: 1-based numbers of the blocks whose attention is a :class:`KNNAttention` (the same
            convention as ``pkm_layers``), an int or an iterable of ints; ``()`` (default) for none. A block
            can hold both a KNN attention and a PKM.
        knn_kwargs: keyword arguments of every :class:`KNNAttention` besides ``dim``; ``heads``,
            ``dim_head`` and ``dropout`` default to the model's.
        clear_memories_on_sos_token_id: a token that starts a document. A row of a segment that holds it
            has its KNN memories cleared (every layer) before the forward, and only the positions from its
            last occurrence on are written to the memories (the rest belong to the previous document).
            ``None`` (default): memories are cleared only by the user.
        heads, dim_head: attention heads and their width.
        ff_mult: hidden width of the feedforwards is ``ff_mult * dim``.
        dropout: dropout in attention and feedforwards.
        device, dtype: factory kwargs.

    Shape:
        - tokens: ``(..., seq)`` long with ``seq <= seq_len``; output logits ``(..., seq, num_tokens)``.
          With KNN layers, ``(batch, seq)``, row ``i`` reading and writing index ``i`` of the memories.

    KNN memories: a model with ``knn_layers`` reads and writes memories given to every call,
    ``model(tokens, knn_memories=memories)`` with ``memories = model.create_knn_memories(batch_size)``;
    feed a long document one segment after the other with the same memories. Calling it without them
    raises a ``ValueError``, rather than silently running as a model without memory.

    Examples::

        >>> model = TransformerLM(256, dim=256, depth=6, seq_len=512, pkm_layers=(3,),
        ...                       pkm_kwargs=dict(num_keys=256, topk=32))
        >>> tokens = torch.randint(0, 256, (4, 512))
        >>> model.loss(tokens).backward()
        >>> sample = model.generate(tokens[:1, :16], 64, temperature=0.8)  # (1, 64)
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        seq_len: int,
        *,
        pkm_layers: Union[int, Iterable[int], None] = None,
        pkm_kwargs: Optional[dict] = None,
        memory: Union[str, Dict[int, str]] = "pkm",
        memory_kwargs: Optional[Dict[str, dict]] = None,
        knn_layers: Union[int, Iterable[int]] = (),
        knn_kwargs: Optional[dict] = None,
        clear_memories_on_sos_token_id: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth), ("seq_len", seq_len),
                            ("heads", heads), ("dim_head", dim_head), ("ff_mult", ff_mult)):
            check_positive_int(name, value)
        if pkm_kwargs is not None and not isinstance(pkm_kwargs, dict):
            raise TypeError(f"pkm_kwargs must be a dict of PKM arguments, got {type(pkm_kwargs).__name__}")
        if memory_kwargs is not None and (
            not isinstance(memory_kwargs, dict) or not set(memory_kwargs) <= set(MEMORY_KINDS)
            or not all(isinstance(v, dict) for v in memory_kwargs.values())
        ):
            raise ValueError(f"memory_kwargs must map memory kinds {tuple(MEMORY_KINDS)} to dicts of their "
                             f"arguments, got {memory_kwargs!r}")
        if knn_kwargs is not None and not isinstance(knn_kwargs, dict):
            raise TypeError(f"knn_kwargs must be a dict of KNNAttention arguments, got {type(knn_kwargs).__name__}")
        if clear_memories_on_sos_token_id is not None and (
                isinstance(clear_memories_on_sos_token_id, bool) or not isinstance(clear_memories_on_sos_token_id, int)
                or not 0 <= clear_memories_on_sos_token_id < num_tokens):
            raise ValueError(f"clear_memories_on_sos_token_id must be None or a token id in [0, {num_tokens}), "
                             f"got {clear_memories_on_sos_token_id!r}")
        factory = dict(device=device, dtype=dtype)
        self.seq_len = seq_len
        self.pkm_layers = tuple(sorted(_pkm_layer_set(pkm_layers, depth)))
        self.memory_kinds = _memory_kinds(memory, self.pkm_layers)
        self.knn_layers = tuple(sorted(_layer_set("knn_layers", knn_layers, depth)))
        self.clear_memories_on_sos_token_id = clear_memories_on_sos_token_id
        knn_kwargs = dict(dict(heads=heads, dim_head=dim_head, dropout=dropout), **(knn_kwargs or {}))

        self.token_emb = nn.Embedding(num_tokens, dim, **factory)
        self.pos_emb = nn.Embedding(seq_len, dim, **factory)
        self.blocks = nn.ModuleList()
        for layer in range(1, depth + 1):
            if layer in self.pkm_layers:
                kind = self.memory_kinds[layer]
                kwargs = {**(pkm_kwargs or {}), **(memory_kwargs or {}).get(kind, {})}
                ff = build_memory(kind, dim, **kwargs, **factory)
            else:
                ff = FeedForward(dim, ff_mult * dim, dropout, **factory)
            if layer in self.knn_layers:
                attn = KNNAttention(dim, **knn_kwargs, **factory)
            else:
                attn = CausalSelfAttention(dim, heads, dim_head, dropout, **factory)
            self.blocks.append(Block(attn, ff, dim, **factory))
        self.norm = nn.LayerNorm(dim, **factory)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False, **factory)

    def create_knn_memories(self, batch_size: int, *, max_memories: int = 16000, **memory_kwargs) -> KNNMemoryList:
        """One :class:`KNNMemory` per KNN layer (block order), ``batch_size`` indices of ``max_memories`` each.

        ``memory_kwargs`` go to every :class:`KNNMemory` (``backend``, ``chunk_size``, ``dtype``, ...); the
        device defaults to the model's. ``memmap_filename=path`` with several KNN layers maps one file per
        layer, ``f"{path}.layer{n}"`` for block ``n`` (one file would hold every layer's writes).
        """
        check_positive_int("batch_size", batch_size)
        memory_kwargs.setdefault("device", self.token_emb.weight.device)
        files = [memory_kwargs.pop("memmap_filename", None)] * len(self.knn_layers)
        if files and files[0] is not None and len(files) > 1:  # one file per layer: a shared one overwrites
            files = [f"{files[0]}.layer{layer}" for layer in self.knn_layers]
        return KNNMemoryList(
            KNNMemory(self.blocks[layer - 1].attn.dim_head, max_memories, batch_size, memmap_filename=file,
                      **memory_kwargs)
            for layer, file in zip(self.knn_layers, files)
        )

    def _check_memories(self, tokens: Tensor, knn_memories) -> None:
        if not self.knn_layers:
            if knn_memories is not None and len(knn_memories) > 0:
                raise ValueError(f"knn_memories given ({len(knn_memories)}) but this model has no knn_layers")
            return
        if knn_memories is None:
            raise ValueError(f"this model has knn_layers={self.knn_layers}: pass knn_memories="
                             "model.create_knn_memories(batch_size), the same for every segment of a document")
        if len(knn_memories) != len(self.knn_layers) or not all(isinstance(m, KNNMemory) for m in knn_memories):
            raise ValueError(f"knn_memories must hold {len(self.knn_layers)} KNNMemory (one per KNN layer), "
                             f"got {len(knn_memories)} items")
        if tokens.dim() != 2:
            raise ValueError(f"with knn_layers, tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        for memory in knn_memories:
            if len(memory.scoped_indices) != tokens.shape[0]:
                raise ValueError(f"tokens has batch size {tokens.shape[0]} but the memories have "
                                 f"{len(memory.scoped_indices)} indices in scope; create_knn_memories(batch_size="
                                 f"{tokens.shape[0]}) or use at_batch_indices")

    def _clear_rows(self, knn_memories, tokens: Tensor) -> None:
        hits = (tokens == self.clear_memories_on_sos_token_id).any(-1)  # (batch,), on the device: no host sync
        for memory in knn_memories:
            memory.clear_where(hits)

    def forward(
        self, tokens: Tensor, knn_memories: Optional[Sequence[KNNMemory]] = None, *, add_knn_memory: bool = True
    ) -> Tensor:
        """Tokens ``(..., seq)`` -> next-token logits ``(..., seq, num_tokens)``.

        With KNN layers, ``knn_memories`` (from :meth:`create_knn_memories`) is required; the segment's keys
        and values are added to it after the forward unless ``add_knn_memory=False``. That call only reads:
        it changes nothing in the memories, so rows holding ``clear_memories_on_sos_token_id`` are cleared
        only by writing calls (before their forward).
        """
        self._check_memories(tokens, knn_memories)
        write_mask = None
        if self.knn_layers and self.clear_memories_on_sos_token_id is not None and add_knn_memory:
            self._clear_rows(knn_memories, tokens)
            write_mask = _since_last_token(tokens, self.clear_memories_on_sos_token_id)
        return self._forward(tokens, knn_memories, write_mask if add_knn_memory else False)

    def _forward(self, tokens: Tensor, knn_memories, write_mask) -> Tensor:
        """``write_mask``: ``None`` writes every position to the memories, ``False`` none, a bool tensor those."""
        seq = tokens.shape[-1]
        if seq > self.seq_len:
            raise ValueError(f"tokens has {seq} positions, more than seq_len={self.seq_len}")
        x = self.token_emb(tokens) + self.pos_emb(torch.arange(seq, device=tokens.device))  # (..., T, dim)
        memories = iter(knn_memories or ())
        for block in self.blocks:
            if isinstance(block.attn, KNNAttention):
                x = block(x, knn_memory=next(memories), add_knn_memory=write_mask is not False,
                          write_mask=write_mask if isinstance(write_mask, Tensor) else None)
            else:
                x = block(x)
        return self.to_logits(self.norm(x))

    def loss(self, tokens: Tensor, knn_memories: Optional[Sequence[KNNMemory]] = None) -> Tensor:
        """Next-token cross-entropy (nats) of ``tokens (..., seq + 1)``: predicts ``tokens[..., 1:]``."""
        return lm_loss(self(tokens[..., :-1], knn_memories), tokens[..., 1:])

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        num_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        knn_memories: Optional[Sequence[KNNMemory]] = None,
        cuda_graph: bool = True,
    ) -> Tensor:
        """Samples ``num_new_tokens`` after ``prompt (batch, n)``; returns only the new tokens ``(batch, num_new_tokens)``.

        ``cuda_graph``: on CUDA, once the context fills ``seq_len`` tokens (every later step has
        the same shapes) and without KNN layers, each step replays one CUDA graph of the forward
        (:class:`~product_key_memory.cuda_graphs.GraphedForward`) instead of launching its kernels
        one by one. Ignored elsewhere.

        ``temperature``: a finite float ``>= 0``; ``0`` is greedy (argmax, the lower token id on ties) and
        ignores ``top_k``. ``top_k``: ``None`` (default) samples from every token; a positive int keeps
        exactly the ``top_k`` likeliest tokens (on ties at the ``top_k``-th place, the lower token ids).
        The model is in eval mode while sampling and gets its mode back afterwards, also when it raises.

        With KNN layers, ``knn_memories`` is required and is taken to hold the document before ``prompt``:
        sampling reads it, and each token is written to it when it slides out of the last ``seq_len``
        tokens (the context), so nothing is stored twice. A prompt longer than ``seq_len`` is first read as a
        document would be: the tokens before its last ``seq_len`` go through the model ``seq_len`` at a time
        and are written to the memories (the clear-on-sos rule as in :meth:`forward`). The clear-on-sos rule
        applies to the context and to each new token.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be a (batch, n >= 1) tensor of tokens, got shape {tuple(prompt.shape)}")
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float >= 0 (0 for greedy), got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite float >= 0 (0 for greedy), got {temperature!r}")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int):
                raise TypeError(f"top_k must be None (all tokens) or a positive int, got {type(top_k).__name__}")
            if top_k <= 0:
                raise ValueError(f"top_k must be None (all tokens) or a positive int, got {top_k!r}")
        self._check_memories(prompt, knn_memories)
        sos = self.clear_memories_on_sos_token_id if self.knn_layers else None
        was_training = self.training
        self.eval()
        graphed = None
        try:
            out, new = prompt, prompt
            if self.knn_layers and prompt.shape[1] > self.seq_len:
                head = prompt[:, :prompt.shape[1] - self.seq_len]  # never in a context: read it segment-wise
                for start in range(0, head.shape[1], self.seq_len):
                    self(head[:, start:start + self.seq_len], knn_memories)
                new = prompt[:, -self.seq_len:]
            for _ in range(num_new_tokens):
                context = out[:, -self.seq_len:]
                write_mask = False
                if self.knn_layers:
                    if sos is not None:
                        self._clear_rows(knn_memories, new)
                    # the first context token leaves the context at the next step: write it now
                    write_mask = torch.zeros_like(context, dtype=torch.bool)
                    write_mask[:, 0] = out.shape[1] >= self.seq_len
                    write_mask &= _since_last_token(context, sos)
                if cuda_graph and context.is_cuda and not self.knn_layers and context.shape[1] == self.seq_len:
                    if graphed is None:
                        graphed = GraphedForward(lambda c: self._forward(c, None, False)[:, -1].float(), context)
                    logits = graphed(context)  # overwritten by the next replay, used before it
                else:
                    logits = self._forward(context, knn_memories, write_mask)[:, -1].float()  # (batch, num_tokens)
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    if top_k is not None and top_k < logits.shape[-1]:
                        # a stable sort keeps exactly top_k, the lower ids first among equal logits
                        keep = logits.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
                        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, keep, True)
                        logits = logits.masked_fill(~kept, float("-inf"))
                    probs = (logits / temperature).softmax(-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                out = torch.cat((out, nxt), dim=-1)
                new = nxt
        finally:
            self.train(was_training)
        return out[:, prompt.shape[1]:]

    def extra_repr(self) -> str:
        knn = f", knn_layers={self.knn_layers}" if self.knn_layers else ""
        kinds = set(self.memory_kinds.values())
        memory = "" if kinds <= {"pkm"} else f", memory={self.memory_kinds}"
        return f"seq_len={self.seq_len}, pkm_layers={self.pkm_layers}{memory}{knn}"
