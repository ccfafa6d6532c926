"""This library against product-key-memory 0.3.0, side by side in one process.

    python benchmarks/bench_pkm.py            # full run, writes benchmarks/results/bench_pkm.json
    python benchmarks/bench_pkm.py --quick    # fewer repeats, 2 threads only
    python benchmarks/bench_pkm.py --sweep    # the size sweep below, writes bench_pkm_sweep.json
    python benchmarks/bench_pkm.py --quick-sweep        # 8 representative sweep points, ~10 minutes on 2 cores
    python benchmarks/bench_pkm.py --list-points        # the sweep's numbered points, for --points 0 5 9

Configurations: ``readme`` (dim=512, heads=4, dim_head=128, num_keys=256, topk=32,
input (1, 1024, 512)), ``keys1024`` (the same with num_keys=1024: 1M slots), and
``decode`` (README layer, input (1, 1, 512)). Phases: ``forward`` (eval, no grad),
``forward compiled`` (decode only: ours under ``torch.compile`` with the default inductor
backend, against 0.3.0 eager),
``fwd+bwd`` (train mode, loss ``out.square().mean()``), ``step`` (zero_grad, forward,
backward, optimizer step; each library's recommended set-up: 0.3.0 is
``torch.optim.Adam(fetch_optimizer_parameters(m))``, ours is ``build_optimizer(m)``),
and ``memory``: the peak RSS growth of one training step (from three warm-up steps
and ``zero_grad(set_to_none=True)``, so it includes the step's gradients),
read from ``/proc/self/status`` (``VmHWM`` reset through ``/proc/self/clear_refs``)
in a fresh child process per library, both children with the same environment
(allocator settings). ``fwd+bwd`` of ours uses the recommended sparse value
gradient; ``fwd+bwd dense`` is ours with a dense value gradient (plain Adam users).

Both layers hold the same weights (0.3.0's state dict loads into ours). Forward and
fwd+bwd alternate between the libraries on every repeat; training steps run one
library after the other (their optimizer states would not fit together at 1M slots).
Reported: median and min-max in ms, ratio = 0.3.0 median / our median, and the
ratio of the minimums (less sensitive to other processes on a shared machine).
Not a test: nothing here asserts timings.

``--sweep`` (issue 12, item 3) times ``forward`` (eval, no grad) and ``fwd+bwd`` (train,
dense value gradient: the default) of both libraries over a sample of the grid
``num_keys`` 128-1024, ``heads`` 1-8, ``dim_head`` 64-256, ``topk`` 8-64, 1-8192 tokens,
at 1 and 2 threads (``dim=512``). The full grid is 4 * 4 * 3 * 4 * 5 = 960 points per
thread count, hours on 2 cores, so it is sampled: the README config, every value of each
axis varied alone around it (the others at the README values), and three corners (all
small; many slots and few reads; few slots and many reads) and a large one (all at the
top, 2048 tokens: 8192 would need ~10 GB for both libraries' dense gradients). Each
point alternates the libraries on every repeat; inputs of 1 and 16 tokens repeat the
call inside each timed sample. Meant to take about 10 minutes on 2 quiet cores (not yet seen:
the first run, on a machine at load 6-8, managed 5 points in 15 minutes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peer import load_peer  # noqa: E402
from product_key_memory import PKM, build_optimizer  # noqa: E402

LAYER = dict(dim=512, heads=4, dim_head=128, topk=32)
CONFIGS = {
    "readme": dict(num_keys=256, shape=(1, 1024, 512), phases=("forward", "fwd+bwd", "fwd+bwd dense", "step")),
    "keys1024": dict(num_keys=1024, shape=(1, 1024, 512), phases=("forward", "fwd+bwd", "fwd+bwd dense", "step")),
    "decode": dict(num_keys=256, shape=(1, 1, 512), phases=("forward", "forward compiled")),
}
SWEEP_BASE = dict(num_keys=256, heads=4, dim_head=128, topk=32, tokens=1024)
SWEEP_AXES = dict(num_keys=(128, 512, 1024), heads=(1, 2, 8), dim_head=(64, 256), topk=(8, 16, 64),
                  tokens=(1, 16, 256, 8192))
SWEEP_CORNERS = (
    dict(num_keys=128, heads=1, dim_head=64, topk=8, tokens=1),
    dict(num_keys=128, heads=1, dim_head=64, topk=8, tokens=1024),
    dict(num_keys=1024, heads=1, dim_head=64, topk=8, tokens=1024),
    dict(num_keys=128, heads=8, dim_head=256, topk=64, tokens=1024),
    dict(num_keys=1024, heads=8, dim_head=256, topk=64, tokens=2048),
)
# --quick-sweep: one point per axis and corner kind, nothing with a 1M-slot dense gradient or 8192
# tokens, at 2 threads: about 10 minutes on 2 cores
QUICK_SWEEP = (
    dict(SWEEP_BASE),
    {**SWEEP_BASE, "tokens": 1},
    {**SWEEP_BASE, "tokens": 16},
    {**SWEEP_BASE, "num_keys": 512},
    {**SWEEP_BASE, "heads": 8},
    {**SWEEP_BASE, "dim_head": 64},
    {**SWEEP_BASE, "topk": 64},
    dict(num_keys=128, heads=1, dim_head=64, topk=8, tokens=1024),
)
ALLOCATOR_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


def make_pair(num_keys: int, seed: int = 0, **layer):
    peer = load_peer()
    torch.manual_seed(seed)
    layer = {**LAYER, **layer}
    ours = PKM(num_keys=num_keys, **layer)
    theirs = peer.PKM(num_keys=num_keys, **layer)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # 0.3.0 checkpoints load into this library
    return ours, theirs, peer


def loss_of(out):
    return out.square().mean()


def timed(fn, inner: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def summarize(samples):
    ms = [s * 1e3 for s in samples]
    return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), n=len(ms))


def bench_alternating(fns: dict, repeats: int, warmup: int, inner: int):
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            samples[k].append(timed(fns[k], inner))
    return {k: summarize(v) for k, v in samples.items()}


def forward_fns(ours, theirs, x):
    ours.eval(), theirs.eval()

    def f_ours():
        with torch.no_grad():
            ours(x)

    def f_peer():
        with torch.no_grad():
            theirs(x)

    return f_ours, f_peer


def fwd_bwd_fns(ours, theirs, x, sparse: bool):
    ours.train(), theirs.train()

    def f_ours():
        ours.values.sparse = sparse
        ours.zero_grad(set_to_none=True)
        loss_of(ours(x)).backward()

    def f_peer():
        theirs.zero_grad(set_to_none=True)
        loss_of(theirs(x)).backward()

    return f_ours, f_peer


def make_step(lib: str, model, peer):
    model.train()
    if lib == "ours":
        opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)
    else:
        opt = torch.optim.Adam(peer.fetch_optimizer_parameters(model, pkm_learning_rate=1e-2), lr=1e-3)

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        opt.step()

    return step, opt


def bench_steps(ours, theirs, peer, x, repeats: int, warmup: int):
    out = {}
    for lib, model in (("ours", ours), ("peer", theirs)):
        step, opt = make_step(lib, model, peer)
        for _ in range(warmup):
            step(x)
        out[lib] = summarize([timed(lambda: step(x)) for _ in range(repeats)])
        model.zero_grad(set_to_none=True)
        del step, opt
        gc.collect()
    if "ours" in out:
        ours.values.sparse = False
    return out


def profile_steps(ours, theirs, peer, x, top: int = 12) -> dict:
    """Where a training step's time goes (torch.profiler, self CPU time per op), for each library."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for lib, model in (("ours", ours), ("peer", theirs)):
        step, opt = make_step(lib, model, peer)
        for _ in range(2):
            step(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(x)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        tables[lib] = [dict(op=e.key, self_ms_per_step=e.self_cpu_time_total / 3e3, share=e.self_cpu_time_total / total)
                       for e in events[:top]]
        model.zero_grad(set_to_none=True)
        del step, opt
        gc.collect()
    ours.values.sparse = False
    return tables


# -- memory: one child process per library -------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(lib: str, config: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    ours, theirs, peer = make_pair(cfg["num_keys"])
    model = ours if lib == "ours" else theirs
    del ours, theirs
    gc.collect()
    x = torch.randn(cfg["shape"])
    step, opt = make_step(lib, model, peer)
    for _ in range(3):
        step(x)
    opt.zero_grad(set_to_none=True)  # the step's own gradients count as its growth
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step(x)
    peak = _status_kib("VmHWM")
    return dict(lib=lib, config=config, rss_before_mib=before / 1024, peak_growth_mib=(peak - before) / 1024)


def bench_memory(config: str, threads: int) -> dict:
    res = {}
    for lib in ("ours", "peer"):
        cmd = [sys.executable, __file__, "--_memory-child", lib, config, str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=True)
        res[lib] = json.loads(done.stdout.strip().splitlines()[-1])
    return res


# -- sweep ---------------------------------------------------------------------------------------


def sweep_points():
    """The README config, each axis varied alone, then the corners (no duplicates)."""
    points = [dict(SWEEP_BASE)]
    for axis, vals in SWEEP_AXES.items():
        points += [{**SWEEP_BASE, axis: v} for v in vals]
    points += [dict(c) for c in SWEEP_CORNERS]
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


SWEEP_WARMUP = 3


def run_sweep(args) -> dict:
    results = dict(meta=dict(torch=torch.__version__, cpu_count=os.cpu_count(), loadavg_start=os.getloadavg(),
                             time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), repeats=args.repeats,
                             warmup=SWEEP_WARMUP), rows=[])
    for point in args.sweep_points:
        tokens = point["tokens"]
        layer = {k: v for k, v in point.items() if k not in ("tokens", "num_keys")}
        ours, theirs, _ = make_pair(point["num_keys"], **layer)
        x = torch.randn(1, tokens, LAYER["dim"])
        inner = 50 if tokens == 1 else (10 if tokens <= 16 else 1)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for phase in ("forward", "fwd+bwd"):
                if phase in ("forward", "forward compiled"):
                    f_ours, f_peer = forward_fns(torch.compile(ours) if phase == "forward compiled" else ours, theirs, x)
                    with torch.no_grad():
                        f_ours()  # a compiled layer compiles on its first call, outside the timing
                else:
                    f_ours, f_peer = fwd_bwd_fns(ours, theirs, x, sparse=False)
                # 3 warm-up calls each: the first fwd+bwd calls fault in fresh memory and the allocator
                # settles over several calls (this library's backward allocates more distinct buffers,
                # so its first calls ran up to 1.5x slower than its steady state; 0.3.0's less)
                r = bench_alternating({"ours": f_ours, "peer": f_peer}, args.repeats, warmup=SWEEP_WARMUP,
                                      inner=inner)
                ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
                row = dict(config=point, threads=threads, phase=phase, ours=r["ours"], peer=r["peer"],
                           ratio=r["peer"]["median_ms"] / r["ours"]["median_ms"],
                           ratio_of_minimums=r["peer"]["min_ms"] / r["ours"]["min_ms"])
                results["rows"].append(row)
                name = " ".join(f"{k}={v}" for k, v in point.items())
                print(f"{name:<55} {threads}T {phase:<8} ours {r['ours']['median_ms']:9.3f} ms  "
                      f"0.3.0 {r['peer']['median_ms']:9.3f} ms  0.3.0/ours {row['ratio']:5.2f}x", flush=True)
        del ours, theirs, x
        gc.collect()
    results["meta"]["loadavg_end"] = os.getloadavg()
    return results


