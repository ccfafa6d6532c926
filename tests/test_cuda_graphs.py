"""cuda_graphs.GraphedForward: a clear error on CPU, and replay equal to eager on a GPU."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from product_key_memory import PKM
from product_key_memory.cuda_graphs import GraphedForward


def test_cpu_inputs_raise_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA graphs.*cpu"):
        GraphedForward(nn.Linear(4, 4), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="must be a tensor"):
        GraphedForward(nn.Linear(4, 4), 3)
    with pytest.raises(ValueError, match="at least one"):
        GraphedForward(nn.Linear(4, 4))


@pytest.mark.cuda
def test_replay_equals_eager():
    torch.manual_seed(0)
    model = PKM(dim=64, heads=2, num_keys=16, topk=4, dim_head=16).cuda().eval()
    x = torch.randn(1, 1, 64, device="cuda")
    step = GraphedForward(model, x)
    for _ in range(3):
        x = torch.randn(1, 1, 64, device="cuda")
        with torch.no_grad():
            want = model(x)
        got = step(x)
        assert_close(got, want, msg="replay vs eager")
    kept = got.clone()
    step(torch.randn(1, 1, 64, device="cuda"))
    assert not torch.equal(kept, got), "the static output is overwritten by the next call"
    with pytest.raises(ValueError, match="captured"):
        step(torch.randn(2, 1, 64, device="cuda"))
