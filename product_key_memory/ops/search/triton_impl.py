"""Product-key search on a GPU: sub-key scores by GEMM, then one fused Triton selection kernel.

1. **Scores.** Both halves' sub-key scores of every token come from the GEMMs of the ``torch``
   backend (:func:`.torch_impl._both_half_scores`: one batched matrix product per half over all
   tokens, cuBLAS on a GPU), into one ``(2, heads, N, num_keys)`` float32 buffer. Each head's key
   table is read once per GEMM tile of tokens instead of once per token, and the scores are the
   ``torch`` backend's bit for bit, so both backends select the same slots.
2. **Selection** (:func:`_select_kernel`), ``BLOCK_M`` rows ``(head, token)`` per program:

   * every score becomes one *packed* int64 key: an order-preserving integer code of the float32
     score in the high 32 bits and ``2**32 - 1 - index`` in the low 32 bits, so the larger key is
     the better (score descending, then index ascending: the library's tie rule), every key is
     distinct, and the score decodes back exactly. ``-0.0`` is folded into ``+0.0`` first.
     Non-finite scores are bounded first (:func:`.reference.bounded_scores`).
   * each half's top-``T`` (``T = next_power_of_2(topk)``) by a bitonic top-k (:func:`_topk_rows`) over
     chunks of at most ``CHUNK`` keys, merging each chunk's best into the running best: registers
     do not grow with ``num_keys``.
   * the final top-``topk`` over the *compact* candidate list only, the pairs
     ``(a + 1) * (b + 1) <= topk`` of the two sorted lists (:func:`..search.candidate_pairs`; 119
     of the 1024 pairs at ``topk = 32``), their sums rounded to float32 as :mod:`.reference` does.
     The two lists reach the candidates through a small scratch buffer (``2 * T`` int64 a row,
     read back from L1): ``tl.gather`` from registers holds a whole list in every thread, which
     spilled from ``topk = 128`` on sm_90; with the scratch every case of :func:`compile_cases`
     builds without spills.

Configurations past :data:`MAX_TOPK` are not launched: :func:`fits` says which, and the op's entry
hands them to the ``torch`` backend. The kernel sees float32 scores whatever the input dtype (the
GEMMs score bfloat16 and float16 inputs in float32, as :func:`.reference.score_dtype` says), so
there is no per-dtype variant.
Specification: :mod:`.reference`. :func:`compile_cases` lists the kernel variants to build for a
GPU target (``tests/ops/test_triton_compile.py``).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._buffers import outside_inference_mode
from .._triton import CompileCase, check_device, interpreted
from . import reference, torch_impl

__all__ = ["MAX_TOPK", "CHUNK", "fits", "launch_config", "search", "search_heads_first", "select", "compile_cases"]

# the largest topk the kernel runs (at 256 the candidate list is 1,466 pairs, 2,048 keys in registers):
# the largest the tests run. sm_90 builds of one row at 8 warps showed no spills at 512 (119 registers)
# and 1,024 (229, near the 255 limit); past 256 the torch backend answers instead
MAX_TOPK = 256
# sub-keys scored per step of a half's top-k: the README layer's 256 and 1,024-key tables in one step
CHUNK = 1024
# the same under Triton's interpreter, which pays per operation rather than per element: whole tables
# up to MAX_NUM_KEYS in one step (tests pass a small chunk to run the steps)
_INTERPRETED_CHUNK = reference.MAX_NUM_KEYS
# keys (int64) one program holds at a time: rows per program are chosen to fill it. A table in several
# chunks holds a chunk, the running best and their merge at once: half as many keys (at 2,048 the
# 16,384-key table spilled 40 bytes on sm_90)
_PROGRAM_KEYS = 2048

# reference.SCORE_BOUND (test_search.py runs both on non-finite input)
SCORE_BOUND: tl.constexpr = tl.constexpr(reference.SCORE_BOUND)


@triton.jit
def _lowest():
    return tl.full((), 1, tl.int64) << 63  # INT64_MIN: below every packed key


@triton.jit
def _low32():
    return tl.full((), 0xFFFFFFFF, tl.int64)


@triton.jit
def _pack(score, index):
    """float32 score, integer index in ``[0, 2**32)`` -> int64 key; larger key = higher score, then lower index.

    The low 32 bits are an unsigned field below the signed code, so int64 order is (code, low bits).
    """
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 == +0.0
    bits = score.to(tl.int32, bitcast=True)
    code = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone signed code of the float
    return (code.to(tl.int64) << 32) | (_low32() - index.to(tl.int64))


@triton.jit
def _unpack(key):
    code = (key >> 32).to(tl.int32)
    bits = code ^ ((code >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), _low32() - (key & _low32())


# -- bitonic top-k on max/min pair exchanges --------------------------------------------------------------
# The bitonic top-k (Shanbhag, Pirk and Madden, SIGMOD 2018; what tl.topk runs): view the row as
# a hypercube of 2 ** n positions, sort blocks of k by bitonic merges, then repeatedly keep the larger of
# each pair k apart (halving the row) and re-merge. tl.topk finds each position's partner with an XOR
# reduction, which Triton's interpreter runs element by element in Python (44 s a call at 65,536 keys); here
# the pair of a hypercube axis is exchanged with a max and a min over that axis instead: the same
# result for distinct keys, plain reductions on a GPU, numpy speed under the interpreter.


@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@triton.jit
def _axis_bit(n_dims: tl.constexpr, axis: tl.constexpr):
    """0 on the first, 1 on the second position of hypercube ``axis``, shaped to broadcast."""
    return tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (n_dims - axis - 1))


@triton.jit
def _exchange(h, descending, bit: tl.constexpr):
    """Order each pair of positions differing in ``bit`` of the row index (``descending``: 0, 1, or a
    per-position 0/1 tensor), larger first where descending."""
    n_dims: tl.constexpr = len(h.shape)
    axis: tl.constexpr = n_dims - 1 - bit
    hi = tl.max(h, axis=axis, keep_dims=True)
    lo = tl.min(h, axis=axis, keep_dims=True)
    second = _axis_bit(n_dims, axis)
    return tl.where((second ^ descending) != 0, hi, lo)


@triton.jit
def _merge(h, stage: tl.constexpr, order: tl.constexpr):
    """Bitonic merge of blocks of ``2 ** stage``: ``order`` 0 ascending, 1 descending, 2 alternating
    (descending where bit ``stage`` of the position is 1)."""
    n_dims: tl.constexpr = len(h.shape)
    if order == 2:
        descending = _axis_bit(n_dims, n_dims - 1 - stage)
    else:
        descending = order
    for i in tl.static_range(stage):
        h = _exchange(h, descending, stage - 1 - i)
    return h


@triton.jit
def _topk_rows(x, K: tl.constexpr):
    """The ``K`` largest of each row of ``x`` ``(M, N)`` (powers of two, ``2 <= K <= N``), best first."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    LOG_N: tl.constexpr = _log2(N)
    LOG_K: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(M * N))
    for i in tl.static_range(1, LOG_K + 1):  # blocks of K sorted, alternately descending and ascending
        h = _merge(h, i, 2 if i < LOG_N else 1)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):  # the larger of each pair K apart, then re-sorted
        h = tl.max(h, axis=len(h.shape) - 1 - LOG_K)
        h = _merge(h, LOG_K, 2 if i < LOG_N else 1)
    return tl.reshape(h, (M, K))


