"""Sharded value tables on 2 gloo processes against the same computation in one process.

One spawn runs every scenario (starting processes is the slow part); each scenario returns
``{name: (actual, expected)}`` pairs that the tests below compare, rank by rank.
"""

import copy
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from product_key_memory import (
    PKM,
    MemoryPlus,
    ShardedValues,
    ValuePool,
    build_optimizer,
    clip_grad_norm_,
    fetch_optimizer_parameters,
    shard_values,
    sharded_parameters,
)
from product_key_memory import distributed as pkm_distributed
from product_key_memory.tables.sharded import column_sizes, sharded_value_read
from product_key_memory.functional import value_read_reference

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
DIM = 7  # odd: the two ranks hold 4 and 3 columns
TOKENS = [(3, 2), (5,)]  # each rank's own tokens, different counts and leading shapes


class _Net(nn.Module):
    """Two memories reading one pool (one of them Memory+ with qk-norm) around a dense layer."""

    def __init__(self):
        super().__init__()
        pool = ValuePool(num_keys=4, dim=DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.mem = PKM(DIM, heads=2, num_keys=4, topk=3, dim_head=4, values=pool)
        self.mem_plus = MemoryPlus(DIM, heads=2, num_keys=4, topk=2, dim_head=4, values=pool, qk_norm=True)

    def forward(self, x, mask=None):
        h = x + self.mem(self.proj(x), mask)
        return h + self.mem_plus(h, mask)


def _tokens(rank, generator, dtype):
    x = torch.randn(*TOKENS[rank], DIM, generator=generator, dtype=dtype)
    mask = torch.rand(TOKENS[rank], generator=generator) > 0.3
    return x, mask


def _loss(out, mask):
    return (out.pow(2) * mask.unsqueeze(-1)).sum() / mask.sum().clamp(min=1)


def _scenario_read(rank, world):
    """sharded_value_read: output, weight gradient and column gradients (dense and sparse)."""
    g = torch.Generator().manual_seed(0)
    slots, m = 10, 4
    table = torch.randn(slots, DIM, generator=g, dtype=torch.float64)
    trainable = torch.rand(slots, generator=g) > 0.3
    data = []
    for r in range(world):
        idx = torch.randint(slots, (*TOKENS[r], m), generator=g)
        w = torch.randn(*TOKENS[r], m, generator=g, dtype=torch.float64)
        data.append((idx, w, torch.randn(*TOKENS[r], DIM, generator=g, dtype=torch.float64)))
    cols = column_sizes(DIM, world)
    start = sum(cols[:rank])
    my_cols = slice(start, start + cols[rank])

    # reference: every rank's read on the whole table; the table's gradient is the mean of the ranks' losses
    full = table.clone().requires_grad_()
    ref_w = [d[1].clone().requires_grad_() for d in data]
    ref_out = [value_read_reference(full, d[0], w, trainable=trainable) for d, w in zip(data, ref_w)]
    sum((o * d[2]).sum() for o, d in zip(ref_out, data)).div(world).backward()

    pairs = {}
    for sparse in (False, True):
        idx, w, grad_out = data[rank]
        shard = table[:, my_cols].clone().requires_grad_()
        w = w.clone().requires_grad_()
        out = sharded_value_read(shard, idx, w, trainable=trainable, sparse=sparse)
        (out * grad_out).sum().backward()
        pairs[f"out sparse={sparse}"] = (out, ref_out[rank].detach())
        pairs[f"grad weights sparse={sparse}"] = (w.grad, ref_w[rank].grad * world)  # its own loss, not the mean
        shard_grad = shard.grad.to_dense() if sparse else shard.grad
        pairs[f"grad shard sparse={sparse}"] = (shard_grad, full.grad[:, my_cols])
    return pairs


def _scenario_gradcheck(rank, world):
    """gradcheck of the custom autograd path, each rank on a group of its own (collectives need lockstep)."""
    groups = [dist.new_group([r]) for r in range(world)]
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(6, (3, 4), generator=g)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    shard = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda w, shard: sharded_value_read(shard, idx, w, group=groups[rank])  # noqa: E731
    ok = torch.autograd.gradcheck(fn, (w, shard))
    return {"gradcheck": (torch.tensor(ok), torch.tensor(True))}


def _model_and_data(rank, world, dtype):
    torch.manual_seed(0)
    ref = _Net().to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [_tokens(r, g, dtype) for r in range(world)]
    return ref, data


def _scenario_model(rank, world):
    """A sharded model: outputs and every gradient of the rank's own loss (the table: the mean over ranks)."""
    ref, data = _model_and_data(rank, world, torch.float64)
    model = shard_values(copy.deepcopy(ref))
    x, mask = data[rank]
    out = model(x, mask)
    _loss(out, mask).backward()

    ref_out = ref(x, mask)
    _loss(ref_out, mask).backward()  # dense gradients: this rank's loss only
    dense = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    sum(_loss(ref(*d), d[1]) for d in data).div(world).backward()  # the table: mean over the ranks' losses
    table = ref.mem.values.weight
    shard = model.mem.values
    cols = slice(shard.column_start, shard.column_start + shard.weight.shape[1])

    pairs = {"out": (out, ref_out.detach()), "table grad": (shard.weight.grad, table.grad[:, cols])}
    for name, p in model.named_parameters():
        if p is not shard.weight:
            pairs[f"grad {name}"] = (p.grad, dense[name])
    pairs["one shared shard"] = (torch.tensor(model.mem_plus.memory.values is shard), torch.tensor(True))
    pairs["tables found once"] = (torch.tensor(len(sharded_parameters(model))), torch.tensor(1))
    pairs["full_weight"] = (shard.full_weight(), table.detach())

    torch.manual_seed(1 + rank)  # another init: the loads below must overwrite it
    fresh = shard_values(_Net().to(torch.float64))
    fresh.load_state_dict(ref.state_dict())  # one process's checkpoint: each rank keeps its columns
    pairs["load a whole table"] = (fresh(x, mask), ref_out.detach())
    fresh.mem.values.reset_parameters()
    fresh.load_state_dict(model.state_dict())  # this rank's own checkpoint
    pairs["load own columns"] = (fresh(x, mask), ref_out.detach())
    try:
        PKM(DIM, heads=2, num_keys=3, topk=3, dim_head=4, values=shard)
        refused = False
    except ValueError:
        refused = True
    pairs["table of the wrong size is refused"] = (torch.tensor(refused), torch.tensor(True))
    return pairs


def _scenario_value_layouts(rank, world):
    """Per-head values (concat_values_and_combine) and narrow values (value_dim) read sharded."""
    torch.manual_seed(0)
    ref = nn.ModuleList([
        PKM(DIM, heads=2, num_keys=4, topk=3, dim_head=5, concat_values_and_combine=True),
        PKM(DIM, heads=2, num_keys=4, topk=3, dim_head=4, value_dim=5),
    ]).to(torch.float64)
    model = shard_values(copy.deepcopy(ref))
    data = [_tokens(r, torch.Generator().manual_seed(2 + r), torch.float64) for r in range(world)]
    x, mask = data[rank]
    pairs = {}
    for i, (layer, ref_layer) in enumerate(zip(model, ref)):
        out = layer(x, mask)
        out.square().sum().backward()
        ref_out = ref_layer(x, mask)
        ref_out.square().sum().backward()  # this rank's loss for the dense gradients
        dense = {n: p.grad.clone() for n, p in ref_layer.named_parameters()}
        ref_layer.zero_grad()
        sum(ref_layer(*d).square().sum() for d in data).div(world).backward()  # the table: mean over ranks
        shard = layer.values
        cols = slice(shard.column_start, shard.column_start + shard.weight.shape[1])
        pairs[f"{i} out"] = (out, ref_out.detach())
        pairs[f"{i} grad table"] = (shard.weight.grad, ref_layer.values.weight.grad[:, cols])
        for name, p in layer.named_parameters():
            if p is not shard.weight:
                pairs[f"{i} grad {name}"] = (p.grad, dense[name])
    return pairs


def _adamw(model):
    return torch.optim.AdamW(fetch_optimizer_parameters(model, 1e-2, pkm_weight_decay=0.0), lr=1e-3, weight_decay=0.1)


def _train_step(model, data, world, clip, make_optimizer=_adamw):
    """One clipped step (AdamW, the value group at its own rate without weight decay); returns the gradients."""
    opt = make_optimizer(model)
    if isinstance(data, tuple):  # this rank's tokens
        loss = _loss(model(*data), data[1])
    else:  # one process sees every rank's batch; DDP and FSDP average the ranks' losses
        loss = sum(_loss(model(*d), d[1]) for d in data) / world
    loss.backward()
    norm = clip(model)
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    grads["total norm"] = norm
    grads = {n: g.to_dense() if g.is_sparse else g for n, g in grads.items()}
    opt.step()
    return grads


MAX_NORM = 0.05  # below the gradient norm of the test model, so clipping changes the gradients


def _clip_one_process(model):
    return nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)


