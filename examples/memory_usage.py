"""Is my memory being used? Train three query-norm variants on a toy recall task and compare slot usage.

The task: 16,384 random keys drawn from a skewed (low-rank, shifted) distribution,
each mapped to its own random target; a PKM of 4,096 slots learns the mapping.
After training, one eval pass over all keys is tracked and the usage statistics
of each layer are printed and plotted (needs matplotlib: ``pip install -e ".[examples]"`` in a checkout).
One to three minutes on two CPU cores. Writes ``memory_usage.png`` under ``--out``.

    python examples/memory_usage.py               # runs/memory_usage/memory_usage.png
    python examples/memory_usage.py --out docs    # the picture in the README
"""

import argparse
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/memory_usage"),
                        help="folder for the output, memory_usage.png")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layers and the data")
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
    keys = ("used_fraction", "kl_uniform", "kl_uniform_weighted", "gini", "slots_50", "slots_90", "slots_99")
    print(f"{'query norm':<18}" + "".join(f"{k:>20}" for k in keys))
    for name, s in stats.items():
        print(f"{name:<18}" + "".join(f"{s[k]:>20.3f}" if isinstance(s[k], float) else f"{s[k]:>20}" for k in keys))
    slots = model["layernorm"].num_memories
    save_usage_plot(tracker, png, title=f"slot usage after {args.steps} steps, {n:,} keys, {slots:,} slots")
    print(f"saved {png}")


if __name__ == "__main__":
    main()
