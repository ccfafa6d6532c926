"""The read of a quantized value table in fast PyTorch ops.

On CPU: a half table through the value read's entry (:func:`..value_read.value_read`, on its
backend), and PyTorch's fbgemm embedding-bag kernels for int8 / int4
(``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` / ``embedding_bag_4bit_rowwise_offsets``),
which dequantize each row as they sum it, in float32. Elsewhere: :func:`.reference.read`. A
half-format read on the torch backend rounds the weights and the sums to the half dtype
(``embedding_bag`` takes weights of the table's dtype).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..value_read import value_read
from . import reference
from .reference import HALF_DTYPES

__all__ = ["read"]


def read(
    store: Tensor, fmt: str, dim: int, indices: Tensor, weights: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """:func:`.reference.read` (float32 weights or none): ``(bags, dim)`` in ``out_dtype``."""
    if indices.device.type != "cpu":
        return reference.read(store, fmt, dim, indices, weights, out_dtype)
    if fmt in HALF_DTYPES:
        out = value_read(store, indices, weights)  # the value read's entry: its backend, no gradient here
    else:
        op = (
            torch.ops.quantized.embedding_bag_byte_rowwise_offsets
            if fmt == "int8"
            else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
        )
        psw = weights if weights is None or weights.dtype == torch.float32 else weights.float()  # float32 only
        out = op(store, indices, None, False, 0, False, psw)
    return out if out.dtype == out_dtype else out.to(out_dtype)
