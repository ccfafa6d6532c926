"""GPU benchmark: this library's ``triton`` and ``torch`` backends, product-key-memory 0.3.0
and a plain ``nn.EmbeddingBag`` read, in one process on one GPU.

    python benchmarks/bench_gpu.py            # full run on CUDA, writes benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --smoke    # every code path at tiny sizes on CPU (triton interpreted)

Configurations: ``readme`` (PKM(dim=512, heads=4, num_keys=256, topk=32, dim_head=128),
input (8, 1024, 512)) and ``keys1024`` (num_keys=1024: 1M slots); each in ``fp32`` and
under ``bf16`` autocast. Phases: ``forward`` (eval, no grad), ``fwd+bwd`` (loss
``out.square().mean()``), ``step`` (zero_grad, forward, backward, optimizer step with each
library's recommended set-up: ours ``build_optimizer`` (sparse value gradient; the triton
backend steps value rows with ``ops.triton.adam``), 0.3.0 ``torch.optim.Adam`` over its
``fetch_optimizer_parameters`` groups), ``decode`` (input (1, 1, 512), eval forward), and
the peak GPU memory of one training step above the resident model.

Value-read kernels are also timed alone at the layer's read shape (tokens x heads*topk
reads of the table) and their bandwidth is set against the device's copy bandwidth,
measured with a large ``tensor.copy_``, for the bytes each must move at least.

Backends: ours under ``use_backend("triton")`` and ``use_backend("torch")`` (the whole layer,
forward, backward and the optimizer's row update, on one backend). Medians of CUDA-event timings (``time.perf_counter`` in ``--smoke``), ratios to
``torch`` measured in the same process. Not a test: nothing asserts timings.
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
from product_key_memory.ops import cpu as cpu_backend  # noqa: E402

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


def backend(lib: str):
    """Ours on the ``triton`` or the ``torch`` backend (the library's own switch); the peer as it is."""
    return use_backend(lib) if lib in ("triton", "torch") else contextlib.nullcontext()


# -- the libraries --------------------------------------------------------------------------------


def load_peer_or_none():
    try:
        from benchmarks.peer import load_peer

        return load_peer()
    except Exception as e:  # no network, no cached wheel: the other columns still run
        print(f"product-key-memory 0.3.0 unavailable ({type(e).__name__}: {e}); its columns are skipped")
        return None


def make_models(num_keys, layer, device, peer):
    torch.manual_seed(0)
    ours = PKM(num_keys=num_keys, **layer).to(device)
    models = {"triton": ours, "torch": ours}
    if peer is not None:
        theirs = peer.PKM(num_keys=num_keys, **layer)
        theirs.load_state_dict(ours.state_dict(), strict=True)
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
        print(f"{config:9s} {precision:5s} {phase:9s} {lib:7s} {res.get('median_ms', float('nan')):10.3f} ms"
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
        if lib != "0.3.0":
            model.values.sparse = False
        gc.collect()


def bench_reads(config, spec, layer, device, timer, copy_bps) -> list:
    """The value-read kernels alone at the layer's read shape, fp32 and bf16 tables."""
    from product_key_memory.ops.triton.value_read import value_read, value_read_backward

    rows = []
    num_slots = spec["num_keys"] ** 2
    tokens = math.prod(spec["shape"][:-1])
    m, D = layer["heads"] * layer["topk"], layer["dim"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        e = torch.finfo(dtype).bits // 8
        table = torch.randn(num_slots, D, generator=gen).to(device=device, dtype=dtype)
        bag = nn.EmbeddingBag(num_slots, D, mode="sum", device=device, dtype=dtype)
        bag.weight.data.copy_(table)
        idx = torch.randint(0, num_slots, (tokens, m), generator=gen).to(device)
        w = torch.rand(tokens, m, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(tokens, D, generator=gen).to(device=device, dtype=dtype)
        reads = tokens * m
        fwd_bytes = reads * (D * e + 8 + e) + tokens * D * e  # rows, index, weight; output
        unique = int(torch.unique(idx).numel())
        bwd_bytes = reads * (2 * D * e + 8 + 8 + 2 * e) + unique * (D * e + 8)  # grad rows + table rows per read
        cases = {
            ("read fwd", "triton"): (lambda: value_read(table, idx, w), fwd_bytes),
            ("read fwd", "torch"): (lambda: F.embedding_bag(idx, table, mode="sum", per_sample_weights=w), fwd_bytes),
            ("read fwd", "EmbeddingBag"): (lambda: bag(idx, per_sample_weights=w), fwd_bytes),
            ("read bwd", "triton"): (lambda: value_read_backward(
                g, table, idx, w, None, need_values_grad=True, need_weights_grad=True, sparse=True), bwd_bytes),
            ("read bwd", "torch"): (lambda: cpu_backend.value_read_backward_rows(g, table, idx, w, None, True), bwd_bytes),
        }
        if dtype == torch.bfloat16 and device.type == "cuda":
            del cases[("read bwd", "torch")]  # no bf16 CUDA kernel for the per-sample-weight gradient
        for (phase, lib), (fn, nbytes) in cases.items():
            res = timer(fn)
            bps = nbytes / (res["median_ms"] / 1e3)
            res.update(bytes=nbytes, gbps=bps / 1e9, fraction_of_copy=bps / copy_bps)
            rows.append(dict(config=config, precision=str(dtype).replace("torch.", ""), phase=phase, lib=lib, **res))
            print(f"{config:9s} {rows[-1]['precision']:8s} {phase:9s} {lib:12s} {res['median_ms']:10.3f} ms "
                  f"{res['gbps']:9.2f} GB/s  {res['fraction_of_copy']:.2%} of copy")
        gc.collect()
    return rows


def add_ratios(rows):
    base = {(r["config"], r["precision"], r["phase"]): r["median_ms"] for r in rows if r["lib"] == "torch"
            and "median_ms" in r}
    for r in rows:
        t = base.get((r["config"], r["precision"], r["phase"]))
        if t and "median_ms" in r:
            r["time_vs_torch"] = r["median_ms"] / t


def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the module docstring as written, and each option's default

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks every path runs, times nothing")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (the median is kept)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before them")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="configurations")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (None: benchmarks/results/bench_gpu.json, bench_gpu_smoke.json with --smoke)")
    args = parser.parse_args(argv)

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
    peer = load_peer_or_none()
    copy_bps = copy_bandwidth(device, timer, copy_bytes)
    print(f"device: {name}; copy bandwidth {copy_bps / 1e9:.1f} GB/s")

    rows = []
    for config in args.configs:
        spec = configs[config]
        for precision in PRECISIONS:
            rows += bench_layer(config, spec, layer, decode_shape, precision, device, timer, peer)
        rows += bench_reads(config, spec, layer, device, timer, copy_bps)
    add_ratios(rows)
    results = dict(
        device=name, smoke=args.smoke, torch=torch.__version__, copy_gbps=copy_bps / 1e9,
        layer=layer, configs={k: configs[k] for k in args.configs}, decode_shape=decode_shape,
        repeats=args.repeats, warmup=args.warmup, rows=rows,
    )
    out = args.out or ROOT / "benchmarks" / "results" / ("bench_gpu_smoke.json" if args.smoke else "bench_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
