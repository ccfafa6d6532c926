"""ImplicitValues (UltraMem's implicit value expansion): against an explicitly expanded table built here."""

import pytest
import torch
from torch.testing import assert_close

from product_key_memory import EmbeddingValues, ValueTable, build_optimizer, fetch_optimizer_parameters
from product_key_memory.tables import ImplicitValues

SLOTS, DIM, EXPANSION, VALUE_DIM = 48, 5, 4, 6


def expanded(table: ImplicitValues) -> torch.Tensor:
    """The explicit ``(virtual_slots, chunks, dim)`` table: slot ``s``, piece ``c`` is ``W_g`` times the row
    with all but piece ``c`` zeroed, ``(row, g)`` from the mapping, ``W_g`` the group's columns of ``proj``."""
    p = table.mapping
    rows = (p % table.rows + table.offset) % table.store.num_slots
    groups = p // table.rows
    piece = table.value_dim // table.chunks
    out = torch.zeros(table.virtual_slots, table.chunks, table.dim, dtype=table.proj.weight.dtype)
    for s in range(table.virtual_slots):
        w = table.proj.weight[:, groups[s] * table.value_dim:(groups[s] + 1) * table.value_dim]  # (dim, value_dim)
        row = table.store.weight[rows[s]]
        for c in range(table.chunks):
            masked = torch.zeros_like(row)
            masked[c * piece:(c + 1) * piece] = row[c * piece:(c + 1) * piece]
            out[s, c] = w @ masked
    return out


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_read_is_the_explicitly_expanded_table(chunks):
    table = ImplicitValues(SLOTS, DIM, expansion=EXPANSION, value_dim=VALUE_DIM, chunks=chunks, dtype=torch.float64)
    assert table.store.num_slots == SLOTS // EXPANSION and table.num_slots == SLOTS * chunks
    big = expanded(table).flatten(0, 1)  # (SLOTS * chunks, dim): slot s * chunks + c is piece c of slot s
    idx = torch.randint(0, SLOTS * chunks, (3, 4, 7))
    w = torch.randn(3, 4, 7, dtype=torch.float64)
    assert_close(table(idx, w), torch.einsum("...m,...md->...d", w, big[idx]), msg="weighted")
    assert_close(table(idx, None), big[idx].sum(-2), msg="unweighted")
    whole = torch.randint(0, SLOTS, (5, 3)).unsqueeze(-1) * chunks + torch.arange(chunks)  # every piece of a slot
    rows, groups = table.physical(whole[..., 0] // chunks)
    want = torch.stack([table.proj.weight[:, g * VALUE_DIM:(g + 1) * VALUE_DIM] @ table.store.weight[r]
                        for r, g in zip(rows.flatten(), groups.flatten())]).view(5, 3, DIM).sum(1)
    assert_close(table(whole.flatten(-2), None), want, msg="all pieces of a slot read the whole row")
    assert_close(table(whole.flatten(-2), None, whole_slots=True), want, msg="whole_slots, unweighted")
    ww = torch.randn(5, 3 * chunks, dtype=torch.float64)
    assert_close(table(whole.flatten(-2), ww, whole_slots=True),
                 torch.einsum("...m,...md->...d", ww, big[whole.flatten(-2)]), msg="whole_slots, weighted")


def test_every_row_serves_expansion_slots():
    table = ImplicitValues(SLOTS, DIM, expansion=EXPANSION, value_dim=VALUE_DIM)
    assert torch.equal(torch.sort(table.mapping).values, torch.arange(SLOTS)), "the mapping is a permutation"
    rows, groups = table.physical(torch.arange(SLOTS))
    pairs = set(zip(rows.tolist(), groups.tolist()))
    assert len(pairs) == SLOTS, "each virtual slot is a distinct (row, projection) pair"
    assert torch.equal(torch.bincount(rows), torch.full((SLOTS // EXPANSION,), EXPANSION))


def test_shared_rows_with_offsets():
    pool = EmbeddingValues(2 * SLOTS // EXPANSION, VALUE_DIM, dtype=torch.float64)
    a = ImplicitValues(SLOTS, DIM, expansion=EXPANSION, values=pool, dtype=torch.float64)
    b = ImplicitValues(SLOTS, DIM, expansion=EXPANSION, values=pool, offset=SLOTS // EXPANSION, dtype=torch.float64)
    assert a.store is b.store
    ra, _ = a.physical(torch.arange(SLOTS))
    rb, _ = b.physical(torch.arange(SLOTS))
    assert ra.max() < SLOTS // EXPANSION <= rb.min(), "the second layer reads the pool's second half"
    idx = torch.randint(0, SLOTS, (5, 3))
    w = torch.randn(5, 3, dtype=torch.float64)
    assert_close(b(idx, w), torch.einsum("...m,...md->...d", w, expanded(b)[idx].sum(-2)))
    wrapped = ImplicitValues(SLOTS, DIM, expansion=EXPANSION, values=pool, offset=len(pool.weight) - 1)
    r, _ = wrapped.physical(torch.arange(SLOTS))
    assert torch.equal(r, (wrapped.mapping % wrapped.rows + len(pool.weight) - 1) % len(pool.weight))
    groups = fetch_optimizer_parameters(torch.nn.ModuleList([a, b]))
    assert [p for p in groups[1]["params"]] == [pool.weight], "the shared rows are one value parameter"
    assert {id(p) for p in groups[0]["params"]} == {id(a.proj.weight), id(b.proj.weight)}


def test_optimizer_makes_the_rows_sparse_and_the_projection_dense():
    table = ImplicitValues(SLOTS, DIM, expansion=EXPANSION, value_dim=VALUE_DIM)
    opt = build_optimizer(table)
    assert table.store.sparse and not table.sparse
    table(torch.randint(0, SLOTS, (4, 3)), torch.randn(4, 3)).sum().backward()
    assert table.store.weight.grad.is_sparse and not table.proj.weight.grad.is_sparse
    opt.step()


def test_gradcheck_float64():
    table = ImplicitValues(12, 3, expansion=3, value_dim=4, chunks=2, dtype=torch.float64)
    idx = torch.randint(0, 24, (2, 5))
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *_: table(idx, w), (w, table.store.weight, table.proj.weight))
    whole = (torch.randint(0, 12, (2, 3)).unsqueeze(-1) * 2 + torch.arange(2)).flatten(-2)  # every piece of a slot
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *_: table(whole, w, whole_slots=True),
                                    (w, table.store.weight, table.proj.weight))


def test_is_a_value_table_and_checks_arguments():
    table = ImplicitValues(SLOTS, DIM, expansion=EXPANSION)
    assert isinstance(table, ValueTable) and table.value_dim == DIM
    assert list(table.value_parameters()) == [table.store.weight]
    with pytest.raises(ValueError, match="expansion"):
        ImplicitValues(SLOTS, DIM, expansion=5)
    with pytest.raises(ValueError, match="virtual_slots"):
        ImplicitValues(0, DIM)
    with pytest.raises(ValueError, match="chunks"):
        ImplicitValues(SLOTS, DIM, value_dim=5, chunks=2)
    with pytest.raises(ValueError, match="offset"):
        ImplicitValues(SLOTS, DIM, offset=-1)
    with pytest.raises(ValueError, match="value_dim"):
        ImplicitValues(SLOTS, DIM, values=EmbeddingValues(12, 4), value_dim=5)
    with pytest.raises(TypeError, match="values"):
        ImplicitValues(SLOTS, DIM, values=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="trainable"):
        table(torch.zeros(1, 2, dtype=torch.long), None, trainable=torch.ones(SLOTS, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        table(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match="whole_slots"):
        ImplicitValues(SLOTS, DIM, expansion=EXPANSION, value_dim=VALUE_DIM, chunks=2)(
            torch.zeros(1, 3, dtype=torch.long), whole_slots=True)


def test_usage_tracker_counts_the_pieces_read():
    from product_key_memory import MemoryUsageTracker

    table = ImplicitValues(SLOTS, DIM, expansion=EXPANSION, value_dim=VALUE_DIM, chunks=2)
    idx = torch.randint(0, 2 * SLOTS, (4, 6))
    with MemoryUsageTracker(torch.nn.ModuleDict(dict(mem=table))) as tracker:
        table(idx, torch.rand(4, 6) + 0.1)
    reads = tracker.counts("mem")["reads"]
    assert torch.equal(reads, torch.bincount(idx.flatten(), minlength=2 * SLOTS).to(reads.dtype))


def test_quantize_values_quantizes_the_shared_rows_once():
    from product_key_memory import quantize_values_
    from product_key_memory.tables import QuantizedValues

    pool = EmbeddingValues(2 * SLOTS // EXPANSION, VALUE_DIM)
    model = torch.nn.ModuleList([ImplicitValues(SLOTS, DIM, expansion=EXPANSION, values=pool, offset=i * 12)
                                 for i in range(2)])
    idx, w = torch.randint(0, SLOTS, (4, 3)), torch.randn(4, 3)
    want = [t(idx, w) for t in model]
    quantize_values_(model, torch.bfloat16)
    assert isinstance(model[0].store, QuantizedValues) and model[0].store is model[1].store
    for t, ref in zip(model, want):
        assert_close(t(idx, w), ref, rtol=2e-2, atol=2e-2)
