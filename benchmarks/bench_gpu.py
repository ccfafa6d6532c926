"""GPU benchmark: this library's ``triton`` and ``torch`` backends, product-key-memory 0.3.0
and a plain ``nn.EmbeddingBag`` read, in one process on one GPU.

    python benchmarks/bench_gpu.py            # full run on CUDA, writes benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --smoke    # every code path at tiny sizes on CPU (triton interpreted)
    python benchmarks/bench_gpu.py --peer-wheel product_key_memory-0.3.0-py3-none-any.whl   # offline
    python benchmarks/bench_gpu.py --configs keys1024 --parts reads --reads zipf --out /tmp/r.json
    python benchmarks/bench_gpu.py --merge a.json b.json --out bench_gpu.json      # join runs

``benchmarks/gpu_check.sh`` runs the CUDA tests and this script in one go on a GPU machine.
The JSON file is rewritten after every configuration and part (``complete: false`` until the
end), so a run stopped by a time limit keeps what it measured.

The 0.3.0 columns need its wheel (see ``benchmarks/peer.py``): found in ``.cache/peer`` at
the checkout's root, else downloaded there with ``pip download``. A GPU machine without
network gets it carried in: ``pip download product-key-memory==0.3.0 --no-deps -d .cache/peer``
where there is network, then copy ``.cache/peer/`` into the GPU machine's checkout (git
ignores it, so a copy of the tracked files leaves it behind) or pass ``--peer-wheel PATH``.
Without the wheel the 0.3.0 columns are skipped and the run goes on.

Configurations: ``readme`` (PKM(dim=512, heads=4, num_keys=256, topk=32, dim_head=128),
input (8, 1024, 512)) and ``keys1024`` (num_keys=1024: 1M slots); each in ``fp32`` and
under ``bf16`` autocast. Phases: ``forward`` (eval, no grad), ``fwd+bwd`` (loss
``out.square().mean()``), ``step`` (zero_grad, forward, backward, optimizer step with each
library's recommended set-up: ours ``build_optimizer`` (sparse value gradient; the triton
backend steps value rows with ``ops.sparse_adam``), 0.3.0 ``torch.optim.Adam`` over its
``fetch_optimizer_parameters`` groups), ``decode`` (input (1, 1, 512), eval forward),
``decode graph`` (ours only, on CUDA: the same step replayed through
``product_key_memory.cuda_graphs.GraphedForward``, as ``TransformerLM.generate`` decodes),
and ``memory``, the peak GPU memory of one training step above the resident model.

Value-read kernels are also timed alone at the layer's read shape (tokens x heads*topk
reads of the table), for three slot distributions (``--reads``): ``uniform``, ``zipf`` (rank r
read with probability proportional to r**-s, ``--zipf-s``, ranks scattered over the table) and
``hot`` (one slot takes 25% of the reads); a ``read agreement`` row gives the triton read's
largest difference from ``F.embedding_bag``. Their bandwidth is set against the device's copy bandwidth,
measured with a large ``tensor.copy_`` (bytes read + written), for the bytes each must
move at least (``bytes``; e the table's element size, U the distinct slots read):

* ``read fwd``: each read's index (8) and weight (e), each distinct slot's row once
  (U * dim * e) and the output (tokens * dim * e). Repeated reads of a row may come from
  cache, so they are not counted; ``bytes_per_read`` and ``fraction_per_read`` count one
  row per read, the traffic the kernel asks of the memory system.
* ``read bwd`` (row-sparse, with the weight gradient): the output gradient (tokens * dim * e),
  each read's index (8), weight (e) and weight gradient (e), and for each distinct slot its
  table row read once and its gradient row and row index written once (U * (2 * dim * e + 8)).

Backends: ours under ``use_backend("triton")`` and ``use_backend("torch")`` (the whole layer,
forward, backward and the optimizer's row update, on one backend). Medians of CUDA-event
timings (``time.perf_counter`` in ``--smoke``). Ratios, all measured in the same process:
``time_vs_torch`` / ``speedup_vs_torch`` against our torch backend in the same phase, and
``time_vs_030`` / ``speedup_vs_030`` against product-key-memory 0.3.0 (the issue's targets),
whose ``decode`` is the baseline of ``decode graph`` too (0.3.0 has no graphed decode);
``memory_vs_030`` for peak memory. A table of them is printed at the end. Not a test:
nothing asserts timings.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from product_key_memory import PKM, build_optimizer, use_backend  # noqa: E402
from product_key_memory.ops.value_read import torch_impl as torch_read  # noqa: E402

LAYER = dict(dim=512, heads=4, dim_head=128, topk=32)
CONFIGS = {"readme": dict(num_keys=256, shape=(8, 1024, 512)), "keys1024": dict(num_keys=1024, shape=(8, 1024, 512))}
DECODE_SHAPE = (1, 1, 512)
SMOKE_LAYER = dict(dim=32, heads=2, dim_head=8, topk=4)
SMOKE_CONFIGS = {"readme": dict(num_keys=8, shape=(1, 4, 32)), "keys1024": dict(num_keys=16, shape=(1, 4, 32))}
SMOKE_DECODE_SHAPE = (1, 1, 32)
PRECISIONS = ("fp32", "bf16")


# -- timing ------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return dict(median_ms=statistics.median(samples), min_ms=min(samples), max_ms=max(samples), n=len(samples))


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes per second of a large device-to-device ``copy_`` (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))["median_ms"]
    return 2 * nbytes / (ms / 1e3)


def triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def backend(lib: str):
    """Ours on the ``triton`` or the ``torch`` backend (the library's own switch); the peer as it is."""
    return use_backend(lib) if lib in ("triton", "torch") else contextlib.nullcontext()


# -- the libraries --------------------------------------------------------------------------------


def load_peer_or_none(wheel=None):
    try:
        from benchmarks.peer import load_peer

        return load_peer(wheel=wheel)
    except Exception as e:  # no network, no cached wheel: the other columns still run
        print(f"product-key-memory 0.3.0 unavailable ({type(e).__name__}: {e}); its columns are skipped")
        return None


def make_models(num_keys, layer, device, peer):
    torch.manual_seed(0)
    ours = PKM(num_keys=num_keys, **layer).to(device)
    models = {"triton": ours, "torch": ours}
    if peer is not None:
        theirs = peer.PKM(num_keys=num_keys, **layer)
        ours.load_state_dict(theirs.state_dict(), strict=True)  # 0.3.0 checkpoints load into this library
        models["0.3.0"] = theirs.to(device)
    return models


def make_optimizer(lib, model, peer):
    if lib == "0.3.0":
        return torch.optim.Adam(peer.fetch_optimizer_parameters(model, pkm_learning_rate=1e-2), lr=1e-3)
    return build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)  # sparse tables; the triton backend's row kernel


