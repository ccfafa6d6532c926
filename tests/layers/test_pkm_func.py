"""torch.func over a PKM: grad, vmap and their compositions equal autograd and a loop over samples.

Under a transform the ops' entries take their reference.py in plain ops (ops.backend.functorch_active).
"""

import pytest
import torch
from torch.testing import assert_close

from product_key_memory import PKM, quantize_values_


def layer(quantized=None):
    torch.manual_seed(0)
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=4).eval()
    return quantize_values_(pkm, quantized) if quantized is not None else pkm


def test_func_grad_over_parameters_equals_autograd():
    pkm = layer()
    x = torch.randn(5, 16)
    params = {k: v.detach() for k, v in pkm.named_parameters()}
    buffers = dict(pkm.named_buffers())

    def loss(p):
        return torch.func.functional_call(pkm, (p, buffers), (x,)).square().sum()

    got = torch.func.grad(loss)(params)
    want = dict(zip(params, torch.autograd.grad(pkm(x).square().sum(), list(pkm.parameters()))))
    for name in params:
        assert_close(got[name], want[name].to_dense() if want[name].is_sparse else want[name], msg=name)


@pytest.mark.parametrize("quantized", [None, torch.int8, torch.bfloat16], ids=["float", "int8", "bfloat16"])
def test_vmap_and_per_sample_grad_equal_a_loop(quantized):
    pkm = layer(quantized)
    x = torch.randn(4, 3, 16)
    # a bfloat16 table read outside a transform rounds the weights and sums to bfloat16 (the reference
    # under one sums in float32): tests/ops/quantized_read's tolerance
    tol = dict(atol=3e-2, rtol=2e-2) if quantized == torch.bfloat16 else {}
    got = torch.func.vmap(pkm)(x)
    assert_close(got, torch.stack([pkm(xi) for xi in x]), **tol)
    per_sample = torch.func.vmap(torch.func.grad(lambda xi: pkm(xi).square().sum()))(x)
    want = torch.stack([torch.autograd.grad(pkm(xi.requires_grad_()).square().sum(), xi)[0] for xi in x.clone()])
    assert_close(per_sample, want, **tol)


def test_jacrev_equals_autograd_jacobian():
    pkm = layer()
    x = torch.randn(2, 16)
    assert_close(torch.func.jacrev(pkm)(x), torch.autograd.functional.jacobian(pkm, x))
