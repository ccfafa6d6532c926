"""pkm::quantized_read and pkm::quantized_read_backward: :mod:`torch_impl` and the entry in every mode
against :mod:`reference`. The format bounds and the tables built on the op are tested in
tests/tables/test_quantized.py."""

import pytest
import torch
from torch.library import opcheck
from torch.testing import assert_close

from product_key_memory import use_backend
from product_key_memory.ops import quantized_read as entry
from product_key_memory.ops.quantized_read import FORMATS, HALF_DTYPES, quantize_rows, reference, row_bytes, torch_impl

from .._tracing import GraphCapture, dispatched_pkm_ops, pkm_targets

# both sides dequantize the same stored codes and sum in float32; a half-format read rounds the
# weights and the sums to the half dtype (torch_impl) where the reference sums in float32
TOL = {
    "int8": dict(atol=1e-5, rtol=1e-5),
    "int4": dict(atol=1e-5, rtol=1e-5),
    "bfloat16": dict(atol=3e-2, rtol=2e-2),
    "float16": dict(atol=4e-3, rtol=2e-3),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
}


def store_of(fmt, num_slots=24, dim=8, seed=0):
    table = torch.randn(num_slots, dim, generator=torch.Generator().manual_seed(seed))
    return table.to(HALF_DTYPES[fmt]) if fmt in HALF_DTYPES else quantize_rows(table, fmt)


def read_args(fmt, bags=5, m=4, weighted=True, seed=0, num_slots=24, dim=8):
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, num_slots, (bags, m), generator=gen)
    w = torch.rand(bags, m, generator=gen) if weighted else None
    return store_of(fmt, num_slots, dim, seed), idx, w


