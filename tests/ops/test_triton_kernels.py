"""Triton kernels (product_key_memory.ops.triton) against plain PyTorch references.

Without CUDA they run on CPU tensors under ``TRITON_INTERPRET=1`` (set in conftest.py) at
small shapes chosen to cross each kernel's blocks: search ``BLOCK_K = 128`` keys and
``BLOCK_D = 64`` features, value read ``BLOCK_M = 32`` reads and ``BLOCK_D = 128``
columns, backward runs of ``BLOCK_R = 16`` reads (the sparse Adam kernel: tests/ops/sparse_adam).
Tests marked ``cuda`` repeat them at real sizes on a GPU.
"""

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton")

from product_key_memory import functional as PF  # noqa: E402
from product_key_memory.ops.triton.search import product_key_search  # noqa: E402
from product_key_memory.ops.triton.value_read import (  # noqa: E402
    value_read,
    value_read_backward,
    value_read_backward_reference,
    value_read_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),  # one bf16 rounding of an fp32-accumulated result
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def brute_force_tie_rule(queries, keys, topk):
    """All ``K * K`` slot scores in fp32, best ``topk`` by (score descending, slot ascending)."""
    q, k = queries.float(), keys.float()
    s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], k[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], k[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (N, H, K * K), in slot order
    full = full + 0.0  # -0.0 -> +0.0
    order = full.sort(dim=-1, descending=True, stable=True).indices[..., :topk]  # stable: lower slot first
    return full.gather(-1, order), order


def exact_inputs(N, H, K, d, dtype, lo=-3, hi=3, gen=None):
    """Small-integer queries and keys: every fp32 sum is exact, and ties are frequent."""
    q = torch.randint(lo, hi + 1, (N, 2, H, d), generator=gen).to(dtype).transpose(1, 2)  # (N, H, 2, d), strided
    keys = torch.randint(lo, hi + 1, (H, K, 2, d), generator=gen).to(dtype)
    return q.to(DEVICE), keys.to(DEVICE).transpose(1, 2)  # the module's (H, 2, K, d) view


def check_search(q, keys, topk):
    scores, idx = product_key_search(q, keys, topk)
    want_scores, want_idx = brute_force_tie_rule(q.cpu(), keys.cpu(), topk)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert scores.shape == idx.shape == (q.shape[0], q.shape[1], topk)
    assert torch.equal(idx.cpu(), want_idx), "slots differ from the tie-rule brute force"
    assert torch.equal(scores.cpu(), want_scores), "scores differ from the brute force"


# -- search -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,H,K,d,topk",
    [
        (3, 2, 5, 3, 1),  # tiny: topk 1, blocks larger than the data
        (4, 3, 20, 5, 7),  # topk not a power of two
        (2, 1, 130, 70, 33),  # crosses BLOCK_K = 128 and BLOCK_D = 64, topk just over 32
        (1, 2, 256, 8, 16),  # K a multiple of BLOCK_K
        (1, 1, 1024, 4, 64),  # the largest table and topk of the contract
        (1, 1, 16, 256, 16),  # d = 256, topk = K
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_search_equals_tie_rule_brute_force(N, H, K, d, topk, dtype):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    check_search(*exact_inputs(N, H, K, d, dtype, gen=gen), topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_ties(dtype):
    """All-zero queries tie every slot: the lowest slots win; duplicated keys tie in pairs."""
    q, keys = exact_inputs(2, 2, 40, 6, dtype)
    check_search(torch.zeros_like(q), keys, 10)
    scores, idx = product_key_search(torch.zeros_like(q), keys, 10)
    assert torch.equal(idx.cpu(), torch.arange(10).expand(2, 2, 10)), "all ties: slots 0..9 in order"
    keys_dup = keys[:, :, :4].repeat(1, 1, 10, 1)  # (H, 2, 40, d): every key 10 times
    check_search(q, keys_dup, 25)
    check_search(-torch.zeros_like(q), keys, 10)  # -0.0 scores count as +0.0


def test_search_single_and_many_heads():
    check_search(*exact_inputs(5, 1, 12, 4, torch.float32), 3)
    check_search(*exact_inputs(2, 8, 12, 4, torch.float32), 5)


def test_search_random_matches_functional_fast_path():
    """Random fp32 (no exact ties): the library's own search selects the same slots."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 2, 16, generator=g).to(DEVICE)
    keys = torch.randn(2, 150, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    scores, idx = product_key_search(q, keys, 12)
    want_scores, want_idx = PF.product_key_search(q, keys, 12)
    assert torch.equal(idx, want_idx), "slots differ from functional.product_key_search"
    assert_close(scores, want_scores, **TOL[torch.float32], msg="scores")


def test_search_empty_and_bad_args():
    q, keys = exact_inputs(0, 2, 10, 4, torch.float32)
    scores, idx = product_key_search(q, keys, 3)
    assert scores.shape == idx.shape == (0, 2, 3)
    q, keys = exact_inputs(2, 2, 10, 4, torch.float32)
    with pytest.raises(ValueError, match="topk"):
        product_key_search(q, keys, 11)
    with pytest.raises(ValueError, match="keys"):
        product_key_search(q, keys[:1], 3)


# -- value read ---------------------------------------------------------------------------------


def read_inputs(S, D, B, m, dtype, idx_dtype=torch.int64, weights=True, gen=None):
    values = torch.randn(S, D, generator=gen).to(dtype)
    indices = torch.randint(0, S, (B, m), generator=gen).to(idx_dtype)
    w = None
    if weights:
        w = torch.randn(B, m, generator=gen)
        w[::2, : m // 2] = 0.0  # padding: read, weight 0
    return values.to(DEVICE), indices.to(DEVICE), None if w is None else w.to(DEVICE)


@pytest.mark.parametrize("S,D,B,m", [(300, 130, 5, 33), (7, 4, 9, 3), (50, 128, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("weighted", [True, False])
def test_value_read_forward(S, D, B, m, dtype, idx_dtype, weighted):
    values, indices, w = read_inputs(S, D, B, m, dtype, idx_dtype, weighted, torch.Generator().manual_seed(S))
    out = value_read(values, indices, w)
    assert out.dtype == dtype and out.shape == (B, D)
    assert_close(out, value_read_reference(values, indices, w), **TOL[dtype], msg="output")


def test_value_read_forward_bf16_weights_and_functional_reference():
    values, indices, w = read_inputs(40, 20, 6, 5, torch.float32)
    out = value_read(values, indices, w.bfloat16())
    assert_close(out, PF.value_read_reference(values, indices, w.bfloat16()), **TOL[torch.float32], msg="bf16 weights")


def test_value_read_empty():
    values, indices, w = read_inputs(10, 8, 0, 4, torch.float32)
    assert value_read(values, indices, w).shape == (0, 8)
    for sparse in (False, True):
        gv, gw = value_read_backward(
            torch.zeros(0, 8, device=DEVICE), values, indices, w, None,
            need_values_grad=True, need_weights_grad=True, sparse=sparse,
        )
        assert gw.shape == (0, 4)
        if sparse:
            assert gv[0].shape == (0,) and gv[1].shape == (0, 8)
        else:
            assert torch.equal(gv, torch.zeros_like(values))


def check_backward(values, indices, w, trainable, sparse, need_values_grad=True, need_weights_grad=True, gen=None):
    B, D = indices.shape[0], values.shape[1]
    grad_out = torch.randn(B, D, generator=gen).to(DEVICE)
    kw = dict(need_values_grad=need_values_grad, need_weights_grad=need_weights_grad, sparse=sparse)
    gv, gw = value_read_backward(grad_out, values, indices, w, trainable, **kw)
    rv, rw = value_read_backward_reference(grad_out, values, indices, w, trainable, **kw)
    tol = TOL[values.dtype]
    if rw is None:
        assert gw is None
    else:
        assert gw.dtype == w.dtype and gw.shape == w.shape
        assert_close(gw, rw, **TOL[w.dtype], msg="weight gradient")
    if rv is None:
        assert gv is None
    elif sparse:
        rows_idx, rows = gv
        assert rows_idx.dtype == torch.int64 and rows.dtype == values.dtype
        assert torch.equal(rows_idx, rv[0]), "sparse rows: touched, non-zero weight, trainable, sorted"
        assert_close(rows, rv[1], **tol, msg="sparse value gradient rows")
    else:
        assert gv.dtype == values.dtype and gv.shape == values.shape
        assert_close(gv, rv, **tol, msg="dense value gradient")


@pytest.mark.parametrize("S,D,B,m", [(40, 130, 3, 33), (3, 4, 9, 7)])  # (3, ...): runs of ~21 reads > BLOCK_R
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [True, False])
def test_value_read_backward(S, D, B, m, dtype, sparse, masked, weighted):
    gen = torch.Generator().manual_seed(S + D)
    values, indices, w = read_inputs(S, D, B, m, dtype, weights=weighted, gen=gen)
    trainable = (torch.rand(S, generator=gen) < 0.6).to(DEVICE) if masked else None
    check_backward(values, indices, w, trainable, sparse, gen=gen)


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
def test_value_read_backward_partial_needs(need):
    values, indices, w = read_inputs(30, 20, 4, 6, torch.float32)
    for idx_dtype in (torch.int64, torch.int32):
        check_backward(values, indices.to(idx_dtype), w, None, False, *need)


def test_value_read_backward_weight_dtypes():
    values, indices, w = read_inputs(30, 20, 4, 6, torch.bfloat16)
    check_backward(values, indices, w.bfloat16(), None, True)
    check_backward(values, indices, w.half(), None, False)


def test_value_read_backward_matches_autograd():
    """The reference backward itself against autograd through ``functional.value_read_reference``."""
    gen = torch.Generator().manual_seed(3)
    values, indices, w = read_inputs(12, 6, 5, 4, torch.float32, gen=gen)
    trainable = torch.rand(12, generator=gen) < 0.5
    grad_out = torch.randn(5, 6, generator=gen)
    v = values.cpu().requires_grad_()
    wt = w.cpu().requires_grad_()
    PF.value_read_reference(v, indices.cpu(), wt, trainable=trainable).backward(grad_out)
    gv, gw = value_read_backward(
        grad_out.to(DEVICE), values, indices, w, trainable.to(DEVICE),
        need_values_grad=True, need_weights_grad=True, sparse=False,
    )
    assert_close(gv.cpu(), v.grad, **TOL[torch.float32], msg="value gradient vs autograd")
    assert_close(gw.cpu(), wt.grad, **TOL[torch.float32], msg="weight gradient vs autograd")


# -- real sizes on a GPU --------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "K,topk,dtype", [(256, 32, torch.float32), (1024, 32, torch.bfloat16), (512, 64, torch.float16)]
)
def test_cuda_search_real_sizes(K, topk, dtype):
    check_search(*exact_inputs(64, 4, K, 128, dtype, lo=-2, hi=2), topk)
    check_search(*exact_inputs(8, 4, K, 128, dtype, lo=0, hi=0), topk)  # all ties


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_value_read_real_sizes(dtype, sparse):
    gen = torch.Generator().manual_seed(0)
    values, indices, w = read_inputs(65536, 512, 2048, 128, dtype, gen=gen)
    assert_close(value_read(values, indices, w), value_read_reference(values, indices, w), **TOL[dtype])
    check_backward(values, indices, w, (torch.rand(65536, generator=gen) < 0.9).to(DEVICE), sparse, gen=gen)


@pytest.mark.cuda
def test_cuda_value_read_int64_offsets():
    """A table of more than 2**31 elements: the last rows are read with int64 offsets."""
    S, D = (2**31) // 128 + 64, 128
    values = torch.zeros(S, D, dtype=torch.bfloat16, device="cuda")
    values[-64:] = torch.arange(64, dtype=torch.bfloat16, device="cuda").unsqueeze(-1)
    indices = torch.arange(S - 64, S, device="cuda").view(8, 8)
    out = value_read(values, indices, None)
    assert_close(out.float(), values[indices].float().sum(1))
    gv, gw = value_read_backward(torch.ones(8, D, device="cuda"), values, indices, torch.ones(8, 8, device="cuda"),
                                 None, need_values_grad=True, need_weights_grad=True, sparse=True)
    assert torch.equal(gv[0], indices.flatten().sort().values)
    assert_close(gw, values[indices].float().sum(-1))
