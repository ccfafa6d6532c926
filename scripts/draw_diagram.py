"""Draw ``pkm.png``: how one token reads the product-key memory (arXiv 1907.05242).

Run from anywhere with ``python scripts/draw_diagram.py`` (needs the ``plot`` extra,
``pip install -e ".[plot]"``); the PNG is written next to ``setup.py``. The drawing
uses small sizes (num_keys = 16, topk = 8) and fixed scores, so every run gives the
same picture.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no display, no global figure registry
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

OUT = Path(__file__).resolve().parent.parent / "pkm.png"

NUM_KEYS = 16  # drawn sizes, small enough to see every cell
TOPK = 8

INK = "#222222"
MUTED = "#666666"
QUERY = "#4C72B0"
HALF1 = "#DD8452"
HALF2 = "#55A868"
CAND = "#D9D2EE"
WIN = "#6A51A3"
VALUE = "#8C8C8C"


def example_scores():
    """Fixed sub-key scores for the two halves of one head's query, ``(2, NUM_KEYS)``."""
    rng = np.random.default_rng(4)  # a seed whose winners spread over the table
    return rng.normal(size=(2, NUM_KEYS)).round(2)


def box(ax, x, y, w, h, color, fill="white", lw=1.6, radius=0.8, ls="-"):
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={radius}", ec=color, fc=fill, lw=lw, ls=ls)
    )


def arrow(ax, start, end, color=INK, style="-|>", lw=1.6, conn="arc3", scale=14):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=scale,
            color=color,
            lw=lw,
            connectionstyle=conn,
            shrinkA=0,
            shrinkB=0,
        )
    )


def elbow(ax, points, color=INK, lw=1.6):
    """Arrow along a polyline (right-angle routing); the head is on the last segment."""
    xs, ys = zip(*points)
    ax.plot(xs[:-1], ys[:-1], color=color, lw=lw, solid_capstyle="butt")
    arrow(ax, points[-2], points[-1], color=color, lw=lw)


def text(ax, x, y, s, size=12, color=INK, **kw):
    kw.setdefault("ha", "center")
    kw.setdefault("va", "center")
    ax.text(x, y, s, fontsize=size, color=color, **kw)


def score_strip(ax, x0, y0, scores, chosen, color, label):
    """Bars for the NUM_KEYS sub-key scores of one half; the TOPK chosen ones coloured."""
    width = 1.35
    base = y0 + 4.0
    for n, s in enumerate(scores):
        c = color if n in chosen else "#CFCFCF"
        ax.add_patch(Rectangle((x0 + n * width, base), width * 0.8, s * 2.2, fc=c, ec="none"))
    ax.plot([x0 - 0.3, x0 + NUM_KEYS * width], [base, base], color=MUTED, lw=0.8)
    text(ax, x0 + NUM_KEYS * width / 2, y0 - 1.6, label, size=11, color=INK)


def draw(path: Path = OUT) -> Path:
    with matplotlib.rc_context({"font.family": "DejaVu Sans"}):  # the font shipped with matplotlib
        fig = Figure(figsize=(16, 7), dpi=100, facecolor="white")
        _draw_on(fig)
        fig.savefig(path, dpi=100, facecolor="white", metadata={"Software": None})
    return path


