"""A Memorizing-Transformer LM training step: TransformerLM(knn_layers=...) against memorizing-transformers-pytorch 0.4.1.

    python benchmarks/bench_knn_lm.py                  # 16,000 and 64,000 memories, dims 256 and 512, 1 and 2 threads
    python benchmarks/bench_knn_lm.py --quick          # a smoke test: 1,024 memories, dim 64, 1 thread, 1 repeat

Both models read the same byte-level documents (the Python standard library's source files, one after another
per batch row), in segments of 512 tokens, batch 2, ``depth`` blocks (dense feedforwards, no PKM) with one
memory layer, 4 heads of 64, 32 memories retrieved per query; each keeps its own position scheme (learned
embeddings here, T5 relative bias in the peer). Each library's memory is filled by forward passes without gradients (the time
to fill is reported), then training steps (forward, loss, backward, Adam) run with the memory full, the two
libraries alternating step by step in one process; reported: median step time.

Recall@32: in one step, every query the memory layer sends to its memory (the layer's real queries) is
searched exactly over the last ``max_memories`` keys that layer wrote per row (what a FIFO memory holds); a
retrieved memory counts as a hit when its key's inner product with the query reaches the exact 32nd best
(within 1e-5). Memory: the growth of resident memory while the library's memory is filled. Not a test:
nothing asserts. Results go to ``benchmarks/results/bench_knn_lm.json`` (``--out``) and a markdown table.

The peer: ``pip install --no-deps memorizing-transformers-pytorch==0.4.1 faiss-cpu joblib cloudpickle
einops-exts``; without it only our rows are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from product_key_memory.transformer import TransformerLM  # noqa: E402

SEQ, BATCH, HEADS, DIM_HEAD, TOPK = 512, 2, 4, 64, 32


def load_peer():
    try:
        from memorizing_transformers_pytorch import MemorizingTransformer
    except ImportError as err:
        print(f"memorizing-transformers-pytorch 0.4.1 not importable ({err})")
        return None
    return MemorizingTransformer


def stdlib_stream(total: int) -> torch.Tensor:
    """``(BATCH, total)`` bytes: the standard library's ``.py`` files, sorted, split between the rows."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    rows, row = [bytearray() for _ in range(BATCH)], 0
    for path in files:
        if all(len(r) >= total for r in rows):
            break
        if len(rows[row]) < total:
            rows[row] += path.read_bytes()
        row = (row + 1) % BATCH
    return torch.stack([torch.frombuffer(r[:total], dtype=torch.uint8).long() for r in rows])


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Recorder:
    """Wraps a memory's ``add``/``search``: keeps the last ``capacity`` keys written per row and, when armed, the
    queries searched and the keys returned."""

    def __init__(self, memory, capacity: int):
        self.capacity, self.keys, self.armed, self.seen = capacity, None, False, []
        add, search = memory.add, memory.search

        def recorded_add(memories, *args, **kwargs):
            keys = torch.as_tensor(memories)[..., 0, :].detach().float().cpu()
            self.keys = keys if self.keys is None else torch.cat((self.keys, keys), 1)[:, -capacity:]
            return add(memories, *args, **kwargs)

        def recorded_search(queries, topk, *args, **kwargs):
            out = search(queries, topk, *args, **kwargs)
            if self.armed:
                self.seen.append((queries.detach().float().cpu(), out[0][..., 0, :].float().cpu(), out[1].cpu(),
                                  self.keys))  # what the memory holds when searched
            return out

        memory.add, memory.search = recorded_add, recorded_search

    def recall(self) -> float:
        hits = total = 0
        for queries, keys, mask, held in self.seen:
            b, d = queries.shape[0], queries.shape[-1]
            q = queries.reshape(b, -1, d)
            got = torch.einsum("bmd,bmkd->bmk", q, keys.reshape(b, q.shape[1], -1, d))
            kth = (q @ held.transpose(1, 2)).topk(TOPK, dim=-1).values[..., -1:]  # (b, m, 1)
            hits += ((got >= kth - 1e-5) & mask.reshape(got.shape)).sum().item()
            total += q.shape[1] * b * TOPK
        return hits / max(1, total)


def memory_kwargs(spec: str) -> dict:
    """``"ivf:ivf_nprobe=16"`` -> ``{"backend": "ivf", "ivf_nprobe": 16}``; ``"default"``: the defaults."""
    backend, _, rest = spec.partition(":")
    kwargs = {} if backend == "default" else {"backend": backend}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        kwargs[key] = int(value)
    return kwargs


def build(lib: str, peer_cls, dim: int, depth: int, layer: int, memories: int, tmp: str):
    torch.manual_seed(0)
    if lib != "peer":
        model = TransformerLM(256, dim, depth, SEQ, knn_layers=(layer,), pkm_layers=(), heads=HEADS,
                              dim_head=DIM_HEAD, knn_kwargs=dict(num_retrieved_memories=TOPK))  # no PKM: as the peer
        mem = model.create_knn_memories(BATCH, max_memories=memories, **memory_kwargs(lib.partition(" ")[2]))

        def loss(tokens):
            return model.loss(tokens, mem)
    else:
        model = peer_cls(num_tokens=256, dim=dim, depth=depth, heads=HEADS, dim_head=DIM_HEAD,
                         memorizing_layers=(layer,), max_knn_memories=memories, num_retrieved_memories=TOPK,
                         knn_memories_directory=tmp)
        mem = model.create_knn_memories(batch_size=BATCH)

        def loss(tokens):
            return model(tokens[:, :-1], mem, labels=tokens[:, 1:])
    rec = Recorder(mem[0], memories)
    return dict(model=model, mem=mem, loss=loss, rec=rec, opt=torch.optim.Adam(model.parameters(), lr=1e-4))


