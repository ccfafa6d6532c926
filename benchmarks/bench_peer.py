"""This library's PEER against PEER-pytorch 0.2.2: a training step, side by side in one process.

    python benchmarks/bench_peer.py            # writes benchmarks/results/bench_peer.json
    python benchmarks/bench_peer.py --quick    # 3 repeats

Layer: dim 256, 262,144 experts (512 x 512 sub-keys), 8 heads x 16 experts per head, input
(1, tokens, 256) for each ``--tokens`` (256 and 1024 by default: 1024 tokens read 131,072 experts,
about 40% of the table's rows touched per step, 256 tokens about 12%). Configurations:
``softmax`` (``non_competing_scores=False``: both libraries keep 16 experts per head) and
``default`` (PEER-pytorch's defaults, ReLU gates: both keep one expert per head, PEER-pytorch#4).
Both layers hold the same weights (PEER-pytorch's state dict loads into ours).

A step is ``zero_grad(set_to_none=True)``, forward, loss ``out.square().mean()``, backward,
optimizer step, each library with its usual optimizer: PEER-pytorch with
``torch.optim.Adam(model.parameters())`` (dense gradients of both expert tables), ours with
``build_optimizer(model)`` (row-sparse expert gradients, SparseRowAdam stepping only the
experts read). ``forward`` is eval mode under no_grad. The libraries alternate on every
repeat; reported: median and min-max in ms, ratio = PEER-pytorch median / ours, and the
ratio of the minimums. Steps are timed after ``--warmup`` (5) untimed steps of each library: a
lazy Adam's first steps also pay the first touch of its state rows, which a dense Adam pays once
in its first step. ``--threads 2`` on a machine whose 2 cores other processes share made every
small op of a step wait for the descheduled thread (one run: ours 11.8 s a step, min 1.1 s); the
numbers in results/ are from ``--threads 1``. Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from product_key_memory import PEER, build_optimizer  # noqa: E402

SIZES = dict(heads=8, num_experts=512 * 512, num_experts_per_head=16)
DIM = 256
CONFIGS = {"softmax": dict(non_competing_scores=False), "default": dict()}


def make_pair(config: str, seed: int = 0):
    from PEER_pytorch import PEER as PeerPytorch

    torch.manual_seed(seed)
    theirs = PeerPytorch(DIM, **SIZES, **CONFIGS[config])
    ours = PEER(DIM, **SIZES, **CONFIGS[config])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def make_step(model, opt, x):
    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    return step


def make_forward(model, x):
    @torch.no_grad()
    def forward():
        model(x)

    return forward


def bench(fns: dict, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return samples


def summarize(samples, ours="ours", theirs="PEER-pytorch") -> dict:
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "ms": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in samples.items()},
        "ratio_median": med[theirs] / med[ours],
        "ratio_min": min(samples[theirs]) / min(samples[ours]),
    }


def output_difference(ours, theirs, x) -> dict:
    """Max |difference| of the outputs, and how many tokens differ by more than 1e-3 (a near-tie in
    float32 that the two searches, summing in another order, break differently swaps an expert)."""
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    per_token = (a - b).abs().amax(-1).flatten()
    return {"max_abs": per_token.max().item(), "max_abs_output": b.abs().max().item(),
            "tokens_over_1e-3": int((per_token > 1e-3).sum()), "tokens": per_token.numel()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    results = {}
    for config, tokens in [(c, t) for c in args.configs for t in args.tokens]:
        x = torch.randn(1, tokens, DIM)
        ours, theirs = make_pair(config)
        diff = output_difference(ours, theirs, x)
        row = {"tokens": tokens, "output_difference": diff}
        ours.eval(), theirs.eval()
        row["forward"] = summarize(bench({"ours": make_forward(ours, x), "PEER-pytorch": make_forward(theirs, x)},
                                         args.repeats, 1))
        ours.train(), theirs.train()
        steps = {
            "ours": make_step(ours, build_optimizer(ours, lr=1e-3, pkm_learning_rate=1e-3), x),
            "PEER-pytorch": make_step(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3), x),
        }
        row["step"] = summarize(bench(steps, args.repeats, args.warmup))
        results[f"{config}/{tokens}"] = row
        del ours, theirs, steps
        print(f"{config}, {tokens} tokens: " + ", ".join(
            f"{phase} ours {row[phase]['ms']['ours']['median']:.1f} ms, PEER-pytorch "
            f"{row[phase]['ms']['PEER-pytorch']['median']:.1f} ms, ratio {row[phase]['ratio_median']:.2f}x "
            f"(min ratio {row[phase]['ratio_min']:.2f}x)" for phase in ("forward", "step")
        ) + f"; max |out diff| {diff['max_abs']:.2e} (max |out| {diff['max_abs_output']:.1f}, "
          f"{diff['tokens_over_1e-3']} tokens over 1e-3)", flush=True)
    return results


def summary_table(results: dict) -> str:
    """The docs' table: a training step's medians of both libraries and their ratio, per gate and token count."""
    gates = {"softmax": "softmax ({k})", "default": "ReLU, 0.2.2 default (1)"}
    k = SIZES["num_experts_per_head"]
    lines = ["| gates (experts kept per head) | tokens | step, ours | step, PEER-pytorch | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        config = name.split("/")[0]
        ms = row["step"]["ms"]
        lines.append(f"| {gates.get(config, config).format(k=k)} | {row['tokens']} | {ms['ours']['median']:.0f} ms "
                     f"| {ms['PEER-pytorch']['median']:.0f} ms | {row['step']['ratio_median']:.1f}x |")
    return "\n".join(lines) + "\n"


def render(json_path: Path) -> Path:
    """Write the docs' table (``.md`` beside the JSON) from committed results, without running anything."""
    out = json_path.with_suffix(".md")
    out.write_text(summary_table(json.loads(json_path.read_text())["results"]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each library (medians)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps of each library")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="tokens per step")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="experts kept per head: softmax (16) or default (PEER-pytorch's one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_peer.json",
                        help="JSON file of the results")
    parser.add_argument("--render", action="store_true",
                        help="only write the docs' markdown table (--out with .md) from the committed JSON; runs nothing")
    args = parser.parse_args(argv)
    if args.render:
        print(f"wrote {render(args.out)}")
        return
    if args.quick:
        args.repeats = 3
    import PEER_pytorch  # noqa: F401  (pip install PEER-pytorch==0.2.2)

    results = run(args)
    meta = {
        "command": "python benchmarks/" + Path(__file__).name + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "sizes": dict(SIZES, dim=DIM, tokens=args.tokens),
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out} and {render(args.out)}")


if __name__ == "__main__":
    main()
