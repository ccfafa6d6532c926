"""exact_search against the GEMM floor of its shapes, timed alternating in one process.

    python benchmarks/knn_search_floor.py --threads 2          # 16,000 and 64,000 memories

The search of a memory layer in bench_knn_lm.py: 2 rows, 4 heads x 512 tokens = 2,048 unit queries per row,
64 dims, top 32. The floor is the score matrix alone: ``torch.bmm`` of the queries with the keys, in chunks into a
reused output (bf16 in 2,048-key chunks, fp32 in 1,024-key chunks: the fastest chunking of each measured here),
no selection. "grouped" is the search every device had before the candidate paths (fp32 scores, maxima over
16 consecutive slots, the tie-ruled top-k of the best groups), still the path off CPU. Each round times every entry once, in turn; medians over the rounds. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from product_key_memory.knn.memory import _exact_search_fp32, exact_search  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16_000, 64_000], help="memories per index")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, alternating (median kept)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    print("| memories | bf16 GEMM floor | fp32 GEMM floor | exact_search (bf16 path) | exact_search (fp32 path) "
          "| grouped | bf16 path / bf16 floor |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in args.sizes:
        g = torch.Generator().manual_seed(s)
        q = F.normalize(torch.randn(2, 2048, 64, generator=g), dim=-1)
        k = F.normalize(torch.randn(2, s, 64, generator=g), dim=-1)
        q16, k16, count = q.bfloat16(), k.bfloat16(), torch.tensor([s, s])
        out16, out32 = torch.empty(2, 2048, 2048, dtype=torch.bfloat16), torch.empty(2, 2048, 1024)

        def floor(qq, kk, out, c):
            for start in range(0, s, c):
                chunk = kk[:, start:start + c]
                torch.bmm(qq, chunk.transpose(1, 2), out=out[:, :, :chunk.shape[1]])

        entries = {
            "floor16": lambda: floor(q16, k16, out16, 2048),
            "floor32": lambda: floor(q, k, out32, 1024),
            "bf16": lambda: exact_search(q, k, count, 32, precision="bf16"),
            "fp32": lambda: exact_search(q, k, count, 32, precision="fp32"),
            "grouped": lambda: _exact_search_fp32(q, k, count, 32),
        }
        a, b = exact_search(q, k, count, 32, precision="bf16"), exact_search(q, k, count, 32, precision="fp32")
        same = torch.equal(a[1], b[1])
        times = {name: [] for name in entries}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, f in entries.items():
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
        print(f"| {s:,} | {med['floor16']:.1f} ms | {med['floor32']:.1f} ms | {med['bf16']:.1f} ms | "
              f"{med['fp32']:.1f} ms | {med['grouped']:.1f} ms | {med['bf16'] / med['floor16']:.2f}x (same slots as fp32: {same}) |",
              flush=True)


if __name__ == "__main__":
    main()