def _draw_on(fig: Figure) -> None:
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 160)
    ax.set_ylim(0, 70)
    ax.axis("off")

    sub = example_scores()
    order = np.argsort(-sub, axis=1, kind="stable")[:, :TOPK]  # per-half top-k sub-key indices
    s1, s2 = sub[0, order[0]], sub[1, order[1]]
    grid = s1[:, None] + s2[None, :]  # (i, j): i-th best of half 1 + j-th best of half 2
    flat = np.argsort(-grid, axis=None, kind="stable")[:TOPK]
    win_i, win_j = np.unravel_index(flat, grid.shape)
    slots = order[0][win_i] * NUM_KEYS + order[1][win_j]
    weights = np.exp(grid[win_i, win_j] - grid.max())
    weights /= weights.sum()

    text(
        ax,
        80,
        66.5,
        "Product Key Memory: one token, one head shown (heads run in parallel; their reads are summed)",
        size=16,
        weight="bold",
    )

    # input and query network
    box(ax, 1, 29, 10, 10, INK)
    text(ax, 6, 35.5, "x", size=18, weight="bold")
    text(ax, 6, 31.5, "(..., dim)", size=11)
    arrow(ax, (11, 34), (14, 34))
    box(ax, 14, 25, 17, 18, QUERY, fill="#EAF0F8")
    text(ax, 22.5, 40.3, "query network", size=13, weight="bold", color=QUERY)
    text(ax, 22.5, 36.8, "Linear", size=12)
    text(ax, 22.5, 34.5, "dim →", size=10.5)
    text(ax, 22.5, 32.4, "2·heads·dim_head", size=10.5)
    text(ax, 22.5, 29.0, "+ norm of each", size=11)
    text(ax, 22.5, 26.8, "half-query", size=11)
    text(ax, 22.5, 22.3, "q: (..., heads,", size=10.5, color=QUERY)
    text(ax, 22.5, 20.1, "2, dim_head)", size=10.5, color=QUERY)

    # per-head region
    box(ax, 32.2, 5, 97.3, 57, MUTED, fill="none", lw=1.2, radius=1.5, ls=(0, (5, 4)))
    text(ax, 36, 60, "for each of the heads", size=12, color=MUTED, ha="left", style="italic")

    # split into half-queries
    for y, name, color in ((47, "q₁", HALF1), (15, "q₂", HALF2)):
        box(ax, 35.5, y, 9, 8, color, fill="white", lw=2)
        text(ax, 40, y + 5.2, name, size=16, weight="bold", color=color)
        text(ax, 40, y + 2.2, "dim_head", size=10.5)
    elbow(ax, [(31, 34), (33.5, 34), (33.5, 51), (35.5, 51)])
    elbow(ax, [(31, 34), (33.5, 34), (33.5, 19), (35.5, 19)])
    text(ax, 40, 35.5, "split in", size=11, color=MUTED)
    text(ax, 40, 33, "two halves", size=11, color=MUTED)

    # sub-key scores and per-half top-k
    score_strip(ax, 49, 46, sub[0], set(order[0]), HALF1, "q₁ · sub-keys₁  (num_keys scores)")
    score_strip(ax, 49, 14, sub[1], set(order[1]), HALF2, "q₂ · sub-keys₂  (num_keys scores)")
    arrow(ax, (44.5, 51), (48.5, 51))
    arrow(ax, (44.5, 19), (48.5, 19))
    text(ax, 60, 57.2, "each half has its own num_keys sub-keys (dim_head)", size=10.5, color=MUTED)
    text(ax, 60, 38.5, "coloured: top-k of each half", size=10.5, color=MUTED)
    text(ax, 60, 36.2, "(topk of num_keys)", size=10.5, color=MUTED)

    # candidate grid
    cell = 2.8
    gx, gy = 86, 15.0  # lower-left corner of the grid
    top = gy + TOPK * cell
    for i in range(TOPK):  # columns: half 1 (top strip), rows: half 2 (left strip)
        ax.add_patch(Rectangle((gx + i * cell, top + 0.6), cell, cell, fc=HALF1, ec="white", lw=1.2))
        ax.add_patch(Rectangle((gx - 0.6 - cell, top - (i + 1) * cell), cell, cell, fc=HALF2, ec="white", lw=1.2))
        text(ax, gx + (i + 0.5) * cell, top + 0.6 + cell + 1.1, str(i), size=9, color=MUTED)
        text(ax, gx - 0.6 - cell - 1.1, top - (i + 0.5) * cell, str(i), size=9, color=MUTED)
        for j in range(TOPK):
            fc = CAND if (i + 1) * (j + 1) <= TOPK else "white"
            ax.add_patch(Rectangle((gx + i * cell, top - (j + 1) * cell), cell, cell, fc=fc, ec="#BBBBBB", lw=0.8))
    for rank, (i, j) in enumerate(zip(win_i, win_j)):
        ax.add_patch(Rectangle((gx + i * cell, top - (j + 1) * cell), cell, cell, fc=WIN, ec="#BBBBBB", lw=0.8))
        text(ax, gx + (i + 0.5) * cell, top - (j + 0.5) * cell, str(rank + 1), size=10, color="white", weight="bold")
    text(ax, gx + TOPK * cell / 2, top + cell + 4.2, "i: rank in half 1's top-k", size=10.5, color=HALF1)
    text(
        ax,
        gx - cell - 4.6,
        top - TOPK * cell / 2 + 2.5,
        "j: rank in half 2's top-k",
        size=10.5,
        color=HALF2,
        rotation=90,
    )
    strip_right = 49 + NUM_KEYS * 1.35
    elbow(
        ax, [(strip_right + 0.5, 51), (gx + TOPK * cell / 2, 51), (gx + TOPK * cell / 2, top + cell + 5.8)], color=HALF1
    )
    arrow(ax, (strip_right + 0.5, 19), (gx - cell - 6.2, 19), color=HALF2)
    text(ax, gx + TOPK * cell / 2, gy - 2.2, "topk × topk sums  s₁[i] + s₂[j]", size=11)
    text(ax, gx + TOPK * cell / 2, gy - 4.6, "shaded: (i+1)(j+1) ≤ topk, the only cells that can win;", size=10.5)
    text(ax, gx + TOPK * cell / 2, gy - 6.8, "numbered: the topk best sums (ranks)", size=10.5)

    # top-k slots and softmax weights
    lx = 113.5
    row_top = 38.6
    row_h = 3.0
    text(ax, lx + 1.5, 50.5, "top-k slots of num_keys²", size=11, weight="bold", color=WIN)
    text(ax, lx + 1.5, 47.9, "slot = idx₁·num_keys + idx₂", size=10)
    text(ax, lx + 10.5, 43.2, "softmax", size=11, weight="bold", color=WIN)
    text(ax, lx + 10.5, 40.8, "weights", size=11, weight="bold", color=WIN)
    text(ax, lx + 1.5, 40.8, "slot", size=10.5, color=MUTED)
    arrow(ax, (gx + TOPK * cell + 0.3, top - TOPK * cell / 2), (lx - 2.0, top - TOPK * cell / 2), conn="arc3")
    bar_x = lx + 5.5
    value_x, value_w, value_y0, value_y1 = 132.5, 6, 8, 56
    for r, (slot, w) in enumerate(zip(slots, weights)):
        y = row_top - (r + 0.5) * row_h
        text(ax, lx + 1.5, y, str(int(slot)), size=10.5, color=INK)
        ax.add_patch(Rectangle((bar_x, y - 0.9), w * 26, 1.8, fc=WIN, ec="none"))
        row_y = value_y1 - (slot + 0.5) / NUM_KEYS**2 * (value_y1 - value_y0)
        ax.plot([bar_x + w * 26 + 0.3, value_x], [y, row_y], color=WIN, lw=0.8, alpha=0.6)
        ax.add_patch(Rectangle((value_x, row_y - 0.35), value_w, 0.7, fc=WIN, ec="none", zorder=3))
    text(ax, lx + 6.5, row_top - TOPK * row_h - 2.2, "(..., heads, topk)", size=10.5, color=MUTED)

    # value table, weighted sum, output
    ax.add_patch(Rectangle((value_x, value_y0), value_w, value_y1 - value_y0, fc="#EFEFEF", ec=VALUE, lw=1.4))
    text(ax, value_x + value_w / 2, value_y1 + 4.6, "values", size=12, weight="bold", color=INK)
    text(ax, value_x + value_w / 2, value_y1 + 2.1, "(num_keys², dim)", size=10.5)
    text(ax, value_x + value_w / 2, value_y0 - 2.2, "shared by", size=10, color=MUTED)
    text(ax, value_x + value_w / 2, value_y0 - 4.4, "all heads", size=10, color=MUTED)
    sx, sy = 145, 32
    ax.add_patch(Circle((sx, sy), 2.3, fc="white", ec=INK, lw=1.6))
    text(ax, sx, sy, "Σ", size=16, weight="bold")
    arrow(ax, (value_x + value_w, sy), (sx - 2.3, sy))
    text(ax, sx, sy - 6.8, "weighted sum", size=10.5)
    text(ax, sx, sy - 9.0, "of the selected", size=10.5)
    text(ax, sx, sy - 11.2, "rows (all heads)", size=10.5)
    box(ax, 149.5, 27, 9.5, 10, INK)
    arrow(ax, (sx + 2.3, sy), (149.5, sy))
    text(ax, 154.25, 33.6, "output", size=12, weight="bold")
    text(ax, 154.25, 30.2, "(..., dim)", size=11)

    text(
        ax,
        80,
        1.6,
        "Drawn with num_keys = 16, topk = 8.  Defaults: PKM(dim, heads=4, num_keys=128, topk=32, "
        "dim_head=128) reads heads·topk of num_keys² value rows per token.",
        size=11,
        color=MUTED,
    )


if __name__ == "__main__":
    print(draw())
