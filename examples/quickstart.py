"""Drop a PKM into a residual block and fit a toy regression for a few steps.

    python examples/quickstart.py               # 50 steps, a few seconds on a CPU
    python examples/quickstart.py --steps 200

Needs only the base install; writes nothing.
"""

import argparse

import torch

from product_key_memory import PKM, fetch_optimizer_parameters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the PKM and the data")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    pkm = PKM(dim=64, heads=4, num_keys=32, topk=8, dim_head=32)
    opt = torch.optim.Adam(fetch_optimizer_parameters(pkm, pkm_learning_rate=1e-2), lr=1e-3)
    x = torch.randn(8, 16, 64)
    target = torch.randn(8, 16, 64)
    for step in range(args.steps):
        loss = (x + pkm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:2d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
