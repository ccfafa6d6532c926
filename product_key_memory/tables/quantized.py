"""Read-only value tables in fewer bytes per row, for inference: :func:`quantize_values_`.

A value read is memory-bound (a 1M-slot table of width 1024 is 4 GiB in float32), so
storing the rows in bfloat16, float16, int8 or int4 shrinks the table 2x, 2x, ~4x or
~7x. On CPU the int8 and int4 reads are PyTorch's own fbgemm embedding-bag kernels
(``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` /
``embedding_bag_4bit_rowwise_offsets``), which dequantize each row as they sum it; on
other devices, and as the reference in tests, a plain-torch read gathers the rows and
dequantizes them (:func:`dequantize_rows`).

Row formats (fbgemm's fused layouts, so the CPU kernels read the buffer as is):

* ``int8``: ``dim`` uint8 codes, then a float32 scale and a float32 offset;
  ``row = code * scale + offset`` with ``offset = min(row)``, ``scale = (max - min) / 255``.
* ``int4``: ``dim / 2`` bytes, two codes each (element ``2i`` in the low nibble), then a
  float16 scale and a float16 offset; ``offset = fp16(min)``,
  ``scale = fp16((max - offset) / 15)`` (1 for a constant row).
* ``bfloat16`` / ``float16``: the rows cast, read with ``F.embedding_bag``.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from ..ops.quantized_read import FORMATS as QUANTIZED_FORMATS
from ..ops.quantized_read import HALF_DTYPES as _HALF
from ..ops.quantized_read import dequantize_rows, quantize_rows, quantized_read, row_bytes
from .base import ValueTable
from .experts import ExpertValues, dot_rows

__all__ = ["QuantizedValues", "QuantizedExpertValues", "quantize_values_", "quantize_rows", "dequantize_rows",
           "row_bytes", "QUANTIZED_FORMATS"]

_ALIASES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.int8: "int8", "int4": "int4"}
_ALIASES.update((f, f) for f in QUANTIZED_FORMATS)  # the format names themselves
# rows quantized at a time: bounds the float32 temporaries of a multi-GiB table to ~64 MiB
_CHUNK_ELEMENTS = 1 << 24


def _format_of(dtype) -> str:
    fmt = _ALIASES.get(dtype) if isinstance(dtype, (torch.dtype, str)) else None
    if fmt is None:
        raise ValueError(
            f"dtype must be one of torch.bfloat16, torch.float16, torch.int8, 'int4' (or the names 'bfloat16', 'float16', 'int8'); got {dtype!r}"
        )
    return fmt


class QuantizedValues(ValueTable):
    r"""A read-only value table stored in ``bfloat16``, ``float16``, ``int8`` or ``int4``.

    Made by :func:`quantize_values_` (or :meth:`from_float`) from a float table. It has no
    parameters: the table gets no gradient (``trainable`` is accepted and ignored,
    ``sparse`` is always ``False``), but the output is differentiable with respect to
    the read weights, so the keys and the query network can be fine-tuned against a
    frozen quantized table.

    Storage (buffers, so ``state_dict`` holds them; a model quantized the same way
    loads them): ``weight`` ``(num_slots, dim)`` in the half dtype, or ``packed``
    ``(num_slots, row_bytes)`` uint8 in fbgemm's fused row-wise layout (module
    docstring). Bytes per row: ``2 dim``, ``dim + 8`` (int8), ``dim / 2 + 4`` (int4).

    Reads: on CPU, ``F.embedding_bag`` on the half table and fbgemm's quantized
    embedding-bag kernels for int8 / int4; elsewhere the rows are gathered and
    dequantized in plain torch (:func:`dequantize_rows`). The sums are in float32 and
    the output has ``out_dtype``, the dtype of the float table it was made from.

    Casts: ``.half()``, ``.bfloat16()``, ``.float()``, ``.double()`` and ``.to(dtype)`` of the table
    or of a model holding it set ``out_dtype`` (as quantizing the cast model would) and leave the
    stored codes and ``format`` as quantized; device moves move the buffers. So casting a model
    after :func:`quantize_values_` gives the output dtype that casting before gives. (``Module.type``,
    which would convert the integer buffers too, raises ``TypeError``.)

    Error per stored element ``x`` of a row with range ``[lo, hi]``, true for every row the
    format holds (tests/ops/quantized_read checks ranges from 1e-10 to 1e6), ``r`` the float32
    rounding of packing and reading, ``r = 2**-21 (hi - lo) + 2**-23 max(|lo|, |hi|)``:

    * ``int8``: ``|x - x'| <= (hi - lo) / 510 + r`` (half a step: the code is the nearest one);
    * ``int4``: ``|x - x'| <= |s| / 2 + |lo - o| + 15 e + r`` with ``o = fp16(lo)``,
      ``s' = (hi - o) / 15``, ``s = fp16(s')`` and ``e = max(2**-11 |s'|, 2**-25)`` (the rounding
      of ``s'`` to float16): half a step, and where a code saturates at 0 or 15, the offset's and
      the scale's rounding. For most rows about ``(hi - lo) / 30``;
    * ``bfloat16``: ``|x - x'| <= 2**-8 |x|``; ``float16``: ``2**-11 |x|`` (round to nearest,
      half an ulp; float16 has subnormals below ``2**-14``).

    Values a format cannot hold raise ``ValueError`` naming the row (never NaN): non-finite values
    and ranges beyond float32 in int8 and int4, ``|lo| >= 65520`` or ``s' >= 65520`` in int4 (its
    float16 offset and scale), values past 65504 in float16 (:func:`quantize_rows`).

    A half-format read also rounds the read weights and the output to the half dtype
    (``F.embedding_bag`` takes weights of the table's dtype): about ``2 u sum |w| |row|``
    more, ``u`` the unit roundoff above.

    Measured at the README layer (``dim=512, heads=4, num_keys=256, topk=32``, random
    input, rows ~ N(0, 1/512)), error of the layer output relative to its float32 RMS:
    the README's "Inference" and ``benchmarks/README.md`` (``benchmarks/bench_inference.py`` prints them).

    Args:
        num_slots, dim: table size.

    Keyword-only args:
        format: one of :data:`QUANTIZED_FORMATS`.
        out_dtype: float dtype of the read's output (default float32).
        device: where the buffers live.
    """

    supports_sparse_grad = False

    def __init__(self, num_slots: int, dim: int, *, format: str, out_dtype: torch.dtype = torch.float32, device=None):
        super().__init__(num_slots, dim)
        fmt = _format_of(format)
        if fmt == "int4" and dim % 2:
            raise ValueError(f"int4 needs an even dim, got dim={dim}")
        if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise TypeError(f"out_dtype must be a float torch.dtype, got {out_dtype!r}")
        self.format = fmt
        self.out_dtype = out_dtype
        if fmt in _HALF:
            self.register_buffer("weight", torch.zeros(num_slots, dim, dtype=_HALF[fmt], device=device))
        else:
            self.register_buffer("packed", torch.zeros(num_slots, row_bytes(fmt, dim), dtype=torch.uint8, device=device))

    @classmethod
    def from_float(cls, weight: Tensor, format) -> "QuantizedValues":
        """The quantized copy of a float ``(num_slots, dim)`` table (same device), packed in row chunks."""
        if not (isinstance(weight, Tensor) and weight.dim() == 2 and weight.is_floating_point()):
            raise ValueError(f"weight must be a float (num_slots, dim) tensor, got {getattr(weight, 'shape', weight)!r}")
        fmt = _format_of(format)
        num_slots, dim = weight.shape
        table = cls(num_slots, dim, format=fmt, out_dtype=weight.dtype, device=weight.device)
        store = table.weight if fmt in _HALF else table.packed
        step = max(1, _CHUNK_ELEMENTS // dim)
        with torch.no_grad():
            for start in range(0, num_slots, step):
                rows = weight[start : start + step]
                if fmt in _HALF:
                    half = rows.to(store.dtype)
                    overflow = torch.isinf(half) & torch.isfinite(rows)
                    if half.device.type != "meta" and bool(overflow.any()):  # meta: no values to check
                        i, j = (int(t) for t in overflow.nonzero()[0])
                        raise ValueError(
                            f"{fmt} holds values up to {torch.finfo(store.dtype).max:g}: row {start + i} holds "
                            f"{float(rows[i, j])!r}, which would become inf (quantize such a table to bfloat16)"
                        )
                    store[start : start + step] = half
                else:
                    store[start : start + step] = quantize_rows(rows, fmt, first_row=start)
        return table

    def _apply(self, fn, recurse=True):
        # Module casts (.half(), .bfloat16(), .double(), .to(dtype)) convert every float buffer; here
        # they set the output dtype instead, and the stored codes only move (device, memory format).
        # The half store goes through as an int16 view, which the casts leave alone.
        half = self.format in _HALF
        probe = fn(torch.empty(0, dtype=self.out_dtype, device=self._store.device))
        if half:
            self._buffers["weight"] = self._buffers["weight"].view(torch.int16)
        try:
            super()._apply(fn, recurse)
        finally:
            store = self._store
            if store.dtype != (torch.int16 if half else torch.uint8):
                raise TypeError(
                    f"QuantizedValues ({self.format}) cannot take a cast of its integer buffers (to {store.dtype}): "
                    "the stored codes stay as quantized; cast with .to(dtype), .half(), .bfloat16(), .double()"
                )
            if half:
                self._buffers["weight"] = store.view(_HALF[self.format])
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self.out_dtype = probe.dtype
        return self

    def nbytes(self) -> int:
        """Bytes of the stored table."""
        store = self.weight if self.format in _HALF else self.packed
        return store.numel() * store.element_size()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole table as float ``(num_slots, dim)`` (tests and inspection; allocates it)."""
        if self.format in _HALF:
            return self.weight.to(dtype)
        return dequantize_rows(self.packed, self.format, self.dim, dtype)

    def reset_parameters(self) -> None:
        """Nothing to reset: the table is read-only (quantize a freshly initialised float table instead)."""

    def value_parameters(self):
        return iter(())

    # -- reads -----------------------------------------------------------------------------

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None) -> Tensor:
        # trainable: no row of a quantized table learns, so it changes nothing
        if indices.dim() < 1 or (weights is not None and weights.shape != indices.shape):
            got = None if weights is None else tuple(weights.shape)
            raise ValueError(f"indices (..., m) and weights of the same shape expected, got {tuple(indices.shape)}, {got}")
        lead, m = indices.shape[:-1], indices.shape[-1]
        w = None if weights is None else weights.reshape(-1, m)
        out = quantized_read(self._store, self.format, self.dim, indices.reshape(-1, m), w, self.out_dtype)
        return out.view(*lead, self.dim)

    @property
    def _store(self) -> Tensor:
        return self.weight if self.format in _HALF else self.packed

    def extra_repr(self) -> str:
        s = f"num_slots={self.num_slots}, dim={self.dim}, format={self.format!r}"
        return s + (f", out_dtype={self.out_dtype}" if self.out_dtype != torch.float32 else "")


