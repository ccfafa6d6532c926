"""Which value-read backward wins by size: the slot-sorted one or ``F.embedding_bag``'s own.

    python benchmarks/read_backward_routes.py              # 1 and 2 threads, writes benchmarks/results/read_routes.json

Both compute the same forward, value gradient (dense, the default) and weight gradient:
``ops.value_read.torch_impl.value_read_backward_sorted`` and ``...value_read_backward_bag``, each forced.
Timed: forward + backward of ``out.square().mean()`` on a table ``(num_slots, dim)``
with ``bags * m`` uniform random reads (``m = heads * topk = 128``), the two routes
alternating on every repeat in one process; median of the repeats, ratio =
embedding_bag / sorted (> 1: the sorted route is faster). The crossover this prints is
what ``product_key_memory.ops.value_read.routes.choose_read_backward`` encodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from product_key_memory.ops.value_read import torch_impl as cpu  # noqa: E402

M = 128


def routes(values, idx, w):
    # both routes forced, whatever choose_read_backward would pick: the forward read, the loss's
    # gradient, then one backward
    def run(backward):
        out = cpu.value_read(values.detach(), idx, w.detach())
        grad_out = 2 * out / out.numel()  # d out.square().mean() / d out
        return backward(grad_out, values, idx, w, None, True, True)

    def sorted_route():
        return run(cpu.value_read_backward_sorted)

    def bag_route():
        return run(lambda g, v, i, ww, t, _, nw: cpu.value_read_backward_bag(g, v, i, ww, t, nw))

    return dict(sorted=sorted_route, embedding_bag=bag_route)


def measure(num_slots, dim, reads, repeats):
    values = torch.randn(num_slots, dim).div_(dim**0.5).requires_grad_()
    idx = torch.randint(0, num_slots, (reads // M, M))
    w = torch.rand(reads // M, M, requires_grad=True)
    fns = routes(values, idx, w)
    for f in fns.values():
        f()
    samples = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
    p.add_argument("--slots", type=int, nargs="+", default=[128**2, 256**2, 1024**2], help="table rows")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="table columns")
    p.add_argument("--reads", type=int, nargs="+", default=[128, 4096, 32768, 131072, 524288],
                   help="rows read per backward")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is kept)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "read_routes.json",
                   help="JSON file of the results")
    args = p.parse_args(argv)
    rows = []
    print(f"{'T':>2} {'slots':>8} {'dim':>4} {'reads':>7} {'sorted ms':>10} {'emb_bag ms':>10} {'bag/sorted':>10}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for num_slots in args.slots:
            for dim in args.dims:
                for reads in args.reads:
                    r = measure(num_slots, dim, reads, args.repeats)
                    row = dict(threads=threads, num_slots=num_slots, dim=dim, reads=reads, **r,
                               ratio=r["embedding_bag"] / r["sorted"])
                    rows.append(row)
                    print(f"{threads:>2} {num_slots:>8} {dim:>4} {reads:>7} {r['sorted']:>10.2f} "
                          f"{r['embedding_bag']:>10.2f} {row['ratio']:>10.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