def loss_of(out):
    return out.float().square().mean()


def bench_layer(config, spec, layer, decode_shape, precision, device, timer, peer) -> list:
    rows = []
    models = make_models(spec["num_keys"], layer, device, peer)
    x = torch.randn(*spec["shape"], device=device)
    x_dec = torch.randn(*decode_shape, device=device)
    ours = models["torch"].eval()
    with torch.no_grad(), autocast(device, precision):
        want = ours(x).float()
        with backend("triton"):
            got = ours(x).float()
    agree = (got - want).abs().max().item()
    rows.append(dict(config=config, precision=precision, phase="agreement", lib="triton", max_abs_diff_vs_torch=agree))
    print(f"{config:9s} {precision:5s} triton vs torch forward: max |diff| {agree:.3g}")

    def record(phase, lib, res):
        rows.append(dict(config=config, precision=precision, phase=phase, lib=lib, **res))
        note = res.get("error") or res.get("skipped")
        if note:
            print(f"{config:9s} {precision:5s} {phase:12s} {lib:7s} {'error' if 'error' in res else 'skipped'}: {note}")
            return
        print(f"{config:9s} {precision:5s} {phase:12s} {lib:7s} {res.get('median_ms', float('nan')):10.3f} ms"
              + (f"  peak {res['peak_mib']:.1f} MiB" if "peak_mib" in res else ""))

    for lib, model in models.items():
        try:
            run_phases(lib, model, x, x_dec, precision, device, timer, peer, record)
        except Exception as e:  # e.g. a library that does not support bf16 autocast: say so, go on
            rows.append(dict(config=config, precision=precision, phase="all", lib=lib,
                             error=f"{type(e).__name__}: {e}"[:300]))
            print(f"{config:9s} {precision:5s} {lib:7s} FAILED: {rows[-1]['error']}")
            model.zero_grad(set_to_none=True)
            if lib != "0.3.0":
                model.values.sparse = False
            gc.collect()
    return rows