@triton.jit
def _chunk_keys(s_ptr, row_off, row_ok, kk, K):
    """Packed keys ``(BLOCK_M, CHUNK)`` of sub-keys ``kk`` of each row; INT64_MIN past ``K`` and past the rows."""
    ok = row_ok[:, None] & (kk < K)[None, :]
    s = tl.load(s_ptr + row_off[:, None] + kk[None, :], mask=ok, other=0.0)
    # the rule for non-finite inputs (reference.bounded_scores): NaN and -inf to -2**125, +inf to 2**125
    s = tl.where(s == s, s, -SCORE_BOUND)
    s = tl.where(s > SCORE_BOUND, SCORE_BOUND, tl.where(s < -SCORE_BOUND, -SCORE_BOUND, s))
    return tl.where(ok, _pack(s, kk[None, :]), _lowest())


@triton.jit
def _half_best(s_ptr, row_off, row_ok, K, BLOCK_M: tl.constexpr, T: tl.constexpr, CH: tl.constexpr,
               ONE_CHUNK: tl.constexpr):
    """The ``T`` best packed keys ``(BLOCK_M, T)`` of one half's sub-key scores, best first."""
    offs = tl.arange(0, CH)
    if ONE_CHUNK:
        best = _topk_rows(_chunk_keys(s_ptr, row_off, row_ok, offs, K), T)
    else:
        # all keys are distinct, so the best T of a union are the best T of the parts' best T
        best = tl.full((BLOCK_M, T), 1, tl.int64) << 63
        for k0 in range(0, K, CH):
            top = _topk_rows(_chunk_keys(s_ptr, row_off, row_ok, k0 + offs, K), T)
            best = _topk_rows(tl.reshape(tl.join(best, top), (BLOCK_M, 2 * T)), T)
    return best


