"""A fact stated early in a long document, asked for segments later: a KNN layer recalls it, local attention cannot.

Each document is ``--segments`` segments of ``--seq-len`` tokens, read one segment at a time (the
model's whole context). The first segment states a fact ``MARK value key`` among random filler; the
last asks ``QUERY key`` and the model must say ``value``. That fact lies beyond the context, so a model
without memory can only guess (``1 / num_values``). The last segment also states and asks facts of its
own (local facts), which both models can learn. Facts sit at random places, so only the key finds them.

Why value first: block 2's query at ``QUERY key`` then has to match the key it wrote at the same token
``key`` segments ago (keys and queries of one token: an easy, identity-like match), and the value it
reads there carries the previous token ``value`` through block 1's attention. The local facts train
that same lookup in block 2's local attention, whose projections write the memories (Wu et al. 2022,
arXiv 2203.08913: memories are the detached keys and values of earlier segments of the same document).
Two models with the same blocks, initialisation and batches are trained: ``knn`` (block 2 of 2 is a
KNNAttention) and ``local`` (no memory).

    python examples/knn_long_document.py --quick     # about four minutes on 2 busy CPU cores
    python examples/knn_long_document.py             # longer documents, more steps

Prints a table of answer accuracy (distant and local facts) and saves ``results.json`` and
``accuracy.png`` under ``--out``, and the table without timings as ``knn_long_document.md``, rendered by
:func:`render` from ``knn_long_document.json``, under ``--results`` (``--quick --results benchmarks/results``:
the README's table). Seeded, one thread by default: the same settings give the same table on every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from product_key_memory import TransformerLM, lm_loss  # noqa: E402

MARK, QUERY, IGNORE = 0, 1, -100


def vocab(args):
    """Token ranges: 2 specials, then keys, values and filler."""
    keys = torch.arange(2, 2 + args.num_keys)
    values = torch.arange(keys[-1] + 1, keys[-1] + 1 + args.num_values)
    filler = torch.arange(values[-1] + 1, values[-1] + 1 + args.num_filler)
    return keys, values, filler, int(filler[-1]) + 1


def make_documents(args, batch: int, generator: torch.Generator):
    """``tokens (batch, segments, seq_len + 1)`` and targets with only the answers kept, and a kind per answer.

    Every row has its own facts, each with its own key. ``kind`` is 1 at answers to distant facts (stated in
    segment 0), 2 at answers to local facts (stated earlier in the last segment), 0 elsewhere. Facts sit at
    random places, so a model cannot find one by its position: it has to match the key.
    """
    keys, values, filler, _ = vocab(args)
    n, seg = args.segments, args.seq_len + 1
    tokens = filler[torch.randint(len(filler), (batch, n, seg), generator=generator)]
    kind = torch.zeros(batch, n, seg, dtype=torch.long)
    facts, half = args.distant_facts + args.local_facts, seg // 2
    for b in range(batch):
        chosen = keys[torch.randperm(len(keys), generator=generator)[:facts]]
        answers = values[torch.randint(len(values), (facts,), generator=generator)]
        triples = [torch.stack((torch.tensor(MARK), v, k)) for k, v in zip(chosen, answers)]  # value first
        # segment 0: the distant facts; the last segment's first half: the local facts
        for f, s in enumerate(torch.randperm(seg // 3, generator=generator)[:args.distant_facts].tolist()):
            tokens[b, 0, 3 * s:3 * s + 3] = triples[f]
        for j, s in enumerate(torch.randperm(half // 3, generator=generator)[:args.local_facts].tolist()):
            tokens[b, -1, 3 * s:3 * s + 3] = triples[args.distant_facts + j]
        # then the questions, distant and local shuffled, in the second half
        for slot, f in enumerate(torch.randperm(facts, generator=generator).tolist()):
            s = half + 3 * slot
            tokens[b, -1, s:s + 3] = torch.stack((torch.tensor(QUERY), chosen[f], answers[f]))
            kind[b, -1, s + 2] = 1 if f < args.distant_facts else 2
    targets = torch.where(kind[..., 1:] > 0, tokens[..., 1:], IGNORE)
    return tokens, targets, kind[..., 1:]


def run_document(model, tokens, targets, memories):
    """Reads a document segment by segment; returns the loss and the logits of the last segment."""
    if memories is not None:
        memories.clear()
    for s in range(tokens.shape[1] - 1):
        with torch.no_grad():  # no answers there, and memories are detached anyway
            model(tokens[:, s, :-1], memories)
    logits = model(tokens[:, -1, :-1], memories)
    return lm_loss(logits, targets[:, -1]), logits


@torch.no_grad()
def evaluate(model, args, memories, generator):
    model.eval()
    correct, total = torch.zeros(3), torch.zeros(3)
    for _ in range(args.eval_batches):
        tokens, targets, kind = make_documents(args, args.batch_size, generator)
        _, logits = run_document(model, tokens, targets, memories)
        hit = logits.argmax(-1) == targets[:, -1]
        for k in (1, 2):
            sel = kind[:, -1] == k
            correct[k] += hit[sel].sum()
            total[k] += sel.sum()
    model.train()
    return {"distant": (correct[1] / total[1]).item(), "local": (correct[2] / total[2]).item()}


def build(args, knn: bool):
    torch.manual_seed(args.seed)
    *_, num_tokens = vocab(args)
    model = TransformerLM(num_tokens, dim=args.dim, depth=2, seq_len=args.seq_len, pkm_layers=(),
                          knn_layers=(2,) if knn else (), heads=args.heads, dim_head=args.dim // args.heads,
                          knn_kwargs=dict(num_retrieved_memories=args.topk))
    memories = model.create_knn_memories(args.batch_size, max_memories=args.max_memories) if knn else None
    return model, memories


def train(args, knn: bool, log):
    model, memories = build(args, knn)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed + 1)  # both models see the same documents
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, targets, _ = make_documents(args, args.batch_size, data)
        loss, _ = run_document(model, tokens, targets, memories)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, args, memories, torch.Generator().manual_seed(args.seed + 2))
            curve.append((step, acc))
            log(f"  {'knn' if knn else 'local':>5} step {step:5d}  loss {loss.item():.3f}  "
                f"distant {acc['distant']:.1%}  local {acc['local']:.1%}  ({time.perf_counter() - start:.0f} s)")
    return {"curve": curve, "final": curve[-1][1], "seconds": time.perf_counter() - start,
            "params": sum(p.numel() for p in model.parameters())}


def save_plot(results, path: Path, chance: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("knn", "-"), ("local", "--")):
        steps = [s for s, _ in results[name]["curve"]]
        for fact, color in (("distant", "tab:red"), ("local", "tab:blue")):
            ax.plot(steps, [a[fact] for _, a in results[name]["curve"]], style, color=color,
                    label=f"{name} model, {fact} facts")
    ax.axhline(chance, color="gray", lw=0.8, label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Recalling facts from beyond the context window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command_line(argv) -> str:
    """The command that reproduces this run, as typed from the repository root (``--out`` left out: it moves
    only the picture and ``results.json``)."""
    args, i = [], 0
    while i < len(argv):
        if argv[i] == "--out":
            i += 2
            continue
        if not argv[i].startswith("--out="):
            args.append(argv[i])
        i += 1
    return shlex.join(["python", "examples/knn_long_document.py", *args])


def results_table(args, argv, results) -> dict:
    """What ``knn_long_document.md`` shows, as plain numbers (no timings: those change from run to run)."""
    config = ("steps", "segments", "seq_len", "batch_size", "distant_facts", "local_facts", "num_values", "threads",
              "seed")
    return dict(command=command_line(argv), config={k: getattr(args, k) for k in config},
                chance=1 / args.num_values,
                models={name: dict(params=r["params"], distant=r["final"]["distant"], local=r["final"]["local"])
                        for name, r in results.items()})


def render(table: dict) -> str:
    """The markdown of ``knn_long_document.json``: everything in it comes from ``table``."""
    c = table["config"]
    lines = [f"`{table['command']}` ({c['steps']:,} steps of {c['batch_size']} documents of {c['segments']} x "
             f"{c['seq_len']} tokens, seed {c['seed']}, {c['threads']} thread{'s' if c['threads'] != 1 else ''}); "
             f"answer accuracy on the last segment, chance {table['chance']:.1%} ({c['num_values']} values):", "",
             "| model | parameters | distant facts | local facts |", "| --- | ---: | ---: | ---: |"]
    for name, m in table["models"].items():
        lines.append(f"| {name} | {m['params']:,} | {m['distant']:.1%} | {m['local']:.1%} |")
    return "\n".join(lines) + "\n"


def write_results(table: dict, folder: Path, name: str = "knn_long_document") -> list:
    """``<folder>/<name>.json`` and the markdown rendered from it, ``<folder>/<name>.md``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.json", folder / f"{name}.md"]
    paths[0].write_text(json.dumps(table, indent=1) + "\n")
    paths[1].write_text(render(table))
    return paths


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # options whose default depends on --quick say it in their help
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None, log=print):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and shorter documents: minutes on 2 CPU cores")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 3000, or 1500 with --quick)")
    p.add_argument("--segments", type=int, default=None, help="segments per document (default: 8, or 3 with --quick)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per segment, the context of both models")
    p.add_argument("--batch-size", type=int, default=32, help="documents per step")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--topk", type=int, default=8, help="memories retrieved per query")
    p.add_argument("--max-memories", type=int, default=2048, help="memories per document (ring buffer)")
    p.add_argument("--num-keys", type=int, default=8, help="distinct fact keys")
    p.add_argument("--num-values", type=int, default=8, help="distinct fact values")
    p.add_argument("--num-filler", type=int, default=8, help="distinct filler tokens")
    p.add_argument("--distant-facts", type=int, default=1, help="facts per document in segment 1")
    p.add_argument("--local-facts", type=int, default=2, help="facts in the last segment")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--eval-batches", type=int, default=4, help="batches per evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model: more only add overhead)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and the documents")
    p.add_argument("--out", type=Path, default=Path("runs/knn_long_document"),
                   help="folder for the picture and results.json")
    p.add_argument("--results", type=Path, default=None,
                   help="folder for the table, knn_long_document.md and .json (default: --out)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.steps = args.steps or (1500 if args.quick else 3000)
    args.segments = args.segments or (3 if args.quick else 8)
    facts = args.distant_facts + args.local_facts
    if args.segments < 2 or 3 * facts > (args.seq_len + 1) // 2 or facts > args.num_keys:
        p.error(f"need --segments >= 2, 3 * facts <= (seq_len + 1) / 2 and facts <= num_keys (facts = {facts})")
    try:  # fail before training, not after
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit(f'{Path(__file__).name} needs matplotlib, not installed: '
                 'pip install -e ".[examples]" in a checkout of product-key-memory (tqdm, matplotlib)')
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    log(f"documents of {args.segments} x {args.seq_len} tokens; {args.distant_facts} facts in segment 1 asked "
        f"in segment {args.segments}, {args.local_facts} stated and asked there")
    results = {name: train(args, name == "knn", log) for name in ("knn", "local")}
    chance = 1 / args.num_values
    log("")
    log("| model | parameters | distant facts | local facts | train time |")
    log("| --- | ---: | ---: | ---: | ---: |")
    for name in ("knn", "local"):
        r = results[name]
        log(f"| {name} | {r['params']:,} | {r['final']['distant']:.1%} | {r['final']['local']:.1%} | "
            f"{r['seconds']:.0f} s |")
    log(f"chance: {chance:.1%}")
    save_plot(results, args.out / "accuracy.png", chance)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    tables = write_results(results_table(args, argv, results), args.results or args.out)
    log(f"saved {args.out / 'accuracy.png'}, {args.out / 'results.json'}, {tables[0]} and {tables[1]}")
    return results


if __name__ == "__main__":
    main()