def _clip_one_process_sparse(model):
    # torch.nn.utils.clip_grad_norm_ cannot take a norm of sparse gradients
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.stack([_dense(p.grad).pow(2).sum() for p in params]).sum().sqrt()
    nn.utils.clip_grads_with_norm_(params, MAX_NORM, total)
    return total


def _clip_sharded(model):
    return clip_grad_norm_(model, MAX_NORM)


def _clip_sharded_deprecated(model):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pkm_distributed.clip_grad_norm_(model, MAX_NORM)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 parameters are DTensors


def _compare_step(model, ref, grads, ref_grads):
    """Gradients (Adam is blind to their scale) and parameters after the step, the table by its columns."""
    shard = model.mem.values
    cols = slice(shard.column_start, shard.column_start + shard.weight.shape[1])
    pairs = {
        "table": (shard.weight.detach(), ref.mem.values.weight.detach()[:, cols]),
        "grad table": (_dense(shard.weight.grad), _dense(ref.mem.values.weight.grad)[:, cols]),
    }
    pairs["total norm"] = (grads["total norm"], ref_grads["total norm"])
    pairs["clipping happened"] = (torch.tensor(bool(ref_grads["total norm"] > MAX_NORM)), torch.tensor(True))
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        if p is not shard.weight:
            pairs[name] = (_full(p).detach(), ref_params[name].detach())
            pairs[f"grad {name}"] = (grads[name], ref_grads[name])
    return pairs


