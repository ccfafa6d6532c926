"""PKM and TransformerLM under torch.compile, torch.export and ONNX export (run in onnxruntime)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.export import Dim
from torch.testing import assert_close

from product_key_memory import PKM, TransformerLM

from .._extras import importorskip

SMALL = dict(heads=2, num_keys=8, topk=4, dim_head=16)
VARIANTS = {
    "default": SMALL,
    "batchnorm-concat": dict(SMALL, use_layernorm=False, concat_values_and_combine=True, pre_layernorm=True),
}


def make_pkm(name="default"):
    torch.manual_seed(0)
    return PKM(32, **VARIANTS[name])


def make_lm():
    torch.manual_seed(0)
    return TransformerLM(64, dim=32, depth=2, seq_len=16, heads=2, dim_head=16, pkm_layers=2, pkm_kwargs=SMALL)


# fullgraph=True raises on any graph break; error_on_recompile raises on a recompile; one graph is traced in all.
@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_compile_one_graph_no_recompile_across_shapes():
    pkm = make_pkm().eval()
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True, dynamic=True)  # fullgraph: a break raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in [(2, 5), (3, 7), (6, 4)]:
            x = torch.randn(*shape, 32)
            assert_close(compiled(x), pkm(x), msg=f"compiled output for input {shape}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_training_step_matches_eager_with_mask():
    pkm = make_pkm().train()
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (3, 5):
            x = torch.randn(batch, 6, 32)
            mask = torch.rand(batch, 6) > 0.3
            g = torch.randn(batch, 6, 32)
            pkm.zero_grad()
            (pkm(x, input_mask=mask) * g).sum().backward()
            expected = grads(pkm)
            pkm.zero_grad()
            (compiled(x, input_mask=mask) * g).sum().backward()
            got = grads(pkm)
            assert got.keys() == expected.keys()
            for name in expected:
                assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_inductor_forward_matches_eager():
    pkm = make_pkm().eval()
    compiled = torch.compile(pkm, fullgraph=True)
    x = torch.randn(4, 8, 32)
    assert_close(compiled(x), pkm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_export_with_dynamic_batch_and_sequence(variant):
    pkm = make_pkm(variant).eval()
    example = torch.randn(2, 5, 32)
    program = torch.export.export(pkm, (example,), dynamic_shapes={"x": {0: Dim("batch"), 1: Dim("seq")}})
    for shape in [(2, 5), (7, 3)]:
        x = torch.randn(*shape, 32)
        x[0, :2] = 0.0  # tied scores: the lower slot wins here too
        assert_close(program.module()(x), pkm(x), msg=f"exported program on {shape}")


def run_onnx(model, example, inputs, dynamic_shapes, tmp_path):
    importorskip("onnx")
    importorskip("onnxscript")
    ort = importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [torch.from_numpy(session.run(None, {name: x.numpy()})[0]) for x in inputs]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_export_runs_in_onnxruntime(variant, tmp_path):
    pkm = make_pkm(variant).eval()
    inputs = [torch.randn(2, 5, 32), torch.randn(3, 9, 32)]
    inputs[1][0, :3] = 0.0  # tied scores: the lower slot wins in onnxruntime too
    outs = run_onnx(pkm, inputs[0], inputs, {"x": {0: Dim("batch"), 1: Dim("seq")}}, tmp_path)
    for x, out in zip(inputs, outs):
        assert_close(out, pkm(x).detach(), atol=1e-5, rtol=1e-4, msg=f"onnxruntime output for {tuple(x.shape)}")


def test_transformer_lm_onnx_export_runs_in_onnxruntime(tmp_path):
    model = make_lm().eval()
    inputs = [torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (3, 16))]
    outs = run_onnx(model, inputs[0], inputs, {"tokens": {0: Dim("batch"), 1: Dim("seq", max=16)}}, tmp_path)
    for x, out in zip(inputs, outs):
        assert_close(out, model(x).detach(), atol=1e-4, rtol=1e-4, msg=f"onnxruntime logits for {tuple(x.shape)}")


COMPILE_OPTIONS = {
    "differentiable_topk": dict(differentiable_topk=True),
    "batchnorm_concat_hidden": dict(use_layernorm=False, concat_values_and_combine=True, query_hidden=(24,),
                                    query_hidden_batchnorm=True, pre_layernorm=True, norm_output=True),
    "channel_batchnorm_qk_norm_relu": dict(query_norm="channel_batchnorm", qk_norm=True, non_competitive_gates=True),
    "no_norm_scoring_value_dim": dict(query_norm="none", temperature=0.5, score_subtract="mean", value_dim=24),
}


@pytest.mark.parametrize("name", list(COMPILE_OPTIONS))
def test_compiled_training_step_with_options_matches_eager(name):
    torch.manual_seed(0)
    pkm = PKM(32, **SMALL, **COMPILE_OPTIONS[name]).train()
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    x = torch.randn(3, 6, 32)
    mask = torch.rand(3, 6) > 0.3
    g = torch.randn(3, 6, 32)
    outs = []
    for fn in (pkm, compiled):
        pkm.zero_grad()
        torch.manual_seed(1)  # the same batch statistics and noise on both
        out = fn(x, input_mask=mask)
        (out * g).sum().backward()
        outs.append((out.detach(), grads(pkm)))
    (want, want_grads), (got, got_grads) = outs
    assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-4, msg=f"gradient of {n}")


def test_compiled_training_with_gumbel_noise():
    # the noise is drawn inside the graph: compare the compiled step with eager under the same seed
    torch.manual_seed(0)
    pkm = PKM(32, **SMALL).train()
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 32)
    results = []
    for fn in (pkm, compiled):
        pkm.zero_grad()
        torch.manual_seed(3)
        out = fn(x, gumbel_noise_scale=0.5)
        out.square().sum().backward()
        results.append((out.detach(), grads(pkm)))
    torch.manual_seed(3)
    with torch.no_grad():
        quiet = pkm(x)
    assert not torch.allclose(results[0][0], quiet)  # the noise changed what was read
    assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for n in results[0][1]:
        assert_close(results[1][1][n], results[0][1][n], atol=1e-5, rtol=1e-4, msg=f"gradient of {n}")


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.int8, "int4"])
def test_compiled_quantized_layer_finetunes_keys_like_eager(fmt):
    from product_key_memory import quantize_values_

    torch.manual_seed(0)
    pkm = quantize_values_(PKM(32, **SMALL), fmt).train()
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 32)
    mask = torch.rand(2, 5) > 0.2
    results = []
    for fn in (pkm, compiled):
        pkm.zero_grad()
        out = fn(x, input_mask=mask)
        out.square().sum().backward()
        results.append((out.detach(), grads(pkm)))
    assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    assert "product_keys.keys" in results[0][1]
    for n in results[0][1]:
        assert_close(results[1][1][n], results[0][1][n], atol=1e-5, rtol=1e-4, msg=f"gradient of {n}")
