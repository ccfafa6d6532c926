"""The value-read kernels on the read patterns of real training, against :mod:`reference`.

Skewed reads (one slot taking a quarter of them, Zipf-distributed slots), ties (a slot read twice
in one bag, one slot read by every read), padding (weight 0) and frozen rows, sizes around the
backward's chunk of ``CHUNK`` sorted reads, bf16 tables with round-to-nearest-even expectations,
out-of-range slots. Each runs on CPU tensors under the interpreter and, marked ``cuda``, on a GPU.
"""

import pytest
from ..._extras import importorskip
import torch
from torch.testing import assert_close

importorskip("triton")

from product_key_memory import functional as PF  # noqa: E402
from product_key_memory import use_backend  # noqa: E402
from product_key_memory.ops._triton import interpreted  # noqa: E402
from product_key_memory.ops.value_read import reference  # noqa: E402
from product_key_memory.ops.value_read import triton_impl  # noqa: E402
from product_key_memory.ops.value_read.triton_impl import (  # noqa: E402
    CHUNK,
    MAX_ONE_PASS_M,
    value_read,
    value_read_backward,
    value_read_backward_rows,
)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreted(triton_impl._read_kernel),
                                                 reason="the kernels run on CPU only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def skewed_slots(S, n, kind, gen):
    """``n`` slots of ``[0, S)``: ``hot`` gives slot 3 a quarter of the reads, ``zipf`` draws slot
    ``k`` with probability ``~ 1 / (k + 1)``, ``one`` reads slot 1 only, ``uniform`` anything."""
    if kind == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64)
        slots = torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)
        return torch.randperm(S, generator=gen)[slots]  # the popular slots anywhere in the table
    slots = torch.randint(0, S, (n,), generator=gen)
    if kind == "hot":
        slots[torch.randperm(n, generator=gen)[: n // 4]] = 3
    elif kind == "one":
        slots.fill_(1)
    return slots


def inputs(S, D, B, m, kind, dtype, device, gen, padding=True):
    values = torch.randn(S, D, generator=gen).to(dtype)
    indices = skewed_slots(S, B * m, kind, gen).view(B, m)
    w = torch.rand(B, m, generator=gen) + 0.1
    if padding:
        w[:, -1] = 0.0  # the last read of each bag is padding
    return values.to(device), indices.to(device), w.to(device)


def check_grads(values, indices, w, trainable, gen):
    """Dense and row-sparse value gradients and the weights' gradient against the reference
    (float32 for the expectation, then the table's dtype)."""
    B, D = indices.shape[0], values.shape[1]
    grad_out = torch.randn(B, D, generator=gen).to(values.device)
    tol = TOL[values.dtype]
    rv, rw = reference.value_read_backward(grad_out, values.float(), indices, w, trainable, True, True)
    gv, gw = value_read_backward(grad_out, values, indices, w, trainable, True, True)
    assert gv.dtype == values.dtype
    assert_close(gv, rv.to(values.dtype), **tol, msg="dense value gradient")
    assert_close(gw, rw.to(w.dtype), **TOL[w.dtype], msg="weight gradient")
    rows_idx, rows, gw2 = value_read_backward_rows(grad_out, values, indices, w, trainable, True)
    touched, _, _ = reference.value_read_backward_rows(grad_out, values.float(), indices, w, trainable, False)
    assert rows_idx.shape == (indices.numel(),), "one entry per read"
    assert torch.equal(rows_idx.unique(), touched), "the distinct entries are the touched rows"
    merged = torch.zeros(values.shape, device=values.device).index_add_(0, rows_idx, rows.float())
    assert_close(merged.to(values.dtype), rv.to(values.dtype), **tol, msg="row-sparse value gradient")
    assert torch.equal(gw2, gw), "the weight gradient does not depend on the value gradient's layout"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["hot", "zipf", "one", "uniform"])
@pytest.mark.parametrize("B,m", [(1, CHUNK - 1), (4, CHUNK // 4), (3, CHUNK // 2 + 1), (13, 7)])
def test_skewed_reads(device, kind, B, m):
    gen = torch.Generator().manual_seed(B * 100 + m)
    values, indices, w = inputs(11, 33, B, m, kind, torch.float32, device, gen)
    assert_close(value_read(values, indices, w), reference.value_read(values, indices, w), **TOL[torch.float32])
    trainable = (torch.rand(11, generator=gen) < 0.7).to(device)
    trainable[3] = True
    check_grads(values, indices, w, None, gen)
    check_grads(values, indices, w, trainable, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_hot_slot_spans_many_chunks(device):
    """A slot read ~5 chunks' worth of times, its neighbours cut by the chunk borders: the border
    pass adds every piece once."""
    gen = torch.Generator().manual_seed(5)
    values, indices, w = inputs(6, 20, 10, 2 * CHUNK + 3, "hot", torch.float32, device, gen)
    indices[:, : CHUNK // 2] = 2
    check_grads(values, indices, w, None, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_one_slot_takes_nearly_every_read(device):
    """~40 border pieces of one run: the border pass sums them in several tiles of ``BLOCK_P``."""
    gen = torch.Generator().manual_seed(8)
    values, indices, w = inputs(7, 24, 20, CHUNK + 1, "one", torch.float32, device, gen)
    indices[::7, 0] = 0  # a few reads of other slots before and after the hot one
    indices[::5, 1] = 6
    assert triton_impl._border_config(24)["BLOCK_P"] < 2 * (indices.numel() // CHUNK) - 4
    check_grads(values, indices, w, None, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_a_slot_read_twice_in_a_bag(device):
    gen = torch.Generator().manual_seed(6)
    values, indices, w = inputs(9, 17, 5, 6, "uniform", torch.float32, device, gen, padding=False)
    indices[:, 1] = indices[:, 0]  # the same row twice in every bag, different weights
    indices[:, 3] = indices[:, 2]
    w[:, 3] = w[:, 2]  # ... and with equal weights
    assert_close(value_read(values, indices, w), reference.value_read(values, indices, w), **TOL[torch.float32])
    check_grads(values, indices, w, None, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_touched(device):
    """Every read padding (or frozen): zero gradients, and the sparse entries keep their own slots."""
    gen = torch.Generator().manual_seed(7)
    values, indices, w = inputs(9, 17, 5, 6, "hot", torch.float32, device, gen)
    w.zero_()
    grad_out = torch.randn(5, 17, generator=gen).to(device)
    gv, _ = value_read_backward(grad_out, values, indices, w, None, True, False)
    assert not gv.any()
    rows_idx, rows, _ = value_read_backward_rows(grad_out, values, indices, w, None, False)
    assert torch.equal(rows_idx, indices.flatten().sort().values) and not rows.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [1, 16, 33, 100])
def test_bf16_rounds_to_nearest_even(device, D):
    """Sums exact in float32 (small integers, weights 1) and halfway between two bf16 values:
    the kernels store the float32 result rounded to nearest even, in the forward and both
    backward outputs."""
    gen = torch.Generator().manual_seed(D)
    S, B, m = 8, 6, 2
    values = torch.zeros(S, D)
    values[0] = 256.0
    values[1:] = torch.randint(0, 8, (S - 1, D), generator=gen).float()  # 256 + odd: halfway cases
    values = values.bfloat16().to(device)
    indices = torch.stack((torch.zeros(B, dtype=torch.long), torch.arange(1, B + 1)), 1).to(device)
    w = torch.ones(B, m, device=device)
    want = reference.value_read(values.float(), indices, w).bfloat16()  # exact sum, then RNE
    assert torch.equal(value_read(values, indices, w), want)
    grad_out = (256.0 + torch.arange(B * D, dtype=torch.float32).view(B, D) % 8).to(device)  # exact sums
    rv, _ = reference.value_read_backward(grad_out, values.float(), indices, w, None, True, False)
    gv, _ = value_read_backward(grad_out, values, indices, w, None, True, False)
    assert torch.equal(gv, rv.bfloat16())
    rows_idx, rows, _ = value_read_backward_rows(grad_out, values, indices, w, None, False)
    merged = torch.zeros(S, D, device=device).index_add_(0, rows_idx, rows.float())
    assert torch.equal(merged.bfloat16(), rv.bfloat16())
    gw_want = (values.float()[indices] * grad_out.unsqueeze(1)).sum(-1)  # exact: integers below 2**24
    _, gw = value_read_backward(grad_out, values, indices, w.bfloat16(), None, False, True)
    assert torch.equal(gw, gw_want.bfloat16())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["hot", "zipf"])
def test_bf16_table_skewed(device, kind):
    gen = torch.Generator().manual_seed(9)
    values, indices, w = inputs(13, 40, 6, 9, kind, torch.bfloat16, device, gen)
    want = reference.value_read(values.float(), indices, w).bfloat16()
    assert_close(value_read(values, indices, w), want, **TOL[torch.bfloat16])
    check_grads(values, indices, w, None, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_wide_bags_take_the_multi_pass_forward(device):
    gen = torch.Generator().manual_seed(10)
    values, indices, w = inputs(50, 20, 2, MAX_ONE_PASS_M + 3, "zipf", torch.float32, device, gen)
    assert not triton_impl._read_config(MAX_ONE_PASS_M + 3, 20)["ONE_PASS"]
    assert_close(value_read(values, indices, w), reference.value_read(values, indices, w), **TOL[torch.float32])
    assert_close(value_read(values, indices, None), reference.value_read(values, indices, None),
                 **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES[:1])  # on a GPU every backend's bad read is a device-side fault
@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_slot_raises_like_the_other_backends(device, bad):
    values = torch.randn(10, 4, device=device)
    indices = torch.tensor([[1, bad]], device=device)
    w = torch.ones(1, 2, device=device)
    for backend in ("torch", "reference"):
        with use_backend(backend), pytest.raises((IndexError, RuntimeError)):
            PF.value_read(values, indices, w)
    with use_backend("triton"), pytest.raises(IndexError, match=r"indices: slot .* outside .*\[0, 10\)"):
        PF.value_read(values, indices, w)
    v = values.clone().requires_grad_()
    with use_backend("triton"), pytest.raises(IndexError, match="outside"):
        PF.value_read(v, indices, w, sparse=True)


_CUDA_BAD_SLOT = """
import torch
from product_key_memory import functional as PF, use_backend
values = torch.randn(10, 4, device="cuda")
with use_backend("triton"):
    out = PF.value_read(values, torch.tensor([[1, 10]], device="cuda"), torch.ones(1, 2, device="cuda"))
try:
    torch.cuda.synchronize()
except RuntimeError as e:
    print("RAISED", e)
"""


@pytest.mark.cuda
def test_out_of_range_slot_fails_on_cuda_without_a_host_read():
    """On a GPU the range check stays on the device (no sync): the launch fails with the message at
    the next synchronisation. A device-side assert ends the CUDA context, so it runs in a child."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _CUDA_BAD_SLOT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert "RAISED" in run.stdout or "outside the table's range" in run.stderr, run.stdout + run.stderr[-2000:]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_slots_read_as_zero_rows(device, monkeypatch):
    """Past the range check, the kernel masks a slot outside the table: it
    neither reads another row nor faults, it adds nothing."""
    monkeypatch.setattr(triton_impl, "_check_slots", lambda indices, num_slots: None)
    values = torch.randn(10, 24, device=device)
    indices = torch.tensor([[1, 10, 3], [-1, 2, 1 << 40]], device=device)
    w = torch.rand(2, 3, device=device)
    inside = (indices >= 0) & (indices < 10)
    want = reference.value_read(values, indices.clamp(0, 9), w * inside)
    assert_close(value_read(values, indices, w), want)
    assert_close(value_read(values, indices[:, :2].repeat(1, MAX_ONE_PASS_M), w[:, :2].repeat(1, MAX_ONE_PASS_M)),
                 reference.value_read(values, indices[:, :2].clamp(0, 9), (w * inside)[:, :2]) * MAX_ONE_PASS_M,
                 rtol=1e-4, atol=1e-4)