@triton.jit
def _select_kernel(
    s_ptr, pairs_ptr, scratch_ptr, scores_ptr, slots_ptr,
    rows, N, K, topk, num_pairs,
    stride_sp, stride_sh, stride_sn,
    BLOCK_M: tl.constexpr, T: tl.constexpr, CH: tl.constexpr, ONE_CHUNK: tl.constexpr, P: tl.constexpr,
):
    """Rows ``r = h * N + n`` of sub-key scores ``s[p, h, n, :]`` (unit last stride) -> the ``topk``
    best ``scores`` (float32) and ``slots`` (int64) of each row, best first, at ``r * topk``.
    ``scratch`` holds ``2 * T`` int64 per row, rounded up to whole programs."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    row_off = (r // N) * stride_sh + (r % N) * stride_sn
    best1 = _half_best(s_ptr, row_off, row_ok, K, BLOCK_M, T, CH, ONE_CHUNK)
    best2 = _half_best(s_ptr + stride_sp, row_off, row_ok, K, BLOCK_M, T, CH, ONE_CHUNK)

    # both sorted lists through a scratch row (L1-resident): tl.gather from registers keeps a whole list
    # per thread, which spills from topk = 128 (sm_90)
    t = tl.arange(0, T)
    lists = scratch_ptr + r[:, None] * (2 * T) + t[None, :]
    tl.store(lists, best1)
    tl.store(lists + T, best2)
    tl.debug_barrier()  # the stores above are seen by every thread of the program

    # the compact candidate list: positions (a, b) in the two sorted lists with (a + 1) * (b + 1) <= topk
    p = tl.arange(0, P)
    p_ok = p < num_pairs
    a = tl.load(pairs_ptr + p, mask=p_ok, other=0)
    b = tl.load(pairs_ptr + P + p, mask=p_ok, other=0)
    mine = row_ok[:, None] & p_ok[None, :]
    row_lists = scratch_ptr + r[:, None] * (2 * T)
    s1, i1 = _unpack(tl.load(row_lists + a[None, :], mask=mine, other=0))
    s2, i2 = _unpack(tl.load(row_lists + T + b[None, :], mask=mine, other=0))
    cand = tl.where(p_ok[None, :], _pack(s1 + s2, i1 * K + i2), _lowest())  # the float32 sum, as the reference
    scores, slots = _unpack(_topk_rows(cand, T))

    j = tl.arange(0, T)
    out = r[:, None] * topk + j[None, :]
    ok = row_ok[:, None] & (j < topk)[None, :]
    tl.store(scores_ptr + out, scores, mask=ok)
    tl.store(slots_ptr + out, slots, mask=ok)


def fits(num_keys: int, topk: int) -> bool:
    """Whether the kernel runs ``topk`` of ``num_keys ** 2`` slots (without spilling registers: the
    default cases of :func:`compile_cases`); the op's entry hands other configurations to ``torch``."""
    return 1 <= topk <= min(num_keys, MAX_TOPK) and num_keys <= reference.MAX_NUM_KEYS


