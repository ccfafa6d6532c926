"""Careless and hostile use: meta-device construction, ties, odd index and input types, clear errors,
and the fast path held to the reference path over random configurations."""

import pytest
import torch

from product_key_memory import PKM, functional as PF, ops
from product_key_memory.functional import reference_path

from .._extras import HealthCheck, given, settings, st

SIZES = dict(heads=2, num_keys=8, topk=4, dim_head=8)


def test_meta_construction_then_to_empty_and_load_equals_the_original():
    torch.manual_seed(0)
    ref = PKM(16, **SIZES, concat_values_and_combine=True, query_norm="batchnorm").eval()
    x = torch.randn(3, 16)
    for assign in (False, True):
        with torch.device("meta"):
            p = PKM(16, **SIZES, concat_values_and_combine=True, query_norm="batchnorm")
        if not assign:
            p.to_empty(device="cpu")
        p.load_state_dict(ref.state_dict(), assign=assign)
        assert not any(t.is_meta for t in list(p.parameters()) + list(p.buffers()))
        torch.testing.assert_close(p.eval()(x), ref(x), rtol=0, atol=0)


def test_meta_construction_then_reset_parameters_gives_a_working_layer():
    with torch.device("meta"):
        p = PKM(16, **SIZES, query_norm="batchnorm", query_hidden=(12,), query_hidden_batchnorm=True)
    p.to_empty(device="cpu")
    for m in p.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    out = p(torch.randn(5, 16))
    assert torch.isfinite(out).all()
    assert torch.equal(p.norm.fn.running_var, torch.ones(8)) or p.training


def test_ties_go_to_the_lower_slot_on_every_path():
    # an all-zero token under the default LayerNorm: every query is zero, every slot scores 0
    torch.manual_seed(0)
    pkm = PKM(16, **SIZES)
    x = torch.cat([torch.zeros(2, 16), torch.randn(3, 16)])
    _, slots = pkm.search(pkm.queries(x))
    assert torch.equal(slots[:2], torch.arange(4).expand(2, 2, 4))  # slots 0..topk-1, in order
    eager = pkm(x)
    with reference_path():
        ref = pkm(x)
    compiled = torch.compile(pkm, backend="aot_eager", fullgraph=True)(x)
    exported = torch.export.export(pkm.eval(), (x,)).module()(x)
    torch.testing.assert_close(eager, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(exported, pkm(x), rtol=0, atol=1e-6, msg="exported program")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_lower_index_is_a_stable_sort(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (50, 40), generator=g).to(dtype) * 0.5
    x[0] = 0.0
    x[1, ::2] = -0.0  # -0.0 ties with 0.0
    index = torch.randperm(40, generator=g).expand(50, 40)
    for idx in (None, index):
        got_v, got_i = ops.topk_lower_index(x, 7, idx)
        want_v, want_i = ops.topk.reference.topk_lower_index(x, 7, idx)
        assert torch.equal(got_i, want_i) and torch.equal(got_v, want_v)


def test_search_with_ties_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (30, 2, 2, 4), generator=g).float()
    q[:5] = 0
    keys = torch.randint(-1, 2, (2, 2, 16, 4), generator=g).float()
    want = PF.brute_force_search(q, keys, 6)
    for backend in ("torch", "reference"):
        with ops.use_backend(backend):
            got = PF.product_key_search(q, keys, 6)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), backend