def run_phases(lib, model, x, x_dec, precision, device, timer, peer, record):
    with backend(lib), autocast(device, precision):
        model.eval()
        with torch.no_grad():
            record("forward", lib, timer(lambda: model(x)))
            record("decode", lib, timer(lambda: model(x_dec)))
        model.train()
        if lib != "0.3.0":
            model.values.sparse = True

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            loss_of(model(x)).backward()

        record("fwd+bwd", lib, timer(fwd_bwd))
        opt = make_optimizer(lib, model, peer)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_of(model(x)).backward()
            opt.step()

        record("step", lib, timer(step))
        if device.type == "cuda":
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            record("memory", lib, dict(peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20))
        model.zero_grad(set_to_none=True)
        if lib != "0.3.0":  # after the memory row, so the graph's pool is not counted in it
            model.eval()
            record_graphed_decode(lib, model, x_dec, device, timer, record)
        if lib != "0.3.0":
            model.values.sparse = False
        gc.collect()


def record_graphed_decode(lib, model, x_dec, device, timer, record):
    """Our decoding step replayed as a CUDA graph (captured under the active backend and autocast)."""
    if device.type != "cuda":
        record("decode graph", lib, dict(skipped="CUDA graphs need a CUDA device"))
        return
    from product_key_memory.cuda_graphs import GraphedForward

    try:
        graphed = GraphedForward(model, x_dec)
    except Exception as e:  # e.g. a host sync in a backend's path: report it, time the rest
        record("decode graph", lib, dict(error=f"{type(e).__name__}: {e}"[:300]))
        return
    record("decode graph", lib, timer(lambda: graphed(x_dec)))
    del graphed


READ_DISTRIBUTIONS = ("uniform", "zipf", "hot")


def read_indices(dist: str, num_slots: int, shape, gen: torch.Generator, zipf_s: float = 1.0) -> torch.Tensor:
    """``shape`` slot indices drawn from ``dist``:

    * ``uniform``: every slot alike;
    * ``zipf``: the slot of rank ``r`` (1-based) read with probability proportional to ``r ** -zipf_s``,
      ranks scattered over the table by a random permutation (a few hot rows anywhere in memory);
    * ``hot``: one slot takes 25% of the reads, the others uniform.

    Reads of one bag may repeat a slot (a layer's top-k never does; the kernels do not rely on it)."""
    n = math.prod(shape)
    if dist == "uniform":
        return torch.randint(0, num_slots, shape, generator=gen)
    if dist == "zipf":
        p = torch.arange(1, num_slots + 1, dtype=torch.float64).pow(-zipf_s)
        cdf = p.cumsum(0)
        cdf /= cdf[-1].clone()
        rank = torch.searchsorted(cdf, torch.rand(n, generator=gen, dtype=torch.float64)).clamp_(max=num_slots - 1)
        return torch.randperm(num_slots, generator=gen)[rank].view(shape)
    if dist == "hot":
        idx = torch.randint(0, num_slots, (n,), generator=gen)
        hot = torch.rand(n, generator=gen) < 0.25
        idx[hot] = int(torch.randint(0, num_slots, (1,), generator=gen))
        return idx.view(shape)
    raise ValueError(f"dist must be one of {READ_DISTRIBUTIONS}, got {dist!r}")