def fill(run, data: torch.Tensor, segments: int) -> tuple[float, int]:
    before, start = rss(), time.perf_counter()
    with torch.no_grad():
        for s in range(segments):
            run["loss"](data[:, s * SEQ:(s + 1) * SEQ + 1])
    return time.perf_counter() - start, rss() - before


def step(run, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    run["opt"].zero_grad(set_to_none=True)
    run["loss"](tokens).backward()
    run["opt"].step()
    return time.perf_counter() - start


def measure(dim: int, memories: int, threads: int, args, peer_cls) -> list[dict]:
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    segments = -(-memories // SEQ)
    data = stdlib_stream((segments + args.repeats + 2) * SEQ + 1)
    libs = [f"ours {spec}" for spec in args.ours] + (["peer"] if peer_cls is not None else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {lib: build(lib, peer_cls, dim, args.depth, args.layer, memories, tmp) for lib in libs}
        filled = {lib: fill(runs[lib], data, segments) for lib in libs}
        times = {lib: [] for lib in libs}
        for r in range(args.repeats + 1):  # the first step of each warms up and is dropped
            tokens = data[:, (segments + r) * SEQ:(segments + r + 1) * SEQ + 1]
            for lib in (libs if r % 2 == 0 else libs[::-1]):
                runs[lib]["rec"].armed = r == args.repeats
                t = step(runs[lib], tokens)
                if r:
                    times[lib].append(t)
        for lib in libs:
            rows.append(dict(library=lib, dim=dim, memories=memories, threads=threads,
                             step_ms=statistics.median(times[lib]) * 1e3, step_times_ms=[t * 1e3 for t in times[lib]],
                             fill_s=filled[lib][0], fill_rss_mib=filled[lib][1] / 2**20,
                             recall_at_32=runs[lib]["rec"].recall()))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dim | memories | threads | ours: step, fill, recall@32, fill RSS | peer: step, fill, recall@32, fill RSS "
             "| peer / ours (step) |", "| ---: | ---: | ---: | --- | --- | ---: |"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["dim"], r["memories"], r["threads"]), []).append(r)

    def cell(r):
        return "-" if r is None else (f"{r['step_ms']:.0f} ms, {r['fill_s']:.1f} s, {r['recall_at_32']:.3f}, "
                                      f"{r['fill_rss_mib']:.0f} MiB")
    for (dim, memories, threads), runs in keyed.items():
        peer = next((r for r in runs if r["library"] == "peer"), None)
        for ours in (r for r in runs if r["library"] != "peer"):
            ratio = f"{peer['step_ms'] / ours['step_ms']:.2f}x" if peer else "-"
            lines.append(f"| {dim} | {memories:,} | {threads} | {ours['library']}: {cell(ours)} | {cell(peer)} "
                         f"| {ratio} |")
    return "\n".join(lines)


def render(json_path: Path) -> Path:
    """Write the docs' table (``.md`` beside the JSON) from committed results, without running anything."""
    out = json_path.with_suffix(".md")
    out.write_text(table(json.loads(json_path.read_text())["rows"]) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 1,024 memories, dim 64, 1 thread, 1 repeat")
    p.add_argument("--sizes", type=int, nargs="+", default=[16_000, 64_000], help="memories per index (full)")
    p.add_argument("--dims", type=int, nargs="+", default=[256, 512], help="model widths")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per library (median kept)")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--layer", type=int, default=3, help="the memory layer (1-based)")
    p.add_argument("--no-peer", action="store_true", help="time this library only")
    p.add_argument("--ours", nargs="+", default=["default"],
                   help="our memories to measure: 'default' (the defaults), 'exact', 'ivf', 'ivf:ivf_nprobe=16', ...")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_knn_lm.json"), help="JSON results")
    p.add_argument("--render", action="store_true",
                   help="only write the docs' markdown table (--out with .md) from the committed JSON; runs nothing")
    args = p.parse_args(argv)
    if args.render:
        print(f"wrote {render(Path(args.out))}")
        return
    if args.quick:
        args.sizes, args.dims, args.threads, args.repeats, args.depth, args.layer = [1024], [64], [1], 1, 2, 2
    peer_cls = None if args.no_peer else load_peer()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}; segments of {SEQ}, "
          f"batch {BATCH}, {HEADS} heads of {DIM_HEAD}, depth {args.depth}, memory layer {args.layer}, top {TOPK}",
          flush=True)
    rows = []
    meta = dict(torch=torch.__version__, machine=platform.machine(), cpu=cpu_name(), quick=args.quick,
                depth=args.depth, layer=args.layer, argv=sys.argv[1:] if argv is None else argv)
    for memories in args.sizes:
        for dim in args.dims:
            for threads in args.threads:
                rows += measure(dim, memories, threads, args, peer_cls)
                print("\n".join(table(rows).splitlines()[-len(args.ours):]), flush=True)
                if args.out:  # after every configuration: a long run stopped early keeps what it measured
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    meta["loadavg_after"] = os.getloadavg()
                    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(table(rows))
    if args.out:
        print(f"wrote {args.out} and {render(Path(args.out))}")
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