def test_int32_indices_read_and_differentiate_like_int64():
    values = torch.randn(20, 6, requires_grad=True)
    w = torch.rand(7, 3, requires_grad=True)
    idx = torch.randint(0, 20, (7, 3))
    grads = []
    for index in (idx, idx.int()):
        out = PF.value_read(values, index, w)
        grads.append(torch.autograd.grad(out.square().sum(), (values, w)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="indices must be an int64 or int32 tensor, got torch.float32"):
        PF.value_read(values, idx.float(), w)


def test_input_dtype_or_device_that_is_not_the_layers_is_a_clear_error():
    pkm = PKM(16, **SIZES)
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but the layer's parameters are torch.float32"):
        pkm(torch.randn(3, 16, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's rule instead
        assert pkm(torch.randn(3, 16, dtype=torch.bfloat16)).shape == (3, 16)
    with pytest.raises(ValueError, match="x is on meta but the layer is on cpu"):
        pkm(torch.randn(3, 16, device="meta"))
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="input_mask is on meta but must be on cpu"):
        pkm(x, input_mask=torch.ones(3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="mem_trainable_mask is on meta but must be on cpu"):
        pkm(x, mem_trainable_mask=torch.ones(64, dtype=torch.bool, device="meta"))


def test_a_state_dict_with_both_concat_projection_names_is_refused():
    pkm = PKM(16, **SIZES, concat_values_and_combine=True)
    sd = pkm.state_dict()
    sd["maybe_concat_combine.2.weight"] = sd["output.combine.weight"].clone()
    with pytest.raises(ValueError, match="holds both 'maybe_concat_combine.2.weight'.*and 'output.combine.weight'"):
        pkm.load_state_dict(sd)
    legacy = pkm.state_dict()
    legacy["maybe_concat_combine.2.weight"] = legacy.pop("output.combine.weight")
    pkm.load_state_dict(legacy, strict=True)  # 0.3.0's name alone still loads


SCORING_OPTIONS = {
    "plain": {}, "qk_norm": dict(qk_norm=True), "temperature": dict(temperature=0.3),
    "subtract_min": dict(score_subtract="min"), "subtract_mean": dict(score_subtract="mean", score_normalize=True),
    "normalize": dict(score_normalize=True),
}
AROUND_OPTIONS = {
    "none": {}, "pre_layernorm": dict(pre_layernorm=True), "norm_output": dict(norm_output=True),
    "query_hidden": dict(query_hidden=(10,), query_hidden_batchnorm=True),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    heads=st.integers(1, 3),
    num_keys=st.sampled_from([4, 8, 16]),
    topk_frac=st.floats(0.1, 1.0),
    dim_head=st.sampled_from([2, 4, 8]),
    concat=st.booleans(),
    activation=st.sampled_from(["softmax", "relu"]),
    query_norm=st.sampled_from(["layernorm", "batchnorm", "channel_batchnorm", "none"]),
    scoring=st.sampled_from(["plain", "qk_norm", "temperature", "subtract_min", "subtract_mean", "normalize"]),
    around=st.sampled_from(["none", "pre_layernorm", "norm_output", "query_hidden"]),
    sparse=st.booleans(),
    zero_tokens=st.integers(0, 3),
    pad=st.booleans(),
    trainable=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_path_equals_reference_path(
    heads, num_keys, topk_frac, dim_head, concat, activation, query_norm, scoring, around, sparse, zero_tokens, pad,
    trainable, seed
):
    """Outputs and every gradient, with ties (all-zero tokens) and padding, over random configurations.

    In float64: in float32 the paths' different matmul orders round differently, and a LayerNorm over
    dim_head=2 amplifies that past any fixed tolerance; float64 leaves exact ties (zero tokens) tied and
    makes every other difference a bug.
    """
    torch.manual_seed(seed)
    topk = max(1, int(num_keys * topk_frac))
    pkm = PKM(
        12, heads=heads, num_keys=num_keys, topk=topk, dim_head=dim_head, concat_values_and_combine=concat,
        non_competitive_gates=activation == "relu", query_norm=query_norm, sparse_values=sparse,
        **SCORING_OPTIONS[scoring], **AROUND_OPTIONS[around],
    ).double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    x[0, :zero_tokens] = 0.0
    mask = (torch.rand(2, 6) > 0.3) if pad else None
    keep = (torch.rand(num_keys**2) > 0.5) if trainable else None
    results = []
    for force_reference in (False, True):
        pkm.zero_grad()
        with reference_path(force_reference):
            out = pkm(x, input_mask=mask, mem_trainable_mask=keep)
        out.square().sum().backward()
        grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in pkm.named_parameters()}
        results.append((out.detach(), grads))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        # a gradient that is zero in exact arithmetic (a LayerNorm over dim_head=2 gives unit half-queries
        # whatever the projection) is rounding noise of the upstream gradients on both paths: compare
        # against at least unit scale
        scale = max(ref_grads[name].abs().max().item(), 1.0)
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9 * scale,
                                   msg=f"gradient of {name}")