def bench_reads(config, spec, layer, device, timer, copy_bps, dists=READ_DISTRIBUTIONS, zipf_s=1.0) -> list:
    """The value-read kernels alone at the layer's read shape, fp32 and bf16 tables, for each read
    distribution of :func:`read_indices`."""
    from product_key_memory.ops.value_read.triton_impl import value_read, value_read_backward_rows

    rows = []
    num_slots = spec["num_keys"] ** 2
    tokens = math.prod(spec["shape"][:-1])
    m, D = layer["heads"] * layer["topk"], layer["dim"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        e = torch.finfo(dtype).bits // 8
        prec = str(dtype).replace("torch.", "")
        table = torch.randn(num_slots, D, generator=gen).to(device=device, dtype=dtype)
        bag = nn.EmbeddingBag(num_slots, D, mode="sum", device=device, dtype=dtype)
        bag.weight.data.copy_(table)
        w = torch.rand(tokens, m, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(tokens, D, generator=gen).to(device=device, dtype=dtype)
        for dist in dists:
            idx = read_indices(dist, num_slots, (tokens, m), gen, zipf_s).to(device)
            reads = tokens * m
            unique = int(torch.unique(idx).numel())
            top_share = float(torch.bincount(idx.flatten()).max()) / reads
            # the least each must move (module docstring): a distinct slot's row once, not once per read
            fwd_bytes = reads * (8 + e) + unique * D * e + tokens * D * e  # index, weight; rows; output
            fwd_bytes_per_read = reads * (8 + e + D * e) + tokens * D * e
            bwd_bytes = tokens * D * e + reads * (8 + 2 * e) + unique * (2 * D * e + 8)  # grad_out; reads; rows
            cases = {
                ("read fwd", "triton"): (lambda: value_read(table, idx, w), fwd_bytes),
                ("read fwd", "torch"): (lambda: F.embedding_bag(idx, table, mode="sum", per_sample_weights=w),
                                        fwd_bytes),
                ("read fwd", "EmbeddingBag"): (lambda: bag(idx, per_sample_weights=w), fwd_bytes),
                ("read bwd", "triton"): (lambda: value_read_backward_rows(g, table, idx, w, None, True), bwd_bytes),
                ("read bwd", "torch"): (lambda: torch_read.value_read_backward_rows(g, table, idx, w, None, True),
                                        bwd_bytes),
            }
            if dtype == torch.bfloat16 and device.type == "cuda":
                del cases[("read bwd", "torch")]  # no bf16 CUDA kernel for the per-sample-weight gradient
            common = dict(config=config, precision=prec, distribution=dist)
            try:  # the kernels' answer first: a fast wrong read is no result
                diff = (value_read(table, idx, w).float() - F.embedding_bag(idx, table, mode="sum",
                                                                            per_sample_weights=w).float())
                rows.append(dict(common, phase="read agreement", lib="triton",
                                 max_abs_diff_vs_torch=diff.abs().max().item()))
            except Exception as err:  # report it, time the rest
                rows.append(dict(common, phase="read agreement", lib="triton", error=f"{type(err).__name__}: {err}"[:300]))
            for (phase, lib), (fn, nbytes) in cases.items():
                try:
                    res = timer(fn)
                except Exception as err:
                    rows.append(dict(common, phase=phase, lib=lib, error=f"{type(err).__name__}: {err}"[:300]))
                    print(f"{config:9s} {prec:8s} {phase:12s} {dist:8s} {lib:12s} error: {rows[-1]['error']}")
                    continue
                bps = nbytes / (res["median_ms"] / 1e3)
                res.update(bytes=nbytes, distinct_slots=unique, reads=reads, top_slot_share=top_share,
                           gbps=bps / 1e9, fraction_of_copy=bps / copy_bps)
                if phase == "read fwd":
                    per_read = fwd_bytes_per_read / (res["median_ms"] / 1e3)
                    res.update(bytes_per_read=fwd_bytes_per_read, fraction_per_read=per_read / copy_bps)
                rows.append(dict(common, phase=phase, lib=lib, **res))
                print(f"{config:9s} {prec:8s} {phase:12s} {dist:8s} {lib:12s} {res['median_ms']:10.3f} ms "
                      f"{res['gbps']:9.2f} GB/s  {res['fraction_of_copy']:.2%} of copy")
        gc.collect()
    return rows


# the phase of each baseline a phase is set against: 0.3.0 has no graphed decode, so its eager one
PEER_PHASE = {"decode graph": "decode"}


def add_ratios(rows):
    """``time_vs_X`` = our median / X's (lower is better), ``speedup_vs_X`` its inverse;
    X = ``torch`` (our torch backend, same phase) and ``030`` (product-key-memory 0.3.0)."""
    def medians(lib):
        return {(r["config"], r["precision"], r["phase"], r.get("distribution")): r["median_ms"] for r in rows
                if r["lib"] == lib and "median_ms" in r}

    peaks = {(r["config"], r["precision"]): r["peak_mib"] for r in rows if r["lib"] == "0.3.0" and "peak_mib" in r}
    for tag, lib, phase_map in (("torch", "torch", {}), ("030", "0.3.0", PEER_PHASE)):
        base = medians(lib)
        for r in rows:
            if r["lib"] in ("0.3.0", lib) or "median_ms" not in r:
                continue
            t = base.get((r["config"], r["precision"], phase_map.get(r["phase"], r["phase"]), r.get("distribution")))
            if t:
                r[f"time_vs_{tag}"] = r["median_ms"] / t
                r[f"speedup_vs_{tag}"] = t / r["median_ms"]
    for r in rows:
        p = peaks.get((r["config"], r["precision"]))
        if r["lib"] != "0.3.0" and "peak_mib" in r and p:
            r["memory_vs_030"] = r["peak_mib"] / p


def label(r) -> str:
    """A row's phase, with its read distribution for the read kernels."""
    return f"{r['phase']} {r['distribution']}" if r.get("distribution") else r["phase"]


def print_ratios(rows):
    """Speedups of each of our rows over the torch backend and over 0.3.0 (x: times faster)."""
    peer_failed = {(r["config"], r["precision"]) for r in rows if r["lib"] == "0.3.0" and "error" in r}
    print(f"\n{'config':9s} {'prec':8s} {'phase':20s} {'lib':12s} {'ms':>10s} {'vs torch':>9s} {'vs 0.3.0':>11s}")
    for r in rows:
        if r["lib"] == "0.3.0" or r["phase"].endswith("agreement"):
            continue
        if "peak_mib" in r:
            vs = f"{r['memory_vs_030']:.2f}x mem" if "memory_vs_030" in r else "-"
            print(f"{r['config']:9s} {r['precision']:8s} {label(r):20s} {r['lib']:12s} "
                  f"{r['peak_mib']:7.1f}MiB {'':>9s} {vs:>11s}")
            continue
        if "median_ms" not in r:
            continue
        vt = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
        vp = f"{r['speedup_vs_030']:.2f}x" if "speedup_vs_030" in r else "-"
        if (r["config"], r["precision"]) in peer_failed and "speedup_vs_030" not in r:
            vp = "0.3.0 fails"
        print(f"{r['config']:9s} {r['precision']:8s} {label(r):20s} {r['lib']:12s} {r['median_ms']:10.3f} "
              f"{vt:>9s} {vp:>11s}")


def merge(paths, out: Path) -> dict:
    """One results file from several runs' (e.g. one per configuration, as ``gpu_check.sh`` runs
    them): rows and configurations joined, the rest taken from the first; a missing or unreadable
    file is named in ``missing``."""
    merged, missing = None, []
    for path in paths:
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            missing.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if merged is None:
            merged = dict(res, rows=[], configs={}, runs=[])
        merged["rows"] += res["rows"]
        merged["configs"].update(res["configs"])
        merged["runs"].append(dict(file=Path(path).name, complete=res.get("complete", True)))
    merged = merged or dict(rows=[], configs={}, runs=[])
    merged["missing"] = missing
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2))
    print(f"merged {len(paths) - len(missing)} of {len(paths)} runs into {out}" + "".join(f"\n  missing {m}" for m in missing))
    return merged


