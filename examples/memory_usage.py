"""Is my memory being used? Train three query-norm variants on a toy recall task and compare slot usage.

The task: 16,384 random keys drawn from a skewed (low-rank, shifted) distribution,
each mapped to its own random target; a PKM of 4,096 slots learns the mapping.
After training, one eval pass over all keys is tracked and the usage statistics
of each layer are printed and plotted (needs matplotlib: ``pip install -e ".[examples]"`` in a checkout).
One to three minutes on two CPU cores. Writes ``memory_usage.png`` under ``--out``, and the table
as ``memory_usage.md`` (rendered from ``memory_usage.json`` by :func:`render`) under ``--results``.

    python examples/memory_usage.py                                 # all under runs/memory_usage/
    python examples/memory_usage.py --results benchmarks/results    # the README's table
    python examples/memory_usage.py --out docs                      # the picture in the README

Seeded: the same settings give the same table on every run. The number of torch threads changes the
order of float sums, and with it the last digits of the training and a few slots: ``--threads`` (default 1)
is part of the settings.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from product_key_memory import PKM, MemoryUsageTracker, fetch_optimizer_parameters, save_usage_plot


def skewed_inputs(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    # most variance in a few directions, and a common offset: real activations look more like this than N(0, I)
    scales = torch.logspace(0, -1.5, dim)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0]
    return (torch.randn(n, dim, generator=gen) * scales) @ basis + 0.5


STAT_KEYS = ("used_fraction", "kl_uniform", "kl_uniform_weighted", "gini", "slots_50", "slots_90", "slots_99")
LABELS = {"layernorm": '`"layernorm"` (default)', "channel_batchnorm": '`"channel_batchnorm"` (the paper\'s)',
          "none": '`"none"`'}


def render(results: dict) -> str:
    """The markdown table of ``memory_usage.json``: everything in it comes from ``results``."""
    c = results["config"]
    lines = [f"`{results['command']}` ({c['steps']} steps, seed {c['seed']}, {c['threads']} torch "
             f"thread{'s' if c['threads'] != 1 else ''}, {c['keys']:,} keys, {c['slots']:,} slots per memory, "
             "one tracked pass over all keys):", "",
             "| query norm | used | KL | Gini | slots for 50% / 90% / 99% |", "| --- | --- | --- | --- | --- |"]
    for name, s in results["rows"].items():
        lines.append(f"| {LABELS.get(name, f'`{name!r}`')} | {s['used_fraction']:.1%} | {s['kl_uniform']:.2f} | "
                     f"{s['gini']:.2f} | {s['slots_50']:,} / {s['slots_90']:,} / {s['slots_99']:,} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, folder: Path, name: str = "memory_usage") -> list:
    """``<folder>/<name>.json`` and the table rendered from it, ``<folder>/<name>.md``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.json", folder / f"{name}.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(render(results))
    return paths


def command_line(argv) -> str:
    """The command that reproduces this run, as typed from the repository root (``--out`` left out: pictures only)."""
    args, i = [], 0
    while i < len(argv):
        if argv[i] == "--out":
            i += 2
            continue
        if not argv[i].startswith("--out="):
            args.append(argv[i])
        i += 1
    return shlex.join(["python", "examples/memory_usage.py", *args])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # an option whose default is another option's value says so in its help
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=_HelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/memory_usage"),
                        help="folder for the picture, memory_usage.png")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for the table, memory_usage.md and memory_usage.json (default: --out)")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layers and the data")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the table depends on it, slightly)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.out.suffix.lower() in (".png", ".pdf", ".svg", ".jpg"):
        parser.error(f"--out is a folder (the picture is <out>/memory_usage.png), got {str(args.out)!r}")
    try:  # fail before training, not after
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit(f'{Path(__file__).name} needs matplotlib, not installed: '
                 'pip install -e ".[examples]" in a checkout of product-key-memory (tqdm, matplotlib)')
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "memory_usage.png"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dim, n = 32, 16384
    x = skewed_inputs(n, dim, gen)
    y = torch.randn(n, dim, generator=gen)

    size = dict(heads=4, num_keys=64, topk=8, dim_head=16)
    model = nn.ModuleDict(
        {
            "layernorm": PKM(dim, **size),
            "channel_batchnorm": PKM(dim, **size, query_norm="channel_batchnorm", query_bias=True, key_init="uniform"),
            "none": PKM(dim, **size, query_norm="none"),
        }
    )
    opt = torch.optim.Adam(fetch_optimizer_parameters(model, pkm_learning_rate=1e-2), lr=1e-3)

    start = time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(0, n, (512,), generator=gen)
        losses = {name: (pkm(x[batch]) - y[batch]).pow(2).mean() for name, pkm in model.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  " + "  ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
    print(f"trained in {time.perf_counter() - start:.1f}s")

    model.eval()
    tracker = MemoryUsageTracker(model)
    with tracker, torch.no_grad():
        for chunk in x.split(2048):
            for pkm in model.values():
                pkm(chunk)
    stats = tracker.stats()
    keys = STAT_KEYS
    print(f"{'query norm':<18}" + "".join(f"{k:>20}" for k in keys))
    for name, s in stats.items():
        print(f"{name:<18}" + "".join(f"{s[k]:>20.3f}" if isinstance(s[k], float) else f"{s[k]:>20}" for k in keys))
    slots = model["layernorm"].num_memories
    save_usage_plot(tracker, png, title=f"slot usage after {args.steps} steps, {n:,} keys, {slots:,} slots")
    results = dict(command=command_line(argv), config=dict(steps=args.steps, seed=args.seed, threads=args.threads,
                                                               keys=n, slots=slots),
                   rows={name: {k: s[k] for k in keys} for name, s in stats.items()})
    saved = write_results(results, args.results or args.out)
    print(f"saved {png}, {saved[0]} and {saved[1]}")
    return results


if __name__ == "__main__":
    main()
