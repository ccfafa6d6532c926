"""clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ (dense) and the dense equivalent (sparse).

The sharded case runs in tests/training/test_distributed.py (2 gloo processes against one).
"""

import math

import pytest
import torch
from torch import nn

from product_key_memory import PKM, build_optimizer, clip_grad_norm_

NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5]


def _params(sizes=((5, 3), (4,), (2, 2, 2)), scale=1.0):
    params = [nn.Parameter(torch.randn(s)) for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape) * scale
    return params


def _clone(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipping, and a scale of 1
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_dense_equals_torch_bit_for_bit(norm_type, max_norm):
    ours = _params()
    ref = _clone(ours)
    ours[1].grad = None  # a parameter without a gradient is skipped
    ref[1].grad = None
    total = clip_grad_norm_(ours, max_norm, norm_type)
    expected = nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert torch.equal(total, expected)
    for p, q in zip(ours, ref):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_module_generator_and_single_tensor_like_torch():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    twin = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    assert torch.equal(clip_grad_norm_(model, 0.1), nn.utils.clip_grad_norm_(twin.parameters(), 0.1))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    (p,) = _params(((3,),))
    (q,) = _clone([p])
    assert torch.equal(clip_grad_norm_(p, 0.1), nn.utils.clip_grad_norm_(q, 0.1))
    assert torch.equal(p.grad, q.grad)
    assert torch.equal(clip_grad_norm_([nn.Parameter(torch.zeros(2))], 1.0), torch.tensor(0.0))
    with pytest.raises(TypeError, match="parameters"):
        clip_grad_norm_([p, "not a tensor"], 1.0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_error_if_nonfinite_like_torch(norm_type):
    for bad in (float("nan"), float("inf")):
        ours = _params()
        ours[0].grad[1, 1] = bad
        ref = _clone(ours)
        with pytest.raises(RuntimeError, match="non-finite") as ours_error:
            clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)
        with pytest.raises(RuntimeError, match="non-finite") as torch_error:
            nn.utils.clip_grad_norm_(ref, 1.0, norm_type, error_if_nonfinite=True)
        assert str(ours_error.value) == str(torch_error.value)
        for p, q in zip(ours, ref):  # nothing scaled
            torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, equal_nan=True)
        total = clip_grad_norm_(ours, 1.0, norm_type)  # error_if_nonfinite=False: scaled by it, as torch
        expected = nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
        assert torch.equal(total, expected) or (total.isnan() and expected.isnan())


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_sparse_and_uncoalesced_gradients_count_as_their_dense_sum(norm_type):
    table = nn.Parameter(torch.randn(10, 4))
    rows = torch.tensor([[3, 1, 3, 7, 1]])  # repeated, unsorted: the norm must see row 3 = sum of two rows
    table.grad = torch.sparse_coo_tensor(rows, torch.randn(5, 4), table.shape)
    assert not table.grad.is_coalesced()
    (other,) = _params(((6,),))
    dense_table = nn.Parameter(table.detach().clone())
    dense_table.grad = table.grad.to_dense()
    (dense_other,) = _clone([other])
    total = clip_grad_norm_([table, other], 0.3, norm_type)
    expected = nn.utils.clip_grad_norm_([dense_table, dense_other], 0.3, norm_type)
    torch.testing.assert_close(total, expected)
    assert table.grad.is_sparse, "the gradient stays sparse"
    torch.testing.assert_close(table.grad.to_dense(), dense_table.grad)
    torch.testing.assert_close(other.grad, dense_other.grad)


def test_works_after_build_optimizer_where_torch_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), PKM(16, heads=2, num_keys=8, topk=3, dim_head=4))
    opt = build_optimizer(model)
    model(torch.randn(6, 16)).square().sum().backward()
    table = model[1].values.weight
    assert table.grad.is_sparse
    with pytest.raises(NotImplementedError):  # the reason this function exists
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.to_dense().reshape(-1) for p in model.parameters()]))
    total = clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(total, expected)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.to_dense().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)
    opt.step()


def test_uncoalesced_sparse_gradient_is_clipped_without_a_host_read():
    """The triton backend's gradient (one entry per read, repeats) is summed by a segmented sum of fixed
    size, not ``coalesce()`` (whose size depends on the data: a read back from a GPU)."""
    from .test_step_no_sync import SyncRecorder

    table = nn.Parameter(torch.randn(10, 4))
    table.grad = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3, 7, 1]]), torch.randn(5, 4), table.shape)
    dense = nn.Parameter(table.detach().clone())
    dense.grad = table.grad.to_dense()
    (other,) = _params(((6,),))
    (dense_other,) = _clone([other])
    with SyncRecorder() as rec:
        total = clip_grad_norm_([table, other], 0.3)
    assert rec.seen == [], rec.seen
    torch.testing.assert_close(total, nn.utils.clip_grad_norm_([dense, dense_other], 0.3))
    torch.testing.assert_close(table.grad.to_dense(), dense.grad)
