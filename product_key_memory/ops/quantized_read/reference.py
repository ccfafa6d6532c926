"""The read of a quantized value table written as plainly as PyTorch allows: the specification.

Row formats (fbgemm's fused row-wise layouts, so the CPU kernels of :mod:`.torch_impl` read the
stored buffer as it is):

* ``int8``: ``dim`` uint8 codes, then a float32 scale and a float32 offset;
  ``row = code * scale + offset`` with ``offset = min(row)``, ``scale = (max - min) / 255``.
* ``int4``: ``dim / 2`` bytes, two codes each (element ``2i`` in the low nibble), then a
  float16 scale and a float16 offset; ``offset = fp16(min)``,
  ``scale = fp16((max - offset) / 15)`` (1 for a constant row).
* ``bfloat16`` / ``float16``: the rows cast; the store is the ``(num_slots, dim)`` half table.

:func:`read` gathers the rows read, dequantizes them and sums them weighted, in float32
(float64 for float64 weights).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FORMATS", "HALF_DTYPES", "row_bytes", "quantize_rows", "dequantize_rows", "rows", "read"]

FORMATS = ("bfloat16", "float16", "int8", "int4")
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_LEVELS = {"int8": 255, "int4": 15}


def row_bytes(fmt: str, dim: int) -> int:
    """Bytes of one stored row: ``dim * 2`` (half formats), ``dim + 8`` (int8), ``dim / 2 + 4`` (int4)."""
    if fmt in HALF_DTYPES:
        return 2 * dim
    return dim + 8 if fmt == "int8" else dim // 2 + 4


def quantize_rows(rows: Tensor, fmt: str) -> Tensor:
    """Float rows ``(n, dim)`` -> packed uint8 rows ``(n, row_bytes)`` in fbgemm's int8 or int4 layout.

    Plain torch on the rows' device, so a table is packed the same way on every device;
    it agrees with ``torch.ops.quantized.embedding_bag_{byte,4bit}_prepack`` (tests) up
    to a code differing by one where a value lies on a rounding tie.
    """
    if fmt not in _LEVELS:
        raise ValueError(f"fmt must be 'int8' or 'int4', got {fmt!r}")
    x = rows.float()
    lo, hi = x.aminmax(dim=-1, keepdim=True)  # (n, 1)
    if fmt == "int8":
        scale = (hi - lo) / 255
        codes = ((x - lo) * (255 / (hi - lo + 1e-8))).round_().clamp_(0, 255).to(torch.uint8)
        return torch.cat((codes, scale.view(torch.uint8), lo.view(torch.uint8)), dim=-1)
    if rows.shape[-1] % 2:
        raise ValueError(f"int4 needs an even row width, got dim={rows.shape[-1]}")
    lo16 = lo.half()
    scale16 = ((hi - lo16.float()) / 15).half()
    scale16 = torch.where(scale16 == 0, torch.ones_like(scale16), scale16)  # a constant row
    codes = ((x - lo16.float()) * (1.0 / scale16.float())).round_().clamp_(0, 15).to(torch.uint8)
    nibbles = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return torch.cat((nibbles, scale16.view(torch.uint8), lo16.view(torch.uint8)), dim=-1)


def dequantize_rows(packed: Tensor, fmt: str, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Packed rows ``(..., row_bytes)`` -> float rows ``(..., dim)`` in ``dtype`` (the plain-torch read)."""
    if fmt == "int8":
        codes = packed[..., :dim]
        scale = packed[..., dim : dim + 4].contiguous().view(torch.float32)
        offset = packed[..., dim + 4 : dim + 8].contiguous().view(torch.float32)
    else:
        half = dim // 2
        nibbles = packed[..., :half]
        codes = torch.stack((nibbles & 15, nibbles >> 4), dim=-1).flatten(-2)  # (..., dim)
        scale = packed[..., half : half + 2].contiguous().view(torch.float16)
        offset = packed[..., half + 2 : half + 4].contiguous().view(torch.float16)
    return torch.addcmul(offset.to(dtype), codes.to(dtype), scale.to(dtype))


def rows(store: Tensor, fmt: str, dim: int, indices: Tensor, dtype: torch.dtype) -> Tensor:
    """The rows ``indices (...)`` of a stored table, dequantized: ``(..., dim)`` in ``dtype``."""
    if fmt in HALF_DTYPES:
        return F.embedding(indices, store).to(dtype)
    return dequantize_rows(F.embedding(indices, store), fmt, dim, dtype)


def read(
    store: Tensor, fmt: str, dim: int, indices: Tensor, weights: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """``out[b] = sum_j weights[b, j] * row(indices[b, j])`` for ``indices (bags, m)``: ``(bags, dim)``
    in ``out_dtype`` (float64 for float64 weights, differentiable w.r.t. ``weights`` by autograd)."""
    dtype = torch.float64 if weights is not None and weights.dtype == torch.float64 else torch.float32
    r = rows(store, fmt, dim, indices, dtype)  # (bags, m, dim)
    out = r.sum(-2) if weights is None else torch.bmm(weights.to(dtype).unsqueeze(-2), r).squeeze(-2)
    return out if dtype == torch.float64 else out.to(out_dtype)
