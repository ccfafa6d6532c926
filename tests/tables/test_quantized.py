"""QuantizedValues and quantize_values_: formats, reads against the reference, gradients, state dicts.

PKM reads through its ``ValueTable``, so the layer tests run ``quantize_values_(pkm, fmt)``
then ``pkm(x)``; a few compose the stages by hand (``queries -> search -> table read``) to
pass a table that is not the layer's own.
"""

import io

import pytest
import torch
from torch import nn

from product_key_memory import PKM, EmbeddingValues, QuantizedValues, ValueTable, quantize_values_, use_backend
from product_key_memory.functional import value_read_reference
from product_key_memory.tables.quantized import QUANTIZED_FORMATS, dequantize_rows, quantize_rows

FORMATS = (torch.bfloat16, torch.float16, torch.int8, "int4")
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # half an ulp, relative


def element_bound(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Largest error per element the format allows, ``(num_slots, dim)``; derived from the format."""
    w = weight.float()
    if fmt in UNIT_ROUNDOFF:
        return UNIT_ROUNDOFF[fmt] * w.abs() + 2.0**-25  # float16 subnormals: absolute half-ulp
    lo, hi = w.aminmax(dim=-1, keepdim=True)
    if fmt == "int8":
        return ((hi - lo) / 255 / 2 + 1e-6 * (hi.abs() + lo.abs())).expand_as(w)
    lo16 = lo.half().float()
    scale = ((hi - lo16) / 15).half().float()
    # half a step, the top code's saturation after rounding the scale, and the offset's rounding
    return (scale / 2 + 15 * scale * 2.0**-11 + (lo - lo16).abs() + 1e-6).expand_as(w)


def fmt_name(fmt) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.int8: "int8"}.get(fmt, fmt)


def forward_with_table(pkm: PKM, x: torch.Tensor, table: ValueTable) -> torch.Tensor:
    """PKM's forward (no mask, no concat) with its value read done by ``table``, a table not the layer's own."""
    flat = x.reshape(-1, pkm.dim)
    weights, indices = pkm.search(pkm.queries(flat))  # (N, H, topk)
    out = table(indices.flatten(-2), weights.flatten(-2))
    return out.view_as(x)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_name)
def test_stored_rows_within_format_bound(fmt):
    weight = torch.randn(300, 64) * torch.rand(300, 1) * 3
    q = QuantizedValues.from_float(weight, fmt)
    err = (q.dequantized() - weight).abs()
    bound = element_bound(weight, fmt_name(fmt))
    assert (err <= bound).all(), f"{fmt}: worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("fmt, prepack", [("int8", "embedding_bag_byte_prepack"), ("int4", "embedding_bag_4bit_prepack")])
def test_packing_matches_fbgemm_prepack(fmt, prepack):
    weight = torch.randn(500, 32) * torch.rand(500, 1)
    weight[0] = 0.25  # a constant row
    ours = quantize_rows(weight, fmt)
    theirs = getattr(torch.ops.quantized, prepack)(weight)
    assert ours.shape == theirs.shape
    dim = weight.shape[1]
    ncodes = dim if fmt == "int8" else dim // 2
    assert torch.equal(ours[:, ncodes:], theirs[:, ncodes:]), "scale and offset bytes differ"
    a, b = dequantize_rows(ours, fmt, dim), dequantize_rows(theirs, fmt, dim)
    scale = ours[:, ncodes:].clone()
    step = (scale[:, :4].contiguous().view(torch.float32) if fmt == "int8" else scale[:, :2].contiguous().view(torch.float16)).float()
    assert ((a - b).abs() <= step * 1.0001).all(), "codes differ by more than one step"
    assert (a != b).float().mean() < 1e-3, "codes differ beyond rounding ties"


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_name)
@pytest.mark.parametrize("lead", [(6,), (3, 4)], ids=["bags", "per-head"])
def test_read_matches_reference_on_dequantized_table(fmt, lead):
    table = QuantizedValues.from_float(torch.randn(1000, 64) / 8, fmt)
    deq = table.dequantized()
    idx = torch.randint(0, 1000, (*lead, 9))
    w = torch.rand(*lead, 9)
    for i, wt in ((idx, w), (idx.int(), w), (idx, None)):
        out = table(i, wt)
        ref = value_read_reference(deq, i.long(), wt)
        assert out.shape == (*lead, 64) and out.dtype == torch.float32
        name = fmt_name(fmt)
        if name in UNIT_ROUNDOFF:
            # half read: weights and output rounded to the half dtype, sums in float32
            ww = torch.ones_like(w) if wt is None else wt
            scale = (ww.abs().unsqueeze(-1) * deq[i.long()].abs()).sum(-2)
            assert ((out - ref).abs() <= 2.02 * UNIT_ROUNDOFF[name] * scale + 1e-6).all(), f"{name} read"
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} fast read: {m}")
        with use_backend("reference"):  # the read of ops/quantized_read/reference.py
            plain = table(i, wt)
        torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} plain read: {m}")


@pytest.mark.parametrize("fmt", ["int8", "int4", "bfloat16"])
def test_weight_gradient_matches_reference(fmt):
    table = QuantizedValues.from_float(torch.randn(200, 32) / 4, fmt)
    idx = torch.randint(0, 200, (3, 5, 7))
    w = torch.rand(3, 5, 7, requires_grad=True)
    g_out = torch.randn(3, 5, 32)
    (grad,) = torch.autograd.grad(table(idx, w), w, g_out)
    w_ref = w.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(value_read_reference(table.dequantized(), idx, w_ref), w_ref, g_out)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{fmt} weight grad: {m}")


@pytest.mark.parametrize("fmt", ["int8", "int4", "float16"])
def test_gradcheck_float64(fmt):
    table = QuantizedValues.from_float(torch.randn(50, 8), fmt)
    idx = torch.randint(0, 50, (4, 5))
    w = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: table(idx, w), (w,))


def test_read_only_table():
    table = QuantizedValues.from_float(torch.randn(100, 16), torch.int8)
    assert list(table.parameters()) == [] and list(table.value_parameters()) == []
    with pytest.raises(ValueError, match="sparse"):
        table.sparse = True
    idx, w = torch.randint(0, 100, (4, 3)), torch.rand(4, 3)
    trainable = torch.zeros(100, dtype=torch.bool)
    torch.testing.assert_close(table(idx, w, trainable=trainable), table(idx, w))
    with torch.no_grad():
        assert not table(idx, w.requires_grad_()).requires_grad


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_name)
def test_frozen_table_finetunes_keys_and_queries(fmt):
    pkm = PKM(dim=32, heads=2, num_keys=16, topk=4, dim_head=16)
    table = quantize_values_(EmbeddingValues(256, 32), fmt)
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    opt = torch.optim.Adam([p for n, p in pkm.named_parameters() if not n.startswith("values")], lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (forward_with_table(pkm, x, table) - y).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert pkm.keys.grad.abs().sum() > 0 and pkm.to_queries.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0], losses


def test_quantize_values_replaces_shared_tables_once():
    shared = EmbeddingValues(64, 16)
    model = nn.ModuleDict(dict(a=nn.ModuleDict(dict(table=shared)), b=nn.ModuleDict(dict(table=shared)),
                               c=EmbeddingValues(64, 16)))
    assert quantize_values_(model, "int8") is model
    assert isinstance(model["a"]["table"], QuantizedValues) and model["a"]["table"] is model["b"]["table"]
    assert isinstance(model["c"], QuantizedValues) and model["c"] is not model["a"]["table"]
    assert sum(isinstance(m, QuantizedValues) for m in model.modules()) == 2
    with pytest.raises(TypeError, match="already quantized"):
        quantize_values_(model, "int4")


@pytest.mark.parametrize("bad", [torch.float32, torch.uint8, "int2", 8, None])
def test_quantize_values_rejects_other_dtypes(bad):
    with pytest.raises(ValueError, match=r"dtype must be one of .*got"):
        quantize_values_(nn.ModuleDict(dict(v=EmbeddingValues(4, 4))), bad)


def test_quantize_values_names_tables_it_cannot_convert():
    class TwoMatrices(ValueTable):
        def __init__(self):
            super().__init__(4, 4)
            self.a, self.b = nn.Parameter(torch.randn(4, 2)), nn.Parameter(torch.randn(2, 4))

    class Hooked(TwoMatrices):
        def quantized(self, fmt):
            return QuantizedValues.from_float((self.a @ self.b).detach(), fmt)

    model = nn.Sequential(nn.ModuleDict(dict(table=TwoMatrices())))
    with pytest.raises(TypeError, match=r"'0\.table'.*TwoMatrices"):
        quantize_values_(model, torch.int8)
    model = nn.Sequential(nn.ModuleDict(dict(table=Hooked())))
    quantize_values_(model, torch.int8)
    assert isinstance(model[0]["table"], QuantizedValues)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_name)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_quantized_layer_within_format_bound(fmt, grad):
    pkm = PKM(dim=32, heads=2, num_keys=16, topk=4, dim_head=8).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        ref = pkm(x)
        weights, indices = pkm.search(pkm.queries(x.reshape(-1, 32)))
        weights, indices = weights.flatten(-2), indices.flatten(-2)  # (N, heads * topk)
        rows = pkm.values.weight[indices]  # (N, m, dim)
    name = fmt_name(fmt)
    # each read row is off by at most the format's element bound; a half-format read also rounds
    # the weights and the sum to the half dtype
    bound = (weights.abs().unsqueeze(-1) * element_bound(pkm.values.weight, name)[indices]).sum(-2)
    if name in UNIT_ROUNDOFF:
        bound = bound + 3 * UNIT_ROUNDOFF[name] * (weights.abs().unsqueeze(-1) * rows.abs()).sum(-2)
    quantize_values_(pkm, fmt)
    assert isinstance(pkm.values, QuantizedValues)
    with torch.set_grad_enabled(grad):
        out = pkm(x)
    err = (out.detach() - ref).abs().reshape(-1, 32)
    assert (err <= bound + 1e-6).all(), f"{name}: max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_name)
def test_pkm_state_dict_round_trip(fmt):
    saved = quantize_values_(PKM(dim=32, heads=2, num_keys=16, topk=4, dim_head=8), fmt).eval()
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    fresh = quantize_values_(PKM(dim=32, heads=2, num_keys=16, topk=4, dim_head=8), fmt).eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))
    assert set(fresh.state_dict()) == set(saved.state_dict())


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_name)
def test_state_dict_round_trip_into_fresh_model(fmt):
    def build():
        return nn.ModuleDict(dict(table=EmbeddingValues(128, 16)))

    saved = quantize_values_(build(), fmt)
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    fresh = quantize_values_(build(), fmt)  # the documented way: quantize first, then load
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    idx, w = torch.randint(0, 128, (5, 4)), torch.rand(5, 4)
    assert torch.equal(fresh["table"](idx, w), saved["table"](idx, w))


def test_format_names_and_bytes():
    assert QUANTIZED_FORMATS == ("bfloat16", "float16", "int8", "int4")
    sizes = {f: QuantizedValues.from_float(torch.randn(10, 64), f).nbytes() for f in QUANTIZED_FORMATS}
    assert sizes == dict(bfloat16=10 * 128, float16=10 * 128, int8=10 * 72, int4=10 * 36)
    with pytest.raises(ValueError, match="even"):
        QuantizedValues(10, 7, format="int4")


def test_quantize_values_without_tables_raises():
    with pytest.raises(ValueError, match="no ValueTable found in Sequential"):
        quantize_values_(nn.Sequential(nn.Linear(2, 2)), torch.int8)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_quantized_layer_compiles_in_one_graph_and_equals_eager(fmt):
    torch.manual_seed(0)
    pkm = quantize_values_(PKM(64, heads=2, num_keys=16, topk=4, dim_head=16).eval(), fmt)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), pkm(x), rtol=1e-5, atol=1e-6)


CASTS = {
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
    "double": (lambda m: m.double(), torch.float64),
    "to_bfloat16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "to_float64": (lambda m: m.to(dtype=torch.float64), torch.float64),
}


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_name)
@pytest.mark.parametrize("cast", list(CASTS))
def test_cast_after_quantizing_equals_cast_before(fmt, cast):
    # value_dim != dim: the output projection sees the read's dtype
    apply, dtype = CASTS[cast]
    torch.manual_seed(0)
    before = PKM(32, heads=2, num_keys=8, topk=4, dim_head=8, value_dim=24).eval()
    after = PKM(32, heads=2, num_keys=8, topk=4, dim_head=8, value_dim=24).eval()
    after.load_state_dict(before.state_dict())
    quantize_values_(apply(before), fmt)
    apply(quantize_values_(after, fmt))
    name = fmt_name(fmt)
    for m in (before, after):
        assert m.values.format == name and m.values.out_dtype == dtype
    assert after.values._store.dtype == before.values._store.dtype  # the codes as quantized, not cast
    x = torch.randn(2, 3, 32, dtype=dtype)
    with torch.no_grad():
        out_before, out_after = before(x), after(x)
    assert out_after.dtype == out_before.dtype == dtype
    if (name, dtype) in {("bfloat16", torch.bfloat16), ("bfloat16", torch.float64), ("float16", torch.float16),
                         ("float16", torch.float64)}:
        # the same stored rows where casting first rounds nothing the format keeps
        torch.testing.assert_close(out_after, out_before)


def test_cast_keeps_half_store_and_moves_it_with_the_module():
    q = QuantizedValues.from_float(torch.randn(16, 8), torch.bfloat16)
    stored = q.weight.clone()
    q.half().double().float()
    assert q.weight.dtype == torch.bfloat16 and torch.equal(q.weight, stored)
    assert q.format == "bfloat16" and q.out_dtype == torch.float32
    q.to("meta")
    assert q.weight.device.type == "meta" and q.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", [torch.int8, "int4", torch.float16])
def test_quantized_transformer_lm_cast_to_bfloat16(fmt):
    from product_key_memory.models import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(num_tokens=32, dim=32, depth=2, seq_len=8, heads=2, dim_head=8,
                          pkm_kwargs=dict(heads=2, num_keys=8, topk=4, dim_head=8)).eval()
    quantize_values_(model, fmt).bfloat16()
    tokens = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("fmt, value", [("int4", 7e4), (torch.float16, -1e5), (torch.int8, float("nan"))], ids=str)
def test_quantize_values_refuses_what_the_format_cannot_hold_naming_table_and_value(fmt, value):
    model = nn.ModuleDict(dict(table=EmbeddingValues(16, 8)))
    with torch.no_grad():
        model["table"].weight[5] = value
    with pytest.raises(ValueError, match=rf"'table'.*row 5.*{value!r}"):
        quantize_values_(model, fmt)


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.float16, torch.int8, "int4"])
def test_quantize_on_the_meta_device_then_load(fmt, tmp_path):
    # a big table: built on the meta device and quantized there (no values to check or pack), then
    # loaded with assign=True; the float table never exists
    torch.manual_seed(0)
    model = quantize_values_(PKM(32, heads=2, num_keys=8, topk=4, dim_head=8).eval(), fmt)
    torch.save(model.state_dict(), tmp_path / "q.pt")
    with torch.device("meta"):
        served = quantize_values_(PKM(32, heads=2, num_keys=8, topk=4, dim_head=8), fmt)
    served.load_state_dict(torch.load(tmp_path / "q.pt"), assign=True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(served.eval()(x), model(x))