def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the module docstring as written, and each option's default

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks every path runs, times nothing")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (the median is kept)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before them")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="configurations")
    parser.add_argument("--peer-wheel", type=Path, default=None,
                        help="the product-key-memory 0.3.0 wheel, for a machine without network "
                             "(None: PKM_PEER_WHEEL, else .cache/peer, else pip download)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (None: benchmarks/results/bench_gpu.json, bench_gpu_smoke.json with --smoke)")
    parser.add_argument("--parts", nargs="+", default=["layer", "reads"], choices=["layer", "reads"],
                        help="the whole layer's phases, the value-read kernels alone, or both")
    parser.add_argument("--reads", nargs="+", default=list(READ_DISTRIBUTIONS), choices=list(READ_DISTRIBUTIONS),
                        help="slot distributions of the value-read timings")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="the Zipf exponent of --reads zipf")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="only join these runs' JSON files into --out (no timing)")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        merge(args.merge, args.out)
        return

    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        layer, configs, decode_shape = SMOKE_LAYER, SMOKE_CONFIGS, SMOKE_DECODE_SHAPE
        args.repeats, args.warmup = 1, 0
        copy_bytes = 1 << 20
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (use --smoke to check the code paths on CPU)")
        device = torch.device("cuda")
        layer, configs, decode_shape = LAYER, CONFIGS, DECODE_SHAPE
        copy_bytes = 1 << 30
    timer = Timer(device, args.repeats, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke, triton interpreted)"
    peer = load_peer_or_none(args.peer_wheel)
    copy_bps = copy_bandwidth(device, timer, copy_bytes)
    print(f"device: {name}; copy bandwidth {copy_bps / 1e9:.1f} GB/s")

    out = args.out or ROOT / "benchmarks" / "results" / ("bench_gpu_smoke.json" if args.smoke else "bench_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def write(complete: bool):  # after every part too, so a run stopped by a time limit leaves what it measured
        results = dict(
            device=name, smoke=args.smoke, torch=torch.__version__, triton=triton_version(), copy_gbps=copy_bps / 1e9,
            layer=layer, configs={k: configs[k] for k in args.configs}, decode_shape=decode_shape,
            repeats=args.repeats, warmup=args.warmup, peer=None if peer is None else "product-key-memory 0.3.0",
            parts=args.parts, reads=args.reads, zipf_s=args.zipf_s, complete=complete, rows=rows,
        )
        out.write_text(json.dumps(results, indent=2))

    for config in args.configs:
        spec = configs[config]
        if "layer" in args.parts:
            for precision in PRECISIONS:
                rows += bench_layer(config, spec, layer, decode_shape, precision, device, timer, peer)
                write(False)
        if "reads" in args.parts:
            rows += bench_reads(config, spec, layer, device, timer, copy_bps, args.reads, args.zipf_s)
            write(False)
    add_ratios(rows)
    print_ratios(rows)
    write(True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