def test_stored_rows_have_the_format_width():
    for fmt in FORMATS:
        store = store_of(fmt)
        width = store.shape[1] * (2 if fmt in HALF_DTYPES else 1)  # bytes of one row
        assert width == row_bytes(fmt, 8), fmt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_torch_impl_equals_reference(fmt, weighted, out_dtype):
    store, idx, w = read_args(fmt, weighted=weighted)
    want = reference.read(store, fmt, 8, idx, w, out_dtype)
    got = torch_impl.read(store, fmt, 8, idx, w, out_dtype)
    assert got.dtype == want.dtype == out_dtype and got.shape == (5, 8)
    tol = TOL["bfloat16"] if out_dtype == torch.bfloat16 else TOL[fmt]
    assert_close(got, want, **tol, msg=f"{fmt}: torch_impl.read")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_reference_rows_are_the_dequantized_table(fmt):
    store, idx, _ = read_args(fmt)
    rows = reference.rows(store, fmt, 8, idx, torch.float32)  # (bags, m, dim)
    assert torch.equal(rows, reference.dequantize_rows(store, fmt, 8)[idx])
    assert_close(reference.read(store, fmt, 8, idx, None, torch.float32), rows.sum(-2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_float64_weights(fmt):
    store, idx, w = read_args(fmt)
    w = w.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: entry.quantized_read(store, fmt, 8, idx, t, torch.float32), (w,))


@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_op_equals_autograd_of_reference(fmt):
    store, idx, w = read_args(fmt)
    up = torch.randn(5, 8)
    wt = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.read(store, fmt, 8, idx, wt, torch.float32), wt, up)
    got = torch.ops.pkm.quantized_read_backward(up, store, idx, fmt, 8, torch.float32)
    assert_close(got, want, **TOL["int8"])
    got_bf16 = torch.ops.pkm.quantized_read_backward(up, store, idx, fmt, 8, torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16
    assert_close(got_bf16, want.bfloat16(), **TOL["bfloat16"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("weighted", [True, False])
def test_opcheck_quantized_read(fmt, weighted):
    store, idx, w = read_args(fmt, weighted=weighted)
    if w is not None:
        w.requires_grad_()
    opcheck(torch.ops.pkm.quantized_read, (store, idx, w, fmt, 8, torch.float32))
    opcheck(torch.ops.pkm.quantized_read, (store, idx, w, fmt, 8, torch.bfloat16))
    opcheck(torch.ops.pkm.quantized_read_backward, (torch.randn(5, 8), store, idx, fmt, 8, torch.float32))


# -- the entry: every mode -----------------------------------------------------------------------------


def _entry_modes(store, fmt, idx, w, up):
    """``mode -> (output, weights gradient or None)``."""
    out = {"no_grad": (entry.quantized_read(store, fmt, 8, idx, w, torch.float32), None)}
    wt = w.clone().requires_grad_()
    o = entry.quantized_read(store, fmt, 8, idx, wt, torch.float32)
    out["grad"] = (o.detach(), torch.autograd.grad(o, wt, up)[0])
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_entry_equals_reference_in_every_mode(backend, fmt):
    store, idx, w = read_args(fmt)
    up = torch.randn(5, 8)
    wt = w.clone().requires_grad_()
    want = reference.read(store, fmt, 8, idx, wt, torch.float32)
    want_grad = torch.autograd.grad(want, wt, up)[0]
    tol = TOL["int8"] if backend == "reference" else TOL[fmt]
    with use_backend(backend):
        for mode, (out, grad) in _entry_modes(store, fmt, idx, w, up).items():
            assert out.dtype == torch.float32
            assert_close(out, want.detach(), **tol, msg=f"{backend}, {mode}: output")
            if grad is not None:
                assert_close(grad, want_grad, **TOL["int8"], msg=f"{backend}, {mode}: weights gradient")


def test_reference_backend_runs_reference_py(monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("torch_impl ran")

    monkeypatch.setattr(torch_impl, "read", broken)
    store, idx, w = read_args("int8")
    up = torch.randn(5, 8)
    with use_backend("reference"):
        for mode, (out, _) in _entry_modes(store, "int8", idx, w, up).items():
            assert_close(out, reference.read(store, "int8", 8, idx, w, torch.float32), msg=mode)
    with pytest.raises(AssertionError, match="torch_impl ran"):  # the patch is in the path
        entry.quantized_read(store, "int8", 8, idx, w, torch.float32)


def test_no_grad_shortcut_skips_the_dispatcher():
    store, idx, w = read_args("int8")
    _, names = dispatched_pkm_ops(entry.quantized_read, store, "int8", 8, idx, w, torch.float32)
    assert names == [], names
    with torch.no_grad():
        _, names = dispatched_pkm_ops(entry.quantized_read, store, "int8", 8, idx, w.requires_grad_(), torch.float32)
    assert names == [], names
    _, names = dispatched_pkm_ops(entry.quantized_read, store, "int8", 8, idx, w, torch.float32)
    assert names == ["pkm.quantized_read.default"], names


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_compiled_entry_keeps_the_custom_op(fmt):
    store, idx, w = read_args(fmt)
    capture = GraphCapture()
    compiled = torch.compile(lambda s, i, t: entry.quantized_read(s, fmt, 8, i, t, torch.float32),
                             backend=capture, fullgraph=True)
    wt = w.clone().requires_grad_()
    out = compiled(store, idx, wt)
    up = torch.randn(5, 8)
    (grad,) = torch.autograd.grad(out, wt, up)
    want = reference.read(store, fmt, 8, idx, wt, torch.float32)
    assert_close(out, want, **TOL[fmt])
    assert_close(grad, torch.autograd.grad(want, wt, up)[0], **TOL["int8"])
    assert pkm_targets(capture.graphs[0]) == {"pkm.quantized_read.default"}


class _Read(torch.nn.Module):
    def __init__(self, store, fmt):
        super().__init__()
        self.register_buffer("store", store)
        self.fmt = fmt

    def forward(self, idx, w):
        return entry.quantized_read(self.store, self.fmt, 8, idx, w, torch.float32)


@pytest.mark.parametrize("fmt", ["int8", "int4", "float16"])
def test_exported_read_holds_no_custom_op(fmt):
    store, idx, w = read_args(fmt)
    ep = torch.export.export(_Read(store, fmt), (idx, w))
    assert pkm_targets(ep.graph_module) == set()
    assert_close(ep.module()(idx, w), reference.read(store, fmt, 8, idx, w, torch.float32))


def test_empty_reads():
    for fmt in FORMATS:
        store, idx, w = read_args(fmt, bags=0)
        for weights in (w, None):
            out = entry.quantized_read(store, fmt, 8, idx, weights, torch.float32)
            assert out.shape == (0, 8), fmt


def rows_over_ranges(dim=16):
    """Rows of every range from 1e-10 to 1e6, at offsets 0, 1, -range / 2 and 300; each row holds
    its min and max exactly (its first two elements)."""
    gen = torch.Generator().manual_seed(3)
    ranges = torch.logspace(-10, 6, 33, dtype=torch.float64)
    out = []
    for r in ranges:
        for lo in (0.0, 1.0, -float(r) / 2, 300.0):
            u = torch.rand(4, dim, generator=gen, dtype=torch.float64)
            u[:, 0], u[:, 1] = 0.0, 1.0
            out.append(lo + float(r) * u)
    return torch.cat(out).float()  # the bounds below use the float32 rows' own min and max


def format_bound(rows: torch.Tensor, fmt: str) -> torch.Tensor:
    """The bound stated in QuantizedValues' docstring, per element ``(n, dim)``."""
    lo, hi = (t.double() for t in rows.aminmax(dim=-1, keepdim=True))
    rounding = 2.0**-21 * (hi - lo) + 2.0**-23 * torch.maximum(lo.abs(), hi.abs())  # float32 arithmetic
    if fmt == "int8":
        return ((hi - lo) / 510 + rounding).expand_as(rows)
    lo16 = lo.half().double()
    s_exact = (hi - lo16) / 15
    s = s_exact.half().double()
    step = torch.maximum(2.0**-11 * s_exact.abs(), torch.full_like(s, 2.0**-25))  # fp16 rounding of the scale
    return (s.abs() / 2 + (lo - lo16).abs() + 15 * step + rounding).expand_as(rows)


def int4_holds(rows: torch.Tensor) -> torch.Tensor:
    lo, hi = (t.double() for t in rows.aminmax(dim=-1))
    return (lo.abs() < 65520) & ((hi - lo.half().double()).abs() / 15 < 65520)  # fp16 offset and scale


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_stored_rows_within_the_stated_bound_for_every_range(fmt):
    rows = rows_over_ranges()
    if fmt == "int4":
        rows = rows[int4_holds(rows)]
    store = quantize_rows(rows, fmt)
    bound = format_bound(rows, fmt)
    ref = reference.dequantize_rows(store, fmt, rows.shape[1], torch.float64)
    # the CPU read: fbgemm's kernels on the same bytes
    idx = torch.arange(rows.shape[0]).unsqueeze(1)
    fbgemm = torch_impl.read(store, fmt, rows.shape[1], idx, torch.ones(idx.shape), torch.float32).double()
    for name, got in (("reference", ref), ("fbgemm", fbgemm)):
        err = (got - rows.double()).abs()
        worst = (err / bound).amax(-1).argmax()
        assert (err <= bound).all(), (
            f"{fmt} {name}: row {rows[worst].aminmax()} error {err[worst].max():.3g} > bound {bound[worst, 0]:.3g}"
        )


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused(fmt, bad):
    rows = torch.randn(4, 8)
    rows[2, 3] = bad
    with pytest.raises(ValueError, match=rf"{fmt}.*row 2"):
        quantize_rows(rows, fmt)


@pytest.mark.parametrize("row", [[7e4] * 8, [-7e4 + i for i in range(8)], [0.0] * 7 + [1e6]],
                         ids=["min_above", "min_below", "scale_above"])
def test_int4_refuses_rows_beyond_float16_never_nan(row):
    rows = torch.zeros(3, 8)
    rows[1] = torch.tensor(row)
    with pytest.raises(ValueError, match=r"int4 .*65504; row 1 "):
        quantize_rows(rows, "int4")
    held = torch.tensor([[6e4] * 8, [-6e4] * 7 + [0.0], [0.0] * 7 + [9e5]])  # within float16's offset and scale
    assert int4_holds(held).all()
    assert torch.isfinite(reference.dequantize_rows(quantize_rows(held, "int4"), "int4", 8)).all()


def test_int8_refuses_a_range_beyond_float32():
    rows = torch.zeros(2, 4)
    rows[0, 0], rows[0, 1] = 3e38, -3e38
    with pytest.raises(ValueError, match=r"int8.*row 0"):
        quantize_rows(rows, "int8")
