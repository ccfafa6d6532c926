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

``--compare kinds`` instead trains the same LM once per memory kind (a dense feedforward everywhere
for ``dense``, then every kind of ``layers.MEMORY_KINDS`` in the ``--pkm-layers`` blocks), each sized
so that the parameters a token touches in its memory block (:func:`active_params_per_token`: the
query network and sub-keys, the value rows or experts it reads, gates and output maps) match the dense
feedforward's (``2 * dim * hidden`` plus biases) as closely as the kind's integer sizes allow
(:func:`fit_memory_kwargs`). All runs use ``build_optimizer`` (lazy sparse Adam), the same seed and the
same batches, in lockstep. Written: ``bench_quality_kinds.json``, ``.md`` (:func:`render_kinds_markdown`
of the JSON) and ``.png``.

    python -m benchmarks.bench_quality --compare kinds --quick   # every kind, 100 steps each
    python -m benchmarks.bench_quality --compare kinds           # 1000 steps each

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
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from product_key_memory import PEER, PKM, TransformerLM, build_optimizer, clip_grad_norm_
from product_key_memory.layers import MEMORY_KINDS, build_memory
from product_key_memory.models.transformer import FeedForward
from product_key_memory.tables.base import ValueTable

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
    """One run's model, optimizer, batches and records: ``name`` in the tables, ``variant`` the optimizer."""

    def __init__(self, variant, start_model, train_data, args, lm, *, name=None):
        self.variant, self.lm, self.args = variant, lm, args
        self.name = variant if name is None else name
        self.model = copy.deepcopy(start_model)
        self.opt = make_optimizer(variant, self.model, args)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.batches = lm.random_batches(train_data, args.batch_size, args.seq_len, args.seed)  # the same for all
        self.tracker = lm.usage_tracker(self.model)
        # memory layers with an auxiliary loss (UltraMem's, on its Tucker cores): added to the training loss
        # as train_lm does; the layer's loss, not its parts' too
        kinds = tuple(MEMORY_KINDS.values())
        self.aux_layers = [m for m in self.model.modules()
                           if isinstance(m, kinds) and callable(getattr(m, "aux_loss", None))]
        self.curve, self.step_times, self.train_time, self.usage, self.vgrad = [], [], 0.0, {}, 0

    def step(self, step):
        batch = next(self.batches)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * self.lm.lr_at(step - 1, self.args)
        t0 = time.perf_counter()
        loss = self.model.loss(batch)
        if self.aux_layers:
            loss = loss + self.args.aux_loss_coef * sum(m.aux_loss() for m in self.aux_layers)
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
        print(f"  {self.name:>11} step {step:>5}  {self.train_time:7.1f} s  val {bpb:.4f} bits/byte", flush=True)

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
    return run_lockstep([Run(v, start_model, train_data, args, lm) for v in variants], val_batches, args)


def run_lockstep(runs, val_batches, args):
    for r in runs:
        r.val_batches = val_batches
        r.evaluate(0)
    for step in range(1, args.steps + 1):
        for r in runs:
            r.step(step)
        if step % args.eval_every == 0 or step == args.steps:
            for r in runs:
                r.evaluate(step)
    return {r.name: r.result() for r in runs}


def at_seconds(curve, seconds):
    """Validation bits per byte at ``seconds`` of training, linear between evaluations."""
    for a, b in zip(curve, curve[1:]):
        if b["seconds"] >= seconds:
            w = (seconds - a["seconds"]) / max(b["seconds"] - a["seconds"], 1e-12)
            return a["bpb"] + w * (b["bpb"] - a["bpb"])
    return curve[-1]["bpb"]


# ------------------------------------------------------------ memory kinds at equal active parameters


def _slots_read(layer):
    """``(slots a token reads, the table read)`` for a memory layer that reads a value table, else ``None``.

    Counted per head, as the reads are made (two heads reading the same row count it twice).
    """
    if isinstance(layer, PKM):
        return layer.heads * layer.topk, layer.values
    if isinstance(layer, PEER):
        return layer.heads * layer.experts_per_head, layer.experts
    ultramem = MEMORY_KINDS.get("ultramem")
    if ultramem is not None and isinstance(layer, ultramem):
        # each virtual slot read is one stored row of the implicit table's store, read piece by piece (the
        # projection is applied to every token's grouped sum, so it counts in full)
        return layer.heads * layer.topk, layer.values.store
    return None


