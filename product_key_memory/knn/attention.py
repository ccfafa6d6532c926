"""Memorizing attention: local causal attention plus attention over retrieved memories (Wu et al. 2022, arXiv 2203.08913)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, check_probability
from .memory import KNNMemory

__all__ = ["KNNAttention"]


class KNNAttention(nn.Module):
    r"""Causal attention over the segment and over the ``num_retrieved_memories`` memories each query retrieves.

    Queries (``heads`` of them) and one key/value head shared by all query heads are L2-normalised, so the
    inner-product search of a :class:`KNNMemory` of width ``dim_head`` ranks memories by cosine; scores are
    ``exp(log_scale_h) * cos(q, k)`` with a learned per-head temperature. Each query reads its segment with causal
    attention (``F.scaled_dot_product_attention``) and its retrieved memories with a second softmax, and the two
    are mixed by a learned per-head gate ``g_h = sigmoid(b_h)`` (arXiv 2203.08913, sec. 3):
    ``g_h * memory + (1 - g_h) * local``. A query whose index holds no memory yet reads only its segment.
    After the forward, the segment's (detached) keys and values are added to the memory, so a segment never
    retrieves itself.

    Args:
        dim: model width.

    Keyword-only args:
        heads, dim_head: query heads and their width (also the memory's ``dim``).
        num_retrieved_memories: memories retrieved per query (``topk`` of the search).
        dropout: attention dropout, local and memory.
        attn_scale_init: initial score scale (the temperature of cosine scores; 20 as the peer).
        gate_init: initial gate bias ``b_h`` (0: the two attentions mixed half and half).
        device, dtype: factory kwargs.

    Shape:
        - x: ``(batch, seq, dim)``: batch row ``i`` reads and writes the memory's index ``i`` in scope, so
          the leading dims cannot be merged as in other layers.
        - mask: ``(batch, seq)`` bool, True for real tokens. Padded tokens attend to nothing (their output
          is zero), are attended by no query, and are not written to the memory.
        - output: ``(batch, seq, dim)``.

    Examples::

        >>> attn = KNNAttention(128, heads=4, dim_head=32, num_retrieved_memories=16)
        >>> memory = KNNMemory(dim=32, max_memories=4096, num_indices=2)
        >>> for segment in torch.randn(3, 2, 64, 128):  # a long document, 64 tokens at a time
        ...     out = attn(segment, knn_memory=memory)  # (2, 64, 128)
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        num_retrieved_memories: int = 32,
        dropout: float = 0.0,
        attn_scale_init: float = 20.0,
        gate_init: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head),
                            ("num_retrieved_memories", num_retrieved_memories)):
            check_positive_int(name, value)
        check_probability("dropout", dropout)
        if isinstance(attn_scale_init, bool) or not isinstance(attn_scale_init, (int, float)) or \
                not 0 < attn_scale_init < math.inf:
            raise ValueError(f"attn_scale_init must be a positive finite float, got {attn_scale_init!r}")
        if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or not math.isfinite(gate_init):
            raise ValueError(f"gate_init must be a finite float, got {gate_init!r}")
        factory = dict(device=device, dtype=dtype)
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.num_retrieved_memories = num_retrieved_memories
        self.attn_scale_init, self.gate_init = float(attn_scale_init), float(gate_init)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False, **factory)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False, **factory)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False, **factory)
        self.log_scale = nn.Parameter(torch.empty(heads, **factory))
        self.gate = nn.Parameter(torch.empty(heads, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear maps as ``nn.Linear`` (Kaiming-uniform); ``log_scale = log(attn_scale_init)``; ``gate = gate_init``."""
        for linear in (self.to_q, self.to_kv, self.to_out):
            linear.reset_parameters()
        nn.init.constant_(self.log_scale, math.log(self.attn_scale_init))
        nn.init.constant_(self.gate, self.gate_init)

    def forward(
        self, x: Tensor, *, knn_memory: KNNMemory, mask: Optional[Tensor] = None,
        add_knn_memory: bool = True, write_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``x (batch, seq, dim)`` -> ``(batch, seq, dim)``; then adds the segment's keys and values to ``knn_memory``.

        ``add_knn_memory=False`` only reads the memory. ``write_mask (batch, seq)`` bool narrows which positions
        are written (with ``mask``: both must be True).
        """
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seq, dim), got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        if mask is not None and (mask.shape != (b, n) or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor of shape {(b, n)}, got {mask.dtype} {tuple(mask.shape)}")
        if not isinstance(knn_memory, KNNMemory):
            raise TypeError(f"knn_memory must be a KNNMemory, got {type(knn_memory).__name__}")
        if knn_memory.dim != self.dim_head:
            raise ValueError(f"knn_memory has dim={knn_memory.dim}, this layer needs dim_head={self.dim_head}")
        q = F.normalize(self.to_q(x).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2), dim=-1)  # (B, H, T, d)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (B, T, d) each, shared by the heads
        k = F.normalize(k, dim=-1)
        scale = self.log_scale.exp()[:, None, None]  # (H, 1, 1)
        dropout = self.dropout if self.training else 0.0

        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            # a padded query keeps its own key so no row is empty; its output is zeroed below
            attn_mask = (causal & mask[:, None, :]) | torch.eye(n, dtype=torch.bool, device=x.device)
            attn_mask = attn_mask[:, None]  # (B, 1, T, T)
        else:
            attn_mask = causal
        local = F.scaled_dot_product_attention(q * scale, k[:, None], v[:, None], attn_mask=attn_mask,
                                               dropout_p=dropout, scale=1.0)  # (B, H, T, d)

        mem_kv, mem_mask = knn_memory.search(q, self.num_retrieved_memories)  # (B, H, T, K, 2, d), (B, H, T, K)
        mem_kv = mem_kv.to(q.dtype)
        mem_k, mem_v = mem_kv.unbind(-2)
        sim = torch.einsum("bhtd,bhtkd->bhtk", q, mem_k) * scale  # (B, H, T, K)
        sim = sim.to(torch.promote_types(sim.dtype, torch.float32))  # softmax in at least fp32
        sim = sim.masked_fill(~mem_mask, torch.finfo(sim.dtype).min)
        attn = sim.softmax(-1).type_as(q) * mem_mask  # rows with no memory: all zeros
        attn = F.dropout(attn, dropout, self.training)
        memory = torch.einsum("bhtk,bhtkd->bhtd", attn, mem_v)

        gate = self.gate.sigmoid()[:, None, None] * mem_mask[..., :1]  # (B, H, T, 1): 0 where nothing retrieved
        out = local + gate * (memory - local)
        if mask is not None:
            out = out * mask[:, None, :, None]
        out = self.to_out(out.transpose(1, 2).flatten(-2))  # (B, T, H * d) -> (B, T, dim)

        if add_knn_memory:
            writes = mask if write_mask is None else (write_mask if mask is None else write_mask & mask)
            knn_memory.add(torch.stack((k, v), dim=-2).detach(), writes)  # (B, T, 2, d)
        return out

    def extra_repr(self) -> str:
        extra = f", dropout={self.dropout}" if self.dropout else ""
        return (f"heads={self.heads}, dim_head={self.dim_head}, "
                f"num_retrieved_memories={self.num_retrieved_memories}{extra}")
