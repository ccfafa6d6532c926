"""The search kernel (:mod:`product_key_memory.ops.search.triton_impl`) against :mod:`reference`.

Without CUDA it runs on CPU tensors under ``TRITON_INTERPRET=1`` (set in tests/conftest.py); every
small-shape test also runs on CUDA when there is one (the ``cuda`` parameter). Shapes cross the kernel's
steps: tables in several chunks (``chunk=``, the last one partial), odd ``num_keys`` and ``topk``, ``topk``
from 1 to :data:`MAX_TOPK`. Inputs are small integers, so every score is exact and ties are frequent:
slots and scores must equal the tie-rule brute force over all ``num_keys ** 2`` slots bit for bit.
"""

import inspect

import pytest
import torch
from torch.testing import assert_close

from ..._extras import importorskip
importorskip("triton")

from product_key_memory import functional as PF  # noqa: E402
from product_key_memory import use_backend  # noqa: E402
from product_key_memory.ops import search as entry  # noqa: E402
from product_key_memory.ops._triton import interpreted  # noqa: E402
from product_key_memory.ops.search import reference, torch_impl  # noqa: E402
from product_key_memory.ops.search import triton_impl as ti  # noqa: E402
from product_key_memory.ops.search.triton_impl import search  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not interpreted(ti._select_kernel), reason="the kernels were built for CUDA, not the interpreter")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}