def _scenario_ddp(rank, world):
    """One clipped AdamW step under DDP equals the step on all ranks' tokens in one process."""
    ref, data = _model_and_data(rank, world, torch.float64)
    model = shard_values(copy.deepcopy(ref))
    ddp = nn.parallel.DistributedDataParallel(model)
    grads = _train_step(ddp, data[rank], world, lambda ddp: _clip_sharded_deprecated(ddp.module))
    grads = {n.removeprefix("module."): g for n, g in grads.items()}
    return _compare_step(model, ref, grads, _train_step(ref, data, world, _clip_one_process))


def _scenario_clip_norm_types(rank, world):
    """clip_grad_norm_ with norm types 1 and inf (dense and sparse tables) equals torch's in one process."""
    pairs = {}
    for norm_type in (1.0, float("inf")):
        for sparse in (False, True):
            ref, data = _model_and_data(rank, world, torch.float64)
            model = shard_values(copy.deepcopy(ref))
            ddp = nn.parallel.DistributedDataParallel(model)
            if sparse:
                model.mem.values.sparse = True
            _loss(ddp(*data[rank]), data[rank][1]).backward()
            total = clip_grad_norm_(model, 1e-3, norm_type)
            sum(_loss(ref(*d), d[1]) for d in data).div(world).backward()
            expected = nn.utils.clip_grad_norm_(ref.parameters(), 1e-3, norm_type)
            key = f"norm {norm_type} sparse={sparse}"
            pairs[f"{key} total"] = (total, expected)
            shard = model.mem.values
            cols = slice(shard.column_start, shard.column_start + shard.weight.shape[1])
            pairs[f"{key} grad table"] = (_dense(shard.weight.grad), ref.mem.values.weight.grad[:, cols])
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                if p is not shard.weight:
                    pairs[f"{key} grad {name}"] = (p.grad, ref_params[name].grad)
    try:  # every rank holds the same tables: both raise, neither waits for the other
        clip_grad_norm_(model, 1.0, 0.0)
        refused = False
    except ValueError:
        refused = True
    pairs["norm_type 0 with sharded tables is refused"] = (torch.tensor(refused), torch.tensor(True))
    return pairs


def _dense(t):
    return t.to_dense() if t.is_sparse else t


