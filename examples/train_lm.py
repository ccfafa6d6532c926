"""Byte-level language model on this Python's standard library: a PKM model against a dense baseline.

Every machine with Python has the data: the ``.py`` files of the standard library
(``sysconfig.get_paths()['stdlib']``, without ``site-packages``). Files go to train or
validation by a hash of their relative path, so the split is the same everywhere.

Two models train on the same batches in the same order:

* ``pkm``: a :class:`~product_key_memory.TransformerLM` whose ``--pkm-layers`` blocks read a PKM
  (``--memory memory_plus``, ``peer`` or ``ultramem``: a Memory+, PEER or UltraMem layer instead;
  UltraMem's auxiliary loss on its Tucker cores is added to the training loss, ``--aux-loss-coef``);
* ``dense``: the same model with a GELU feedforward in those blocks whose hidden width is
  chosen so the block does the same multiply-adds per token as the PKM (query projection,
  sub-key scores and the ``heads * topk`` value rows read). Every other block is identical,
  so both models spend the same compute per token and differ only in parameters.

Run ``python examples/train_lm.py --quick`` for a few minutes on 2 CPU cores; see ``--help``.
Needs the examples' extras (tqdm, matplotlib): ``pip install -e ".[examples]"`` in a checkout.
Writes ``val_curves.png``, ``results.json`` and ``memory_usage_pkm.png`` under ``--out``, and the
tables (bits per byte, the validation curve, the memory-usage statistics) as ``train_lm.md``, rendered
by :func:`render` from ``train_lm.json``, under ``--results`` (``--results benchmarks/results``: the
README's tables). Seeded and one thread by default: the same settings give the same tables on every run;
``results.json`` also holds the training speed, which the tables leave out.

Blocks are numbered from 1 as in ``TransformerLM(pkm_layers=...)``; module paths count from 0,
so block 3 is ``blocks.2`` and its PKM ``blocks.2.ff``. Printed names show both.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

from product_key_memory import PEER, PKM, TransformerLM, UltraMem, fetch_optimizer_parameters
from product_key_memory.layers.ultramem import ultramem_aux_loss
from product_key_memory.training import value_lr_multiplier
from product_key_memory.models.transformer import FeedForward

# ----------------------------------------------------------------------------------- data


def stdlib_files(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        yield rel, path


def is_validation(rel: str, val_percent: float) -> bool:
    bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10_000
    return bucket < val_percent * 100


def load_stdlib(val_percent: float = 5.0):
    """Bytes of the standard library's ``.py`` files, split by file: ``(train, val, info)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = {"train": [], "val": []}
    files = {"train": 0, "val": 0}
    for rel, path in stdlib_files(root):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        split = "val" if is_validation(rel, val_percent) else "train"
        parts[split].append(data + b"\n")
        files[split] += 1
    to_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    info = dict(root=str(root), train_files=files["train"], val_files=files["val"])
    return to_tensor(parts["train"]), to_tensor(parts["val"]), info


def random_batches(data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size, 1), generator=gen)
        yield data[starts + offsets].long()  # (B, T + 1)


def validation_batches(data: torch.Tensor, num_batches: int, batch_size: int, seq_len: int):
    """Fixed windows spread evenly over the validation bytes."""
    n = num_batches * batch_size
    starts = torch.linspace(0, len(data) - seq_len - 2, n).long().view(num_batches, batch_size, 1)
    return [data[s + torch.arange(seq_len + 1)].long() for s in starts]


# ------------------------------------------------------------------------------ compute


def pkm_lookup_macs(pkm: PKM) -> int:
    """Multiply-adds per token of a PKM outside its linear maps: sub-key scores and the value rows read."""
    return pkm.heads * 2 * pkm.num_keys * pkm.dim_head + pkm.heads * pkm.topk * pkm.values.weight.shape[1]


def peer_lookup_macs(peer: PEER) -> int:
    """Multiply-adds per token of a PEER outside its query projection: sub-key scores and the experts
    used (one down and one up row each)."""
    return peer.heads * 2 * peer.num_keys * peer.dim_key + peer.heads * peer.experts_per_head * 2 * peer.dim


