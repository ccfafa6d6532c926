"""EmbeddingValues on its own: a read is the plain gather-and-sum of rows written here, its gradient too."""

import pytest
import torch

from product_key_memory import EmbeddingValues, ValueTable

NUM_SLOTS, DIM = 40, 8
# the reference runs in float64; a table computes in its own dtype
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def gather_sum(weight, indices, weights):
    """``out[..., :] = sum_j weights[..., j] * weight[indices[..., j]]`` (an unweighted sum for ``None``)."""
    rows = weight[indices.long()]  # (..., m, dim)
    if weights is None:
        return rows.sum(-2)
    return (rows * weights.unsqueeze(-1)).sum(-2)


def read_inputs(lead, m=5, with_weights=True, index_dtype=torch.long):
    indices = torch.randint(0, NUM_SLOTS, (*lead, m)).to(index_dtype)  # repeats included
    weights = torch.randn(*lead, m, dtype=torch.float64) if with_weights else None
    return indices, weights


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (6,), (2, 3)], ids=["m", "N,m", "B,T,m"])
@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "None"])
def test_read_and_gradients_equal_gather_and_sum(dtype, lead, with_weights):
    table = EmbeddingValues(NUM_SLOTS, DIM, dtype=dtype)
    indices, weights = read_inputs(lead, with_weights=with_weights)
    w = None if weights is None else weights.float().requires_grad_(True)
    got = table(indices, w)
    what = f"{dtype}, indices {tuple(indices.shape)}, weights {'given' if with_weights else 'None'}"
    assert got.shape == (*lead, DIM) and got.dtype == dtype, f"{what}: got {tuple(got.shape)} {got.dtype}"

    ref_weight = table.weight.detach().double().requires_grad_(True)
    ref_w = None if w is None else w.detach().double().requires_grad_(True)
    want = gather_sum(ref_weight, indices, ref_w)
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype], msg=f"{what}: read")

    g = torch.randn(*lead, DIM, dtype=torch.float64)
    (got * g.to(dtype)).sum().backward()
    (want * g.to(dtype).double()).sum().backward()
    assert not table.weight.grad.is_sparse and table.weight.grad.dtype == dtype
    torch.testing.assert_close(table.weight.grad, ref_weight.grad.to(dtype), **TOL[dtype], msg=f"{what}: grad of table")
    if w is not None:
        assert w.grad.dtype == w.dtype, f"{what}: weights' gradient came back in {w.grad.dtype}"
        tol = TOL[dtype] if dtype != torch.float64 else TOL[torch.float32]
        torch.testing.assert_close(w.grad, ref_w.grad.float(), **tol, msg=f"{what}: grad of weights")


@pytest.mark.parametrize("index_dtype", [torch.long, torch.int32])
def test_int32_indices_read_the_same_rows(index_dtype):
    table = EmbeddingValues(NUM_SLOTS, DIM, dtype=torch.float64)
    indices, weights = read_inputs((4,), index_dtype=index_dtype)
    torch.testing.assert_close(table(indices, weights), gather_sum(table.weight.detach(), indices, weights),
                               **TOL[torch.float64], msg=f"{index_dtype} indices")


def test_float64_gradcheck_of_the_read():
    table = EmbeddingValues(NUM_SLOTS, 3, dtype=torch.float64)
    indices, weights = read_inputs((3,), m=4)
    weight = table.weight.detach().clone().requires_grad_(True)
    weights.requires_grad_(True)
    read = lambda wt, ws: torch.func.functional_call(table, {"weight": wt}, (indices, ws))  # noqa: E731
    assert torch.autograd.gradcheck(read, (weight, weights))


@pytest.mark.parametrize("trainable", [False, True], ids=["all rows", "trainable mask"])
def test_sparse_gradient_holds_exactly_the_rows_read_with_nonzero_weight(trainable):
    table = EmbeddingValues(NUM_SLOTS, DIM, sparse=True, dtype=torch.float64)
    assert table.sparse
    indices, weights = read_inputs((6,))
    weights[:, -1] = 0.0  # the last slot of each bag is padding
    indices = indices % (NUM_SLOTS - 1)
    indices[:, -1] = NUM_SLOTS - 1  # a row read only with weight 0
    mask = torch.rand(NUM_SLOTS) > 0.4 if trainable else None
    # autograd.grad: accumulating into .grad drops the coalesced flag (torch does so for nn.Embedding too)
    (grad,) = torch.autograd.grad(table(indices, weights, trainable=mask).square().sum(), table.weight)
    assert grad.is_sparse and grad.is_coalesced(), "sparse=True did not give a coalesced sparse gradient"

    read = indices[weights != 0].unique()
    if mask is not None:
        read = read[mask[read]]
    assert NUM_SLOTS - 1 not in read.tolist()
    assert torch.equal(grad.indices()[0], read), "the sparse gradient does not hold exactly the rows read"
    ref_weight = table.weight.detach().clone().requires_grad_(True)
    gather_sum(ref_weight, indices, weights).square().sum().backward()
    want = ref_weight.grad if mask is None else ref_weight.grad * mask.unsqueeze(-1)
    torch.testing.assert_close(grad.to_dense(), want, **TOL[torch.float64], msg="sparse gradient values")
    table(indices, weights, trainable=mask).square().sum().backward()
    assert table.weight.grad.is_sparse and torch.equal(table.weight.grad._indices()[0], read), ".grad holds other rows"