def _scenario_ddp_sparse(rank, world):
    """The same with build_optimizer: sparse value gradients and SparseRowAdam."""
    ref, data = _model_and_data(rank, world, torch.float64)
    model = shard_values(copy.deepcopy(ref))
    ddp = nn.parallel.DistributedDataParallel(model)
    grads = _train_step(ddp, data[rank], world, lambda ddp: _clip_sharded(ddp.module), lambda m: build_optimizer(m))
    grads = {n.removeprefix("module."): g for n, g in grads.items()}
    pairs = _compare_step(model, ref, grads, _train_step(ref, data, world, _clip_one_process_sparse, build_optimizer))
    pairs["sparse table gradient"] = (torch.tensor(model.mem.values.weight.grad.is_sparse), torch.tensor(True))
    return pairs


def _scenario_fsdp2(rank, world):
    """The same step with the dense parameters under fully_shard (FSDP2) and the table ignored by it."""
    from torch.distributed.fsdp import fully_shard

    ref, data = _model_and_data(rank, world, torch.float64)
    model = shard_values(copy.deepcopy(ref))
    fully_shard(model, ignored_params=set(sharded_parameters(model)))
    grads = _train_step(model, data[rank], world, _clip_sharded)
    pairs = _compare_step(model, ref, grads, _train_step(ref, data, world, _clip_one_process))
    is_dtensor = hasattr(model.proj.weight, "full_tensor")
    pairs["dense parameters are sharded"] = (torch.tensor(is_dtensor), torch.tensor(True))
    return pairs


def _scenario_mismatched_sizes(rank, world):
    """ShardedValues built with another size on each rank: a ValueError on every rank, no deadlock."""
    pairs = {}
    for name, args in (("dim", (10, 8 + rank)), ("slots", (10 + rank, 8))):
        try:
            ShardedValues(*args)
            message = ""
        except ValueError as e:
            message = str(e)
        pairs[f"{name} refused"] = (torch.tensor("same num_slots, dim" in message), torch.tensor(True))
    table = ShardedValues(10, 8)  # the group still works afterwards
    pairs["then builds"] = (torch.tensor(table.full_weight().shape), torch.tensor([10, 8]))
    return pairs


SCENARIOS = {
    "read": _scenario_read,
    "gradcheck": _scenario_gradcheck,
    "model": _scenario_model,
    "value_layouts": _scenario_value_layouts,
    "ddp": _scenario_ddp,
    "ddp_sparse": _scenario_ddp_sparse,
    "clip_norm_types": _scenario_clip_norm_types,
    "mismatched_sizes": _scenario_mismatched_sizes,
    "fsdp2": _scenario_fsdp2,
}


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        results = {name: scenario(rank, world) for name, scenario in SCENARIOS.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _compare(pairs, rank):
    for name, (actual, expected) in pairs.items():
        torch.testing.assert_close(
            actual, expected, rtol=0, atol=1e-5, msg=lambda m, name=name: f"rank {rank}, {name}: {m}"
        )


@pytest.mark.parametrize("rank", range(WORLD))
def test_sharded_read_matches_one_process(results, rank):
    _compare(results[rank]["read"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_sharded_read_gradcheck(results, rank):
    _compare(results[rank]["gradcheck"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_sharded_model_forward_and_every_gradient(results, rank):
    _compare(results[rank]["model"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_sharded_per_head_and_narrow_values(results, rank):
    _compare(results[rank]["value_layouts"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_step_matches_one_process(results, rank):
    _compare(results[rank]["ddp"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_sparse_step_matches_one_process(results, rank):
    _compare(results[rank]["ddp_sparse"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_clip_norm_types_match_one_process(results, rank):
    _compare(results[rank]["clip_norm_types"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_sizes_that_differ_between_ranks_are_refused_on_every_rank(results, rank):
    _compare(results[rank]["mismatched_sizes"], rank)


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_step_matches_one_process(results, rank):
    _compare(results[rank]["fsdp2"], rank)


def test_sharded_values_need_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        ShardedValues(16, 8)


def test_sizes_by_their_earlier_names(tmp_path):
    # a one-process group: the constructor's own arguments, nothing to exchange
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        new = ShardedValues(16, 8)
        torch.manual_seed(0)
        old = ShardedValues(num_embeddings=16, embedding_dim=8)
        assert (old.num_slots, old.dim, old.num_embeddings, old.embedding_dim) == (16, 8, 16, 8)
        assert torch.equal(old.weight, new.weight)
        with pytest.raises(TypeError, match="pass num_slots or num_embeddings"):
            ShardedValues(16, 8, num_embeddings=16)
        with pytest.raises(TypeError, match="missing argument dim"):
            ShardedValues(16)
    finally:
        dist.destroy_process_group()
