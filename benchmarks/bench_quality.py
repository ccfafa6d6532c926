"""What the value-table optimizer does to learning: lazy Adam, catch-up Adam and dense Adam on a byte-level LM.

The model and data are those of ``examples/train_lm.py`` (a small TransformerLM with a PKM in block 3,
bytes of this Python's standard library, split by file). For each table size (``--num-keys``: 256 is
65,536 slots, 1024 is 1,048,576) three runs start from the same weights and see the same batches, in
lockstep (one step of each in turn, so that the load of a shared machine hits them alike):

* ``lazy``: ``build_optimizer`` with sparse value gradients, ``SparseRowAdam(catch_up=False)``;
* ``catch_up``: the same with ``catch_up=True`` (dense AdamW's result for the table, rows caught up
  by the forward pre-hook before they are read);
* ``dense``: ``build_optimizer(sparse_values=False)``: the table's gradient is dense and every row
  takes AdamW's step, which is what ``catch_up`` reproduces.

Everything else (the rest of the model, AdamW with decoupled weight decay 0.1 off the tables, the
warm-up + cosine schedule, gradient clipping at 1.0 with the library's sparse-aware
``clip_grad_norm_``) is identical. Printed and saved to JSON: validation bits per byte at equal
steps and at equal training wall-clock (each curve interpolated at the fastest run's total time),
median step time, optimizer state bytes and value-gradient bytes, slot usage on the validation
batches (``MemoryUsageTracker``), and a plot.

    python -m benchmarks.bench_quality --quick        # both sizes, 60 steps each
    python -m benchmarks.bench_quality                # 600 steps each

Not a test: it asserts nothing. Timings share the machine with whatever else runs; the JSON records
the load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from product_key_memory import build_optimizer, clip_grad_norm_

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("lazy", "catch_up", "dense")


def load_train_lm():
    """``examples/train_lm.py`` as a module: its data, model builder, schedule and evaluation."""
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "examples" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_optimizer(variant: str, model, args):
    common = dict(lr=args.lr, pkm_learning_rate=args.pkm_lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                  pkm_weight_decay=0.0, decoupled_weight_decay=True)
    if variant == "dense":
        return build_optimizer(model, sparse_values=False, **common)
    return build_optimizer(model, catch_up=variant == "catch_up", **common)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def grad_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()
            total += g.values().numel() * g.values().element_size() + g.indices().numel() * 8
        else:
            total += g.numel() * g.element_size()
    return total


def value_grad_bytes(model) -> int:
    return sum(grad_bytes(m) for m in model.modules() if m.__class__.__name__ == "EmbeddingValues")


class Run:
    """One variant's model, optimizer, batches and records."""

    def __init__(self, variant, start_model, train_data, args, lm):
        self.variant, self.lm, self.args = variant, lm, args
        self.model = copy.deepcopy(start_model)
        self.opt = make_optimizer(variant, self.model, args)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.batches = lm.random_batches(train_data, args.batch_size, args.seq_len, args.seed)  # the same for all
        self.tracker = lm.usage_tracker(self.model)
        self.curve, self.step_times, self.train_time, self.usage, self.vgrad = [], [], 0.0, {}, 0

    def step(self, step):
        batch = next(self.batches)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * self.lm.lr_at(step - 1, self.args)
        t0 = time.perf_counter()
        loss = self.model.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        dt = time.perf_counter() - t0
        self.train_time += dt
        self.step_times.append(dt)
        if step == self.args.steps:
            self.vgrad = value_grad_bytes(self.model)

    def evaluate(self, step):
        # with catch_up the hook brings the rows read here up to date, as it would for the next training read
        bpb, usage = self.lm.evaluate(self.model, self.val_batches, self.tracker)
        self.usage = next(iter(usage.values())) if usage else {}
        self.curve.append(dict(step=step, seconds=self.train_time, bpb=bpb))
        print(f"  {self.variant:>8} step {step:>5}  {self.train_time:7.1f} s  val {bpb:.4f} bits/byte", flush=True)

    def result(self):
        if self.variant == "catch_up":
            self.opt.catch_up_()  # every row up to date: the weights dense AdamW's run would hold
            bpb_all, _ = self.lm.evaluate(self.model, self.val_batches, None)
        else:
            bpb_all = self.curve[-1]["bpb"]
        keep = ("used_fraction", "kl_uniform", "kl_uniform_weighted", "gini", "slots_50", "slots_90")
        warm = self.step_times[min(5, len(self.step_times) - 1):]
        return dict(
            curve=self.curve, final_bpb=self.curve[-1]["bpb"], final_bpb_after_catch_up=bpb_all,
            train_seconds=self.train_time, step_seconds_median=statistics.median(warm),
            optimizer_state_bytes=state_bytes(self.opt), value_grad_bytes=self.vgrad,
            usage={k: self.usage[k] for k in keep if k in self.usage},
        )


def run_size(variants, start_model, train_data, val_batches, args, lm):
    """All variants in lockstep, one step of each in turn, so that load changes hit them alike."""
    runs = [Run(v, start_model, train_data, args, lm) for v in variants]
    for r in runs:
        r.val_batches = val_batches
        r.evaluate(0)
    for step in range(1, args.steps + 1):
        for r in runs:
            r.step(step)
        if step % args.eval_every == 0 or step == args.steps:
            for r in runs:
                r.evaluate(step)
    return {r.variant: r.result() for r in runs}