def ultramem_lookup_macs(layer: UltraMem) -> int:
    """Multiply-adds per token of an UltraMem outside its linear maps: the sub-key scores (``rank`` sets),
    the cores' scores on the candidate grid and the stored rows read (its projection is an nn.Linear)."""
    keys = layer.keys
    side = min(2 * keys.candidates if keys.first_stage == "two_sided" else keys.candidates, keys.num_keys)
    sub = layer.heads * 2 * keys.rank * keys.num_keys * keys.dim_head
    grid = layer.heads * side * side * keys.cores * keys.rank * (keys.rank + 1)
    return sub + grid + layer.heads * layer.topk * layer.values.value_dim


def macs_per_token(model: nn.Module, seq_len: int = 0) -> int:
    """Multiply-adds per token of every linear map and memory lookup, plus causal attention at full context."""
    total = 0
    for m in model.modules():
        if isinstance(m, PKM):
            total += pkm_lookup_macs(m)  # its query projection (and combine) are nn.Linear, counted below
        elif isinstance(m, PEER):
            total += peer_lookup_macs(m)
        elif isinstance(m, UltraMem):
            total += ultramem_lookup_macs(m)  # its query projection and IVE projection are nn.Linear
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif type(m).__name__ == "CausalSelfAttention":
            total += m.heads * m.dim_head * (seq_len + 1)  # q.k and attn.v over half the context on average
    return total


