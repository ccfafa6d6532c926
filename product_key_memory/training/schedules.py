"""Learning-rate schedules for memory layers: UltraMem's value learning rate that starts high and decays to 1x.

UltraMem (arXiv 2411.12364) trains its value table at a multiple of the learning rate that decays
linearly to the ordinary rate: ``optim.py:722`` of the official code (ZihaoHuang-notabot/Ultra-Sparse-Memory-Network
at commit 041104b, ``olmo/optim.py``), ``1 + (initial - 1) * max(0, 1 - step / (max_steps * decay_fraction))``,
multiplied into the value groups' learning rate before warm-up and cosine decay (``optim.py:716-723``).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .._checks import check_positive_float, check_positive_int

__all__ = ["value_lr_multiplier", "value_lr_scheduler"]


def value_lr_multiplier(step: int, *, max_steps: int, initial: float = 4.0, decay_fraction: float = 1.0) -> float:
    """``1 + (initial - 1) * max(0, 1 - step / (max_steps * decay_fraction))``: ``initial`` at step 0,
    falling linearly to 1 at ``max_steps * decay_fraction`` and 1 after (``optim.py:722``; the official
    defaults are ``initial=4.0`` (``mem_value_lr_times``) and ``decay_fraction=1.0``
    (``mem_value_lr_max_steps_rate``))."""
    check_positive_int("max_steps", max_steps)
    check_positive_float("initial", initial)
    check_positive_float("decay_fraction", decay_fraction)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return 1.0 + (initial - 1.0) * max(0.0, 1.0 - step / (max_steps * decay_fraction))


def value_lr_scheduler(
    optimizer: Optimizer,
    *,
    max_steps: int,
    initial: float = 4.0,
    decay_fraction: float = 1.0,
    value_groups: Sequence[int] = (1,),
    base: Optional[Callable[[int], float]] = None,
) -> LambdaLR:
    """A ``LambdaLR`` giving the ``value_groups`` (indices into ``optimizer.param_groups``; ``(1,)`` is the
    value group of :func:`~product_key_memory.build_optimizer` and
    :func:`~product_key_memory.fetch_optimizer_parameters`) the factor ``base(step) * value_lr_multiplier(step)``
    and the other groups ``base(step)`` (``base``: e.g. warm-up and cosine decay; constant 1 by default).

    Example::

        >>> opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-3)
        >>> sched = value_lr_scheduler(opt, max_steps=10_000)  # values at 4e-3, decaying to 1e-3
        >>> for step in range(10_000): ...; opt.step(); sched.step()
    """
    value_lr_multiplier(0, max_steps=max_steps, initial=initial, decay_fraction=decay_fraction)  # checks
    n = len(optimizer.param_groups)
    groups = set(value_groups)
    if not groups or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in groups):
        raise ValueError(f"value_groups must be indices into the optimizer's {n} param_groups, got {value_groups!r}")
    base = base if base is not None else (lambda step: 1.0)

    def value(step: int) -> float:
        return base(step) * value_lr_multiplier(step, max_steps=max_steps, initial=initial,
                                                decay_fraction=decay_fraction)

    lambdas: List[Callable[[int], float]] = [value if i in groups else base for i in range(n)]
    return LambdaLR(optimizer, lambdas)
