"""Recall of UltraMem's two-stage Tucker search (TDQKR) against a brute-force search over all slots.

For each rank, first stage and core initialisation, :class:`~product_key_memory.parts.TuckerKeys` searches
random queries, and the script counts how many of the exact top-k (every one of the ``num_keys ** 2``
slots scored through the cores) it finds: recall@topk, averaged over queries and heads. Untrained
keys and cores: ``uniform`` is the official initialisation (cores ``U(0, 1)``, close to rank 1);
``normal`` draws the cores ``N(0, 1)`` (signed, far from rank 1), a harder case. CPU, float32.

    python benchmarks/ultramem_recall.py            # writes benchmarks/results/ultramem_recall.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from product_key_memory.parts import TuckerKeys

OUT = Path(__file__).resolve().parent / "results"


def brute_force_slots(part: TuckerKeys, q: torch.Tensor) -> torch.Tensor:
    keys = part.key_norm(part.keys)  # (H, 2, r, K, d)
    rows = torch.einsum("nhd,hrkd->nhkr", q[:, :, 0], keys[:, 0])
    cols = torch.einsum("nhd,hrkd->nhkr", q[:, :, 1], keys[:, 1])
    total = part.core.sum(0)  # (H, r, r): the summed cores rank the slots
    scores = torch.einsum("nhir,hrs,nhjs->nhij", rows, total, cols).flatten(2)
    return scores.topk(part.topk, dim=-1).indices


@torch.no_grad()
def recall(rank: int, first_stage: str, init: str, candidates: int, args) -> float:
    torch.manual_seed(args.seed)
    part = TuckerKeys(args.heads, args.num_keys, args.dim_head, args.topk, rank=rank, cores=args.cores,
                      candidates=candidates, first_stage=first_stage)
    if init == "normal":
        part.core.normal_()
    q = torch.randn(args.queries, args.heads, 2, args.dim_head)
    _, slots = part(q)
    want = brute_force_slots(part, q)
    return (slots.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-keys", type=int, default=128, help="sub-keys per half")
    p.add_argument("--topk", type=int, default=16, help="slots per head")
    p.add_argument("--dim-head", type=int, default=32, help="width of a query half")
    p.add_argument("--heads", type=int, default=2, help="query heads")
    p.add_argument("--cores", type=int, default=2, help="Tucker cores")
    p.add_argument("--queries", type=int, default=1024, help="random queries")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--out", type=Path, default=OUT, help="output path (writes .json and .md)")
    args = p.parse_args(argv)
    rows = []
    for init in ("uniform", "normal"):
        for rank in (1, 2, 4):
            for first_stage in ("two_sided", "top"):
                for candidates in (args.topk, 2 * args.topk):
                    r = recall(rank, first_stage, init, candidates, args)
                    rows.append(dict(init=init, rank=rank, first_stage=first_stage, candidates=candidates, recall=r))
                    print(f"cores {init:>7}  rank {rank}  {first_stage:>9}  candidates {candidates:>3}: recall {r:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "ultramem_recall.json").write_text(json.dumps(dict(setup=setup, torch=torch.__version__,
                                                                   results=rows), indent=1) + "\n")
    lines = [f"TDQKR recall@{args.topk} against brute force over {args.num_keys ** 2} slots "
             f"({args.heads} heads, {args.cores} cores, dim_head {args.dim_head}, {args.queries} random queries, "
             f"untrained keys, seed {args.seed}, torch {torch.__version__}, CPU float32)", "",
             "| cores init | rank | first stage | candidates | recall |", "|---|---|---|---|---|"]
    lines += [f"| {r['init']} | {r['rank']} | {r['first_stage']} | {r['candidates']} | {r['recall']:.4f} |"
              for r in rows]
    (args.out / "ultramem_recall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