class QuantizedExpertValues(ValueTable):
    r"""Read-only experts for inference: ``down`` and ``up`` are quantized tables
    (:class:`QuantizedValues`), read as :class:`~product_key_memory.ExpertValues` reads its matrices.

    Made by ``quantize_values_(model, dtype)`` on a model holding :class:`~product_key_memory.ExpertValues`;
    the state dict holds the two quantized tables' buffers under ``down.`` and ``up.``.
    """

    supports_sparse_grad = False

    def __init__(self, down: ValueTable, up: ValueTable):
        if (down.num_slots, down.dim) != (up.num_slots, up.dim):
            raise ValueError(f"down and up must have the same sizes, got {(down.num_slots, down.dim)} "
                             f"and {(up.num_slots, up.dim)}")
        super().__init__(up.num_slots, up.dim)
        self.down, self.up = down, up

    def reset_parameters(self) -> None:
        raise RuntimeError("a quantized expert table is read-only; quantize a freshly initialised ExpertValues")

    def project(self, x: Tensor, indices: Tensor, *, trainable: Optional[Tensor] = None) -> Tensor:
        """As :meth:`~product_key_memory.ExpertValues.project`; ``trainable`` changes nothing (no row learns)."""
        # the quantized table's read, not its module call: hooks count the experts' up reads only
        return dot_rows(x, self.down.read(indices.reshape(-1, 1), None), indices)

    def read(self, indices: Tensor, weights: Optional[Tensor], *, trainable: Optional[Tensor] = None) -> Tensor:
        return self.up.read(indices, weights)


