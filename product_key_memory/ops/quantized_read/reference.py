"""The read of a quantized value table written as plainly as PyTorch allows: the specification.

Row formats (fbgemm's fused row-wise layouts, so the CPU kernels of :mod:`.torch_impl` read the
stored buffer as it is):

* ``int8``: ``dim`` uint8 codes, then a float32 scale and a float32 offset;
  ``row = code * scale + offset`` with ``offset = min(row)``, ``scale = (max - min) / 255``,
  ``code = round((x - min) / scale)`` (0 for a constant row). fbgemm's prepack divides by
  ``max - min + 1e-8`` instead, which breaks the half-step bound for ranges near 1e-8; its kernels
  read only the stored scale and offset, so they read these codes as they read their own.
* ``int4``: ``dim / 2`` bytes, two codes each (element ``2i`` in the low nibble), then a
  float16 scale and a float16 offset; ``offset = fp16(min)``,
  ``scale = fp16((max - offset) / 15)`` (1 where that is 0, as fbgemm's prepack).
* ``bfloat16`` / ``float16``: the rows cast; the store is the ``(num_slots, dim)`` half table.

What a format cannot hold is refused (``ValueError`` naming the row and its values), never
stored as NaN: a non-finite value (int8, int4), a range beyond float32 (int8), and for int4 a
min or a scale beyond float16's 65504 (``|min| >= 65520`` or ``(max - fp16(min)) / 15 >= 65520``).

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
_LEVELS = {"int8": 255, "int4": 15}  # the largest code of each packed format


def row_bytes(fmt: str, dim: int) -> int:
    """Bytes of one stored row: ``dim * 2`` (half formats), ``dim + 8`` (int8), ``dim / 2 + 4`` (int4)."""
    if fmt in HALF_DTYPES:
        return 2 * dim
    return dim + 8 if fmt == "int8" else dim // 2 + 4


def _refuse_rows(bad: Tensor, lo: Tensor, hi: Tensor, first_row: int, why: str) -> None:
    if bad.device.type == "meta":  # a table built on the meta device holds no values to check
        return
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(
            f"{why}; row {first_row + i} (min {float(lo.reshape(-1)[i])!r}, max {float(hi.reshape(-1)[i])!r}) "
            "cannot be stored (quantize such a table to bfloat16, or rescale it)"
        )


def quantize_rows(rows: Tensor, fmt: str, *, first_row: int = 0) -> Tensor:
    """Float rows ``(n, dim)`` -> packed uint8 rows ``(n, row_bytes)`` in fbgemm's int8 or int4 layout.

    Plain torch on the rows' device, so a table is packed the same way on every device;
    it agrees with ``torch.ops.quantized.embedding_bag_{byte,4bit}_prepack`` (tests) in the
    scale and offset bytes, and up to a code differing by one where a value lies on a rounding
    tie (int8: by more for ranges near 1e-8, see the module docstring). A row the format cannot
    hold raises ``ValueError`` naming it (counted from ``first_row``).
    """
    if fmt not in _LEVELS:
        raise ValueError(f"fmt must be 'int8' or 'int4', got {fmt!r}")
    x = rows.float()
    lo, hi = x.aminmax(dim=-1, keepdim=True)  # (n, 1)
    if fmt == "int8":
        span = hi - lo
        _refuse_rows(~torch.isfinite(span), lo, hi, first_row, "int8 holds finite rows whose max - min is a float32")
        scale = span / 255
        inverse = torch.where(span > 0, 255 / span, 0.0)  # a constant row: every code 0
        codes = ((x - lo) * inverse).round_().clamp_(0, 255).to(torch.uint8)
        return torch.cat((codes, scale.view(torch.uint8), lo.view(torch.uint8)), dim=-1)
    if rows.shape[-1] % 2:
        raise ValueError(f"int4 needs an even row width, got dim={rows.shape[-1]}")
    lo16 = lo.half()
    scale16 = ((hi - lo16.float()) / 15).half()
    _refuse_rows(
        ~(torch.isfinite(scale16) & torch.isfinite(lo16) & torch.isfinite(hi)), lo, hi, first_row,
        "int4 stores a float16 offset fp16(min) and scale fp16((max - offset) / 15), which hold up to 65504",
    )
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
