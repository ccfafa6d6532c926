"""A whole ``PKM`` layer under ``use_backend("triton")`` against the ``torch`` backend.

Forward output and every parameter gradient, then two ``SparseRowAdam`` steps from
``build_optimizer``. Without CUDA the kernels run on CPU tensors under
``TRITON_INTERPRET=1`` (set by tests/conftest.py) at small sizes;
tests marked ``cuda`` repeat them at the README size on a GPU.
"""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from .._extras import importorskip
importorskip("triton")

from product_key_memory import PKM, build_optimizer, use_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]

# small: every code path at interpreter speed; readme: the README layer on a GPU, with few tokens
# because two fp32 summation orders swap a near-tie at the top-k border about once in 1e4 searches,
# and a swapped slot changes the output by its weight (the kernel tests use exact inputs at real sizes)
SIZES = [
    pytest.param(dict(dim=32, heads=2, num_keys=16, topk=4, dim_head=16), (2, 5), id="small"),
    pytest.param(dict(dim=512, heads=4, num_keys=256, topk=32, dim_head=128), (2, 16), id="readme",
                 marks=pytest.mark.cuda),
]
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),  # bf16 rounding of fp32-accumulated sums, in another order
}


def baseline(dtype):
    """The backend to compare with: ``torch``, except bf16 tables on CUDA, where the torch
    backend's weight gradient has no bf16 kernel (pytorch/pytorch#185808): ``reference``."""
    return "reference" if dtype == torch.bfloat16 and DEVICE == "cuda" else "torch"


def dense(g):
    return None if g is None else (g.to_dense() if g.is_sparse else g)


def run_layer(model, backend, x, grad_out, autocast=False, **kwargs):
    """Output and ``{name: gradient}`` of one forward and backward on ``backend``."""
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(DEVICE, dtype=torch.bfloat16) if autocast else torch.autocast(DEVICE, enabled=False)
    with use_backend(backend), ctx:
        out = model(x, **kwargs)
        (out.float() * grad_out).sum().backward()
    return out.detach(), {n: dense(p.grad) for n, p in model.named_parameters()}