def _num_pairs(topk: int) -> int:
    return sum(topk // (a + 1) for a in range(topk))  # the length of candidate_pairs(topk)


def launch_config(rows: int, num_keys: int, topk: int, chunk: int = CHUNK) -> dict:
    """The selection kernel's constexprs and ``num_warps`` for ``rows`` rows, scoring at most ``chunk``
    (a power of two) sub-keys per step (the one place they are chosen)."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    t = max(triton.next_power_of_2(topk), 2)  # 2, not 1: a bitonic top-1 has no pairs to exchange
    ch = max(min(triton.next_power_of_2(num_keys), chunk), t)
    p = max(triton.next_power_of_2(_num_pairs(topk)), t)
    width = max(ch, p)
    one_chunk = num_keys <= ch
    program_keys = _PROGRAM_KEYS if one_chunk else _PROGRAM_KEYS // 2
    block_m = max(1, min(program_keys // width, triton.next_power_of_2(max(rows, 1))))
    return dict(BLOCK_M=block_m, T=t, CH=ch, ONE_CHUNK=one_chunk, P=p,
                # sm_90 spilled at 1,024 keys a row on 4 warps, and at 8 rows of 256 keys on 8 warps
                num_warps=4 if width < 1024 else 8)


@functools.lru_cache(maxsize=64)
def _pair_table(topk: int, p: int, device: torch.device) -> Tensor:
    """``candidate_pairs(topk)`` as int32 ``(2, p)``, zero-padded to ``p`` columns (cached: never written)."""
    with outside_inference_mode():
        pairs = torch_impl.cached_candidate_pairs(topk, device)
        table = torch.zeros(2, p, dtype=torch.int32, device=device)
        table[:, : pairs.shape[1]] = pairs
        return table


def select(sub: Tensor, topk: int, *, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Sub-key scores ``(2, heads, N, num_keys)`` float32 (unit last stride) -> ``scores`` float32 and
    ``slots`` int64, heads first ``(heads, N, topk)``, best first, the lower slot first on ties.

    ``chunk``: sub-keys scored per step (a power of two; :data:`CHUNK` by default, the whole table under
    the interpreter)."""
    if sub.dim() != 4 or sub.shape[0] != 2 or sub.dtype != torch.float32 or sub.stride(-1) != 1:
        raise ValueError(
            "sub must be float32 (2, heads, N, num_keys) with a unit last stride, got "
            f"{sub.dtype} {tuple(sub.shape)} strides {sub.stride()}"
        )
    _, heads, n, num_keys = sub.shape
    if not fits(num_keys, topk):
        raise ValueError(
            f"topk must be in [1, min(num_keys, {MAX_TOPK})] and num_keys at most {reference.MAX_NUM_KEYS} for "
            f"the search kernel (the op's entry hands larger ones to torch), got topk={topk}, num_keys={num_keys}"
        )
    check_device("search", _select_kernel, sub=sub)
    scores = torch.empty(heads, n, topk, dtype=torch.float32, device=sub.device)
    slots = torch.empty(heads, n, topk, dtype=torch.int64, device=sub.device)
    rows = heads * n
    if rows == 0:
        return scores, slots
    if chunk is None:
        chunk = _INTERPRETED_CHUNK if interpreted(_select_kernel) else CHUNK
    cfg = launch_config(rows, num_keys, topk, chunk)
    pairs = _pair_table(topk, cfg["P"], sub.device)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]),)
    scratch = torch.empty(grid[0] * cfg["BLOCK_M"], 2, cfg["T"], dtype=torch.int64, device=sub.device)
    _select_kernel[grid](
        sub, pairs, scratch, scores, slots,
        rows, n, num_keys, topk, _num_pairs(topk),
        sub.stride(0), sub.stride(1), sub.stride(2),
        **cfg,
    )
    return scores, slots