def build_models(args):
    if args.memory == "peer":  # num_keys ** 2 experts, topk of them per head, softmax gates
        pkm_kwargs = dict(heads=args.pkm_heads, num_experts=args.num_keys**2, num_experts_per_head=args.topk,
                          dim_key=args.pkm_dim_head, non_competing_scores=False)
    elif args.memory == "ultramem":  # num_keys ** 2 virtual slots over num_keys ** 2 / 4 stored rows
        pkm_kwargs = dict(heads=args.pkm_heads, num_keys=args.num_keys, topk=args.topk, dim_key=args.pkm_dim_head)
    else:
        pkm_kwargs = dict(heads=args.pkm_heads, num_keys=args.num_keys, topk=args.topk, dim_head=args.pkm_dim_head)
    common = dict(num_tokens=256, dim=args.dim, depth=args.depth, seq_len=args.seq_len, heads=args.heads,
                  dim_head=args.dim // args.heads, ff_mult=args.ff_mult)
    pkm_model = TransformerLM(**common, pkm_layers=args.pkm_layers, pkm_kwargs=pkm_kwargs, memory=args.memory)
    # dense baseline: in the memory blocks, a feedforward doing the memory's multiply-adds (2 * dim * hidden)
    pkm_layer = pkm_model.blocks[pkm_model.pkm_layers[0] - 1].ff
    hidden = max(1, round(macs_per_token(pkm_layer) / (2 * args.dim)))
    dense_model = TransformerLM(**common, pkm_layers=())
    for layer in pkm_model.pkm_layers:
        dense_model.blocks[layer - 1].ff = FeedForward(args.dim, hidden)
    return {"pkm": pkm_model, "dense": dense_model}, hidden


# ---------------------------------------------------------------------------- memory stats


def block_label(path: str) -> str:
    """``'blocks.2.ff'`` -> ``'block 3 (blocks.2.ff)'``: ``--pkm-layers`` counts blocks from 1, module paths from 0."""
    parts = path.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return f"block {int(parts[1]) + 1} ({path})"
    return path


def usage_tracker(model):
    """The library's memory-usage tracker over the model's PKM layers, or ``None`` (no PKM, or a version without it)."""
    try:
        from product_key_memory import MemoryUsageTracker
    except ImportError:
        return None
    return MemoryUsageTracker(model) if any(isinstance(m, (PKM, PEER, UltraMem)) for m in model.modules()) else None


# -------------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, batches, tracker=None):
    """Mean validation loss in bits per byte, and the PKM layers' usage statistics on these batches."""
    model.eval()
    if tracker is not None:
        tracker.reset()
        tracker.attach()
    loss = sum(model.loss(b).item() for b in batches) / len(batches)
    usage = None
    if tracker is not None:
        tracker.detach()
        usage = tracker.stats()
    model.train()
    return loss / math.log(2), usage


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% (as a factor of the base rates)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(name, model, train_data, val_batches, args):
    from tqdm import tqdm  # an extra, checked by require_extras before any training

    groups = fetch_optimizer_parameters(model, pkm_learning_rate=args.pkm_lr, pkm_weight_decay=0.0)
    is_value = [i == 1 for i, g in enumerate(groups) if g["params"]]  # group 1: the value tables
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in opt.param_groups]
    has_ultramem = any(isinstance(m, UltraMem) for m in model.modules())
    batches = random_batches(train_data, args.batch_size, args.seq_len, args.seed)  # same batches for every model
    tokens_per_step = args.batch_size * args.seq_len
    tracker = usage_tracker(model)
    bpb, usage = evaluate(model, val_batches, tracker)
    curve, usages = [(0, bpb)], [(0, usage)]
    train_time, loss_ema = 0.0, None
    bar = tqdm(range(1, args.steps + 1), desc=f"{name:>5}", unit="step", dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        for g, base, value in zip(opt.param_groups, base_lrs, is_value):
            g["lr"] = base * lr_at(step - 1, args)
            if value and has_ultramem:  # UltraMem's value learning rate: a multiplier decaying to 1
                g["lr"] *= value_lr_multiplier(step - 1, max_steps=args.steps, initial=args.value_lr_times)
        t0 = time.perf_counter()
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_loss_coef * ultramem_aux_loss(model) if has_ultramem else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_time += time.perf_counter() - t0
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            bpb, usage = evaluate(model, val_batches, tracker)
            curve.append((step, bpb))
            usages.append((step, usage))
        postfix = dict(loss=f"{loss_ema:.3f}", tok_s=f"{step * tokens_per_step / train_time:,.0f}",
                       val_bpb=f"{curve[-1][1]:.3f}")
        if usages[-1][1]:  # share of memory slots read on the validation batches, averaged over PKM layers
            used = [u["used_fraction"] for u in usages[-1][1].values()]
            postfix["mem_used"] = f"{sum(used) / len(used):.0%}"
        bar.set_postfix(postfix)
    bar.close()
    return dict(curve=curve, usage=usages if tracker is not None else None, tracker=tracker,
                tokens_per_s=args.steps * tokens_per_step / train_time, train_seconds=train_time)


def print_usage(name, r, out_dir: Path):
    """Prints the usage statistics of the model's memory layers; returns the path of their plot, or ``None``."""
    if r["tracker"] is None:
        if any(isinstance(m, (PKM, PEER, UltraMem)) for m in r["model"].modules()):
            print("memory-usage statistics: this version of product_key_memory has no MemoryUsageTracker (skipped)")
        return None
    print(f"memory usage of the {name} model's PKM layers on the validation batches:")
    keys = ("used_fraction", "kl_uniform", "kl_uniform_weighted", "gini", "slots_50", "slots_90", "slots_99")
    for layer, s in r["usage"][-1][1].items():
        print(f"  {block_label(layer)}: {s['slots']:,} slots, " + ", ".join(
            f"{k} {s[k]:,}" if isinstance(s[k], int) else f"{k} {s[k]:.3g}" for k in keys if k in s))
    try:
        from product_key_memory import save_usage_plot
    except ImportError:
        return None
    path = out_dir / f"memory_usage_{name}.png"
    save_usage_plot(r["tracker"], path, title=f"{name}: slot usage on validation")
    return path


@torch.no_grad()
def sample_text(model, val_data, args) -> str:
    prompt = val_data[:64].long().unsqueeze(0)
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(prompt, args.sample_bytes, temperature=0.8, top_k=32, generator=gen)
    return bytes(prompt[0].tolist()).decode("utf-8", "replace") + "|>" + bytes(out[0].tolist()).decode("utf-8", "replace")


def plot(results, path: Path, tokens_per_step: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, r in results.items():
        steps, bpb = zip(*r["curve"])
        label = f"{name} ({r['params'] / 1e6:.1f}M params, final {bpb[-1]:.3f} bpb)"
        ax.plot([s * tokens_per_step / 1e6 for s in steps], bpb, marker="o", markersize=3, label=label)
    final = min(min(b for _, b in r["curve"]) for r in results.values())
    ax.set_ylim(final - 0.1, min(8.0, final + 1.5))
    ax.set_xlabel("training bytes seen (millions)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Byte-level LM on the Python standard library: PKM vs dense (equal MACs/token)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def require_extras(names=("tqdm", "matplotlib")):
    """Exit with the install line, before any data or training, when a package of the examples extra is missing."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(f"{Path(__file__).name} needs {' and '.join(missing)}, not installed: "
                 f'pip install -e ".[examples]" in a checkout of product-key-memory (tqdm, matplotlib)')


# ------------------------------------------------------------------------------ results

USAGE_KEYS = ("used_fraction", "kl_uniform", "kl_uniform_weighted", "gini", "slots_50", "slots_90", "slots_99")
CONFIG_KEYS = ("steps", "batch_size", "seq_len", "dim", "depth", "memory", "num_keys", "topk", "pkm_heads",
               "pkm_layers", "seed", "threads")


def command_line(argv) -> str:
    """The command that reproduces this run, as typed from the repository root (``--out`` left out: it moves
    only the pictures and ``results.json``)."""
    args, i = [], 0
    while i < len(argv):
        if argv[i] == "--out":
            i += 2
            continue
        if not argv[i].startswith("--out="):
            args.append(argv[i])
        i += 1
    return shlex.join(["python", "examples/train_lm.py", *args])


def results_table(args, argv, results, info) -> dict:
    """What ``train_lm.md`` shows, as plain numbers: seeded, so the same for every run of the same settings."""
    return dict(
        command=command_line(argv),
        config={k: getattr(args, k) for k in CONFIG_KEYS},
        data=dict(python=sys.version.split()[0], train_files=info["train_files"], val_files=info["val_files"]),
        models={name: dict(params=r["params"], macs_per_token=r["macs_per_token"], final_bpb=r["final_bpb"],
                           curve=[list(point) for point in r["curve"]]) for name, r in results.items()},
        usage={name: {layer: {k: s[k] for k in ("slots", *USAGE_KEYS) if k in s} for layer, s in r["usage"][-1][1].items()}
               for name, r in results.items() if r["usage"] is not None and r["usage"][-1][1]},
    )


def render(table: dict) -> str:
    """The markdown of ``train_lm.json``: everything in it comes from ``table``."""
    c, models = table["config"], table["models"]
    tokens = c["steps"] * c["batch_size"] * c["seq_len"]
    lines = [f"`{table['command']}` ({c['steps']:,} steps of {c['batch_size']} x {c['seq_len']} bytes, "
             f"{tokens / 1e6:.1f}M training bytes, seed {c['seed']}, {c['threads']} thread"
             f"{'s' if c['threads'] != 1 else ''}; {table['data']['train_files']:,} train and "
             f"{table['data']['val_files']:,} validation files of the standard library of Python {table['data']['python']}):", "",
             "| model | val bits/byte | parameters | MACs/token |", "| --- | ---: | ---: | ---: |"]
    for name, m in models.items():
        lines.append(f"| {name} | {m['final_bpb']:.3f} | {m['params'] / 1e6:.2f}M | {m['macs_per_token']:,} |")
    steps = [s for s, _ in next(iter(models.values()))["curve"] if s > 0]
    lines += ["", "Validation bits per byte during training:", "",
              "| step | " + " | ".join(f"{s:,}" for s in steps) + " |", "| --- |" + " ---: |" * len(steps)]
    for name, m in models.items():
        bpb = dict((s, b) for s, b in m["curve"])
        lines.append(f"| {name} | " + " | ".join(f"{bpb[s]:.3f}" for s in steps) + " |")
    for name, layers in table["usage"].items():
        lines += ["", f"Memory usage of the {name} model's memory layers on the validation batches, at the end:", "",
                  "| block | slots | used | KL | KL (weighted) | Gini | slots for 50% / 90% / 99% |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for layer, s in layers.items():
            lines.append(f"| {block_label(layer)} | {s['slots']:,} | {s['used_fraction']:.1%} | {s['kl_uniform']:.2f} | "
                         f"{s['kl_uniform_weighted']:.2f} | {s['gini']:.3f} | "
                         f"{s['slots_50']:,} / {s['slots_90']:,} / {s['slots_99']:,} |")
    return "\n".join(lines) + "\n"


def write_results(table: dict, folder: Path, name: str = "train_lm") -> list:
    """``<folder>/<name>.json`` and the markdown rendered from it, ``<folder>/<name>.md``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.json", folder / f"{name}.md"]
    paths[0].write_text(json.dumps(table, indent=1) + "\n")
    paths[1].write_text(render(table))
    return paths


def saved_line(paths) -> str:
    """``saved a, b and c``: the last line a run prints, naming every file it wrote."""
    paths = [str(p) for p in paths]
    return "saved " + (", ".join(paths[:-1]) + " and " + paths[-1] if len(paths) > 1 else paths[0])


# --quick: the default models for 400 steps instead of 2000 (a few minutes on one CPU core)
QUICK = dict(steps=400, warmup=40, eval_every=50, eval_batches=8, sample_bytes=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the same models for fewer steps and evaluations: a few minutes on 2 CPU cores")
    p.add_argument("--steps", type=int, default=2000, help="training steps per model (400 with --quick)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence, the context")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--depth", type=int, default=4, help="number of blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ff-mult", type=int, default=4, help="feedforward width as a multiple of --dim")
    p.add_argument("--pkm-layers", type=int, nargs="+", default=[3],
                   help="blocks with a PKM, numbered from 1 as TransformerLM(pkm_layers=...): 3 is module blocks.2")
    p.add_argument("--memory", choices=("pkm", "memory_plus", "peer", "ultramem"), default="pkm",
                   help="the memory layer of the --pkm-layers blocks (peer: num_keys**2 experts, topk per head; "
                        "ultramem: num_keys**2 virtual slots)")
    p.add_argument("--aux-loss-coef", type=float, default=1e-3,
                   help="ultramem: weight of the Tucker cores' auxiliary loss (the official mem_tucker_rank_penalty)")
    p.add_argument("--value-lr-times", type=float, default=1.0,
                   help="ultramem: the value tables' learning rate starts this many times --pkm-lr and decays "
                        "linearly to 1x over the run (the official code uses 4.0 over its base rate)")
    p.add_argument("--num-keys", type=int, default=128, help="sub-keys per half: num_keys**2 memory slots")
    p.add_argument("--topk", type=int, default=16, help="memory slots read per PKM head")
    p.add_argument("--pkm-heads", type=int, default=4, help="PKM query heads")
    p.add_argument("--pkm-dim-head", type=int, default=64, help="width of a PKM query")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of everything but the value tables")
    p.add_argument("--pkm-lr", type=float, default=1e-2, help="learning rate of the PKM value tables")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on the value tables)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (40 with --quick)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between validations (50 with --quick)")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches (8 with --quick)")
    p.add_argument("--sample-bytes", type=int, default=200, help="bytes sampled at the end (100 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; more help only on an otherwise idle machine")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and the batches")
    p.add_argument("--out", type=Path, default=Path("runs/train_lm"),
                   help="folder for the pictures and results.json")
    p.add_argument("--results", type=Path, default=None,
                   help="folder for the tables, train_lm.md and train_lm.json (default: --out)")
    if "--quick" in (argv if argv is not None else sys.argv[1:]):
        p.set_defaults(**QUICK)  # explicit flags still win
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    require_extras()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"outputs go to {args.out.resolve()}")
    train_data, val_data, info = load_stdlib()
    print(f"data: {info['root']}: {info['train_files']} train files ({len(train_data) / 1e6:.1f} MB), "
          f"{info['val_files']} validation files ({len(val_data) / 1e6:.1f} MB)")
    val_batches = validation_batches(val_data, args.eval_batches, args.batch_size, args.seq_len)

    torch.manual_seed(args.seed)
    models, hidden = build_models(args)
    macs = {name: macs_per_token(m, args.seq_len) for name, m in models.items()}
    blocks = ", ".join(block_label(f"blocks.{layer - 1}.ff") for layer in models["pkm"].pkm_layers)
    print(f"PKM in {blocks}; the dense model has a {hidden}-wide feedforward there "
          f"(others {args.ff_mult * args.dim}); MACs/token: pkm {macs['pkm']:,}, dense {macs['dense']:,}")

    results, written = {}, []
    for name, model in models.items():
        r = train(name, model, train_data, val_batches, args)
        r.update(model=model, params=sum(p.numel() for p in model.parameters()), macs_per_token=macs[name],
                 final_bpb=r["curve"][-1][1])
        results[name] = r
        written.append(print_usage(name, r, args.out))

    print(f"\nsample from the pkm model (prompt|>continuation):\n{sample_text(models['pkm'], val_data, args)}\n")

    png = args.out / "val_curves.png"
    plot(results, png, args.batch_size * args.seq_len)
    saved = {name: {k: v for k, v in r.items() if k not in ("model", "tracker")} for name, r in results.items()}
    (args.out / "results.json").write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                                           data=info, results=saved), indent=1))
    print(f"| model | val bits/byte | parameters | MACs/token | train tokens/s |")
    print(f"|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['final_bpb']:.3f} | {r['params'] / 1e6:.2f}M | {r['macs_per_token'] / 1e6:.2f}M "
              f"| {r['tokens_per_s']:,.0f} |")
    written += [png, args.out / "results.json", *write_results(results_table(args, argv, results, info),
                                                                 args.results or args.out)]
    print("\n" + saved_line(p for p in written if p is not None))
    return results


if __name__ == "__main__":
    main()
