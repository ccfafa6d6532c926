"""ShardedExpertValues: a PEER layer after shard_values on 2 gloo processes against the unsharded layer."""

import copy
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from product_key_memory import PEER, shard_values
from product_key_memory.tables import ShardedExpertValues
from product_key_memory.tables.sharded import column_sizes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, DIM = 2, 10  # the ranks hold 5 and 5 columns of each matrix
TOKENS = [(3, 2), (5,)]  # each rank's own tokens


def _tokens(rank):
    return torch.randn(*TOKENS[rank], DIM, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same layer on every rank
        ref = PEER(DIM, heads=2, num_experts=64, num_experts_per_head=4, non_competing_scores=False,
                   dtype=torch.float64)
        layer = shard_values(copy.deepcopy(ref))
        assert isinstance(layer.experts, ShardedExpertValues)
        layer.experts.sparse = True  # as build_optimizer sets it: both matrices give row-sparse gradients
        assert layer.experts.down.sparse and layer.experts.up.sparse
        out = layer(_tokens(rank))
        out.square().sum().backward()
        # one process: the losses of both ranks' tokens, the tables' gradient averaged over ranks
        sum(ref(_tokens(r)).square().sum() for r in range(world)).backward()
        start = sum(column_sizes(DIM, world)[:rank])
        cols = slice(start, start + layer.experts.down.weight.shape[1])
        pairs = {"output": (out.detach(), ref(_tokens(rank)).detach())}
        for name in ("down", "up"):
            grad = getattr(layer.experts, name).weight.grad
            assert grad.is_sparse, name
            got = grad.to_dense()
            pairs[f"gradient of {name}"] = (got, getattr(ref.experts, name).grad[:, cols] / world)
        torch.save(pairs, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_experts_match_one_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        for name, (got, want) in torch.load(tmp_path / f"rank{rank}.pt").items():
            torch.testing.assert_close(got, want, msg=lambda m, name=name: f"rank {rank}, {name}: {m}")
