"""``pkm::sparse_adam_step_``: Adam on the given rows of a table and its moments, in place.

:func:`sparse_adam_step_` is the one entry: it checks the arguments and picks the
implementation; :class:`~product_key_memory.SparseRowAdam` calls nothing else.

* ``reference`` (:mod:`.reference`): the specification, row by row in float64;
* ``torch`` (:mod:`.torch_impl`): blocks of rows in torch ops, the default off CUDA, and for
  ``amsgrad``, float64 tables or non-contiguous tensors on any device;
* ``triton`` (:mod:`.triton_impl`): one kernel, one program per row, the default for CUDA tensors
  when Triton imports (CPU tensors under ``TRITON_INTERPRET=1`` with ``use_backend("triton")``).

``step`` may be a tensor on the table's device (a capturable optimizer's step count): the bias
corrections are then computed on the device (in the kernel, or in torch ops), never read back to
the host, so a CUDA graph that captured the step replays it with the current count.

The update (catch-up coefficients, then Adam's step) is stated in :mod:`.reference`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..backend import backend_for
from . import reference, torch_impl
from .torch_impl import device_bias_corrections

__all__ = ["sparse_adam_step_", "device_bias_corrections"]

IMPLEMENTATIONS = ("reference", "torch", "triton")


@torch.library.custom_op(
    "pkm::sparse_adam_step_", mutates_args=("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
)
def _sparse_adam_step_op(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor], rows: Tensor,
    grad_rows: Optional[Tensor], catch_up: Optional[Tensor], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled_weight_decay: bool, maximize: bool, step_size: float, bc2_sqrt: float,
    step_t: Optional[Tensor], chunk_bytes: int, impl: str,
) -> None:
    if impl == "auto":  # chosen here, in eager code, when the entry was traced (use_backend is a ContextVar)
        impl = route(param, exp_avg, exp_avg_sq, max_exp_avg_sq)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, step_size=step_size,
              bc2_sqrt=bc2_sqrt)
    if impl == "triton":
        from . import triton_impl  # imports Triton only when used

        triton_impl.sparse_adam_step_(param, exp_avg, exp_avg_sq, rows, grad_rows, catch_up, step_t=step_t, **kw)
    elif impl == "reference":
        if step_t is not None:  # the specification reads the count (a host read; the fast paths do not)
            kw.update(zip(("step_size", "bc2_sqrt"), _bias_corrections(float(step_t), lr, beta1, beta2)))
        reference.sparse_adam_step_reference_(param, exp_avg, exp_avg_sq, max_exp_avg_sq, rows, grad_rows,
                                              catch_up, **kw)
    else:
        if step_t is not None:
            kw.update(zip(("step_size", "bc2_sqrt"), torch_impl.device_bias_corrections(step_t, lr, beta1, beta2)))
        torch_impl.sparse_adam_step_(param, exp_avg, exp_avg_sq, max_exp_avg_sq, rows, grad_rows, catch_up,
                                     chunk_bytes=chunk_bytes, **kw)


@_sparse_adam_step_op.register_fake
def _sparse_adam_step_fake(param, exp_avg, exp_avg_sq, max_exp_avg_sq, rows, grad_rows, catch_up, lr, beta1,
                           beta2, eps, weight_decay, decoupled_weight_decay, maximize, step_size, bc2_sqrt,
                           step_t, chunk_bytes, impl) -> None:
    return None


def _bias_corrections(step: float, lr: float, beta1: float, beta2: float):
    """``(step_size, bc2_sqrt)`` of :mod:`.reference` for a step count held on the host."""
    step = max(step, 1.0)
    return lr / (1 - beta1**step), math.sqrt(1 - beta2**step)


def route(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor]) -> str:
    """The implementation :func:`sparse_adam_step_` runs: the device's backend (``use_backend`` can
    force one), except that the Triton kernel takes neither ``amsgrad`` (a third moment tensor),
    float64 (it computes in float32) nor non-contiguous tables; those run in torch ops."""
    name = backend_for(param.device)
    if name == "triton" and (
        max_exp_avg_sq is not None
        or torch.float64 in (param.dtype, exp_avg.dtype, exp_avg_sq.dtype)
        or not (param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous())
    ):
        return "torch"
    return name


def sparse_adam_step_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    rows: Tensor,
    grad_rows: Optional[Tensor] = None,
    *,
    catch_up: Optional[Tensor] = None,
    max_exp_avg_sq: Optional[Tensor] = None,
    lr: float,
    betas: tuple,
    eps: float,
    step: Union[float, Tensor],
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    chunk_bytes: int = 1 << 20,
) -> None:
    """In place: catch the ``rows`` of ``param (S, D)`` and its moments up, then one Adam step.

    Args:
        param, exp_avg, exp_avg_sq: ``(S, D)`` tables of one shape (``exp_avg*`` may be float32
            for a half ``param``); ``max_exp_avg_sq`` too, for ``amsgrad``. Contiguous tensors of
            another shape ``(S, ...)`` are taken as ``(S, prod(...))``, ``grad_rows`` likewise.
        rows: ``(U,)`` int64, unique; entries below 0 are padding and leave everything as it is.
        grad_rows: ``(U, D)`` gradient of each row, or ``None`` for the catch-up alone.
        catch_up: ``(U, 4)`` float ``(d, b1, b2, s)`` per row (see :mod:`.reference`), or ``None``.
        lr, betas, eps, weight_decay, decoupled_weight_decay, maximize: as ``torch.optim.Adam``.
        step: the step count after this step (bias correction), ``>= 1``: a number, or a one-element
            floating tensor on ``param``'s device (e.g. ``torch.optim.Adam(capturable=True)``'s
            ``state["step"]``), whose value is then used on the device only: no host sync, and a
            captured CUDA graph reads the count current at each replay.
        chunk_bytes: block size of the torch implementation.
    """
    if param.dim() != 2:  # rows of any shape: as (num_rows, row size) views
        if param.dim() == 0 or not all(t is None or t.is_contiguous() for t in (param, exp_avg, exp_avg_sq,
                                                                            max_exp_avg_sq)):
            raise ValueError(f"param must be a (num_rows, dim) table, or a contiguous tensor of rows of another "
                             f"shape, got shape {tuple(param.shape)}")
        flat = lambda t: None if t is None or t.shape != param.shape else t.view(param.shape[0], -1)  # noqa: E731
        if grad_rows is not None and grad_rows.shape[1:] == param.shape[1:]:
            grad_rows = grad_rows.reshape(grad_rows.shape[0], -1)
        param, exp_avg, exp_avg_sq, max_exp_avg_sq = (
            param.view(param.shape[0], -1), flat(exp_avg), flat(exp_avg_sq), flat(max_exp_avg_sq))
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_exp_avg_sq)):
        if t is not None and (t.shape != param.shape or t.device != param.device):
            raise ValueError(f"{name} must have param's shape {tuple(param.shape)} and device {param.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if grad_rows is not None and grad_rows.shape != (rows.numel(), param.shape[1]):
        raise ValueError(f"grad_rows must be ({rows.numel()}, {param.shape[1]}), got {tuple(grad_rows.shape)}")
    if catch_up is not None and catch_up.shape != (rows.numel(), 4):
        raise ValueError(f"catch_up must be ({rows.numel()}, 4), got {tuple(catch_up.shape)}")
    step_t = None
    if isinstance(step, Tensor):
        if step.numel() != 1 or not step.is_floating_point() or step.device != param.device:
            raise ValueError(f"step as a tensor must be one floating element on param's device {param.device}, "
                             f"got {step.dtype} of shape {tuple(step.shape)} on {step.device}")
        step_t, step = step.reshape(()), 1.0  # its value is checked nowhere: that would read it back
    elif grad_rows is not None and not step >= 1:
        raise ValueError(f"step must be >= 1 (the count after this step), got {step!r}")
    beta1, beta2 = betas
    impl = "auto" if torch.compiler.is_compiling() else route(param, exp_avg, exp_avg_sq, max_exp_avg_sq)
    _sparse_adam_step_op(
        param, exp_avg, exp_avg_sq, max_exp_avg_sq, rows, grad_rows, catch_up, float(lr), float(beta1),
        float(beta2), float(eps), float(weight_decay), bool(decoupled_weight_decay), bool(maximize),
        *map(float, _bias_corrections(float(step), float(lr), float(beta1), float(beta2))), step_t,
        int(chunk_bytes), impl,
    )
