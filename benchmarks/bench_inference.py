"""Inference with quantized value tables against product-key-memory 0.3.0, side by side in one process.

    python benchmarks/bench_inference.py            # 1 and 2 threads, writes benchmarks/results/bench_inference.json
    python benchmarks/bench_inference.py --batch8   # also the (8, 1024, 512) forward

Layer: the README config (dim=512, heads=4, num_keys=256, topk=32, dim_head=128; 65,536
slots); ``--num-keys 1024`` for a 1M-slot table. For each table format (fp32, bf16, fp16,
int8, int4) the script reports:

* ``table MiB``: bytes of the stored table (and, by the same formula, of a 1M-slot
  ``dim=1024`` table);
* ``forward``: eval, no grad, input ``(1, 1024, 512)`` (and ``(8, 1024, 512)``);
  ``decode``: input ``(1, 1, 512)``, 100 calls per timed sample;
* accuracy of the layer output against the float32 layer on the same input:
  ``max |err| / rms(out)`` and ``mean |err| / mean |out|``; and of the stored rows:
  ``max |err| / rms(table)``.

Every format is timed as a user runs it: ``quantize_values_(pkm, fmt)`` on a copy of the
float layer, then ``PKM.forward`` (``fp32`` is the float layer itself), under ``torch.no_grad``
(the lean inference path). Every row alternates with 0.3.0 on every repeat; ratio = 0.3.0
median / ours median. Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peer import load_peer  # noqa: E402
from product_key_memory import PKM, quantize_values_  # noqa: E402
from product_key_memory.tables.quantized import row_bytes  # noqa: E402

LAYER = dict(dim=512, heads=4, topk=32, dim_head=128)
FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
QUANT = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "int4": "int4"}


def build(num_keys: int, seed: int = 0):
    """0.3.0's layer, and ours in every format: ``{fmt: PKM}``, the same weights throughout."""
    peer = load_peer()
    torch.manual_seed(seed)
    ours = PKM(num_keys=num_keys, **LAYER).eval()
    theirs = peer.PKM(num_keys=num_keys, **LAYER).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # 0.3.0 checkpoints load into this library
    layers = {"fp32": ours}
    for name, fmt in QUANT.items():
        layers[name] = quantize_values_(copy.deepcopy(ours), fmt)
    return layers, theirs


def timed_pair(f_ours, f_peer, repeats: int, inner: int):
    with torch.no_grad():
        for f in (f_ours, f_peer):
            f()
        samples = {"ours": [], "peer": []}
        for r in range(repeats):
            for k, f in ((("ours", f_ours), ("peer", f_peer)) if r % 2 == 0 else (("peer", f_peer), ("ours", f_ours))):
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                samples[k].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def accuracy(layers, fmt, x):
    with torch.no_grad():
        ref = layers["fp32"](x)
        err = (layers[fmt](x) - ref).abs()
        w = layers["fp32"].values.weight
        stored = w if fmt == "fp32" else layers[fmt].values.dequantized()
        row_err = (stored - w).abs()
    rms = ref.square().mean().sqrt()
    return dict(out_max=(err.max() / rms).item(), out_mean=(err.mean() / ref.abs().mean()).item(),
                row_max=(row_err.max() / w.square().mean().sqrt()).item())


def table_mib(fmt: str, num_slots: int, dim: int) -> float:
    if fmt == "fp32":
        return num_slots * dim * 4 / 2**20
    name = {"bf16": "bfloat16", "fp16": "float16"}.get(fmt, fmt)
    return num_slots * row_bytes(name, dim) / 2**20