def _row_params(table: ValueTable) -> int:
    """Parameters of one slot: a value row, or a PEER expert's down and up rows."""
    return sum(p.numel() for p in table.parameters()) // table.num_slots


def active_params_per_token(module: torch.nn.Module) -> int:
    """Parameters one token touches in ``module``: in each table of rows that a memory layer reads, only
    the rows it reads (:func:`_slots_read` times :func:`_row_params`); every other parameter in full
    (query network, sub-keys, norms, gates, output maps, a feedforward's weights and biases)."""
    read, covered = 0, set()
    for m in module.modules():
        found = _slots_read(m)
        if found is not None:
            slots, table = found
            read += slots * _row_params(table)
            covered |= {id(t) for t in table.modules()}
    # a table is accounted for when its rows are counted, or a counted table lies inside it (UltraMem's)
    unknown = [type(m).__name__ for m in module.modules() if isinstance(m, ValueTable)
               and not any(id(t) in covered for t in m.modules())]
    if unknown:
        raise TypeError(f"active_params_per_token: no rule for the slots read from {unknown} in "
                        f"{type(module).__name__}: add the layer that reads them to _slots_read")
    in_rows = {id(p) for m in module.modules() if id(m) in covered for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in module.parameters() if id(p) not in in_rows) + read


def dense_ff(args) -> FeedForward:
    """The feedforward of every block of the dense model (``ff_mult * dim`` hidden units)."""
    return FeedForward(args.dim, args.ff_mult * args.dim)


def _pkm_sizes(args):
    base = dict(heads=args.pkm_heads, num_keys=args.num_keys, topk=args.topk, dim_head=args.pkm_dim_head)
    return base, "dim_head", "topk"


def _peer_sizes(args):  # num_keys ** 2 experts, softmax gates, as examples/train_lm.py's
    base = dict(heads=args.pkm_heads, num_experts=args.num_keys**2, num_experts_per_head=args.topk,
                dim_key=args.pkm_dim_head, non_competing_scores=False)
    return base, "dim_key", "num_experts_per_head"


def _ultramem_sizes(args):  # the layer's own Tucker rank, cores and value expansion (2, 2, 4)
    base = dict(heads=args.pkm_heads, num_keys=args.num_keys, topk=args.topk, dim_key=args.pkm_dim_head)
    return base, "dim_key", "topk"


# kind -> (args -> (its arguments from the command line, the query/key width's name, the reads per head's
# name)); fit_memory_kwargs fits the last two to the target. Kinds not in MEMORY_KINDS are left out.
KIND_SIZES = {"pkm": _pkm_sizes, "memory_plus": _pkm_sizes, "peer": _peer_sizes, "ultramem": _ultramem_sizes}


def sized_kinds():
    """The memory kinds of ``MEMORY_KINDS`` with a sizing rule in :data:`KIND_SIZES`, in registry order."""
    return [k for k in MEMORY_KINDS if k in KIND_SIZES]


