"""KNNMemory against memorizing-transformers-pytorch 0.4.1's KNNMemory, side by side in one process.

    python benchmarks/bench_knn.py               # 16k and 256k memories, 5 repeats
    python benchmarks/bench_knn.py --quick       # 16k only, 3 repeats

Both hold the same memories (``b=2`` rows, ``d=64``) and answer the same queries (``b=2, n=512`` with
``topk=32``). A timed step is what a memorizing layer does per segment: ``add`` 512 new memories per
row, then ``search``. The capacity is the fill plus the timed adds, so neither library evicts during the
run (0.4.1 would throw its whole index away). Recall is the share of each query's true top 32 (brute
force, float64) that the search returned, read from the value of each memory, which holds its id.
Reported: median and min-max in ms over the repeats, ratio = peer median / our median. The peer runs
its Faiss HNSW index with ``multiprocessing=False`` (its transformer's default; ``True`` starts joblib
processes per call). Ours: the exact backend, and the faiss IVF backend. Not a test: nothing asserts.

The peer is the real package: ``pip install --no-deps memorizing-transformers-pytorch==0.4.1 faiss-cpu
joblib cloudpickle einops-exts`` (its wheel asks for faiss-gpu); without it only our rows are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from product_key_memory import KNNMemory  # noqa: E402

B, N, D, TOPK = 2, 512, 64, 32


def load_peer():
    try:
        from memorizing_transformers_pytorch.knn_memory import KNNMemory as PeerKNNMemory
    except ImportError as err:
        print(f"memorizing-transformers-pytorch 0.4.1 not importable ({err}); to compare, run\n"
              "  pip install --no-deps memorizing-transformers-pytorch==0.4.1 faiss-cpu joblib cloudpickle "
              "einops-exts\n")
        return None
    return PeerKNNMemory


def memories_with_ids(start: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, n, 2, D)`` random unit keys; each value holds its id in channel 0 (exact in float32 below 2**24)."""
    keys = torch.nn.functional.normalize(torch.randn(B, n, D, generator=generator), dim=-1)
    values = torch.zeros(B, n, D)
    values[..., 0] = torch.arange(start, start + n, dtype=torch.float32)
    return torch.stack((keys, values), dim=2)


def recall(key_values: torch.Tensor, mask: torch.Tensor, all_memories: torch.Tensor, queries: torch.Tensor) -> float:
    ids = key_values[..., 1, 0].round().long().masked_fill(~mask, -1)  # (B, N, TOPK)
    true = (queries.double() @ all_memories[:, :, 0].double().transpose(1, 2)).topk(TOPK, dim=-1).indices
    hits = (ids[..., :, None] == true[..., None, :]).any(-1).sum()
    return hits.item() / true.numel()


