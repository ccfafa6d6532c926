"""Train a toy language model whose memory table is split by columns over processes.

The value table (a pool read by every memory layer) holds ``dim / world_size`` columns of every
slot on each rank; everything else is ordinary data-parallel (DDP). The task is pure
recall: the next token is a fixed random function of the current one, so the memory has
to store a lookup table.

    torchrun --nproc_per_node 2 examples/train_sharded.py                  # CPU, gloo
    torchrun --nproc_per_node 8 examples/train_sharded.py --num-keys 1024 --dim 1024 --steps 1000  # GPUs, nccl

It must be started by ``torchrun`` (which sets RANK, WORLD_SIZE and LOCAL_RANK); under plain
``python`` it prints the torchrun line to use and exits with status 2. Writes nothing.
"""

import argparse
import os
import shlex
import sys

import torch
import torch.distributed as dist
from torch import nn

from product_key_memory import MemoryPlus, ShardedValues, fetch_optimizer_parameters, shard_values
from product_key_memory import clip_grad_norm_


class TinyLM(nn.Module):
    """Embedding, a few residual Memory+ layers reading one shared pool, a linear head."""

    def __init__(self, vocab: int, dim: int, layers: int, pool: nn.Module, num_keys: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.memories = nn.ModuleList(
            MemoryPlus(dim, heads=4, num_keys=num_keys, topk=8, dim_head=32, values=pool, qk_norm=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for memory in self.memories:
            h = h + memory(h)
        return self.head(self.norm(h))


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def require_launcher(argv):
    """Exit with status 2 and the torchrun line to use when not started by torchrun (or another launcher)."""
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        nproc = torch.cuda.device_count() or 2  # one per GPU, else 2 CPU processes (gloo)
        command = shlex.join(["torchrun", "--nproc_per_node", str(nproc), sys.argv[0], *argv])
        sys.stderr.write(f"{os.path.basename(sys.argv[0])} runs one process per device and must be started by "
                         f"torchrun ({', '.join(missing)} not set); run:\n    {command}\n")
        sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-keys", type=int, default=32, help="sub-keys per half; the pool has num_keys**2 slots")
    parser.add_argument("--dim", type=int, default=64, help="model width; the table's columns split over the ranks")
    parser.add_argument("--layers", type=int, default=2, help="Memory+ layers reading the shared pool")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    require_launcher(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    train(args, device)
    dist.barrier()  # every rank done (and its model freed) before the process group goes down
    dist.destroy_process_group()


def train(args, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    # every rank draws its own columns of the table, so the full table never exists anywhere
    torch.manual_seed(1000 + rank)
    pool = ShardedValues(args.num_keys**2, args.dim, device=device)
    torch.manual_seed(0)  # the rest starts equal on every rank (DDP also broadcasts it from rank 0)
    model = TinyLM(args.vocab, args.dim, args.layers, pool, args.num_keys).to(device)
    shard_values(model)  # the pool is already sharded; this marks it for DDP to leave alone
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(fetch_optimizer_parameters(model, 1e-2, pkm_weight_decay=0.0), lr=3e-3, weight_decay=0.1)

    facts = torch.randperm(args.vocab, generator=torch.Generator().manual_seed(0)).to(device)  # the lookup to learn
    data = torch.Generator(device=device).manual_seed(rank)  # each rank its own batches
    for step in range(args.steps):
        tokens = torch.randint(args.vocab, (args.batch, args.seq), device=device, generator=data)
        loss = nn.functional.cross_entropy(ddp(tokens).flatten(0, 1), facts[tokens].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(model, 1.0)  # the norm over all ranks' columns of the table, and the rest once
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item() / world:.4f}", flush=True)

    shard = pool.weight
    mib = shard.numel() * shard.element_size() / 2**20
    print(
        f"rank {rank}: columns [{pool.column_start}:{pool.column_start + shard.shape[1]}) of the "
        f"({pool.num_embeddings}, {pool.embedding_dim}) table, {mib:.2f} MiB of values",
        flush=True,
    )


if __name__ == "__main__":
    main()
