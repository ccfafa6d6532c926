"""Cost of MemoryUsageTracker: PKM forward (and forward + backward) with and without the tracker attached.

    python benchmarks/usage_tracker.py [--device cuda]

Prints the median of several runs and the ratio measured in the same process.
"""

import argparse
import statistics
import time

import torch

from product_key_memory import PKM, MemoryUsageTracker


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(fn, tracker, device, repeats=15, warmup=2):
    """Median seconds of fn without and with the tracker, alternating runs so load drifts hit both."""
    plain, tracked = [], []
    for i in range(warmup + repeats):
        t0 = _timed(fn, device)
        with tracker:
            t1 = _timed(fn, device)
        if i >= warmup:
            plain.append(t0)
            tracked.append(t1)
    return statistics.median(plain), statistics.median(tracked)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    pkm = PKM(512, heads=4, num_keys=256, topk=32, dim_head=128, device=device)
    x = torch.randn(args.tokens, 512, device=device)
    mask = torch.rand(args.tokens, device=device) > 0.1

    def forward():
        with torch.no_grad():
            pkm(x, input_mask=mask)

    def train_step():
        pkm(x, input_mask=mask).sum().backward()

    tracker = MemoryUsageTracker(pkm)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"PKM dim 512, 4 heads, 256 ** 2 slots, topk 32, {args.tokens} tokens, {device}{threads}")
    print(f"{'pass':<20}{'plain ms':>12}{'tracked ms':>12}{'ratio':>8}")
    for name, fn in (("forward", forward), ("forward + backward", train_step)):
        plain, tracked = interleaved_medians(fn, tracker, device)
        print(f"{name:<20}{plain * 1e3:>12.2f}{tracked * 1e3:>12.2f}{tracked / plain:>8.3f}")

    # the hook alone, on this forward's slots and weights
    with torch.no_grad():
        weights, indices = pkm.search(pkm.queries(x, mask))
    hook = tracker._usage["pkm"]
    times = [_timed(lambda: hook(indices, weights, mask), device) for _ in range(20)]
    print(f"{'hook alone':<20}{statistics.median(times) * 1e3:>12.2f} ms per call")

if __name__ == "__main__":
    main()