def summary_table(results) -> str:
    """The docs' table: per format its size, its error against float32 and the 0.3.0 / ours ratios."""
    names = {"fp32": ("float32", "`4 dim`"), "bf16": ("bfloat16", "`2 dim`"), "fp16": ("float16", "`2 dim`"),
             "int8": ("int8", "`dim + 8`"), "int4": ("int4", "`dim / 2 + 4`")}
    rows = results["rows"]
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    ratio = {(r["fmt"], r["kind"], r["threads"]): f"{r['ratio']:.2f}x" for r in rows if r["kind"] != "accuracy"}
    per_threads = " / ".join(str(t) for t in threads)
    lines = [f"| format | bytes per row | README table | 1M x 1024 table | output error (mean \\|err\\| / mean \\|out\\|) "
             f"| forward, {per_threads} threads | decode step, {per_threads} threads |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in (r for r in rows if r["kind"] == "accuracy"):
        name, size = names.get(r["fmt"], (r["fmt"], ""))
        error = "0" if r["out_mean"] == 0 else f"{r['out_mean']:.1e}"
        fwd = " / ".join(ratio.get((r["fmt"], "forward (1,1024)", t), "-") for t in threads)
        dec = " / ".join(ratio.get((r["fmt"], "decode (1,1)", t), "-") for t in threads)
        lines.append(f"| {name} | {size} | {r['table_mib']:.1f} MiB | {r['table_mib_1m_1024']:,.0f} MiB | {error} "
                     f"| {fwd} | {dec} |")
    return "\n".join(lines) + "\n"


def render(json_path: Path) -> Path:
    """Write the docs' table (``.md`` beside the JSON) from committed results, without running anything."""
    out = json_path.with_suffix(".md")
    out.write_text(summary_table(json.loads(json_path.read_text())))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
    p.add_argument("--num-keys", type=int, default=256, help="sub-keys per half: num_keys**2 slots")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="table formats to time")
    p.add_argument("--batch8", action="store_true", help="also time the (8, 1024, 512) forward")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (the median is kept)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_inference.json",
                   help="JSON file of the results")
    p.add_argument("--render", action="store_true",
                   help="only write the docs' markdown table (--out with .md) from the committed JSON; runs nothing")
    args = p.parse_args(argv)
    if args.render:
        print(f"wrote {render(args.out)}")
        return
    layers, theirs = build(args.num_keys)
    slots = args.num_keys**2
    shapes = {"forward (1,1024)": (1, 1024, 512), "decode (1,1)": (1, 1, 512)}
    if args.batch8:
        shapes["forward (8,1024)"] = (8, 1024, 512)
    torch.manual_seed(1)
    inputs = {k: torch.randn(s) for k, s in shapes.items()}
    rows = []
    for fmt in args.formats:
        acc = accuracy(layers, fmt, inputs["forward (1,1024)"])
        rows.append(dict(fmt=fmt, kind="accuracy", table_mib=table_mib(fmt, slots, 512),
                         table_mib_1m_1024=table_mib(fmt, 2**20, 1024), **acc))
        print(f"{fmt:<12} table {rows[-1]['table_mib']:8.1f} MiB (1M x 1024: {rows[-1]['table_mib_1m_1024']:7.0f} MiB)  "
              f"out max|err|/rms {acc['out_max']:.2e}  mean|err|/mean|out| {acc['out_mean']:.2e}  "
              f"row max|err|/rms {acc['row_max']:.2e}", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape_name, x in inputs.items():
            decode = x.shape[1] == 1
            for fmt in args.formats:
                r = timed_pair(functools.partial(layers[fmt], x), functools.partial(theirs, x),
                               repeats=args.repeats, inner=100 if decode else 1)
                row = dict(fmt=fmt, kind=shape_name, threads=threads, ours_ms=r["ours"], peer_ms=r["peer"],
                           ratio=r["peer"] / r["ours"])
                rows.append(row)
                print(f"{threads}T {shape_name:<17} {fmt:<12} ours {r['ours']:9.3f} ms  0.3.0 {r['peer']:9.3f} ms  "
                      f"0.3.0/ours {row['ratio']:5.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, cpu_count=os.cpu_count(), loadavg=os.getloadavg(), num_keys=args.num_keys,
                repeats=args.repeats, time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out} and {render(args.out)}")


if __name__ == "__main__":
    main()