def test_trainable_mask_stops_only_the_tables_gradient():
    table = EmbeddingValues(NUM_SLOTS, DIM, dtype=torch.float64)
    indices, weights = read_inputs((6,))
    weights.requires_grad_(True)
    mask = torch.arange(NUM_SLOTS) % 2 == 0
    out = table(indices, weights, trainable=mask)
    torch.testing.assert_close(out, table(indices, weights.detach()), rtol=0, atol=0, msg="the mask changed the read")
    out.sum().backward()
    ref_weight = table.weight.detach().clone().requires_grad_(True)
    ref_w = weights.detach().clone().requires_grad_(True)
    gather_sum(ref_weight, indices, ref_w).sum().backward()
    torch.testing.assert_close(table.weight.grad, ref_weight.grad * mask.unsqueeze(-1), **TOL[torch.float64],
                               msg="rows outside the mask got gradient, or rows inside lost it")
    torch.testing.assert_close(weights.grad, ref_w.grad, **TOL[torch.float64], msg="the mask changed the weights' grad")


def test_inits_and_reset_parameters():
    torch.manual_seed(2)
    table = EmbeddingValues(NUM_SLOTS, DIM)
    torch.manual_seed(2)
    want = torch.empty(NUM_SLOTS, DIM).normal_(std=DIM**-0.5)
    torch.testing.assert_close(table.weight.detach(), want, rtol=0, atol=0, msg="normal init is not N(0, 1 / dim)")
    assert torch.equal(EmbeddingValues(NUM_SLOTS, DIM, init="zeros").weight, torch.zeros(NUM_SLOTS, DIM))
    with torch.no_grad():
        table.weight.fill_(5.0)
    torch.manual_seed(3)
    table.reset_parameters()
    torch.manual_seed(3)
    want = torch.empty(NUM_SLOTS, DIM).normal_(std=DIM**-0.5)
    torch.testing.assert_close(table.weight.detach(), want, rtol=0, atol=0, msg="reset_parameters is not a fresh draw")


def test_sizes_and_the_0_3_0_names():
    table = EmbeddingValues(NUM_SLOTS, DIM, dtype=torch.float64)
    assert isinstance(table, ValueTable)
    assert (table.num_slots, table.dim) == (NUM_SLOTS, DIM)
    assert (table.num_embeddings, table.embedding_dim) == (NUM_SLOTS, DIM), "0.3.0's nn.EmbeddingBag names"
    assert table.weight.shape == (NUM_SLOTS, DIM) and table.weight.dtype == torch.float64
    assert list(table.state_dict()) == ["weight"]
    assert repr(table) == f"EmbeddingValues(num_slots={NUM_SLOTS}, dim={DIM})"
    assert repr(EmbeddingValues(4, 2, sparse=True, init="zeros")) == (
        "EmbeddingValues(num_slots=4, dim=2, sparse=True, init='zeros')")
    table.sparse = True
    assert table.sparse


@pytest.mark.parametrize("make, error, match", [
    (lambda: EmbeddingValues(0, DIM), ValueError, r"^num_slots must be a positive int, got 0"),
    (lambda: EmbeddingValues(NUM_SLOTS, -2), ValueError, r"^dim must be a positive int, got -2"),
    (lambda: EmbeddingValues(NUM_SLOTS, DIM, init="uniform"), ValueError,
     r"^init must be one of \('normal', 'zeros'\), got 'uniform'"),
    (lambda: EmbeddingValues(NUM_SLOTS, DIM, sparse=1), TypeError, r"^sparse must be a bool, got 1"),
])
def test_constructor_errors_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((torch.zeros(3, 2), None), {}, TypeError, r"^indices must be an int64 or int32 tensor, got torch.float32"),
    ((torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 4)), {}, ValueError,
     r"^weights must have the shape of indices \(3, 2\), got \(3, 4\)"),
    ((torch.zeros(3, 2, dtype=torch.long), None), dict(trainable=torch.ones(NUM_SLOTS)), ValueError,
     rf"^trainable must be a bool tensor of shape \({NUM_SLOTS},\), got torch.float32"),
    ((torch.zeros(3, 2, dtype=torch.long), None), dict(trainable=torch.ones(3, dtype=torch.bool)), ValueError,
     rf"^trainable must be a bool tensor of shape \({NUM_SLOTS},\), got torch.bool of shape \(3,\)"),
    ((torch.tensor(1), None), {}, ValueError, r"^indices must have at least one dim"),
])
def test_read_errors_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        EmbeddingValues(NUM_SLOTS, DIM)(*args, **kwargs)
