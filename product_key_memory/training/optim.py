"""Parameter groups: value tables learn with their own learning rate (arXiv 1907.05242, sec. 4.2)."""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from ..ops import empty_hugepage
from ..ops.sparse_adam import device_bias_corrections, sparse_adam_step_
from ..tables.base import ValueTable

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
    r"""Adam for tables that learn from row-sparse gradients: lazy, or with dense Adam's result (``catch_up``).

    Dense gradients get exactly ``torch.optim.Adam``'s step (its single-tensor,
    ``foreach=False`` formulas), also with ``maximize``, ``amsgrad`` and
    ``decoupled_weight_decay``. A sparse gradient (e.g. a PKM value table with
    ``values.sparse = True``) updates the rows it holds, so the step costs follow the
    tokens, not the table size. Bias correction counts the steps in which the parameter
    had a gradient (as ``torch.optim.SparseAdam``). A row missing from a sparse gradient
    has a zero gradient in that step; what happens to it depends on ``catch_up``:

    * ``catch_up=False`` (lazy Adam): the row and its moments stay as they are. When every
      row is in every sparse gradient the result equals ``torch.optim.Adam``; otherwise it
      does not (dense Adam decays an unread row's moments and keeps moving it on its
      momentum). ``weight_decay`` and ``amsgrad`` apply to the rows in the gradient only.
    * ``catch_up=True``: the result of dense Adam with decoupled weight decay (AdamW) at
      about the lazy cost. A row last brought up to date at step ``s`` and next touched at
      step ``e`` first gets, in closed form, what the skipped steps ``j = s+1 .. e`` of
      dense Adam with a zero gradient do to it::

          m_e = m_s * prod_j beta1_j            v_e = v_s * prod_j beta2_j
          p_e = p_s * prod_j delta_j - (m_s / sqrt(v_s)) * sum_j [prod_{i>j} delta_i] * c_j * rho_j
          delta_j = 1 - lr_j * weight_decay_j   c_j = lr_j * sqrt(1 - beta2_j**j) / (1 - beta1_j**j)
          rho_j = prod_{i=s+1..j} beta1_i / sqrt(beta2_i)

      with each skipped step's own learning rate (so schedulers work), betas and decay.
      The one term left out is Adam's ``eps`` in those steps. Dense Adam's skipped update is
      ``e_j = lr_j / (1 - beta1**j) * m_j / (a_j + eps)`` with ``a_j = sqrt(v_j / (1 - beta2**j))``;
      the closed form takes ``f_j = e_j * (a_j + eps) / a_j``. The moments are exact, so the
      parameter differs from dense Adam's by at most
      ``sum_j |f_j - e_j| = sum_j |e_j| * eps / a_j = sum_j |f_j| * eps / (a_j + eps)`` per element,
      the later decays (factors ``delta`` in ``(0, 1]``) only shrinking it: exactly 0 for
      ``eps = 0``, never more than ``sum_j |f_j|`` (the skipped steps' whole move), and for
      constant ``lr`` and betas with ``beta1 < beta2`` at most
      ``|f_{s+1}| * (eps / a_{s+1}) / (1 - beta1 / beta2)``, since ``|f_j|`` shrinks by
      ``beta1 / sqrt(beta2)`` a step and ``1 / a_j`` grows by ``1 / sqrt(beta2)``. Elements
      never updated (``v = 0``, hence ``m = 0``) do not move, as in dense Adam.

      Rows are brought up to date when a gradient reaches them, by :meth:`catch_up_`
      (all rows: call it before evaluating with the table read by other code, saving, or
      exporting), by a forward pre-hook on the value tables (:meth:`attach`, done by
      :func:`build_optimizer`: a forward then reads what dense Adam's model would), and
      ``ceil(num_rows / catch_up_window)`` rows a step in turn, so that no row is more
      than ``catch_up_window`` steps behind. The per-step numbers above are kept for the
      last ``catch_up_window`` steps only.

      Memory per table of ``S`` rows: an int32 step counter per row (``4 * S`` bytes,
      against ``8 * S * dim`` for the two moments in float32), ``5 * (catch_up_window + 1)``
      float64 per-step numbers and a step clock. Work per step: the rows in the gradient,
      ``ceil(S / catch_up_window)`` more rows, and ``O(catch_up_window)`` scalars. The
      Triton kernel applies the catch-up in the same pass as the step.

      ``catch_up`` cannot honour ``amsgrad`` (its maximum is not a closed form of the
      skipped steps), L2 ``weight_decay`` without ``decoupled_weight_decay`` (it gives
      unread rows a gradient), or ``betas[0] >= sqrt(betas[1])`` (an unread row's
      ``m / sqrt(v)`` then grows without bound and ``eps`` decides the step); those raise
      ``ValueError``. ``maximize`` changes nothing in a zero-gradient step and is kept.

    ``capturable=True`` (as ``torch.optim.Adam``'s): each parameter's ``state["step"]`` is a
    float32 tensor on its device, counted there, and the bias corrections are computed there
    from it (in the Triton kernel, or in tensor ops), so a step reads nothing back to the host
    and a CUDA graph that captured ``step()`` replays it with the current count. Capture after
    a few warm-up steps outside the graph, which make the state. ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` stay Python numbers baked into a captured graph: a scheduler that changes
    ``lr`` needs a new capture. ``catch_up=True`` works with it: its step clock, per-row counters
    and turn cursor are device tensors then, and its per-step numbers are computed on the device.
    Every option works with it (``amsgrad`` and float64 tables take the torch row update, which
    then keeps padding rows instead of dropping them with a host read). A row-sparse gradient
    made without a host sync (the triton backend's read, on CUDA) keeps the whole training step
    capturable. Without ``capturable`` the count is a CPU tensor read by ``.item()`` (no device
    sync, but a captured graph would replay the first step's bias correction forever, so
    capturing such a step raises ``RuntimeError`` as in torch).

    Every option can also be set per parameter group (and edited there between steps;
    a group switched from ``catch_up=True`` to ``False`` first brings its rows up to date).
    Adam's other implementation switches are accepted where they change nothing: ``foreach``
    (there is one implementation), ``fused`` and ``differentiable`` set
    to ``False``/``None``; set to ``True``, or a group key that is an option of another
    ``torch.optim`` optimizer (``momentum``, ``nesterov``, ...), raises ``ValueError``
    rather than being ignored. Other keys (a scheduler's ``initial_lr``, your own tags)
    are kept as torch keeps them. The rows are updated by
    :func:`product_key_memory.ops.sparse_adam.sparse_adam_step_` (Triton on CUDA).

    Args:
        params: parameters or groups, e.g. :func:`fetch_optimizer_parameters`.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as
            ``torch.optim.Adam``.
        catch_up: dense Adam's result for rows missing from sparse gradients (above).
        catch_up_window: the most steps a row may fall behind (``catch_up`` only).
        capturable: keep the step count on the device and never read it back (above).
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
        catch_up: bool = False,
        catch_up_window: int = 4096,
        chunk_bytes: int = 1 << 20,
        capturable: bool = False,
    ):
        check_positive_int("chunk_bytes", chunk_bytes)
        check_positive_int("catch_up_window", catch_up_window)
        self.chunk_bytes = chunk_bytes
        self.catch_up_window = catch_up_window
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            catch_up=catch_up,
            capturable=capturable,
        )
        _check_group(defaults, "")
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)
        self._hooks: List = []

    def __getstate__(self):
        state = super().__getstate__()  # torch keeps defaults, state and groups; a copy needs these too
        state.update(chunk_bytes=self.chunk_bytes, catch_up_window=self.catch_up_window)
        return state

    def __setstate__(self, state):
        # state dicts of earlier versions have groups without the newer options
        for key, default in (("chunk_bytes", 1 << 20), ("catch_up_window", 4096)):
            if key not in state and key not in self.__dict__:  # load_state_dict passes state and groups only
                state[key] = default
        super().__setstate__(state)
        self.__dict__.setdefault("_hooks", [])
        for group in self.param_groups:
            for key in _BOOL_OPTIONS:
                group.setdefault(key, False)

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]: ")

    def load_state_dict(self, state_dict: Dict) -> None:
        # torch casts every tensor state to a floating parameter's dtype; the per-step numbers stay
        # float64, the catch-up counters and cursor keep their integer dtypes
        kept = {pid: {k: st[k] for k in (_WINDOW, _ROW_STEP, _CLOCK, _CURSOR) if isinstance(st.get(k), Tensor)}
                for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, t in kept.get(pid, {}).items():
                self.state[p][key] = t.to(dtype=t.dtype, device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        for i, group in enumerate(self.param_groups):  # a group dict may have been edited since
            _check_group(group, f"param_groups[{i}]: ")
        # as torch.optim.Adam: refuse to capture a step that is not capturable (older torch: the cuda_ name)
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or self._cuda_graph_capture_health_check
        check()
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
                    # as torch.optim.Adam: the count on the CPU, or on the device when capturable
                    state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if group["capturable"]
                                     else torch.tensor(0.0))
                    state["exp_avg"] = _zeros_state(p)
                    state["exp_avg_sq"] = _zeros_state(p)
                elif group["capturable"] and state["step"].device != p.device:  # switched on, or a CPU state loaded
                    state["step"] = state["step"].to(dtype=torch.float32, device=p.device)
                elif not group["capturable"] and state["step"].device.type != "cpu":  # read once, not every step
                    state["step"] = state["step"].cpu()
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = _zeros_state(p)
                sparse_catch_up = p.grad.is_sparse and group["catch_up"]
                if _ROW_STEP in state and not sparse_catch_up:
                    # a dense gradient, or catch-up switched off: every row to the last step, then as usual
                    self._catch_up_rows(p, state, None)
                    for key in _CATCH_UP_STATE:
                        del state[key]
                if sparse_catch_up and _ROW_STEP not in state:
                    self._init_catch_up(p, state, group["capturable"])
                state["step"] += 1
                if p.grad.is_sparse:
                    self._sparse_step(p, p.grad, state, group)
                else:
                    self._dense_step(p, p.grad, state, group)
        return loss

    @torch.no_grad()
    def catch_up_(self) -> None:
        """Bring every row of every ``catch_up`` table to the last step: afterwards each table,
        and its moments, hold what dense Adam's would (within the ``eps`` bound). Costs one pass
        over the tables; call it before evaluation that bypasses the tables' forward, saving or
        exporting the weights."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and _ROW_STEP in state:
                    self._catch_up_rows(p, state, None)

    def attach(self, module: nn.Module) -> List:
        """Register a forward pre-hook on every :class:`ValueTable` in ``module`` whose weight this
        optimizer steps with ``catch_up``: before a forward reads rows, they are brought up to the
        last step, so the model reads what dense Adam's would. Returns the hook handles
        (:func:`build_optimizer` calls this). The hook reads the ``indices`` argument, runs on
        every backend, does no host sync on CUDA (duplicate rows are masked, not removed) and
        is traced by ``torch.compile``. Tables whose value parameter is not one
        ``(num_slots, dim)`` tensor (quantized, sharded) are left alone; reads that do not go
        through the table's forward (``functional.value_read`` on its weight) need
        :meth:`catch_up_` first."""
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        handles = []
        ref = weakref.ref(self)
        for m in module.modules():
            if not isinstance(m, ValueTable):
                continue
            params = list(m.value_parameters())
            if len(params) != 1 or params[0].dim() != 2 or params[0].shape[0] != m.num_slots:
                continue
            group = groups.get(id(params[0]))
            if group is None or not group["catch_up"]:
                continue
            handles.append(m.register_forward_pre_hook(_CatchUpBeforeRead(ref, params[0]), with_kwargs=True))
        self._hooks.extend(handles)
        return handles

    def catch_up_read_(self, param: Tensor, indices: Tensor) -> None:
        """Bring the rows ``indices`` (any shape, repeats allowed) of ``param`` to the last step."""
        state = self.state.get(param)
        if not state or _ROW_STEP not in state:
            return
        with torch.no_grad():
            rows = indices.reshape(-1).to(device=param.device, dtype=torch.int64)
            if _host_reads_free(param.device) and not torch.compiler.is_compiling():
                # on CPU a data-dependent size costs no device sync: only the rows behind, no padding
                rows = torch.unique(rows)
                rows = rows[state[_ROW_STEP][rows] != state[_CLOCK]]
                op_rows = rows
            else:  # keep the size: the first of equal rows works, the rest are padding (-1)
                rows = rows.sort().values
                repeat = torch.zeros_like(rows, dtype=torch.bool)
                repeat[1:] = rows[1:] == rows[:-1]
                op_rows = rows.masked_fill(repeat, -1)
            self._catch_up_rows(param, state, rows, op_rows=op_rows, to=state[_CLOCK])

    # -- internals -------------------------------------------------------------------------

    def _init_catch_up(self, p: Tensor, state, capturable: bool = False) -> None:
        """Every row counts as up to date at the current step (a fresh table, or a lazy state loaded)."""
        if capturable:  # the count stays on the device: copied, not read
            now = state["step"].to(device=p.device, dtype=torch.int32)
            state[_ROW_STEP] = torch.empty(p.shape[0], dtype=torch.int32, device=p.device).copy_(now)
            state[_CLOCK] = now.clone()
            state[_CURSOR] = torch.zeros((), dtype=torch.int64, device=p.device)
        else:
            now = int(state["step"].item())
            state[_ROW_STEP] = torch.full((p.shape[0],), now, dtype=torch.int32, device=p.device)
            state[_CLOCK] = torch.tensor(now, dtype=torch.int32, device=p.device)
            state[_CURSOR] = 0
        window = torch.ones(5, self.catch_up_window + 1, dtype=torch.float64, device=p.device)
        window[4] = 0
        state[_WINDOW] = window

    def _catch_up_rows(self, p, state, rows, *, op_rows=None, to=None) -> None:
        """Rows ``rows`` (``None``: all, in blocks) to step ``to`` (the clock when ``None``), with the
        coefficients of the window for each row's age; their counters then read ``to``."""
        row_step, window = state[_ROW_STEP], state[_WINDOW]
        to = state[_CLOCK] if to is None else to
        if rows is None:
            block = max(1, self.chunk_bytes // max(1, p[0].numel() * p.element_size())) * 16
            for start in range(0, p.shape[0], block):
                r = torch.arange(start, min(start + block, p.shape[0]), device=p.device)
                self._catch_up_rows(p, state, r, op_rows=r, to=to)
            return
        ages = (to - row_step[rows]).long()  # (U,), in [0, catch_up_window]
        coeffs = _coeffs_at(window, ages)  # (U, 4): d, b1, b2, s
        sparse_adam_step_(
            p.data, state["exp_avg"], state["exp_avg_sq"], rows if op_rows is None else op_rows, None,
            catch_up=coeffs, lr=0.0, betas=(0.0, 0.0), eps=0.0, step=1, chunk_bytes=self.chunk_bytes,
        )
        row_step[rows] = to

    def _push_step(self, state, group, step) -> None:
        """Shift the window one step: entry ``a`` takes a row from step ``step - a`` to ``step``
        (an int, or a 0-dim int32 tensor on the device: then computed there)."""
        window = state[_WINDOW]
        beta1, beta2 = group["betas"]
        delta = 1 - group["lr"] * group["weight_decay"]  # decoupled (checked), else weight_decay == 0
        if isinstance(step, Tensor):
            t = step.to(torch.float64)
            c = group["lr"] * (1 - torch.pow(beta2, t)).sqrt() / (1 - torch.pow(beta1, t))
        else:
            c = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        old = window[:, :-1].clone()
        window[0, 1:] = old[0] * delta
        window[1, 1:] = old[1] * beta1
        window[2, 1:] = old[2] * beta2
        window[3, 1:] = old[3] * (beta1 / math.sqrt(beta2))
        window[4, 1:] = old[4] * delta + c * window[3, 1:]
        window[:4, 0] = 1
        window[4, 0] = 0
        if isinstance(step, Tensor):
            state[_CLOCK].copy_(step)
        else:
            state[_CLOCK].fill_(step)

    @staticmethod
    def _coefficients(state, group):
        beta1, beta2 = group["betas"]
        step = state["step"].item()
        step_size = group["lr"] / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        return beta1, beta2, step_size, bias_correction2_sqrt

    def _dense_step(self, p: Tensor, grad: Tensor, state, group) -> None:
        # the formulas of torch.optim.Adam's single-tensor step, in the same order
        if group["capturable"]:
            beta1, beta2 = group["betas"]
            step_size, bc2_sqrt = device_bias_corrections(state["step"], group["lr"], beta1, beta2)
        else:
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
        if isinstance(step_size, Tensor):  # addcdiv_ takes a number only: p - step_size * (m / denom)
            p.sub_(torch.div(exp_avg, denom, out=denom).mul_(step_size))
        else:
            p.addcdiv_(exp_avg, denom, value=-step_size)

    def _sparse_step(self, p: Tensor, grad: Tensor, state, group) -> None:
        if grad.sparse_dim() != 1:  # e.g. dense.to_sparse(): one index per element, make it row-sparse
            grad = grad.to_dense().to_sparse(sparse_dim=1)
        rows, values = grad._indices()[0], grad._values()
        op_rows = rows
        if _host_reads_free(p.device):
            # PKM's torch-backend gradient arrives with sorted unique rows, but autograd drops the coalesced flag
            if not (grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all())):
                grad = grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                op_rows = rows
        elif not grad.is_coalesced():  # repeated rows (the triton read gives one entry per read), no host sync
            rows, op_rows, values = merge_repeated_rows(rows, values)
        capturable = group["capturable"]
        # capturable: the count stays a tensor on the device, read by the op (and below) there
        step = state["step"].to(torch.int32) if capturable else int(state["step"].item())
        catch_up = None
        if group["catch_up"]:  # rows first to the previous step, in the same pass as this one
            ages = (step - 1 - state[_ROW_STEP][op_rows.clamp(min=0)]).long()
            # rows read through the hook are up to date already; on CPU, skipping that no-op costs no sync
            if not _host_reads_free(p.device) or bool(ages.any()):
                catch_up = _coeffs_at(state[_WINDOW], ages)
        if rows.numel():
            sparse_adam_step_(
                p, state["exp_avg"], state["exp_avg_sq"], op_rows, values, catch_up=catch_up,
                max_exp_avg_sq=state["max_exp_avg_sq"] if group["amsgrad"] else None, lr=group["lr"],
                betas=group["betas"], eps=group["eps"], step=state["step"] if capturable else step,
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"],
                chunk_bytes=self.chunk_bytes,
            )
        if group["catch_up"]:
            state[_ROW_STEP][rows] = step
            self._push_step(state, group, step)
            # a slice of the table in turn, so that no row falls more than the window behind
            n = p.shape[0]
            width = state[_WINDOW].shape[1] - 1
            k = min(n, -(-n // width))
            cursor = state[_CURSOR]
            if capturable and not isinstance(cursor, Tensor):  # a graph must read the turn's start, not bake it in
                cursor = state[_CURSOR] = torch.tensor(cursor, dtype=torch.int64, device=p.device)
            elif not capturable and isinstance(cursor, Tensor):
                cursor = state[_CURSOR] = int(cursor)
            turn = (torch.arange(k, device=p.device) + cursor) % n
            if capturable:
                cursor.add_(k).remainder_(n)
            else:
                state[_CURSOR] = (cursor + k) % n
            self._catch_up_rows(p, state, turn, to=step)


def _host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor's data back to Python costs no device sync (the CPU): the step
    then takes the cheaper data-dependent branches; on a GPU it takes only fixed-size ops."""
    return device.type == "cpu"


def merge_repeated_rows(rows: Tensor, values: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """A row-sparse gradient's repeated rows summed, in ops of fixed sizes (no host sync, unlike
    ``coalesce``; also :func:`~product_key_memory.training.clip.clip_grad_norm_`'s). Returns ``(rows, op_rows, grads)``: ``rows`` sorted (repeats kept),
    ``op_rows`` each distinct row once then ``-1`` padding, ``grads`` their summed gradients."""
    rows, perm = rows.sort(stable=True)
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = rows[1:] != rows[:-1]
    run = starts.cumsum(0) - 1
    grads = torch.zeros_like(values).index_add_(0, run, values.index_select(0, perm))
    op_rows = torch.full_like(rows, -1).scatter_(0, run, rows)  # equal rows write the same value
    return rows, op_rows, grads


class _CatchUpBeforeRead:
    """A ValueTable forward pre-hook: catch the rows about to be read up (SparseRowAdam.attach)."""

    def __init__(self, optimizer_ref, param: nn.Parameter):
        self.optimizer_ref, self.param = optimizer_ref, param

    def __getstate__(self):  # a pickled model keeps the hook but not the optimizer (a weakref does not pickle)
        return {"optimizer_ref": None, "param": self.param}

    def __call__(self, module, args, kwargs):
        optimizer = self.optimizer_ref() if self.optimizer_ref is not None else None
        if optimizer is not None:
            indices = args[0] if args else kwargs["indices"]
            optimizer.catch_up_read_(self.param, indices)


# catch-up state: per-row step counters, the step they count to, the per-step numbers by age, the turn
_ROW_STEP, _CLOCK, _WINDOW, _CURSOR = "catch_up_row_step", "catch_up_clock", "catch_up_window", "catch_up_cursor"
_CATCH_UP_STATE = (_ROW_STEP, _CLOCK, _WINDOW, _CURSOR)


def _coeffs_at(window: Tensor, ages: Tensor) -> Tensor:
    """``(U, 4)``: the window's rows that the op takes, d, b1, b2, s (row 3 is rho), at columns
    ``ages``. Sliced, not indexed by a list of rows: a list becomes a host tensor copied to the
    device, a sync on CUDA that a captured graph cannot hold."""
    cols = window[:, ages]  # (5, U)
    return torch.cat((cols[:3], cols[4:])).t()


_BOOL_OPTIONS = ("amsgrad", "maximize", "decoupled_weight_decay", "catch_up", "capturable")
# torch.optim.Adam's other implementation switches: the value that changes nothing here
_SWITCHES = {"foreach": (None, True, False), "fused": (None, False), "differentiable": (None, False)}


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
    if group["catch_up"]:
        what = f"{where}catch_up=True gives dense Adam's result in closed form, which it cannot with"
        if group["amsgrad"]:
            raise ValueError(f"{what} amsgrad=True (its running maximum); use catch_up=False or amsgrad=False")
        if wd != 0 and not group["decoupled_weight_decay"]:
            raise ValueError(
                f"{what} L2 weight_decay={wd!r} (it gives unread rows a gradient); use decoupled_weight_decay=True "
                "(AdamW's decay, which it applies over skipped steps) or weight_decay=0"
            )
        if not betas[0] < math.sqrt(betas[1]):
            raise ValueError(
                f"{what} betas={tuple(betas)!r}: it needs betas[0] < sqrt(betas[1]), else an unread row's "
                "m / sqrt(v) grows without bound and eps decides its steps"
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
    decoupled_weight_decay: bool = False,
    catch_up: bool = False,
    capturable: bool = False,
) -> SparseRowAdam:
    """The recommended optimizer set-up for a model holding PKM layers.

    One :class:`SparseRowAdam` over :func:`fetch_optimizer_parameters` (value tables
    at ``pkm_learning_rate``, everything else at ``lr``). With ``sparse_values``
    (default) it first sets ``sparse = True`` on every :class:`ValueTable` that can learn sparsely, so value
    gradients hold only the rows read and the step updates only those rows: a
    training step then costs the same for a 65k- or a 1M-slot table. Without it
    this is plain Adam.

    ``catch_up=True`` gives the value tables dense Adam's (AdamW's) result at about the
    lazy cost (see :class:`SparseRowAdam`) and registers the forward pre-hooks that bring
    rows up to date before a forward reads them (:meth:`SparseRowAdam.attach`). Weight decay
    with it must be ``decoupled_weight_decay=True``. Which of the two learns better on the
    byte-level LM is measured in ``benchmarks/README.md`` (Optimizer: lazy or catch-up).

    ``capturable=True`` keeps every step count on the device, for both groups (the value
    tables and everything else, all stepped by the one :class:`SparseRowAdam`): with the
    triton backend on CUDA a whole training step (forward, backward, ``step``) can then be
    captured in a CUDA graph and replayed. ``lr`` is baked into the capture.

    Example::

        >>> opt = build_optimizer(model, lr=1e-3, pkm_learning_rate=1e-2)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """
    if sparse_values:
        for m in module.modules():
            if isinstance(m, ValueTable) and m.supports_sparse_grad:
                m.sparse = True
    groups = fetch_optimizer_parameters(module, pkm_learning_rate, pkm_weight_decay=pkm_weight_decay)
    opt = SparseRowAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, catch_up=catch_up, capturable=capturable)
    if catch_up:
        opt.attach(module)
    return opt
