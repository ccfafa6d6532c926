import pytest
import torch

from product_key_memory._routes import READ_BACKWARDS, choose_read_backward


def test_small_table_few_reads_take_embedding_bag():
    assert choose_read_backward(4096, 128**2, 128, torch.float32, 1) == "embedding_bag"
    assert choose_read_backward(32768, 128**2, 128, torch.float32, 2) == "embedding_bag"


@pytest.mark.parametrize(
    "reads, slots, dim",
    [(131072, 128**2, 128), (128, 128**2, 512), (4096, 256**2, 128), (131072, 256**2, 512), (128, 1024**2, 128)],
)
def test_large_tables_or_many_reads_take_sorted(reads, slots, dim):
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
