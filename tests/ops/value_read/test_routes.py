"""The size rule that picks the torch backend's dense read backward (ops/value_read/routes.py), and
both routes against reference.py."""

import pytest
import torch

from product_key_memory.ops.value_read import reference, torch_impl
from product_key_memory.ops.value_read.routes import READ_BACKWARDS, choose_read_backward


def test_small_table_few_reads_take_embedding_bag_on_one_thread():
    assert choose_read_backward(4096, 128**2, 128, torch.float32, 1) == "embedding_bag"
    assert choose_read_backward(32768, 128**2, 128, torch.float32, 1) == "embedding_bag"
    assert choose_read_backward(32768, 128**2, 128, torch.float32, 2) == "sorted"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reads, slots", [(131072, 256**2), (524288, 256**2), (524288, 512**2), (131072, 128**2)])
def test_wide_rows_read_one_to_eight_times_take_embedding_bag(reads, slots, threads):
    assert choose_read_backward(reads, slots, 512, torch.float32, threads) == "embedding_bag"


@pytest.mark.parametrize(
    "reads, slots, dim",
    [(131072, 128**2, 128), (128, 128**2, 512), (4096, 256**2, 128), (32768, 256**2, 512), (524288, 128**2, 512),
     (131072, 1024**2, 512), (131072, 256**2, 256)],
)
def test_large_tables_few_or_many_reads_per_slot_and_narrow_rows_take_sorted(reads, slots, dim):
    assert choose_read_backward(reads, slots, dim, torch.float32, 2) == "sorted"


def test_dtype_scales_the_sizes():
    # a 16 MiB float32 table is 8 MiB in bfloat16
    assert choose_read_backward(4096, 128**2, 256, torch.float32, 1) == "sorted"
    assert choose_read_backward(4096, 128**2, 256, torch.bfloat16, 1) == "embedding_bag"


def test_every_answer_is_a_known_route_and_bad_sizes_raise():
    assert {choose_read_backward(r, 128**2, 128, torch.float32, 1) for r in (1, 10**6)} <= set(READ_BACKWARDS)
    with pytest.raises(ValueError, match="num_reads must be a positive int, got 0"):
        choose_read_backward(0, 10, 10, torch.float32, 1)
    with pytest.raises(TypeError, match="dtype"):
        choose_read_backward(1, 10, 10, "float32", 1)


@pytest.mark.parametrize("with_weights, with_trainable", [(True, False), (True, True), (False, False)])
def test_both_read_backward_routes_give_the_same_gradients(with_weights, with_trainable):
    values = torch.randn(64, 8, dtype=torch.float64)
    idx = torch.randint(0, 64, (10, 6))
    w = torch.rand(10, 6, dtype=torch.float64) if with_weights else None
    if w is not None:
        w[0, :2] = 0.0  # padding reads
    trainable = (torch.rand(64) > 0.3) if with_trainable else None
    g = torch.randn(10, 8, dtype=torch.float64)
    want = reference.value_read_backward(g, values, idx, w, trainable, True, True)
    bag = torch_impl.value_read_backward_bag(g, values, idx, w, trainable, True)
    srt = torch_impl.value_read_backward_sorted(g, values, idx, w, trainable, True, True)
    for name, got in (("embedding_bag", bag), ("sorted", srt)):
        torch.testing.assert_close(got[0], want[0], msg=f"{name} route: value gradient")
        if w is None:
            assert got[1] is None, f"{name} route: a weight gradient without weights"
        else:
            torch.testing.assert_close(got[1], want[1], msg=f"{name} route: weight gradient")


def test_small_table_backward_takes_the_embedding_bag_route(monkeypatch):
    from product_key_memory import functional as PF

    calls = []
    real = torch_impl.value_read_backward_bag
    monkeypatch.setattr(torch_impl, "value_read_backward_bag", lambda *a: calls.append(1) or real(*a))
    values = torch.randn(128, 16, requires_grad=True)
    w = torch.rand(4, 8, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        PF.value_read(values, torch.randint(0, 128, (4, 8)), w).sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert calls, "an 8 KiB table read 32 times on one thread should take the embedding_bag route"
    assert values.grad is not None and w.grad is not None