def _quantized_version(table: nn.Module, fmt: str, path: str) -> ValueTable:
    if isinstance(table, QuantizedValues):
        raise TypeError(f"quantize_values_: the table at {path or '<model>'!r} is already quantized ({table.format})")
    if isinstance(table, ExpertValues):  # PEER's experts: both matrices quantized
        down, up = (QuantizedValues.from_float(w.detach(), fmt) for w in (table.down, table.up))
        return QuantizedExpertValues(down, up)
    hook = getattr(table, "quantized", None)
    if callable(hook):  # a table type of one's own decides how it quantizes
        return hook(fmt)
    weight = getattr(table, "weight", None)
    if type(table).__name__ == "ShardedValues" or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(
            f"quantize_values_: cannot quantize the value table at {path or '<model>'!r} "
            f"({type(table).__name__}): it has no (num_slots, dim) float weight; give its class a "
            f"quantized(format) method returning a read-only ValueTable"
        )
    try:
        return QuantizedValues.from_float(weight.detach(), fmt)
    except ValueError as e:  # a row the format cannot hold: say which table
        raise ValueError(f"quantize_values_: the value table at {path or '<model>'!r}: {e}") from None


def quantize_values_(model: nn.Module, dtype: Union[torch.dtype, str]) -> nn.Module:
    """Replace every value table of ``model`` by a read-only quantized copy, in place.

    Every :class:`~product_key_memory.ValueTable` found in ``model.named_modules()``
    becomes a :class:`QuantizedValues` on its parent module(s); a table shared by several
    layers becomes one quantized table shared by the same layers. The float tables are
    freed once nothing else (e.g. an optimizer) holds them.

    Args:
        model: any module holding value tables (or a table itself, returned converted).
        dtype: ``torch.bfloat16``, ``torch.float16``, ``torch.int8`` (or ``"int8"``), ``"int4"``.

    Returns:
        ``model`` (or the new table when ``model`` is itself a table).

    A quantized checkpoint loads into a freshly built float model after the same call::

        model = build_model()                 # float tables
        quantize_values_(model, torch.int8)   # the same buffers as the saved model
        model.load_state_dict(torch.load("quantized.pt"))

    A model without any :class:`~product_key_memory.ValueTable` raises ``ValueError``.
    Tables of other types need a ``quantized(format)`` method (``format`` one of
    :data:`QUANTIZED_FORMATS`); without it, and for ``ShardedValues``, this raises
    ``TypeError`` naming the table's path.
    """
    fmt = _format_of(dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, ValueTable):
        return _quantized_version(model, fmt, "")
    done: Dict[int, ValueTable] = {}
    # every (parent, attribute) that holds a table; named_modules lists a shared table once
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(parent.named_children()):
            if not isinstance(child, ValueTable):
                continue
            path = f"{parent_name}.{name}" if parent_name else name
            if id(child) not in done:
                done[id(child)] = _quantized_version(child, fmt, path)
            setattr(parent, name, done[id(child)])
    if not done:
        raise ValueError(
            f"quantize_values_: no ValueTable found in {type(model).__name__}; value tables are found by "
            f"isinstance(module, ValueTable) (a PKM whose values are a plain nn.EmbeddingBag has none)"
        )
    return model