def gflops(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    """Median GFLOP/s of ``a @ b`` (float32)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.numel() // a.shape[-2] // a.shape[-1]) / \
        statistics.median(times) / 1e9


def bench(name, memory, fill: torch.Tensor, steps: list, queries: torch.Tensor, repeats: int):
    memory.add(fill)
    times, all_memories = [], fill
    for new in steps[:repeats]:
        start = time.perf_counter()
        memory.add(new)
        key_values, mask = memory.search(queries, TOPK)
        times.append(time.perf_counter() - start)
        all_memories = torch.cat((all_memories, new), dim=1)
    return {"name": name, "times": times, "recall": recall(key_values, mask, all_memories, queries)}


ROOT = Path(__file__).resolve().parents[1]


def summary_table(results: dict) -> str:
    """The docs' table from the JSON this script writes: one row per size and library."""
    lines = ["| memories | library | add + search | recall | peer / this |", "| ---: | --- | ---: | ---: | ---: |"]
    for r in results["rows"]:
        ratio = "-" if r["peer_over_this"] is None else f"{r['peer_over_this']:.1f}x"
        lines.append(f"| {r['memories']:,} | {r['library']} | {r['median_ms']:,.0f} ms | {r['recall']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def render(json_path: Path) -> Path:
    """Write the docs' table (``.md`` beside the JSON) from committed results, without running anything."""
    out = json_path.with_suffix(".md")
    out.write_text(summary_table(json.loads(json_path.read_text())))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16k memories only, 3 repeats")
    p.add_argument("--sizes", type=int, nargs="+", default=[16_000, 256_000], help="memories per row")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is kept)")
    p.add_argument("--no-faiss", action="store_true", help="skip our faiss backend")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of torch and of Faiss (both libraries get the same; default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_knn.json",
                   help="JSON file of the results (and its markdown table beside it)")
    p.add_argument("--render", action="store_true",
                   help="only write the docs' markdown table (--out with .md) from the committed JSON; runs nothing")
    args = p.parse_args(argv)
    if args.render:
        print(f"wrote {render(args.out)}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        pass
    if args.quick:
        args.sizes, args.repeats = args.sizes[:1], 3
    peer_cls = load_peer()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; b={B}, n={N}, d={D}, topk={TOPK}")
    gemm_peak = gflops(torch.randn(2048, 2048), torch.randn(2048, 2048).T)
    print(f"GEMM peak of this process: {gemm_peak:.0f} GFLOP/s (float32 2048^3 matmul)")
    print("| memories | library | add+search median (ms) | min-max (ms) | recall | peer / this |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    rows = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        fill = memories_with_ids(0, size, g)
        steps = [memories_with_ids(size + i * N, N, g) for i in range(args.repeats)]
        queries = torch.nn.functional.normalize(torch.randn(B, N, D, generator=g), dim=-1)
        capacity = size + args.repeats * N
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            if peer_cls is not None:
                peer = peer_cls(D, max_memories=capacity, num_indices=B, multiprocessing=False,
                                memmap_filename=str(Path(tmp) / "peer.memmap"))
                runs.append(bench("memorizing-transformers-pytorch 0.4.1", peer, fill, steps, queries, args.repeats))
                del peer
            runs.append(bench("KNNMemory exact", KNNMemory(D, capacity, B), fill, steps, queries, args.repeats))
            if not args.no_faiss:
                try:
                    memory = KNNMemory(D, capacity, B, backend="faiss")
                except ImportError as err:
                    print(f"(faiss backend skipped: {err})")
                else:
                    runs.append(bench("KNNMemory faiss", memory, fill, steps, queries, args.repeats))
        keys = fill[:, :, 0]
        rate = gflops(queries, keys.transpose(1, 2))
        print(f"|  | (the search's {B}x{N}x{size:,}x{D} matmul alone: {rate:.0f} GFLOP/s, "
              f"{2 * B * N * size * D / rate / 1e6:.1f} ms) | | | | |")
        peer_median = statistics.median(runs[0]["times"]) if peer_cls is not None else None
        for run in runs:
            med = statistics.median(run["times"])
            ratio = f"{peer_median / med:.1f}x" if peer_median is not None else "-"
            print(f"| {size:,} | {run['name']} | {med * 1e3:.1f} | {min(run['times']) * 1e3:.1f}-"
                  f"{max(run['times']) * 1e3:.1f} | {run['recall']:.3f} | {ratio} |", flush=True)
            rows.append(dict(memories=size, library=run["name"], median_ms=med * 1e3, min_ms=min(run["times"]) * 1e3,
                             max_ms=max(run["times"]) * 1e3, recall=run["recall"],
                             peer_over_this=None if peer_median is None else peer_median / med))
    meta = dict(torch=torch.__version__, machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                threads=torch.get_num_threads(), repeats=args.repeats, gemm_gflops=gemm_peak,
                command="python benchmarks/bench_knn.py " + " ".join(sys.argv[1:] if argv is None else argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {args.out} and {render(args.out)}")


if __name__ == "__main__":
    main()