def at_seconds(curve, seconds):
    """Validation bits per byte at ``seconds`` of training, linear between evaluations."""
    for a, b in zip(curve, curve[1:]):
        if b["seconds"] >= seconds:
            w = (seconds - a["seconds"]) / max(b["seconds"] - a["seconds"], 1e-12)
            return a["bpb"] + w * (b["bpb"] - a["bpb"])
    return curve[-1]["bpb"]


def plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(10, 3.6 * len(sizes)), dpi=110, squeeze=False)
    for row, size in enumerate(sizes):
        for col, key in enumerate(("step", "seconds")):
            ax = axes[row][col]
            for variant, r in results[size].items():
                ax.plot([c[key] for c in r["curve"]], [c["bpb"] for c in r["curve"]], marker="o", markersize=3,
                        label=f"{variant} (final {r['final_bpb']:.3f})")
            finals = [r["final_bpb"] for r in results[size].values()]
            ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
            ax.set_xlabel("training step" if key == "step" else "training seconds")
            ax.set_ylabel("validation bits per byte")
            ax.set_title(f"{size} slots: at equal {'steps' if key == 'step' else 'wall-clock'}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


QUICK = dict(steps=60, warmup=6, eval_every=20, eval_batches=4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="60 steps a run, 4 validation batches")
    p.add_argument("--num-keys", type=int, nargs="+", default=[256, 1024],
                   help="sub-keys per half: num_keys**2 slots (256: 65,536; 1024: 1,048,576)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="optimizers to compare")
    p.add_argument("--steps", type=int, default=600, help="training steps of each run (60 with --quick)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (6 with --quick)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations (20 with --quick)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (4 with --quick)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--dim", type=int, default=128, help="model width (and value width)")
    p.add_argument("--depth", type=int, default=4, help="number of blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ff-mult", type=int, default=4, help="feedforward width as a multiple of --dim")
    p.add_argument("--pkm-layers", type=int, nargs="+", default=[3], help="blocks with a PKM, from 1")
    p.add_argument("--topk", type=int, default=16, help="memory slots read per PKM head")
    p.add_argument("--pkm-heads", type=int, default=4, help="PKM query heads")
    p.add_argument("--pkm-dim-head", type=int, default=64, help="width of a PKM query")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate off the value tables")
    p.add_argument("--pkm-lr", type=float, default=1e-2, help="learning rate of the value tables")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay off the tables")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the batches")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_quality.json", help="JSON file (the plot goes beside)")
    if "--quick" in (argv if argv is not None else sys.argv[1:]):
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_train_lm()
    train_data, val_data, info = lm.load_stdlib()
    val_batches = lm.validation_batches(val_data, args.eval_batches, args.batch_size, args.seq_len)
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.processor() or
                platform.machine(), cpus=os.cpu_count(), threads=args.threads, loadavg_before=os.getloadavg(),
                data=info, args={k: str(v) for k, v in vars(args).items()})
    started = time.time()
    results = {}
    for num_keys in args.num_keys:
        lm_args = argparse.Namespace(**{**vars(args), "num_keys": num_keys})
        torch.manual_seed(args.seed)
        start_model = lm.build_models(lm_args)[0]["pkm"]
        slots = num_keys**2
        print(f"{slots:,} slots ({num_keys} keys), {sum(p.numel() for p in start_model.parameters()) / 1e6:.1f}M "
              "parameters", flush=True)
        results[slots] = run_size(args.variants, start_model, train_data, val_batches, lm_args, lm)
        del start_model
    meta.update(loadavg_after=os.getloadavg(), wall_seconds=time.time() - started)

    rows = []
    for slots, by_variant in results.items():
        budget = min(r["train_seconds"] for r in by_variant.values())
        for variant, r in by_variant.items():
            r["bpb_at_equal_seconds"] = at_seconds(r["curve"], budget)
            r["equal_seconds"] = budget
            rows.append((slots, variant, r))
    print(f"\n| slots | optimizer | val bits/byte at {args.steps} steps | at equal wall-clock | step (ms) | "
          "optimizer state (MiB) | value gradient (MiB) | slots used (val) | KL from uniform | Gini |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for slots, variant, r in rows:
        u = r["usage"]
        print(f"| {slots:,} | {variant} | {r['final_bpb']:.4f} | {r['bpb_at_equal_seconds']:.4f} "
              f"({r['equal_seconds']:.0f} s) | {1e3 * r['step_seconds_median']:.0f} | "
              f"{r['optimizer_state_bytes'] / 2**20:.0f} | {r['value_grad_bytes'] / 2**20:.1f} | "
              f"{u.get('used_fraction', math.nan):.1%} | {u.get('kl_uniform', math.nan):.3f} | "
              f"{u.get('gini', math.nan):.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results={str(k): v for k, v in results.items()}), indent=1))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"\nsaved {args.out} and {png}")
    return results


if __name__ == "__main__":
    main()
