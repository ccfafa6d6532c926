"""A small decoder-only transformer language model with PKM layers (arXiv 1907.05242, sec. 3.3).

Chosen blocks swap their feedforward for a :class:`~product_key_memory.PKM`; the rest is
a plain pre-norm GPT: learned positions, causal attention through
``F.scaled_dot_product_attention``, GELU feedforwards, an untied output head.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int
from .pkm import PKM

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

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


def _pkm_layer_set(pkm_layers, depth: int) -> frozenset:
    if pkm_layers is None:
        return frozenset({(depth + 1) // 2})
    layers = (pkm_layers,) if isinstance(pkm_layers, (int, float, str)) else tuple(pkm_layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
            raise ValueError(f"pkm_layers must be 1-based block numbers in [1, depth={depth}], got {pkm_layers!r}")
    return frozenset(layers)


class TransformerLM(nn.Module):
    r"""Decoder-only transformer whose blocks ``pkm_layers`` use a PKM instead of a feedforward.

    Args:
        num_tokens: vocabulary size (256 for bytes).
        dim: model width.
        depth: number of blocks.
        seq_len: longest context (learned positions); :meth:`generate` keeps the last ``seq_len`` tokens.

    Keyword-only args:
        pkm_layers: 1-based numbers of the blocks that get a PKM (as product-key-memory 0.3.0),
            an int or an iterable of ints; ``()`` for a dense model; ``None`` (default) for the
            middle block ``(depth + 1) // 2``.
        pkm_kwargs: keyword arguments of every :class:`PKM` (besides ``dim``). The default
            PKM normalises queries with a LayerNorm, which is causal; ``use_layernorm=False``
            (batch-norm queries) mixes statistics across the tokens of a batch at training
            time, so a token's output then depends on later tokens.
        heads, dim_head: attention heads and their width.
        ff_mult: hidden width of the feedforwards is ``ff_mult * dim``.
        dropout: dropout in attention and feedforwards.
        device, dtype: factory kwargs.

    Shape:
        - tokens: ``(..., seq)`` long with ``seq <= seq_len``; output logits ``(..., seq, num_tokens)``.

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
        factory = dict(device=device, dtype=dtype)
        self.seq_len = seq_len
        self.pkm_layers = tuple(sorted(_pkm_layer_set(pkm_layers, depth)))

        self.token_emb = nn.Embedding(num_tokens, dim, **factory)
        self.pos_emb = nn.Embedding(seq_len, dim, **factory)
        self.blocks = nn.ModuleList()
        for layer in range(1, depth + 1):
            if layer in self.pkm_layers:
                ff = PKM(dim, **(pkm_kwargs or {}), **factory)
            else:
                ff = FeedForward(dim, ff_mult * dim, dropout, **factory)
            self.blocks.append(Block(CausalSelfAttention(dim, heads, dim_head, dropout, **factory), ff, dim, **factory))
        self.norm = nn.LayerNorm(dim, **factory)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False, **factory)

    def forward(self, tokens: Tensor) -> Tensor:
        """Tokens ``(..., seq)`` -> next-token logits ``(..., seq, num_tokens)``."""
        seq = tokens.shape[-1]
        if seq > self.seq_len:
            raise ValueError(f"tokens has {seq} positions, more than seq_len={self.seq_len}")
        x = self.token_emb(tokens) + self.pos_emb(torch.arange(seq, device=tokens.device))  # (..., T, dim)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.norm(x))

    def loss(self, tokens: Tensor) -> Tensor:
        """Next-token cross-entropy (nats) of ``tokens (..., seq + 1)``: predicts ``tokens[..., 1:]``."""
        return lm_loss(self(tokens[..., :-1]), tokens[..., 1:])

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        num_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Samples ``num_new_tokens`` after ``prompt (batch, n)``; returns only the new tokens ``(batch, num_new_tokens)``.

        ``temperature=0`` is greedy; ``top_k`` keeps only the ``top_k`` likeliest tokens.
        The model is in eval mode while sampling and gets its mode back afterwards.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be a (batch, n >= 1) tensor of tokens, got shape {tuple(prompt.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        was_training = self.training
        self.eval()
        out = prompt
        for _ in range(num_new_tokens):
            logits = self(out[:, -self.seq_len:])[:, -1].float()  # (batch, num_tokens)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = (logits / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat((out, nxt), dim=-1)
        self.train(was_training)
        return out[:, prompt.shape[1]:]

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, pkm_layers={self.pkm_layers}"