def _largest_at_most(f, lo: int, hi: int, target: int) -> int:
    """The largest ``x`` in ``[lo, hi]`` with ``f(x) <= target`` for ``f`` non-decreasing (``lo`` if none)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if f(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_memory_kwargs(kind: str, dim: int, target: int, args) -> dict:
    """The kind's arguments with its query/key width and then its reads per head chosen so that
    :func:`active_params_per_token` comes closest to ``target``.

    Heads and table size stay as given (``--pkm-heads``, ``--num-keys``). The width is the largest whose
    layer, with ``--topk`` reads per head, does not pass ``target``; the reads per head are then the
    number (from 1) that brings the count closest to it. Sizes are counted on a ``meta``-device layer.
    """
    if kind not in KIND_SIZES:
        raise ValueError(f"kind must be one of {tuple(sized_kinds())} (memory kinds with a sizing rule), got {kind!r}")
    base, width, reads = KIND_SIZES[kind](args)

    def count(**kw) -> float:
        try:
            layer = build_memory(kind, dim, device="meta", **{**base, **kw})
        except ValueError:  # past the kind's limits (reads per head above the sub-keys): never chosen
            return math.inf
        return active_params_per_token(layer)

    w = _largest_at_most(lambda v: count(**{width: v}), 1, 8 * dim, target)
    r = _largest_at_most(lambda v: count(**{width: w, reads: v}), 1, 8 * dim, target)
    if abs(count(**{width: w, reads: r + 1}) - target) < abs(count(**{width: w, reads: r}) - target):
        r += 1
    return {**base, width: w, reads: r}


def build_kind_model(kind: str, args, memory_kwargs: dict):
    common = dict(num_tokens=256, dim=args.dim, depth=args.depth, seq_len=args.seq_len, heads=args.heads,
                  dim_head=args.dim // args.heads, ff_mult=args.ff_mult)
    if kind == "dense":
        return TransformerLM(**common, pkm_layers=())
    return TransformerLM(**common, pkm_layers=args.pkm_layers, memory=kind, memory_kwargs={kind: memory_kwargs})


def memory_blocks_active(model, blocks) -> int:
    """Active parameters per token of the feedforward or memory of ``blocks`` (numbered from 1), summed."""
    return sum(active_params_per_token(model.blocks[b - 1].ff) for b in blocks)


def run_kinds(kinds, args, lm, train_data, val_batches):
    target = active_params_per_token(dense_ff(args))
    models, sizes = {}, {}
    for kind in kinds:  # dense: the model's own feedforward in the memory block(s)
        sizes[kind] = {} if kind == "dense" else fit_memory_kwargs(kind, args.dim, target, args)
        torch.manual_seed(args.seed)  # the same draws for the blocks before the memory
        models[kind] = build_kind_model(kind, args, sizes[kind])
    info = {}
    for kind, model in models.items():
        info[kind] = dict(
            sizes=sizes[kind] or dict(hidden=args.ff_mult * args.dim),
            active_params_per_token=memory_blocks_active(model, args.pkm_layers),
            params=sum(p.numel() for p in model.parameters()),
        )
        print(f"{kind:>11}: {info[kind]['active_params_per_token']:,} active parameters per token in block(s) "
              f"{args.pkm_layers} (dense: {target * len(args.pkm_layers):,}), {info[kind]['params'] / 1e6:.2f}M "
              f"parameters, {_fmt_kwargs(info[kind]['sizes'])}", flush=True)
    runs = [Run("lazy", model, train_data, args, lm, name=kind) for kind, model in models.items()]
    del models
    results = run_lockstep(runs, val_batches, args)
    budget = min(r["train_seconds"] for r in results.values())
    keep = ("curve", "final_bpb", "train_seconds", "step_seconds_median", "usage")
    out = {kind: {**info[kind], **{k: r[k] for k in keep}, "bpb_at_equal_seconds": at_seconds(r["curve"], budget)}
           for kind, r in results.items()}
    target = dict(dense_hidden=args.ff_mult * args.dim, active_params_per_token=target * len(args.pkm_layers))
    return dict(target=target, equal_seconds=budget, kinds=out)


def _fmt_kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def render_kinds_markdown(data: dict) -> str:
    """The Markdown report of a ``--compare kinds`` run, from its JSON (``bench_quality_kinds.json``)."""
    meta, args = data["meta"], data["meta"]["args"]
    steps, budget = args["steps"], data["equal_seconds"]
    load = ", ".join(f"{x:.1f}" for x in meta["loadavg_before"]) + " before, " + ", ".join(
        f"{x:.1f}" for x in meta["loadavg_after"]) + " after"
    # other work than this run's own threads, by the 1-minute load average before and after it
    shared = max(meta["loadavg_before"][0], meta["loadavg_after"][0] - meta["threads"]) > 0.5
    lines = [
        "# Memory kinds at equal active parameters per token",
        "",
        "Produced by",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Byte-level LM of `examples/train_lm.py` (dim {args['dim']}, depth {args['depth']}, {args['heads']} heads, "
        f"context {args['seq_len']}, batch {args['batch_size']}) on this Python's standard library "
        f"({meta['data']['train_files']} train files, {meta['data']['val_files']} validation files); the memory "
        f"in block(s) {args['pkm_layers'].strip('[]')}, a {data['target']['dense_hidden']}-wide GELU feedforward in "
        f"every other block (and in every block of `dense`). Every run: `build_optimizer` (lazy sparse Adam, "
        f"lr {args['lr']}, value tables {args['pkm_lr']}), seed {args['seed']}, the same batches, {steps} steps, "
        "in lockstep (one step of each in turn).",
        "",
        f"Active parameters per token: the parameters a token touches in the memory block(s), counted from the "
        f"built modules by `active_params_per_token`: of a table of value rows or experts, the rows read (per "
        f"head); every other parameter in full (query network, sub-keys, norms, gates, output maps, UltraMem's "
        f"value projection). Target: the dense feedforward's {data['target']['active_params_per_token']:,}. "
        f"Each kind keeps its heads and table size and takes the widest queries that fit, then the reads per "
        f"head that come closest (`fit_memory_kwargs`).",
        "",
        f"| kind | sizes | active params / token | vs dense | parameters | val bits/byte at {steps} steps | "
        f"at equal wall-clock ({budget:.0f} s) | step (ms, median) | slots used (val) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    target = data["target"]["active_params_per_token"]
    for kind, r in data["kinds"].items():
        used = r["usage"].get("used_fraction")
        lines.append(
            f"| {kind} | {_fmt_kwargs(r['sizes'])} | {r['active_params_per_token']:,} | "
            f"{r['active_params_per_token'] / target:.3f} | {r['params'] / 1e6:.2f}M | {r['final_bpb']:.4f} | "
            f"{r['bpb_at_equal_seconds']:.4f} | {1e3 * r['step_seconds_median']:.0f} | "
            f"{'-' if used is None else f'{used:.1%}'} |")
    lines += [
        "",
        f"At equal wall-clock: each run's validation curve (evaluated every {args['eval_every']} steps on "
        f"{args['eval_batches']} batches) interpolated linearly at the shortest run's total training time, "
        f"{budget:.1f} s (training steps only, not evaluation). Slots used: the share of the memory's slots "
        f"(experts for PEER, pieces of virtual slots for UltraMem) read on the validation batches "
        f"(`MemoryUsageTracker`). Layers with an auxiliary loss (UltraMem's Tucker cores) add it to the "
        f"training loss times {args.get('aux_loss_coef', '-')}, as `examples/train_lm.py` does.",
        "",
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, {meta['threads']} torch thread(s), torch {meta['torch']}, "
        f"Python {meta['python']}; load average {load}; {meta['wall_seconds'] / 60:.1f} min in all.",
    ]
    if shared:
        lines += ["", "The machine was shared with other work during this run (load average above this run's own "
                      "thread): step times and the equal-wall-clock column are noisy; the equal-steps column is "
                      "not affected."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def _draw_curves(ax, runs: dict, labels: dict, key: str, title: str, legend_size: int) -> None:
    """Each run's validation curve against ``key`` (``"step"`` or ``"seconds"``) on ``ax``, the y range from the
    best final value."""
    for name, r in runs.items():
        ax.plot([c[key] for c in r["curve"]], [c["bpb"] for c in r["curve"]], marker="o", markersize=3,
                label=labels[name])
    best = min(r["final_bpb"] for r in runs.values())
    ax.set_ylim(best - 0.1, best + 1.2)
    ax.set_xlabel("training step" if key == "step" else "training seconds")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_kinds(data: dict, path: Path) -> bool:
    """Validation curves of each kind at equal steps and at equal wall-clock; ``False`` without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path} not written)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    labels = {kind: f"{kind} ({r['active_params_per_token']:,} active, final {r['final_bpb']:.3f})"
              for kind, r in data["kinds"].items()}
    for ax, key in zip(axes, ("step", "seconds")):
        equal = "steps" if key == "step" else "wall-clock"
        _draw_curves(ax, data["kinds"], labels, key, f"memory kinds at equal active parameters per token: equal "
                     f"{equal}", legend_size=7)
        if key == "seconds":
            ax.axvline(data["equal_seconds"], color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(10, 3.6 * len(sizes)), dpi=110, squeeze=False)
    for row, size in enumerate(sizes):
        labels = {variant: f"{variant} (final {r['final_bpb']:.3f})" for variant, r in results[size].items()}
        for col, key in enumerate(("step", "seconds")):
            _draw_curves(axes[row][col], results[size], labels, key,
                         f"{size} slots: at equal {'steps' if key == 'step' else 'wall-clock'}", legend_size=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


QUICK = dict(steps=60, warmup=6, eval_every=20, eval_batches=4)
# kinds --quick: 100 rounds of five kinds, under 10 minutes on a quiet 2-core machine (UltraMem's step is the longest)
QUICK_KINDS = dict(steps=100, warmup=10, eval_every=10, eval_batches=4)
FULL_KINDS = dict(steps=1000, warmup=80, eval_every=100)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compare", choices=("optimizers", "kinds"), default="optimizers",
                   help="optimizers: lazy, catch-up and dense Adam on the PKM LM; kinds: dense and each memory "
                        "kind at equal active parameters per token")
    p.add_argument("--quick", action="store_true",
                   help="60 steps a run (100 with --compare kinds), 4 validation batches")
    p.add_argument("--kinds", nargs="+", default=None,
                   help="with --compare kinds: 'dense' and memory kinds (default: dense and every kind of "
                        "layers.MEMORY_KINDS with a sizing rule here)")
    p.add_argument("--num-keys", type=int, nargs="+", default=None,
                   help="sub-keys per half: num_keys**2 slots (default 256 1024, i.e. 65,536 and 1,048,576; "
                        "one size with --compare kinds, default 128)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="optimizers to compare")
    p.add_argument("--steps", type=int, default=600,
                   help="training steps of each run (60 with --quick; kinds: 1000, 100 with --quick)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (6 with --quick; kinds: 80, 10)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between validations (20 with --quick; kinds: 100, 10)")
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
    p.add_argument("--aux-loss-coef", type=float, default=1e-3,
                   help="weight of a layer's auxiliary loss (UltraMem's Tucker cores), as train_lm's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the batches")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file, the plot (and with kinds the Markdown) beside it (default: "
                        "benchmarks/results/bench_quality.json, with kinds bench_quality_kinds.json)")
    p.add_argument("--note", default="", help="with --compare kinds: a sentence for the report (what else ran)")
    pre, _ = p.parse_known_args(argv)
    kinds_mode = pre.compare == "kinds"
    if kinds_mode:
        p.set_defaults(**(QUICK_KINDS if pre.quick else FULL_KINDS))
    elif pre.quick:
        p.set_defaults(**QUICK)  # explicit flags still win
    args = p.parse_args(argv)
    if args.num_keys is None:
        args.num_keys = [128] if kinds_mode else [256, 1024]
    if args.out is None:
        args.out = RESULTS / ("bench_quality_kinds.json" if kinds_mode else "bench_quality.json")
    if kinds_mode:
        if len(args.num_keys) != 1:
            p.error(f"--compare kinds takes one --num-keys, got {args.num_keys}")
        args.num_keys = args.num_keys[0]
        known = ["dense", *sized_kinds()]
        if args.kinds is None:
            args.kinds = known
            left = [k for k in MEMORY_KINDS if k not in known]
            if left:
                print(f"no sizing rule for the memory kind(s) {left}: left out")
        bad = [k for k in args.kinds if k not in known]
        if bad:
            p.error(f"--kinds must be among {known}, got {bad}")
    torch.set_num_threads(args.threads)
    lm = load_train_lm()
    train_data, val_data, info = lm.load_stdlib()
    val_batches = lm.validation_batches(val_data, args.eval_batches, args.batch_size, args.seq_len)
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.processor() or
                platform.machine(), cpus=os.cpu_count(), threads=args.threads, loadavg_before=os.getloadavg(),
                data=info, args={k: str(v) for k, v in vars(args).items()})
    started = time.time()
    if kinds_mode:
        data = run_kinds(args.kinds, args, lm, train_data, val_batches)
        meta.update(loadavg_after=os.getloadavg(), wall_seconds=time.time() - started, note=args.note,
                    command=" ".join(["python -m benchmarks.bench_quality", shlex.join(argv)]).strip())
        data = json.loads(json.dumps(dict(meta=meta, **data)))  # rendered from what the JSON holds
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
        md = render_kinds_markdown(data)
        args.out.with_suffix(".md").write_text(md)
        print("\n" + md)
        png = args.out.with_suffix(".png")
        saved = [args.out, args.out.with_suffix(".md")] + ([png] if plot_kinds(data, png) else [])
        print("saved " + ", ".join(map(str, saved)))
        return data
    results = {}
    for num_keys in args.num_keys:
        lm_args = argparse.Namespace(**{**vars(args), "num_keys": num_keys, "memory": "pkm"})  # train_lm's PKM model
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
