"""Parameter groups: value tables learn with their own learning rate (arXiv 1907.05242, sec. 4.2)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_positive_int
from .ops import empty_hugepage
from .ops.sparse_adam import sparse_adam_step_
from .tables import ValueTable

__all__ = ["fetch_pkm_value_parameters", "fetch_optimizer_parameters", "SparseRowAdam", "build_optimizer"]


def _value_tables(module: nn.Module) -> List[nn.Parameter]:
    seen, params = set(), []
    for m in module.modules():
        if isinstance(m, ValueTable):
            for p in m.value_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def fetch_pkm_value_parameters(module: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Split ``module``'s parameters into (the parameters of every :class:`ValueTable`, everything else).

    Each parameter appears once, also when several layers share one table.
    """
    values = _value_tables(module)
    value_ids = {id(p) for p in values}
    rest = [p for p in module.parameters() if id(p) not in value_ids]
    return values, rest


def fetch_optimizer_parameters(
    module: nn.Module, pkm_learning_rate: float = 1e-2, *, pkm_weight_decay: Optional[float] = None
) -> List[Dict]:
    """Optimizer groups ``[{'params': rest}, {'params': values, 'lr': pkm_learning_rate}]``.

    ``pkm_weight_decay`` (e.g. ``0.0``) gives the value group its own weight decay.
    """
    values, rest = fetch_pkm_value_parameters(module)
    value_group = {"params": values, "lr": pkm_learning_rate}
    if pkm_weight_decay is not None:
        value_group["weight_decay"] = pkm_weight_decay
    return [{"params": rest}, value_group]