def check_layer(model, x, *, dtype=torch.float32, autocast=False, **kwargs):
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(*x.shape[:-1], model.dim, generator=gen).to(DEVICE)
    want_out, want_grads = run_layer(model, baseline(dtype), x, grad_out, autocast, **kwargs)
    out, grads = run_layer(model, "triton", x, grad_out, autocast, **kwargs)
    tol = TOL[torch.bfloat16 if autocast else dtype]
    assert out.dtype == want_out.dtype
    assert_close(out, want_out, **tol, msg="output")
    for name, want in want_grads.items():
        got = grads[name]
        if want is None:
            assert got is None, f"{name}: a gradient where the baseline has none"
            continue
        assert got is not None, f"{name}: no gradient"
        scale = want.abs().max().clamp_min(1.0).item()  # gradients through a LayerNorm can be large
        assert_close(got, want, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")
    return out


def layer(cfg, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return PKM(**cfg, **kwargs, device=DEVICE, dtype=dtype)


def inputs(cfg, lead, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*lead, cfg["dim"], generator=gen).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("cfg,lead", SIZES)
def test_layer_fp32_dense(cfg, lead):
    check_layer(layer(cfg), inputs(cfg, lead))


@pytest.mark.parametrize("cfg,lead", SIZES)
def test_layer_sparse_values(cfg, lead):
    model = layer(cfg, sparse_values=True)
    check_layer(model, inputs(cfg, lead))
    model.zero_grad(set_to_none=True)
    with use_backend("triton"):
        model(inputs(cfg, lead)).sum().backward()
    assert model.values.weight.grad.is_sparse, "sparse_values=True gives a sparse gradient under triton"


@pytest.mark.parametrize("cfg,lead", SIZES)
def test_layer_concat_values_and_combine(cfg, lead):
    check_layer(layer(cfg, concat_values_and_combine=True), inputs(cfg, lead))


@pytest.mark.parametrize("cfg,lead", SIZES)
@pytest.mark.parametrize("sparse", [False, True])
def test_layer_input_mask_and_trainable_mask(cfg, lead, sparse):
    gen = torch.Generator().manual_seed(2)
    model = layer(cfg, sparse_values=sparse)
    x = inputs(cfg, lead)
    input_mask = (torch.rand(lead, generator=gen) < 0.7).to(DEVICE)
    input_mask.view(-1)[0] = False
    trainable = (torch.rand(cfg["num_keys"] ** 2, generator=gen) < 0.5).to(DEVICE)
    out = check_layer(model, x, input_mask=input_mask, mem_trainable_mask=trainable)
    assert torch.equal(out[~input_mask], torch.zeros_like(out[~input_mask])), "padded tokens give zeros"


@pytest.mark.parametrize("cfg,lead", SIZES)
def test_layer_ties_all_zero_token(cfg, lead):
    """An all-zero token has a zero query: every slot ties, and the lowest slots win on both."""
    model = layer(cfg)
    x = inputs(cfg, lead)
    x.view(-1, cfg["dim"])[1] = 0.0
    check_layer(model, x)
    with torch.no_grad():
        q = model.queries(x.view(-1, cfg["dim"]))
        assert torch.equal(q[1], torch.zeros_like(q[1])), "a zero token has a zero query"
        want = model.search(q)[1]
        with use_backend("triton"):
            got = model.search(q)[1]
    assert torch.equal(got, want), "triton selects the torch backend's slots"
    assert torch.equal(got[1], torch.arange(cfg["topk"], device=DEVICE).expand_as(got[1])), "ties: lower slot wins"


@pytest.mark.parametrize("cfg,lead", SIZES)
def test_layer_bf16(cfg, lead):
    check_layer(layer(cfg, torch.bfloat16), inputs(cfg, lead, torch.bfloat16), dtype=torch.bfloat16)


@pytest.mark.parametrize("cfg,lead", SIZES)
def test_layer_bf16_autocast(cfg, lead):
    check_layer(layer(cfg), inputs(cfg, lead), autocast=True)


@pytest.mark.parametrize("cfg,lead", SIZES)
def test_sparse_row_adam_two_steps(cfg, lead, monkeypatch):
    """``build_optimizer``'s SparseRowAdam: under triton the value rows step in the Adam kernel."""
    from product_key_memory.ops.sparse_adam import triton_impl as adam

    calls = []
    kernel_step = adam.sparse_adam_step_
    monkeypatch.setattr(adam, "sparse_adam_step_", lambda *a, **k: calls.append(1) or kernel_step(*a, **k))
    x = inputs(cfg, lead)
    grad_out = torch.randn(*lead, cfg["dim"], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(layer(cfg))
        # eps 1e-3: at the default 1e-8 a first Adam step is lr * sign(g), and a near-zero key gradient
        # whose sign differs between backends by fp32 rounding (~1e-7) moves its weight by 2 * lr
        opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2, eps=1e-3)
        with use_backend(backend):
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                (model(x) * grad_out).sum().backward()
                opt.step()
        assert len(calls) == (2 if backend == "triton" else 0), f"{backend}: {len(calls)} Adam kernel calls"
        assert model.values.weight.grad.is_sparse, "build_optimizer makes the value gradient sparse"
        results[backend] = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = dict(layer(cfg).named_parameters())
    for name, want in results["torch"].items():
        assert_close(results["triton"][name], want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    moved = results["triton"]["values.weight"] != start["values.weight"].detach()
    assert moved.any() and not moved.all(), "only the rows read change"


def test_cpu_tensors_without_interpreter_say_what_to_do():
    """Without ``TRITON_INTERPRET=1`` a CPU layer under triton names the fix, not '0 active drivers'."""
    code = textwrap.dedent(
        """
        import torch
        from product_key_memory import PKM, use_backend
        m = PKM(dim=16, heads=2, num_keys=8, topk=4, dim_head=8)
        try:
            with use_backend("triton"):
                m(torch.randn(2, 3, 16))
        except RuntimeError as e:
            print("ERROR:", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ERROR:" in res.stdout, f"no RuntimeError: {res.stdout[-2000:]}"
    message = res.stdout.split("ERROR:", 1)[1]
    assert "TRITON_INTERPRET=1" in message and "before importing product_key_memory" in message, message
    assert "CUDA" in message and "queries" in message, message
