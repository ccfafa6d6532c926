"""Is the memory being used? The memory-usage diagnostics of arXiv 1907.05242.

:class:`MemoryUsageTracker` counts, on the device and without a host sync, how often
each slot of every value table (:class:`~product_key_memory.ValueTable`) of a model is
read and how much weight it receives; :func:`usage_statistics` turns those counts into numbers and
:func:`save_usage_plot` into a picture (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Dict, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ..tables.base import ValueTable

__all__ = ["MemoryUsageTracker", "usage_statistics", "save_usage_plot", "MASS_LEVELS"]

MASS_LEVELS = (0.5, 0.9, 0.99)


class _LayerUsage:
    """Per-table accumulator, a forward hook of the table: slot read counts and weight mass.

    A read counts when its weight is not zero (a padded token's weights are zero, and a
    slot read with weight 0 adds nothing to the output). One extra bin at the end takes
    the other reads, so masking needs no boolean indexing (a data-dependent shape, hence
    a host sync) and is dropped on read-out.

    Concurrent forwards of one table (threads) each add their own reads under a lock, which
    is held while the additions are queued, never while waiting on the device. The hook
    belongs to the table it was attached to: calls from any other module are ignored, and a
    deep copy or a pickle of the table carries an inert hook with no counts.
    """

    def __init__(self, num_memories: int, table: Optional[nn.Module] = None):
        self.num_memories = num_memories
        self.table = None if table is None else weakref.ref(table)
        self.reads: Optional[Tensor] = None
        self.mass: Optional[Tensor] = None
        self.tokens: Optional[Tensor] = None
        self._lock = threading.Lock()

    def __reduce__(self):
        return (_LayerUsage, (self.num_memories,))  # attached to nothing: counts nothing

    def _allocate(self, device: torch.device) -> None:
        mass_dtype = torch.float32 if device.type == "mps" else torch.float64
        self.reads = torch.zeros(self.num_memories + 1, dtype=torch.long, device=device)
        self.mass = torch.zeros(self.num_memories + 1, dtype=mass_dtype, device=device)
        self.tokens = torch.zeros((), dtype=torch.long, device=device)

    def hook(self, module: nn.Module, args, kwargs, output) -> None:
        """``register_forward_hook(..., with_kwargs=True)`` signature: the table was called as
        ``table(indices, weights, trainable=...)``."""
        if self.table is None or self.table() is not module:
            return
        indices = args[0]
        weights = args[1] if len(args) > 1 else kwargs.get("weights")
        if weights is None:
            weights = torch.ones(indices.shape, device=indices.device)
        indices, weights = indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, indices.shape[-1])
        live = weights.detach() != 0
        # rows with every weight zero (padding) are not tokens; zero-weight reads are not reads
        self(torch.where(live, indices, self.num_memories), weights, live.any(-1))

    @torch.no_grad()
    def __call__(self, indices: Tensor, weights: Tensor, mask: Optional[Tensor]) -> None:
        if mask is not None:
            indices = torch.where(mask.view(-1, *([1] * (indices.dim() - 1))), indices, self.num_memories)
        slots = indices.reshape(-1)
        # |w|: the share of the output each read carries, also for relu gates or subtracted scores; the
        # weights are the ones the layer used (after attn_dropout in training), added in the counts' dtype
        w = weights.detach().abs().reshape(-1)
        with self._lock:  # another thread's forward may be adding to the same counts
            if self.reads is None:
                self._allocate(indices.device)
            elif self.reads.device != indices.device:  # the model moved
                moved = (t.to(indices.device) for t in (self.reads, self.mass, self.tokens))
                self.reads, self.mass, self.tokens = moved
            self.tokens += indices.shape[0] if mask is None else mask.sum()
            # index_add_ keeps everything on the device: no .item(), no data-dependent shapes
            self.reads.index_add_(0, slots, self.reads.new_ones(()).expand(slots.numel()))
            self.mass.index_add_(0, slots, w.to(self.mass.dtype))

    def counts(self) -> Dict[str, Tensor]:
        n = self.num_memories
        return {"reads": self.reads[:n], "mass": self.mass[:n], "tokens": self.tokens}

    def reset(self) -> None:
        for t in (self.reads, self.mass, self.tokens):
            if t is not None:
                t.zero_()


class MemoryUsageTracker:
    """Counts slot reads of every value table of ``model`` while attached.

    The tables are the model's :class:`~product_key_memory.ValueTable` modules, whatever
    layer reads them (a :class:`PKM`, a :class:`MemoryPlus`, a memory of your own); each
    is named by its path without a trailing ``.values`` (``"blocks.2.ff"``), and a table
    shared by several layers is counted once, for all of them. Opt-in: nothing is counted
    until the tracker is attached (``with tracker:`` or :meth:`attach`), which adds a
    forward hook to each table. Counts live on the tables' device and survive detaching
    until :meth:`reset`. A read counts when its weight is not zero, so padded tokens
    (``input_mask`` ``False``) are not counted; ``tokens`` counts the bags read with any
    non-zero weight (tokens, or token-heads with ``concat_values_and_combine``).

    Args:
        model: a module containing value tables (or one).

    Examples::

        >>> tracker = MemoryUsageTracker(model)
        >>> with tracker:
        ...     for x in batches:
        ...         model(x)
        >>> tracker.stats()["layers.3.ff"]["used_fraction"]
        0.87
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.layers: Dict[str, nn.Module] = {}
        for name, m in model.named_modules():  # shared tables come once
            if isinstance(m, ValueTable):
                # the layer's path names its table; a lone layer's table is "pkm", a lone table "table"
                short = "pkm" if name == "values" else name[: -len(".values")] if name.endswith(".values") else name
                self.layers[short or "table"] = m
        if not self.layers:
            raise ValueError(f"model ({type(model).__name__}) contains no value table (ValueTable) to track")
        self._usage = {name: _LayerUsage(m.num_slots, m) for name, m in self.layers.items()}
        self._handles = []
        self.attached = False

    def __reduce__(self):
        # the copied layers' hooks are dropped (see _LayerUsage), so a copy would count nothing
        raise TypeError("a MemoryUsageTracker cannot be copied or pickled: make a new one for the copied model")

    def attach(self) -> "MemoryUsageTracker":
        """Start counting: add a forward hook to every table."""
        if not self.attached:
            self._handles = [
                table.register_forward_hook(self._usage[name].hook, with_kwargs=True)
                for name, table in self.layers.items()
            ]
            self.attached = True
        return self

    def detach(self) -> None:
        """Stop counting; the counts are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.attached = False

    def __enter__(self) -> "MemoryUsageTracker":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        """Zero every count (on the device)."""
        for usage in self._usage.values():
            usage.reset()

    def counts(self, layer: str) -> Dict[str, Tensor]:
        """Raw device tensors of ``layer``: ``reads`` and ``mass`` ``(num_keys ** 2,)``, ``tokens``."""
        if layer not in self._usage:
            raise KeyError(f"no tracked table {layer!r}; tracked: {list(self._usage)}")
        usage = self._usage[layer]
        if usage.reads is None:
            table = self.layers[layer]
            usage._allocate(next(iter(table.buffers()), next(table.parameters(), torch.empty(0))).device)
        return usage.counts()

    def stats(self, layers: Optional[Iterable[str]] = None) -> Dict[str, Dict[str, float]]:
        """``{layer name: usage_statistics(...)}`` (syncs with the device once per layer)."""
        names = list(self._usage) if layers is None else list(layers)
        return {name: usage_statistics(**self.counts(name)) for name in names}


def _kl_from_uniform(p: Tensor) -> float:
    # KL(p || uniform) = log n - H(p), with 0 log 0 = 0
    n = p.numel()
    nz = p[p > 0]
    return float(math.log(n) + (nz * nz.log()).sum())


def _gini(x: Tensor) -> float:
    # mean absolute difference over twice the mean, via the sorted form
    n = x.numel()
    s = x.sort().values
    rank = torch.arange(1, n + 1, dtype=s.dtype, device=s.device)
    return float(((2 * rank - n - 1) * s).sum() / (n * s.sum()))


def _slots_holding(x: Tensor, level: float) -> int:
    # fewest slots whose mass reaches `level` of the total
    c = x.sort(descending=True).values.cumsum(0)
    return min(int((c < level * c[-1] * (1 - 1e-12)).sum()) + 1, x.numel())


def _distribution_stats(x: Tensor, suffix: str) -> Dict[str, float]:
    total = float(x.sum())
    if total <= 0:
        nan = float("nan")
        out = {f"kl_uniform{suffix}": nan, f"gini{suffix}": nan}
        out.update({f"slots_{round(level * 100)}{suffix}": nan for level in MASS_LEVELS})
        return out
    out = {f"kl_uniform{suffix}": _kl_from_uniform(x / total), f"gini{suffix}": _gini(x)}
    out.update({f"slots_{round(level * 100)}{suffix}": _slots_holding(x, level) for level in MASS_LEVELS})
    return out


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_counts(name: str, x: Tensor) -> None:
    # a NaN or a negative count has no usage distribution (a Gini above 1, a KL of NaN)
    bad = ~(torch.isfinite(x) & (x >= 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must hold finite counts >= 0, got {float(x[i])} at slot {i}")


def usage_statistics(
    reads: Tensor, mass: Optional[Tensor] = None, tokens: Union[Tensor, int, None] = None
) -> Dict[str, float]:
    """The paper's memory-usage numbers from per-slot counts.

    Args:
        reads: ``(num_slots,)`` how often each slot was read.
        mass: ``(num_slots,)`` summed weight each slot received (optional).
        tokens: tokens counted (optional, reported as is).

    Returns:
        A plain dict: ``slots``, ``tokens``, ``reads`` (total), ``used_fraction`` (slots
        read at least once); for the read counts ``kl_uniform`` (KL divergence of the
        usage distribution from uniform, nats), ``gini`` (0: uniform, ``1 - 1/slots``:
        one slot), ``slots_50`` / ``slots_90`` / ``slots_99`` (fewest slots holding that
        share of the reads); with ``mass`` the same with suffix ``_weighted``. Values are
        NaN while nothing is counted.
    """
    if not isinstance(reads, Tensor) or reads.dim() != 1:
        raise ValueError(f"reads must be a 1-d tensor of per-slot counts, got {_describe(reads)}")
    if mass is not None and (not isinstance(mass, Tensor) or mass.shape != reads.shape):
        raise ValueError(f"mass must be a tensor of the shape of reads {tuple(reads.shape)}, got {_describe(mass)}")
    r = reads.detach().to("cpu", torch.float64)
    _check_counts("reads", r)
    if mass is not None:
        _check_counts("mass", mass.detach().to("cpu", torch.float64))
    if tokens is not None and not (float(tokens) >= 0 and math.isfinite(float(tokens))):
        raise ValueError(f"tokens must be a finite count >= 0, got {tokens!r}")
    out: Dict[str, float] = {
        "slots": r.numel(),
        "tokens": int(tokens) if tokens is not None else None,
        "reads": int(r.sum()),
        "used_fraction": float((r > 0).double().mean()),
    }
    out.update(_distribution_stats(r, ""))
    if mass is not None:
        out.update(_distribution_stats(mass.detach().to("cpu", torch.float64), "_weighted"))
    return out


def save_usage_plot(
    tracker: MemoryUsageTracker,
    path,
    *,
    layers: Optional[Iterable[str]] = None,
    weighted: bool = True,
    title: Optional[str] = None,
):
    """Save a PNG (or any format matplotlib infers from ``path``) of each layer's usage.

    One row per layer: left, the share of reads (and of weight) per slot, slots sorted
    from most to least used, log scale; right, the cumulative share against the
    fraction of slots, with the uniform diagonal and the 50/90/99% marks.
    Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra).

    Returns:
        the matplotlib ``Figure``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("save_usage_plot needs matplotlib: pip install matplotlib (or the 'plot' extra: "
                          "pip install -e '.[plot]' in a checkout of product-key-memory)") from e

    names = list(tracker.layers) if layers is None else list(layers)
    fig = Figure(figsize=(10, 3.2 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 2, squeeze=False)
    for row, name in enumerate(names):
        counts = tracker.counts(name)
        stats = usage_statistics(**counts)
        series = [("reads", counts["reads"])] + ([("weight", counts["mass"])] if weighted else [])
        left, right = axes[row]
        if stats["reads"] == 0:
            for ax in (left, right):
                ax.text(0.5, 0.5, f"{name}: nothing counted", ha="center", va="center", transform=ax.transAxes)
            continue
        for label, t in series:
            x = t.detach().to("cpu", torch.float64)
            share = (x / x.sum().clamp(min=1e-300)).sort(descending=True).values
            rank = torch.arange(1, share.numel() + 1)
            left.plot(rank.numpy(), share.numpy(), label=label)
            frac = rank.double() / share.numel()
            right.plot(frac.numpy(), share.cumsum(0).numpy(), label=label)
        n = counts["reads"].numel()
        left.axhline(1.0 / n, color="grey", linestyle=":", label="uniform")
        left.set_yscale("log")
        left.set_xlabel("slot rank (most read first)")
        left.set_ylabel("share")
        left.set_title(
            f"{name}: {stats['used_fraction']:.1%} of {n} slots used, KL {stats['kl_uniform']:.2f}, "
            f"Gini {stats['gini']:.2f}",
            fontsize=9,
        )
        left.legend(fontsize=8)
        right.plot([0, 1], [0, 1], color="grey", linestyle=":", label="uniform")
        for level in MASS_LEVELS:
            k = stats[f"slots_{round(level * 100)}"]
            if k == k:  # not NaN
                right.plot([k / n], [level], marker="o", color="black", markersize=3)
                right.annotate(
                    f"{level:.0%}: {k}", (k / n, level), fontsize=7, xytext=(4, -10), textcoords="offset points"
                )
        right.set_xlabel("fraction of slots (most read first)")
        right.set_ylabel("cumulative share")
        right.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return fig
