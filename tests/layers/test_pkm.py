import itertools

import pytest
import torch

from product_key_memory import PKM, ProductKeyMemory

from ..reference import reference_pkm

SMALL = dict(dim=12, heads=2, num_keys=8, topk=3, dim_head=4)
FLAGS = ("pre_layernorm", "norm_output", "non_competitive_gates", "concat_values_and_combine")


def small_pkm(dtype=torch.float64, **kwargs):
    return PKM(**{**SMALL, **kwargs}, dtype=dtype)


def grads_of(module, loss):
    names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=len(FLAGS))))
def test_output_and_gradients_equal_the_paper_reference(flags):
    pkm = small_pkm(**dict(zip(FLAGS, flags))).eval()
    x = torch.randn(5, SMALL["dim"], dtype=torch.float64)
    out, ref = pkm(x), reference_pkm(pkm, x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    assert_same_grads(grads_of(pkm, (out * g).sum()), grads_of(pkm, (ref * g).sum()))


def test_batchnorm_queries_equal_reference_in_train_and_eval():
    pkm = small_pkm(use_layernorm=False)
    x = torch.randn(6, SMALL["dim"], dtype=torch.float64)
    out, ref = pkm(x), reference_pkm(pkm, x)
    torch.testing.assert_close(out, ref)
    assert_same_grads(grads_of(pkm, out.square().sum()), grads_of(pkm, ref.square().sum()))
    pkm.eval()
    torch.testing.assert_close(pkm(x), reference_pkm(pkm, x))


def test_batchnorm_normalises_query_features_and_tracks_their_statistics():
    pkm = small_pkm(use_layernorm=False, dtype=torch.float32)
    x = torch.randn(2, 9, SMALL["dim"]) * 3 + 1
    pkm(x)
    q = (x.reshape(-1, SMALL["dim"]) @ pkm.to_queries.weight.t()).view(-1, SMALL["dim_head"])
    bn = pkm.norm.fn
    torch.testing.assert_close(bn.running_mean, 0.1 * q.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * q.var(0, unbiased=True))
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("use_layernorm", [True, False])
@pytest.mark.parametrize("concat", [False, True])
def test_masked_tokens_are_exactly_absent(use_layernorm, concat):
    """With a mask, the real tokens get what a batch of only the real tokens gets;
    padded tokens output zero and give no gradient and no statistic."""
    pkm = small_pkm(use_layernorm=use_layernorm, concat_values_and_combine=concat)
    twin = small_pkm(use_layernorm=use_layernorm, concat_values_and_combine=concat)
    twin.load_state_dict(pkm.state_dict())
    x = torch.randn(3, 5, SMALL["dim"], dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) < 0.6
    mask[0, 0] = True
    with torch.no_grad():
        x[~mask] = float("nan")  # garbage in padded positions must not leak
    out = pkm(x, input_mask=mask)
    assert torch.all(out[~mask] == 0)
    x_real = x.detach()[mask].clone().requires_grad_()
    out_real = twin(x_real)
    torch.testing.assert_close(out[mask], out_real)
    g = torch.randn_like(out_real)
    loss = (out[mask] * g).sum() + out[~mask].sum()
    (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert torch.all(gx[~mask] == 0)
    assert_same_grads(grads_of(pkm, loss), grads_of(twin, (out_real * g).sum()))
    for a, b in zip(pkm.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("concat", [False, True])
def test_mem_trainable_mask_limits_value_gradients_only(concat):
    pkm = small_pkm(concat_values_and_combine=concat)
    x = torch.randn(7, SMALL["dim"], dtype=torch.float64)
    trainable = torch.rand(SMALL["num_keys"] ** 2) < 0.5
    out = pkm(x, mem_trainable_mask=trainable)
    torch.testing.assert_close(out, pkm(x))
    masked, full = grads_of(pkm, out.sum()), grads_of(pkm, pkm(x).sum())
    assert torch.all(masked["values.weight"][~trainable] == 0)
    torch.testing.assert_close(masked["values.weight"][trainable], full["values.weight"][trainable])
    for name in full:
        if name != "values.weight":
            torch.testing.assert_close(masked[name], full[name], msg=name)


def test_concat_mode_trains_keys_and_queries():
    pkm = small_pkm(concat_values_and_combine=True)
    grads = grads_of(pkm, pkm(torch.randn(4, SMALL["dim"], dtype=torch.float64)).square().sum())
    for name in ("product_keys.keys", "query.to_queries.weight", "values.weight", "output.combine.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("lead", [(), (0,), (1,), (3, 4), (2, 0, 3), (2, 1, 2, 3)])
def test_any_leading_shape(lead):
    pkm = small_pkm().eval()
    x = torch.randn(*lead, SMALL["dim"], dtype=torch.float64)
    out = pkm(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, SMALL["dim"]), reference_pkm(pkm, x.reshape(-1, SMALL["dim"])))


def test_zero_tokens_train_with_batchnorm_and_backward():
    pkm = small_pkm(use_layernorm=False)
    x = torch.randn(0, 3, SMALL["dim"], dtype=torch.float64, requires_grad=True)
    out = pkm(x)
    assert out.shape == x.shape
    out.sum().backward()


def test_non_contiguous_input_equals_contiguous():
    pkm = small_pkm().eval()
    x = torch.randn(SMALL["dim"], 6, 2, dtype=torch.float64).permute(2, 1, 0)
    assert not x.is_contiguous()
    torch.testing.assert_close(pkm(x), pkm(x.contiguous()))


def test_gradcheck_whole_layer_float64():
    pkm = small_pkm(norm_output=True, pre_layernorm=True).eval()
    x = torch.randn(3, SMALL["dim"], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: pkm(inp), (x,))


def test_differentiable_topk_passes_gradient_to_unselected_subkeys():
    hard = small_pkm(num_keys=6, topk=2).train()
    soft = small_pkm(num_keys=6, topk=2, differentiable_topk=True).train()
    soft.load_state_dict(hard.state_dict())
    x = torch.randn(5, SMALL["dim"], dtype=torch.float64)
    torch.testing.assert_close(soft(x), hard(x), atol=1e-6, rtol=1e-6)
    g_soft = grads_of(soft, soft(x).square().sum())["product_keys.keys"]
    g_hard = grads_of(hard, hard(x).square().sum())["product_keys.keys"]
    # the hard top-k gives no gradient to sub-keys never selected; the coordinate-descent top-k does
    assert (g_soft != 0).sum() > (g_hard != 0).sum()


def test_gumbel_noise_only_in_training():
    pkm = small_pkm()
    x = torch.randn(6, SMALL["dim"], dtype=torch.float64)
    pkm.eval()
    torch.testing.assert_close(pkm(x, gumbel_noise_scale=5.0), pkm(x))
    pkm.train()
    assert not torch.allclose(pkm(x, gumbel_noise_scale=5.0), pkm(x))


@pytest.mark.parametrize("which", ["input_dropout", "query_dropout", "value_dropout", "attn_dropout"])
def test_dropouts_act_in_training_only(which):
    pkm = small_pkm(**{which: 0.5})
    plain = small_pkm()
    plain.load_state_dict(pkm.state_dict())
    x = torch.randn(6, SMALL["dim"], dtype=torch.float64)
    torch.testing.assert_close(pkm.eval()(x), plain.eval()(x))
    assert not torch.allclose(pkm.train()(x), plain.train()(x))


def test_alias_and_repr():
    assert ProductKeyMemory is PKM
    text = repr(small_pkm(concat_values_and_combine=True))
    assert "num_keys=8" in text and "concat_heads=True" in text


def test_state_dict_round_trip():
    a = small_pkm(use_layernorm=False, pre_layernorm=True, norm_output=True)
    a(torch.randn(4, SMALL["dim"], dtype=torch.float64))  # move the running statistics
    b = small_pkm(use_layernorm=False, pre_layernorm=True, norm_output=True)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(5, SMALL["dim"], dtype=torch.float64)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_shared_value_table():
    first = small_pkm()
    second = small_pkm(values=first.values)
    assert second.values.weight is first.values.weight
    x = torch.randn(3, SMALL["dim"], dtype=torch.float64)
    (first(x) + second(x)).sum().backward()
    g_first = torch.autograd.grad(first(x).sum(), first.values.weight)[0]
    g_second = torch.autograd.grad(second(x).sum(), first.values.weight)[0]
    torch.testing.assert_close(first.values.weight.grad, g_first + g_second)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dim=0), ValueError, "dim must be a positive int, got 0"),
        (dict(heads=-1), ValueError, "heads must be a positive int, got -1"),
        (dict(num_keys=2.5), ValueError, "num_keys must be a positive int, got 2.5"),
        (dict(topk=9), ValueError, "topk must be at most num_keys=8, got topk=9"),
        (dict(dim_head=True), ValueError, "dim_head must be a positive int, got True"),
        (dict(attn_dropout=1.0), ValueError, r"attn_dropout must be a float in \[0, 1\), got 1.0"),
        (dict(values=torch.nn.Embedding(10, 12)), TypeError, r"values must be a ValueTable .*got Embedding"),
        (dict(bogus=1), TypeError, "bogus"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PKM(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m(torch.randn(3, 11)), ValueError, r"x must have shape \(\.\.\., dim=12\), got \(3, 11\)"),
        (lambda m: m(torch.tensor(1.0)), ValueError, "x must have shape"),
        (lambda m: m([1.0] * 12), TypeError, "x must be a torch.Tensor, got list"),
        (lambda m: m(torch.ones(3, 12, dtype=torch.long)), TypeError, "floating point"),
        (lambda m: m(torch.randn(2, 3, 12), input_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
         r"input_mask must have shape x.shape\[:-1\] = \(2, 3\), got \(2, 4\)"),
        (lambda m: m(torch.randn(2, 3, 12), input_mask=torch.ones(2, 3)), TypeError,
         "input_mask must be a bool tensor, got torch.float32"),
        (lambda m: m(torch.randn(2, 12), mem_trainable_mask=torch.ones(10, dtype=torch.bool)), ValueError,
         r"mem_trainable_mask must have shape \(num_keys \*\* 2,\) = \(64,\), got \(10,\)"),
        (lambda m: m(torch.randn(2, 12), gumbel_noise_scale=-1.0), ValueError, "gumbel_noise_scale"),
        (lambda m: m(torch.randn(2, 12), input_masks=None), TypeError, "input_masks"),
    ],
)
def test_forward_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(PKM(**SMALL))


def test_autocast_bf16_forward_and_backward_cpu():
    pkm = PKM(**SMALL)
    x = torch.randn(4, 5, SMALL["dim"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pkm(x)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in pkm.parameters() if p.grad is not None)
    torch.testing.assert_close(out.float(), pkm(x), atol=0.1, rtol=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(dtype):
    pkm = PKM(**SMALL, device="cuda")
    x = torch.randn(4, 5, SMALL["dim"], device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = pkm(x)
    out.float().square().mean().backward()
    torch.testing.assert_close(out.float(), pkm(x), atol=0.05, rtol=0.05)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    pkm = small_pkm(dtype=torch.float32).eval()
    x = torch.randn(4, SMALL["dim"])
    torch.testing.assert_close(pkm.cuda()(x.cuda()).cpu(), pkm.cpu()(x), atol=1e-5, rtol=1e-5)


def test_low_precision_parameters_keep_float32_scores():
    pkm = PKM(**SMALL, dtype=torch.bfloat16)
    x = torch.randn(3, 4, SMALL["dim"], dtype=torch.bfloat16)
    weights, slots = pkm.search(pkm.queries(x.reshape(-1, SMALL["dim"])))
    assert weights.dtype == torch.float32 and slots.dtype == torch.long
    out = pkm(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert pkm.values.weight.grad.dtype == torch.bfloat16