def exact_inputs(N, H, K, d, dtype, device, lo=-3, hi=3, seed=0):
    """Small-integer queries and keys: every fp32 sum is exact, and ties are frequent."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (N, 2, H, d), generator=gen).to(dtype).transpose(1, 2)  # (N, H, 2, d), strided
    keys = torch.randint(lo, hi + 1, (H, K, 2, d), generator=gen).to(dtype)
    return q.to(device), keys.to(device).transpose(1, 2)  # the module's (H, 2, K, d) view


def check_search(q, keys, topk, **kwargs):
    scores, idx = search(q, keys, topk, **kwargs)
    num_keys = keys.shape[2]
    if q.shape[0] * q.shape[1] * num_keys**2 <= 2**24:
        want_scores, want_idx = reference.brute_force_search(q.cpu(), keys.cpu(), topk)  # all K * K slots
    else:  # the reference's two stages (what the brute force must equal: test_search.py)
        want_scores, want_idx = reference.search(q.cpu(), keys.cpu(), topk)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert scores.shape == idx.shape == (q.shape[0], q.shape[1], topk)
    assert torch.equal(idx.cpu(), want_idx), "slots differ from the tie-rule brute force"
    assert torch.equal(scores.cpu(), want_scores), "scores differ from the brute force"
    two_stage = reference.search(q.cpu(), keys.cpu(), topk)
    assert torch.equal(idx.cpu(), two_stage[1]), "slots differ from reference.search"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "N,H,K,d,topk",
    [
        (3, 2, 5, 3, 1),  # tiny: topk 1, blocks larger than the data
        (4, 3, 20, 5, 7),  # topk not a power of two
        (2, 1, 130, 70, 33),  # odd table, topk just over 32 (T = 64)
        (1, 2, 256, 8, 32),  # the README layer's table and topk
        (1, 1, 1024, 4, 64),
        (1, 1, 16, 256, 16),  # d = 256, topk = K
        (2, 1, 160, 3, 128),
        (1, 1, 300, 2, 256),  # topk = MAX_TOPK
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_search_equals_tie_rule_brute_force(N, H, K, d, topk, dtype, device):
    check_search(*exact_inputs(N, H, K, d, dtype, device, seed=N * 1000 + K), topk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "K,topk,chunk",
    [
        (300, 5, 64),  # five chunks, the last one of 44 keys
        (300, 33, 64),  # T = 64 = chunk: each chunk merged unsorted
        (257, 32, 128),  # a last chunk of one key
        (129, 1, 2),  # the smallest chunk: 65 steps
    ],
)
def test_table_in_chunks_equals_brute_force(K, topk, chunk, device):
    """Tables past a chunk are selected chunk by chunk, merging each chunk's best into the running best."""
    cfg = ti.launch_config(6, K, topk, chunk)
    assert not cfg["ONE_CHUNK"] and cfg["CH"] == max(chunk, cfg["T"])
    check_search(*exact_inputs(2, 1, K, 3, torch.float32, device, lo=-2, hi=2, seed=K), topk, chunk=chunk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_ties(dtype, device):
    """All-zero queries tie every slot: the lowest slots win; duplicated keys tie in groups."""
    q, keys = exact_inputs(2, 2, 40, 6, dtype, device)
    check_search(torch.zeros_like(q), keys, 10)
    scores, idx = search(torch.zeros_like(q), keys, 10)
    assert torch.equal(idx.cpu(), torch.arange(10).expand(2, 2, 10)), "all ties: slots 0..9 in order"
    keys_dup = keys[:, :, :4].repeat(1, 1, 10, 1)  # (H, 2, 40, d): every key 10 times
    check_search(q, keys_dup, 25)
    check_search(-torch.zeros_like(q), keys, 10)  # -0.0 scores count as +0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk", [1, 32, 128, 256])
def test_search_ties_at_every_topk(topk, device):
    """Queries and keys in {-1, 0, 1}: a handful of distinct scores, so the k-th place is a long tie and
    the compact candidate list must keep the lower slots (chunked too)."""
    q, keys = exact_inputs(1 if topk > 32 else 2, 1, 257, 2, torch.float32, device, lo=-1, hi=1, seed=topk)
    check_search(q, keys, topk)
    if topk <= 32:
        check_search(q, keys, topk, chunk=64)


@pytest.mark.parametrize("device", DEVICES)
def test_search_single_and_many_heads(device):
    check_search(*exact_inputs(5, 1, 12, 4, torch.float32, device), 3)
    check_search(*exact_inputs(2, 8, 12, 4, torch.float32, device), 5)
    check_search(*exact_inputs(1, 3, 12, 4, torch.float32, device), 5)  # one token: the one-GEMM-per-head scores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_search_equals_torch_backend_on_random_inputs(dtype, device):
    """Random inputs (sums rounded): the kernel selects from the torch backend's own sub-key scores, so the
    two backends agree bit for bit, and with reference.search up to float32 rounding."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 2, 16, generator=g).to(dtype).to(device)
    keys = torch.randn(2, 150, 2, 16, generator=g).to(dtype).to(device).transpose(1, 2)
    for topk in (12,):
        scores, idx = search(q, keys, topk)
        want_scores, want_idx = torch_impl.search(q, keys, topk)
        assert torch.equal(idx, want_idx), "slots differ from torch_impl.search"
        assert torch.equal(scores, want_scores), "scores differ from torch_impl.search"
        ref_scores, ref_idx = reference.search(q.cpu(), keys.cpu(), topk)
        assert_close(scores.cpu(), ref_scores, **TOL[torch.float32], msg="scores vs reference.search")
        lib_scores, lib_idx = PF.product_key_search(q, keys, topk)
        assert_close(scores, lib_scores, **TOL[torch.float32], msg="scores vs functional.product_key_search")


def _bf16_rne(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 rounded to nearest, ties to even, in integer ops (independent of torch's cast)."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded << 16).to(torch.int64).remainder(2**32).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_inputs_rounded_to_nearest_even(device):
    """float32 inputs half-way between two bfloat16 numbers (1 + 2**-8 rounds down to 1, 1 + 3 * 2**-8 up to
    1 + 2**-6): the bfloat16 inputs the search takes are the round-to-nearest-even ones, and it selects
    and scores exactly as the reference does on those values in float32."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-4, 5, (3, 2, 2, 4), generator=g).float()
    halfway = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2 + 2**-7])
    q32 = base + halfway[torch.randint(0, 4, base.shape, generator=g)]
    k32 = torch.randint(-4, 5, (2, 9, 2, 4), generator=g).float().transpose(1, 2) * (1 + 2**-8)
    q, keys = q32.to(torch.bfloat16), k32.to(torch.bfloat16)
    assert torch.equal(q.float(), _bf16_rne(q32)) and torch.equal(keys.float(), _bf16_rne(k32))
    want = reference.search(_bf16_rne(q32), _bf16_rne(k32), 7)  # float32 values: every product and sum exact
    scores, idx = search(q.to(device), keys.to(device), 7)
    assert torch.equal(idx.cpu(), want[1]), "slots differ from the reference on the rounded inputs"
    assert torch.equal(scores.cpu(), want[0]), "scores differ from the reference on the rounded inputs"


@pytest.mark.parametrize("device", DEVICES)
def test_search_empty_and_bad_args(device):
    q, keys = exact_inputs(0, 2, 10, 4, torch.float32, device)
    scores, idx = search(q, keys, 3)
    assert scores.shape == idx.shape == (0, 2, 3)
    q, keys = exact_inputs(2, 2, 10, 4, torch.float32, device)
    with pytest.raises(ValueError, match="topk"):
        search(q, keys, 11)
    with pytest.raises(ValueError, match="keys"):
        search(q, keys[:1], 3)
    with pytest.raises(ValueError, match="chunk must be a power of two, got 48"):
        search(q, keys, 3, chunk=48)
    with pytest.raises(TypeError, match="float64"):
        search(q.double(), keys.double(), 3)
    q, keys = exact_inputs(1, 1, ti.MAX_TOPK + 1, 1, torch.float32, device)
    with pytest.raises(ValueError, match=f"topk must be in \\[1, min\\(num_keys, {ti.MAX_TOPK}\\)\\]"):
        search(q, keys, ti.MAX_TOPK + 1)