class SparseRowAdam(torch.optim.Optimizer):
    r"""Adam that, given a sparse gradient, updates only the rows it holds (lazy Adam).

    Dense gradients get exactly ``torch.optim.Adam``'s step (its single-tensor,
    ``foreach=False`` formulas), also with ``maximize``, ``amsgrad`` and
    ``decoupled_weight_decay``. A sparse gradient (e.g. a PKM value table with
    ``values.sparse = True``) updates its rows' moments and values and leaves every
    other row, and its moments, untouched, so the step costs follow the tokens, not
    the table size. Bias correction counts the steps in which the parameter had a
    gradient (as ``torch.optim.SparseAdam``); when every row is in every sparse
    gradient the result equals ``torch.optim.Adam``. ``weight_decay`` (L2 added to the
    gradient, or with ``decoupled_weight_decay`` the AdamW decay of the weights) and
    ``amsgrad``'s running maximum apply to the touched rows only for sparse gradients.

    Every option can also be set per parameter group (and edited there between steps).
    Adam's implementation switches are accepted where they change nothing: ``foreach``
    (there is one implementation), ``fused``, ``capturable`` and ``differentiable`` set
    to ``False``/``None``; set to ``True``, or a group key that is an option of another
    ``torch.optim`` optimizer (``momentum``, ``nesterov``, ...), raises ``ValueError``
    rather than being ignored. Other keys (a scheduler's ``initial_lr``, your own tags)
    are kept as torch keeps them.

    Args:
        params: parameters or groups, e.g. :func:`fetch_optimizer_parameters`.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as
            ``torch.optim.Adam``.
        chunk_bytes: sparse rows are updated in blocks of about this many bytes, so the
            temporaries stay small and are reused instead of freshly mapped.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        chunk_bytes: int = 1 << 20,
    ):
        check_positive_int("chunk_bytes", chunk_bytes)
        self.chunk_bytes = chunk_bytes
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        _check_group(defaults, "")
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        # state dicts of earlier versions have groups without the newer options
        super().__setstate__(state)
        for group in self.param_groups:
            for key in _BOOL_OPTIONS:
                group.setdefault(key, False)

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]: ")

    @torch.no_grad()
    def step(self, closure=None):
        for i, group in enumerate(self.param_groups):  # a group dict may have been edited since
            _check_group(group, f"param_groups[{i}]: ")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = _zeros_state(p)
                    state["exp_avg_sq"] = _zeros_state(p)
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = _zeros_state(p)
                state["step"] += 1
                if p.grad.is_sparse:
                    self._sparse_step(p, p.grad, state, group)
                else:
                    self._dense_step(p, p.grad, state, group)
        return loss

    @staticmethod
    def _coefficients(state, group):
        beta1, beta2 = group["betas"]
        step = state["step"].item()
        step_size = group["lr"] / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        return beta1, beta2, step_size, bias_correction2_sqrt

    def _dense_step(self, p: Tensor, grad: Tensor, state, group) -> None:
        # the formulas of torch.optim.Adam's single-tensor step, in the same order
        beta1, beta2, step_size, bc2_sqrt = self._coefficients(state, group)
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            if group["decoupled_weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            else:
                grad = grad.add(p, alpha=group["weight_decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsgrad"]:
            second = state["max_exp_avg_sq"]
            torch.maximum(second, exp_avg_sq, out=second)
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / bc2_sqrt).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _sparse_step(self, p: Tensor, grad: Tensor, state, group) -> None:
        if grad.sparse_dim() != 1:  # e.g. dense.to_sparse(): one index per element, make it row-sparse
            grad = grad.to_dense().to_sparse(sparse_dim=1)
        rows, values = grad._indices()[0], grad._values()
        # PKM's gradient arrives with sorted unique rows, but autograd drops the coalesced flag
        if not (grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all())):
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        if rows.numel() == 0:
            return
        sparse_adam_step_(
            p, state["exp_avg"], state["exp_avg_sq"], rows, values,
            max_exp_avg_sq=state["max_exp_avg_sq"] if group["amsgrad"] else None, lr=group["lr"],
            betas=group["betas"], eps=group["eps"], step=state["step"].item(), weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"],
            chunk_bytes=self.chunk_bytes,
        )


_BOOL_OPTIONS = ("amsgrad", "maximize", "decoupled_weight_decay")
# torch.optim.Adam's implementation switches: the value that changes nothing here
_SWITCHES = {"foreach": (None, True, False), "fused": (None, False), "capturable": (None, False),
             "differentiable": (None, False)}


@functools.lru_cache(maxsize=None)
def _foreign_options() -> FrozenSet[str]:
    """Options of other ``torch.optim`` optimizers (``momentum``, ``nesterov``, ...): ignoring one is a silent bug."""
    names = set()
    for obj in vars(torch.optim).values():
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            for name, par in inspect.signature(obj.__init__).parameters.items():
                if par.kind in (par.POSITIONAL_OR_KEYWORD, par.KEYWORD_ONLY):
                    names.add(name)
    known = {"self", "params", "defaults", "lr", "betas", "eps", "weight_decay", *_BOOL_OPTIONS, *_SWITCHES}
    return frozenset(names - known)


def _check_group(group: Dict, where: str) -> None:
    """A param group's options are ones SparseRowAdam applies, or a clear error naming the key."""
    lr, eps, betas, wd = group["lr"], group["eps"], group["betas"], group["weight_decay"]
    if not 0.0 <= lr:
        raise ValueError(f"{where}lr must be >= 0, got {lr!r}")
    if not 0.0 <= eps:
        raise ValueError(f"{where}eps must be >= 0, got {eps!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}betas must be two floats in [0, 1), got {betas!r}")
    if not 0.0 <= wd:
        raise ValueError(f"{where}weight_decay must be >= 0, got {wd!r}")
    for key in _BOOL_OPTIONS:
        if not isinstance(group[key], bool):
            raise ValueError(f"{where}{key} must be a bool, got {group[key]!r}")
    for key, allowed in _SWITCHES.items():
        if key in group and not any(group[key] is a for a in allowed):
            raise ValueError(
                f"{where}{key}={group[key]!r} is not supported by SparseRowAdam (one plain implementation); "
                f"allowed: {' or '.join(map(repr, allowed))}"
            )
    foreign = sorted(set(group) & _foreign_options())
    if foreign:
        raise ValueError(
            f"{where}SparseRowAdam has no option {foreign}: it would be ignored; its options are lr, betas, eps, "
            f"weight_decay, {', '.join(_BOOL_OPTIONS)}"
        )


def _zeros_state(p: Tensor) -> Tensor:
    if p.device.type == "cpu" and p.is_contiguous():
        # a table-sized state: huge pages make the row gathers of lazy steps miss the TLB far less
        return empty_hugepage(*p.shape, dtype=p.dtype, device=p.device).zero_()
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def build_optimizer(
    module: nn.Module,
    lr: float = 1e-3,
    pkm_learning_rate: float = 1e-2,
    *,
    sparse_values: bool = True,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    pkm_weight_decay: Optional[float] = None,
) -> SparseRowAdam:
    """The recommended optimizer set-up for a model holding PKM layers.

    One :class:`SparseRowAdam` over :func:`fetch_optimizer_parameters` (value tables
    at ``pkm_learning_rate``, everything else at ``lr``). With ``sparse_values``
    (default) it first sets ``sparse = True`` on every :class:`ValueTable` that can learn sparsely, so value
    gradients hold only the rows read and the step updates only those rows: a
    training step then costs the same for a 65k- or a 1M-slot table. Without it
    this is plain Adam.

    Example::

        >>> opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """
    if sparse_values:
        for m in module.modules():
            if isinstance(m, ValueTable) and m.supports_sparse_grad:
                m.sparse = True
    groups = fetch_optimizer_parameters(module, pkm_learning_rate, pkm_weight_decay=pkm_weight_decay)
    return SparseRowAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