def sweep_table(results) -> str:
    lines = ["| num_keys | heads | dim_head | topk | tokens | threads | phase | ours ms | 0.3.0 ms | 0.3.0 / ours |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        c = row["config"]
        lines.append(f"| {c['num_keys']} | {c['heads']} | {c['dim_head']} | {c['topk']} | {c['tokens']} | "
                     f"{row['threads']} | {row['phase']} | {row['ours']['median_ms']:.3g} | "
                     f"{row['peer']['median_ms']:.3g} | {row['ratio']:.2f}x |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def run(args) -> dict:
    results = dict(
        meta=dict(
            torch=torch.__version__, python=platform.python_version(), machine=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(), loadavg_start=os.getloadavg(), quick=args.quick,
            allocator_env={k: os.environ.get(k) for k in ALLOCATOR_ENV},
            time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        ),
        rows=[],
    )
    repeats = 3 if args.quick else args.repeats
    for config in args.configs:
        cfg = CONFIGS[config]
        ours, theirs, peer = make_pair(cfg["num_keys"])
        x = torch.randn(cfg["shape"])
        with torch.no_grad():
            ours.eval(), theirs.eval()
            diff = (ours(x) - theirs(x)).abs().max().item()
        print(f"[{config}] max |ours - 0.3.0| forward = {diff:.2e}", flush=True)
        decode = cfg["shape"][1] == 1
        for threads in args.threads:
            torch.set_num_threads(threads)
            for phase in cfg["phases"]:
                if args.phases and phase not in args.phases:
                    continue
                if phase in ("forward", "forward compiled"):
                    f_ours, f_peer = forward_fns(torch.compile(ours) if phase == "forward compiled" else ours, theirs, x)
                    with torch.no_grad():
                        f_ours()  # a compiled layer compiles on its first call, outside the timing
                    r = bench_alternating({"ours": f_ours, "peer": f_peer}, repeats * (3 if decode else 1),
                                          warmup=3 if decode else 1, inner=200 if decode else 1)
                elif phase in ("fwd+bwd", "fwd+bwd dense"):
                    f_ours, f_peer = fwd_bwd_fns(ours, theirs, x, sparse=phase == "fwd+bwd")
                    r = bench_alternating({"ours": f_ours, "peer": f_peer}, repeats, warmup=1, inner=1)
                    ours.values.sparse = False
                    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
                else:
                    step_repeats = max(3, repeats // 2) if cfg["num_keys"] > 256 else repeats
                    r = bench_steps(ours, theirs, peer, x, step_repeats, warmup=2)
                row = dict(config=config, threads=threads, phase=phase, ours=r["ours"], peer=r["peer"],
                           ratio=r["peer"]["median_ms"] / r["ours"]["median_ms"],
                           ratio_of_minimums=r["peer"]["min_ms"] / r["ours"]["min_ms"])
                results["rows"].append(row)
                print(format_row(row), flush=True)
        if args.profile and "step" in cfg["phases"]:
            torch.set_num_threads(args.threads[-1])
            tables = profile_steps(ours, theirs, peer, x)
            results.setdefault("profiles", {})[config] = tables
            for lib, rows in tables.items():
                print(f"[{config}] {args.threads[-1]}T training step profile, {lib}:")
                for r in rows:
                    print(f"    {r['op']:<56} {r['self_ms_per_step']:9.2f} ms  {100 * r['share']:5.1f}%")
        del ours, theirs
        gc.collect()
    for config in args.memory_configs:
        for threads in args.threads[-1:]:
            m = bench_memory(config, threads)
            row = dict(config=config, threads=threads, phase="step peak RSS growth", ours=m["ours"], peer=m["peer"],
                       ratio=m["peer"]["peak_growth_mib"] / max(m["ours"]["peak_growth_mib"], 1e-9))
            results["rows"].append(row)
            print(format_row(row), flush=True)
    results["meta"]["loadavg_end"] = os.getloadavg()
    return results


def format_row(row) -> str:
    o, p = row["ours"], row["peer"]
    head = f"{row['config']:<9} {row['threads']}T {row['phase']:<21}"
    if "peak_growth_mib" in o:
        return f"{head} ours {o['peak_growth_mib']:9.1f} MiB   0.3.0 {p['peak_growth_mib']:9.1f} MiB   0.3.0/ours {row['ratio']:6.2f}x"
    return (f"{head} ours {o['median_ms']:9.3f} ms [{o['min_ms']:.3f}-{o['max_ms']:.3f}]   "
            f"0.3.0 {p['median_ms']:9.3f} ms [{p['min_ms']:.3f}-{p['max_ms']:.3f}]   "
            f"speed-up {row['ratio']:6.2f}x (of minimums {row['ratio_of_minimums']:.2f}x)")


def markdown_table(results) -> str:
    lines = [
        "| config | threads | phase | ours median [min-max] | 0.3.0 median [min-max] | 0.3.0 / ours (medians) | (minimums) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        o, p = row["ours"], row["peer"]
        if "peak_growth_mib" in o:
            a, b, extra = f"{o['peak_growth_mib']:.0f} MiB", f"{p['peak_growth_mib']:.0f} MiB", ""
        else:
            a = f"{o['median_ms']:.3g} ms [{o['min_ms']:.3g}-{o['max_ms']:.3g}]"
            b = f"{p['median_ms']:.3g} ms [{p['min_ms']:.3g}-{p['max_ms']:.3g}]"
            extra = f"{row['ratio_of_minimums']:.2f}x"
        lines.append(f"| {row['config']} | {row['threads']} | {row['phase']} | {a} | {b} | {row['ratio']:.2f}x | {extra} |")
    return "\n".join(lines)


def _mib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def summary_table(results) -> str:
    """The docs' table: one row per layer and thread count, the 0.3.0 / ours ratio per phase."""
    layers = {"readme": "README layer (65,536 slots)", "keys1024": "`num_keys = 1024` (1M slots)",
              "decode": "decoding step (README layer)"}
    phases = ("forward", "fwd+bwd", "fwd+bwd dense", "step")
    cells, peaks = {}, {}
    for row in results["rows"]:
        key = (row["config"], row["threads"])
        if row["phase"] == "step peak RSS growth":
            peaks[key] = f"{_mib(row['ours']['peak_growth_mib'])} vs {_mib(row['peer']['peak_growth_mib'])}"
        else:
            cells.setdefault(key, {})[row["phase"]] = f"{row['ratio']:.2f}x"
    lines = ["| layer | threads | forward | fwd+bwd | fwd+bwd, dense | step | peak memory of a step (ours vs 0.3.0) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for config, name in layers.items():
        keys = sorted(k for k in cells if k[0] == config)
        for i, key in enumerate(keys):
            got = cells[key]
            label = name if i == 0 else ""
            lines.append(f"| {label} | {key[1]} | " + " | ".join(got.get(ph, "") for ph in phases)
                         + f" | {peaks.get(key, '')} |")
        compiled_rows = [(k[1], cells[k]["forward compiled"]) for k in keys if "forward compiled" in cells[k]]
        for i, (threads, ratio) in enumerate(compiled_rows):
            label = "decoding step, `torch.compile` (inductor)" if i == 0 else ""
            lines.append(f"| {label} | {threads} | {ratio} | | | | |")
    return "\n".join(lines) + "\n"


def render(json_path: Path) -> Path:
    """Write the docs' table (``.md`` beside the JSON) from committed results, without running anything."""
    results = json.loads(json_path.read_text())
    table = sweep_table(results) + "\n" if json_path.name == "bench_pkm_sweep.json" else summary_table(results)
    out = json_path.with_suffix(".md")
    out.write_text(table)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 2 threads only")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (None: 1 2, or 2 with --quick)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="configurations")
    parser.add_argument("--memory-configs", nargs="*", default=["readme"], choices=list(CONFIGS)[:2],
                        help="configs whose training-step memory is measured (0.3.0 needs ~10 GB at keys1024)")
    parser.add_argument("--phases", nargs="+", default=None, help="only these phases (None: all of each config)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (3 with --quick)")
    parser.add_argument("--profile", action="store_true", help="also print where a training step's time goes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_pkm.json",
                        help="JSON file of the results (with --sweep, bench_pkm_sweep.json beside it)")
    parser.add_argument("--sweep", action="store_true", help="the size sweep (forward, fwd+bwd) instead of the configs")
    parser.add_argument("--quick-sweep", action="store_true",
                        help="the sweep at 8 representative points, 2 threads, 3 repeats (about 10 minutes on 2 cores)")
    parser.add_argument("--points", type=int, nargs="+", default=None,
                        help="with --sweep: only these points, numbered as --list-points prints them")
    parser.add_argument("--list-points", action="store_true", help="print the numbered sweep points and exit")
    parser.add_argument("--render", action="store_true",
                        help="only write the docs' markdown table (--out with .md) from the committed JSON; runs nothing")
    parser.add_argument("--_memory-child", nargs=3, metavar=("LIB", "CONFIG", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        print(f"wrote {render(args.out)}")
        return
    if args._memory_child:
        lib, config, threads = args._memory_child
        print(json.dumps(memory_child(lib, config, int(threads))))
        return
    points = sweep_points()
    if args.list_points:
        for i, point in enumerate(points):
            print(f"{i:3d}  " + " ".join(f"{k}={v}" for k, v in point.items()))
        return
    if args.quick_sweep:
        args.sweep, args.quick = True, True
        args.sweep_points = list(QUICK_SWEEP)
    elif args.points is not None:
        bad = [i for i in args.points if not 0 <= i < len(points)]
        if bad:
            parser.error(f"--points must be in 0..{len(points) - 1} (see --list-points), got {bad}")
        args.sweep = True
        args.sweep_points = [points[i] for i in args.points]
    else:
        args.sweep_points = points
    if args.threads is None:
        args.threads = [2] if args.quick else [1, 2]
    if args.sweep:
        args.repeats = 3 if args.quick else min(args.repeats, 5)
        results = run_sweep(args)
        print()
        print(sweep_table(results))
        out = args.out.with_name("bench_pkm_sweep.json") if args.out.name == "bench_pkm.json" else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {out}")
        return
    results = run(args)
    print()
    print(markdown_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out} and {render(args.out)}")


if __name__ == "__main__":
    main()