# -- the entry's fallback --------------------------------------------------------------------------------


def test_fits_is_the_topk_bound():
    assert ti.fits(256, 32) and ti.fits(reference.MAX_NUM_KEYS, ti.MAX_TOPK) and ti.fits(5, 5)
    assert not ti.fits(1024, ti.MAX_TOPK + 1) and not ti.fits(5, 6) and not ti.fits(10, 0)


@pytest.mark.skipif(not interpreted(ti._select_kernel), reason="CPU tensors reach the kernel only when interpreted")
@pytest.mark.parametrize("topk,launches", [(32, 1), (ti.MAX_TOPK + 1, 0)])
def test_entry_hands_topk_past_the_kernel_to_torch(monkeypatch, topk, launches):
    """Past MAX_TOPK the triton backend takes the torch backend's search (the kernel is never launched)
    and gives the reference's answer; up to it, the kernel."""
    calls = []
    launch = ti.select

    def counted(*args, **kwargs):
        calls.append(args[1])
        return launch(*args, **kwargs)

    monkeypatch.setattr(ti, "select", counted)
    q, keys = exact_inputs(2, 1, 300, 2, torch.float32, "cpu", lo=-1, hi=1)
    want = reference.search(q, keys, topk)
    with use_backend("triton"):
        got = entry.search(q, keys, topk)
        grad_q = q.clone().requires_grad_()
        got_grad = entry.search(grad_q, keys, topk)  # through the custom op
    assert len(calls) == 2 * launches, calls
    for what, (s, i) in (("no grad", got), ("custom op", got_grad)):
        assert torch.equal(i, want[1]), f"{what}: slots differ from reference.search"
        assert torch.equal(s.detach(), want[0]), f"{what}: scores differ from reference.search"


# -- kernel variants -------------------------------------------------------------------------------------


def test_compile_cases_name_every_kernel_argument():
    cases = ti.compile_cases()
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), names
    params = list(inspect.signature(ti._select_kernel.fn).parameters)
    for c in cases:
        assert list(c.signature) == params, f"{c.name}: signature {list(c.signature)}, kernel {params}"
        consts = [n for n, t in c.signature.items() if t == "constexpr"]
        assert sorted(c.constexprs) == sorted(consts), f"{c.name}: constexprs {sorted(c.constexprs)}"
        assert c.num_warps in (4, 8) and all(i < len(params) for i in c.divisible)
    by_name = {c.name: c for c in cases}
    readme = by_name["search_select_readme"]
    assert readme.default and readme.constexprs["T"] == 32 and readme.constexprs["ONE_CHUNK"]
    assert not by_name["search_select_keys16384"].constexprs["ONE_CHUNK"]
    assert max(c.constexprs["T"] for c in cases) == ti.MAX_TOPK


@pytest.mark.cuda
@pytest.mark.parametrize(
    "K,topk,dtype", [(256, 32, torch.float32), (1024, 32, torch.bfloat16), (512, 64, torch.float16),
                     (4096, 128, torch.float32), (1024, 256, torch.bfloat16)]
)
def test_cuda_search_real_sizes(K, topk, dtype):
    check_search(*exact_inputs(64, 4, K, 128, dtype, "cuda", lo=-2, hi=2), topk)
    check_search(*exact_inputs(8, 4, K, 128, dtype, "cuda", lo=0, hi=0), topk)  # all ties


@pytest.mark.parametrize("n", [1, 5])  # one token takes the decoding step's own product
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_autocast_scores_in_float32_on_every_path(backend, n):
    """Under bf16 autocast the sub-key scores stay float32 (the specification), so a decoding step
    selects what a batched call selects, and the triton selection gets the float32 scores it takes."""
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(n, 3, 2, 16, generator=gen)
    keys = torch.randn(3, 64, 2, 16, generator=gen).transpose(1, 2)  # a layer's keys: a transposed view
    with use_backend(backend):
        want_scores, want_slots = entry.search(q, keys, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores, slots = entry.search(q, keys, 8)
    assert scores.dtype == torch.float32
    assert torch.equal(slots, want_slots)
    assert_close(scores, want_scores, rtol=0, atol=0)
