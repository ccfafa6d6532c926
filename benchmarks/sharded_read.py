"""Time a PKM layer with its table sharded by columns against the same layer unsharded.

    torchrun --standalone --nproc_per_node 2 benchmarks/sharded_read.py

Every rank runs forward + backward on its own tokens, once with the whole table in the
process and once with ``ShardedValues`` (its columns only); rank 0 prints the median of
several runs, the ratio, and the table bytes each rank holds. On CPU with gloo this
measures the cost of the exchanges, not the GPU speed.
"""

import argparse
import copy
import os
import shlex
import statistics
import sys
import time

import torch
import torch.distributed as dist

from product_key_memory import PKM, shard_values


def _time(layer, x, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        dist.barrier()
        start = time.perf_counter()
        layer(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dim", type=int, default=256, help="model width")
    parser.add_argument("--num-keys", type=int, default=128, help="sub-keys per half: num_keys**2 slots")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is kept)")
    args = parser.parse_args()
    if not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        parser.exit(2, f"{parser.prog} must be started by torchrun, e.g.\n    torchrun --standalone --nproc_per_node 2 "
                    f"{shlex.join(sys.argv)}\n")

    dist.init_process_group("gloo")
    run(args)
    dist.barrier()  # every rank done, and the layers freed, before gloo goes down (else it may abort at exit)
    dist.destroy_process_group()


def run(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    whole = PKM(args.dim, heads=4, num_keys=args.num_keys, topk=32, dim_head=64)
    sharded = shard_values(copy.deepcopy(whole))

    rows = []
    for n in args.tokens:
        x = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(rank))
        t_whole, t_sharded = _time(whole, x, args.repeats), _time(sharded, x, args.repeats)
        rows.append((n, t_whole * 1e3, t_sharded * 1e3, t_sharded / t_whole))
    if rank == 0:
        print(f"world {world}, dim {args.dim}, {args.num_keys ** 2} slots, heads 4, topk 32, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads per rank")
        print(f"table per rank: whole {table_mib(whole.values.weight):.1f} MiB, "
              f"sharded {table_mib(sharded.values.weight):.1f} MiB")
        print(f"{'tokens/rank':>11} | {'whole ms':>9} | {'sharded ms':>10} | {'ratio':>5}")
        for n, a, b, r in rows:
            print(f"{n:>11} | {a:>9.2f} | {b:>10.2f} | {r:>5.2f}")


def table_mib(w):
    return w.numel() * w.element_size() / 2**20


if __name__ == "__main__":
    main()
