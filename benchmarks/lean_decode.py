"""How much of a decoding step is per-call overhead: ``PKM.forward`` against the same maths as a bare op list.

    python benchmarks/lean_decode.py [--threads 1] [--tokens 1]

The "lean" function is what an eval / no-grad fast path would run: one linear, one
layer norm, two batched GEMMs against keys pre-laid out ``(heads, dim_head, num_keys)``
per half (done once, outside the timed call), three top-ks, the candidate sum, one
softmax and one ``embedding_bag``; no module calls (dropouts with p=0), no argument
checks, no dtype promotions or casts, no reshape copies. It is checked against
``PKM.forward`` (max abs difference printed), then both are timed alternating in one
process (median of 15 samples of 100 calls), and the aten op calls per step are counted
with ``torch.profiler``. A prototype for the analysis of issue 12 item 2, not an API.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from product_key_memory import PKM  # noqa: E402
from product_key_memory.functional import candidate_pairs  # noqa: E402


def make_lean(m: PKM):
    H, d, K, k = m.heads, m.dim_head, m.num_keys, m.topk
    W, ln, V = m.to_queries.weight, m.norm, m.values.weight
    k1, k2 = (m.keys[:, :, p].transpose(1, 2).contiguous() for p in (0, 1))  # (H, d, K) each, once
    a, b = candidate_pairs(k)  # (P,) each: the pairs that can reach the top-k

    def lean(x):
        q = F.linear(x.view(-1, m.dim), W).view(-1, 2, H, d)
        q = F.layer_norm(q, (d,), ln.weight, ln.bias, ln.eps).transpose(0, 2)  # (H, 2, N, d)
        v1, i1 = torch.bmm(q[:, 0], k1).topk(k, -1)  # (H, N, k)
        v2, i2 = torch.bmm(q[:, 1], k2).topk(k, -1)
        s, pos = (v1[..., a] + v2[..., b]).topk(k, -1)
        slots = (i1[..., a] * K + i2[..., b]).gather(-1, pos)
        w = s.softmax(-1)
        out = F.embedding_bag(slots.transpose(0, 1).reshape(-1, H * k), V, mode="sum",
                              per_sample_weights=w.transpose(0, 1).reshape(-1, H * k))
        return out.view_as(x)

    return lean


def op_calls(fn, n=10):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    return sum(e.count for e in prof.key_averages()) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--tokens", type=int, default=1, help="tokens per decode step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = PKM(dim=512, heads=4, num_keys=256, topk=32, dim_head=128).eval()
    x = torch.randn(1, args.tokens, 512)
    lean = make_lean(m)
    with torch.no_grad():
        print(f"max |lean - forward| = {(lean(x) - m(x)).abs().max().item():.2e}")
        fns = {"PKM.forward": lambda: m(x), "lean": lambda: lean(x)}
        for name, f in fns.items():
            print(f"{name:<12} {op_calls(f):5.0f} aten op calls per step")
        inner = 100 if args.tokens <= 16 else 3
        s = {k: [] for k in fns}
        for r in range(15):
            for kk in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[kk]()
                s[kk].append((time.perf_counter() - t0) / inner * 1e3)
    med = {k: statistics.median(v) for k, v in s.items()}
    for k, v in med.items():
        print(f"{k:<12} {v:8.3f} ms (median)")
    print(f"PKM.forward / lean = {med['PKM.forward'] / med['lean']:.2f}x at {args.threads} thread(s), {args.tokens} token(s)")


if __name__ == "__main__":
    main()
