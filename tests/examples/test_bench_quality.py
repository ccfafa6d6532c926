"""benchmarks/bench_quality.py: the active-parameter count against hand counts, the sizing rule, and
``--compare kinds`` (and the optimizer comparison) end to end at a tiny size."""

import json
import math
import sys
from pathlib import Path

import pytest
from .._extras import importorskip
import torch
from torch import nn

from product_key_memory import PEER, PKM, EmbeddingValues, MemoryPlus
from product_key_memory.layers import build_memory
from product_key_memory.models.transformer import FeedForward

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import bench_quality as bq  # noqa: E402

TINY = ["--steps", "4", "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
        "--seq-len", "16", "--dim", "32", "--depth", "2", "--pkm-layers", "2", "--num-keys", "8", "--topk", "4",
        "--pkm-heads", "2", "--pkm-dim-head", "8"]


def test_active_params_pkm_by_hand():
    dim, heads, num_keys, topk, dim_head = 32, 2, 8, 3, 6
    layer = PKM(dim, heads=heads, num_keys=num_keys, topk=topk, dim_head=dim_head)
    queries = dim * heads * 2 * dim_head  # to_queries, no bias
    query_norm = 2 * dim_head  # LayerNorm over each half-query, weight and bias
    sub_keys = heads * num_keys * 2 * dim_head  # every sub-key is scored
    values_read = heads * topk * dim  # topk rows per head, dim wide
    assert bq.active_params_per_token(layer) == queries + query_norm + sub_keys + values_read


def test_active_params_memory_plus_adds_its_gate_and_output():
    dim = 32
    layer = MemoryPlus(dim, heads=2, num_keys=8, topk=3, dim_head=6)
    assert bq.active_params_per_token(layer) == bq.active_params_per_token(layer.memory) + 2 * dim * dim


@pytest.mark.parametrize("pre_rmsnorm", [False, True])
def test_active_params_peer_by_hand(pre_rmsnorm):
    dim, heads, num_keys, per_head, dim_key = 32, 2, 8, 3, 5
    layer = PEER(dim, heads=heads, num_experts=num_keys**2, num_experts_per_head=per_head, dim_key=dim_key,
                 non_competing_scores=False, pre_rmsnorm=pre_rmsnorm)
    queries = dim * 2 * heads * dim_key
    sub_keys = heads * num_keys * 2 * dim_key
    experts_read = heads * per_head * 2 * dim  # each expert: one down row and one up row
    norm = dim if pre_rmsnorm else 0
    assert bq.active_params_per_token(layer) == queries + sub_keys + experts_read + norm


def test_active_params_dense_feedforward_is_all_its_parameters():
    dim, hidden = 32, 96
    assert bq.active_params_per_token(FeedForward(dim, hidden)) == 2 * dim * hidden + hidden + dim


def test_active_params_refuses_a_table_read_by_an_unknown_layer():
    with pytest.raises(TypeError, match="EmbeddingValues"):
        bq.active_params_per_token(nn.Sequential(EmbeddingValues(16, 8)))


@pytest.mark.parametrize("kind", bq.sized_kinds())
def test_fit_comes_closest_with_its_reads_per_head(kind):
    args = bq.argparse.Namespace(dim=64, ff_mult=4, pkm_heads=2, num_keys=16, topk=4, pkm_dim_head=16)
    target = bq.active_params_per_token(bq.dense_ff(args))
    kwargs = bq.fit_memory_kwargs(kind, args.dim, target, args)
    _, width, reads = bq.KIND_SIZES[kind](args)

    def gap(**change):
        try:
            layer = build_memory(kind, args.dim, device="meta", **{**kwargs, **change})
        except ValueError:
            return math.inf
        return abs(bq.active_params_per_token(layer) - target)

    assert gap() <= gap(**{reads: kwargs[reads] - 1}) and gap() <= gap(**{reads: kwargs[reads] + 1})
    # the width is the largest that stays within the target at the given reads per head
    at_topk = lambda w: bq.active_params_per_token(build_memory(kind, args.dim, device="meta", **{**kwargs, width: w,
                                                                                                 reads: args.topk}))
    assert at_topk(kwargs[width]) <= target < at_topk(kwargs[width] + 1)