def search_heads_first(
    queries: Tensor, keys: Tensor, topk: int, *, chunk: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """:func:`search` in the layouts a layer holds: queries ``(N, 2, heads, dim_key)``, keys
    ``(heads, num_keys, 2, dim_key)`` -> ``scores, slots`` ``(heads, N, topk)``. No autograd."""
    if torch.float64 in (queries.dtype, keys.dtype):
        raise TypeError(
            f"the search kernel scores in float32; got queries {queries.dtype} and keys {keys.dtype} (the op's "
            "entry hands float64 to the torch backend)"
        )
    check_device("search", _select_kernel, queries=queries, keys=keys)
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    sub = torch_impl._both_half_scores(queries, keys, torch.float32)  # (2, H, N, K), the torch backend's GEMMs
    return select(sub, topk, chunk=chunk)


def search(queries: Tensor, keys: Tensor, topk: int, *, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(N, heads, 2, dim_key)`` queries, ``(heads, 2, num_keys, dim_key)`` keys -> ``scores`` float32,
    ``slots`` int64 ``(N, heads, topk)`` (views of heads-first results), best first: score descending,
    then slot ``i1 * num_keys + i2`` ascending. Any strides with a unit last stride. ``chunk``: as :func:`select`."""
    if queries.dim() != 4 or queries.shape[2] != 2:
        raise ValueError(f"queries must be (N, heads, 2, dim_key), got shape {tuple(queries.shape)}")
    if keys.dim() != 4 or keys.shape[1] != 2:
        raise ValueError(f"keys must be (heads, 2, num_keys, dim_key), got shape {tuple(keys.shape)}")
    heads, dim_key, num_keys = queries.shape[1], queries.shape[3], keys.shape[2]
    if keys.shape[0] != heads or keys.shape[3] != dim_key:
        raise ValueError(f"keys {tuple(keys.shape)} do not match queries {tuple(queries.shape)} (heads, dim_key)")
    if not 1 <= topk <= num_keys:
        raise ValueError(f"topk must be in [1, num_keys={num_keys}], got {topk}")
    scores, slots = search_heads_first(queries.transpose(1, 2), keys.transpose(1, 2), topk, chunk=chunk)
    return scores.transpose(0, 1), slots.transpose(0, 1)  # (N, H, topk)


# -- kernel variants to build ahead of time (tests/ops/test_triton_compile.py) ------------------------------

_SIGNATURE = dict(
    s_ptr="*fp32", pairs_ptr="*i32", scratch_ptr="*i64", scores_ptr="*fp32", slots_ptr="*i64",
    rows="i32", N="i32", K="i32", topk="i32", num_pairs="i32",
    stride_sp="i64", stride_sh="i64", stride_sn="i64",
    BLOCK_M="constexpr", T="constexpr", CH="constexpr", ONE_CHUNK="constexpr", P="constexpr",
)


def compile_cases() -> List[CompileCase]:
    """Every selection-kernel variant :func:`launch_config` gives, at the README layer, the test sizes and the
    extremes :func:`fits` allows (``default``: those the library launches at common layer sizes)."""
    cases = []
    # (name, tokens, heads, num_keys, topk, default)
    for name, n, heads, num_keys, topk, default in [
        ("readme", 8192, 4, 256, 32, True),  # dim_head 128: half-queries of 64, 256 x 256 slots
        ("keys1024", 8192, 4, 1024, 32, True),
        ("tiny", 3, 2, 5, 1, False),
        ("odd", 7, 3, 130, 33, False),
        ("topk64", 8192, 4, 1024, 64, True),
        ("topk128", 8192, 4, 1024, 128, True),
        ("topk256", 8192, 4, 1024, 256, True),
        ("keys16384", 8192, 4, 16384, 32, True),  # several chunks per half
        ("keys65536_topk256", 64, 4, 65536, 256, False),
        ("decode", 1, 4, 256, 32, True),  # one token
    ]:
        cfg = launch_config(n * heads, num_keys, topk)
        num_warps = cfg.pop("num_warps")
        cases.append(CompileCase(
            name=f"search_select_{name}", kernel=_select_kernel, signature=_SIGNATURE, constexprs=cfg,
            num_warps=num_warps, divisible=(0, 1, 2, 3, 4), default=default,
        ))
    return cases
