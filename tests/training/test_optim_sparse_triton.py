"""SparseRowAdam on the triton read's row-sparse gradient (one entry per read, rows repeated,
uncoalesced) steps the same rows, by the same amounts, as on the torch backend's coalesced one:
lazy Adam moves exactly the rows read with a non-zero weight that are trainable, each once."""

import pytest
from .._extras import importorskip
import torch
from torch.testing import assert_close

importorskip("triton")

from product_key_memory import SparseRowAdam, use_backend  # noqa: E402
from product_key_memory import functional as PF  # noqa: E402
from product_key_memory.ops._triton import interpreted  # noqa: E402
from product_key_memory.ops.value_read import triton_impl  # noqa: E402
from product_key_memory.training import optim as optim_module  # noqa: E402

pytestmark = pytest.mark.skipif(
    not interpreted(triton_impl._read_kernel), reason="CPU tensors run the kernels only under TRITON_INTERPRET=1"
)


def _run(backend, host_reads_free, monkeypatch, steps=3):
    gen = torch.Generator().manual_seed(0)
    S, D, B, m = 40, 12, 6, 9
    table = torch.nn.Parameter(torch.randn(S, D, generator=gen))
    opt = SparseRowAdam([table], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    trainable = torch.rand(S, generator=gen) < 0.7
    monkeypatch.setattr(optim_module, "_host_reads_free", lambda device: host_reads_free)
    for _ in range(steps):
        indices = torch.randint(0, S, (B, m), generator=gen)
        indices[:, : m // 3] = 5  # a hot slot
        w = torch.rand(B, m, generator=gen)
        w[:, -2:] = 0.0  # padding
        indices[:, -2:] = 37  # row 37 is read only as padding: never stepped
        grad_out = torch.randn(B, D, generator=gen)
        with use_backend(backend):
            out = PF.value_read(table, indices, w, trainable=trainable, sparse=True)
        out.backward(grad_out)
        assert table.grad.is_sparse
        opt.step()
        opt.zero_grad(set_to_none=True)
    return table.detach(), opt.state[table]


@pytest.mark.parametrize("host_reads_free", [True, False])
def test_triton_gradient_steps_as_the_torch_gradient(monkeypatch, host_reads_free):
    start = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    want, want_state = _run("torch", True, monkeypatch)
    got, state = _run("triton", host_reads_free, monkeypatch)
    assert_close(got, want, atol=1e-6, rtol=1e-5)
    for key in ("exp_avg", "exp_avg_sq"):
        assert_close(state[key], want_state[key], atol=1e-6, rtol=1e-5, msg=key)
    moved = (got != start).any(1)
    assert torch.equal(moved, (want != start).any(1)), "the same rows moved"
    assert not moved[37], "a row read only with weight 0 moved"