def test_kinds_mode_end_to_end(tmp_path):
    out = tmp_path / "kinds.json"
    data = bq.main(["--compare", "kinds", *TINY, "--out", str(out), "--note", "a test run"])
    saved = json.loads(out.read_text())
    assert saved == data
    assert list(saved["kinds"]) == ["dense", *bq.sized_kinds()]
    assert out.with_suffix(".md").read_text() == bq.render_kinds_markdown(saved)
    md = out.with_suffix(".md").read_text()
    assert saved["meta"]["command"] in md and "a test run" in md
    target = saved["target"]["active_params_per_token"]
    assert saved["kinds"]["dense"]["active_params_per_token"] == target
    budget = min(r["train_seconds"] for r in saved["kinds"].values())
    assert saved["equal_seconds"] == budget
    for kind, r in saved["kinds"].items():
        assert [c["step"] for c in r["curve"]] == [0, 2, 4], kind
        assert r["final_bpb"] == r["curve"][-1]["bpb"]
        assert f"| {kind} | {bq._fmt_kwargs(r['sizes'])} | {r['active_params_per_token']:,} |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out.with_suffix(".png").stat().st_size > 0


def test_kinds_mode_refuses_unknown_kinds(tmp_path):
    with pytest.raises(SystemExit):
        bq.main(["--compare", "kinds", "--kinds", "dense", "nope", *TINY, "--out", str(tmp_path / "k.json")])


def test_optimizer_mode_still_runs(tmp_path):
    importorskip("matplotlib")
    results = bq.main([*TINY, "--variants", "lazy", "dense", "--out", str(tmp_path / "opt.json")])
    assert list(results) == [64] and set(results[64]) == {"lazy", "dense"}
    assert (tmp_path / "opt.json").exists()


@pytest.mark.skipif("ultramem" not in bq.MEMORY_KINDS, reason="UltraMem is not registered in MEMORY_KINDS")
def test_active_params_ultramem_by_hand():
    dim, heads, num_keys, topk, dim_key, expansion = 32, 2, 8, 3, 6, 4
    layer = build_memory("ultramem", dim, heads=heads, num_keys=num_keys, topk=topk, dim_key=dim_key,
                         value_expansion=expansion)
    queries = dim * heads * 2 * dim_key + 2 * dim_key  # to_queries and the half-query LayerNorm
    tucker = sum(p.numel() for p in layer.keys.parameters())  # sub-keys, cores, key norm: all scored
    projection = expansion * dim * dim  # one (dim, expansion * value_dim) map over the grouped rows
    rows_read = heads * topk * dim  # each virtual slot read is one stored row of value_dim = dim
    assert bq.active_params_per_token(layer) == queries + tucker + projection + rows_read


@pytest.mark.skipif("ultramem" not in bq.MEMORY_KINDS, reason="UltraMem is not registered in MEMORY_KINDS")
def test_run_adds_each_memory_layers_aux_loss_once():
    lm = bq.load_train_lm()
    args = bq.argparse.Namespace(dim=32, depth=2, seq_len=16, heads=2, ff_mult=4, pkm_layers=[1, 2], batch_size=2,
                                 seed=0, lr=1e-3, pkm_lr=1e-2, weight_decay=0.0)
    model = bq.build_kind_model("ultramem", args, dict(heads=2, num_keys=8, topk=4, dim_key=8))
    run = bq.Run("lazy", model, torch.zeros(1000, dtype=torch.uint8), args, lm, name="ultramem")
    assert run.aux_layers == [run.model.blocks[0].ff, run.model.blocks[1].ff]
