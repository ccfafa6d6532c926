"""KNNAttention against a plain per-position reference; padding; memory writes; TransformerLM with KNN layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from product_key_memory import PKM, KNNAttention, KNNMemory, TransformerLM
from product_key_memory.knn import KNNMemoryList


def reference(attn: KNNAttention, x, memory_keys, memory_values, counts, mask=None):
    """Loop over rows, heads and positions: the equations of arXiv 2203.08913 sec. 3 as written in the docstring."""
    b, n, _ = x.shape
    h, d, topk = attn.heads, attn.dim_head, attn.num_retrieved_memories
    mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    q = F.normalize(attn.to_q(x).view(b, n, h, d), dim=-1)
    k, v = attn.to_kv(x).split(d, dim=-1)
    k = F.normalize(k, dim=-1)
    outs = torch.zeros(b, n, h, d, dtype=x.dtype)
    for i in range(b):
        live_k, live_v = memory_keys[i, : counts[i]], memory_values[i, : counts[i]]
        for head in range(h):
            scale = attn.log_scale[head].exp()
            g = attn.gate[head].sigmoid()
            for t in range(n):
                if not mask[i, t]:
                    continue
                keys = [j for j in range(t + 1) if mask[i, j]]
                w = torch.softmax(torch.stack([scale * (q[i, t, head] @ k[i, j]) for j in keys]), 0)
                local = sum(wj * v[i, j] for wj, j in zip(w, keys))
                if counts[i] == 0:
                    outs[i, t, head] = local
                    continue
                scores = live_k @ q[i, t, head].detach()
                chosen = scores.sort(descending=True, stable=True).indices[:topk]
                sim = scale * (live_k[chosen] @ q[i, t, head])
                memory = torch.softmax(sim, 0) @ live_v[chosen]
                outs[i, t, head] = g * memory + (1 - g) * local
    return attn.to_out(outs.reshape(b, n, h * d))


def make(num_retrieved_memories=3, **kwargs):
    torch.manual_seed(0)
    attn = KNNAttention(12, heads=2, dim_head=4, num_retrieved_memories=num_retrieved_memories, gate_init=0.3,
                        dtype=torch.float64, **kwargs)
    memory = KNNMemory(4, max_memories=10, num_indices=2, dtype=torch.float64)
    return attn, memory


@pytest.mark.parametrize("filled", [(0, 0), (2, 7), (10, 10)])
def test_matches_per_position_reference_and_its_gradients(filled):
    attn, memory = make()
    for i, count in enumerate(filled):
        if count:
            with memory.at_batch_indices([i]):
                memory.add(torch.randn(1, count, 2, 4, dtype=torch.float64))
    keys, values = memory.buffer[:, :, 0].clone(), memory.buffer[:, :, 1].clone()
    counts = memory.count.tolist()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    out = attn(x, knn_memory=memory, add_knn_memory=False)
    expected = reference(attn, x, keys, values, counts)
    assert_close(out, expected, msg="output")
    g = torch.randn_like(out)
    params = [x, *attn.parameters()]
    for name, a, e in zip(["x", *dict(attn.named_parameters())], torch.autograd.grad(out, params, g),
                          torch.autograd.grad(expected, params, g, allow_unused=True)):
        assert_close(a, torch.zeros_like(a) if e is None else e, msg=f"gradient of {name}")


def test_padding_neither_attends_nor_is_attended_nor_stored():
    attn, memory = make()
    memory.add(torch.randn(2, 6, 2, 4, dtype=torch.float64))
    keys, values, counts = memory.buffer[:, :, 0].clone(), memory.buffer[:, :, 1].clone(), memory.count.tolist()
    before = KNNMemory(4, max_memories=10, num_indices=2, dtype=torch.float64)
    before.load_state_dict(memory.state_dict())
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = torch.tensor([[False, True, True, False, True], [True, True, True, True, False]])
    out = attn(x, knn_memory=memory, mask=mask)
    assert_close(out, reference(attn, x, keys, values, counts, mask))
    assert not out[~mask].any(), "padded positions give zeros"
    changed = torch.where(mask[..., None], x, torch.randn_like(x))
    assert_close(attn(changed, knn_memory=before, mask=mask)[mask], out[mask])
    assert torch.equal(before.buffer, memory.buffer), "padded tokens do not change what is written"
    assert memory.count.tolist() == [9, 10], "only the 3 and 4 real tokens are written"


def test_segment_is_written_after_the_forward_detached_and_found_by_the_next():
    attn, memory = make(num_retrieved_memories=5)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    first = attn(x, knn_memory=memory)
    assert memory.count.tolist() == [5, 5] and not memory.buffer.requires_grad
    k, v = attn.to_kv(x).split(4, dim=-1)
    assert_close(memory.buffer[:, :5, 0], F.normalize(k, dim=-1).detach())
    assert_close(memory.buffer[:, :5, 1], v.detach())
    # the first call saw an empty memory: local attention only
    memory_free = KNNAttention(12, heads=2, dim_head=4, num_retrieved_memories=5, dtype=torch.float64)
    memory_free.load_state_dict(attn.state_dict())
    with torch.no_grad():
        memory_free.gate.fill_(-1e4)  # g = 0
    assert_close(first, memory_free(x, knn_memory=KNNMemory(4, 10, 2, dtype=torch.float64)))
    second = attn(x, knn_memory=memory)  # now retrieves the first segment's keys
    assert not torch.allclose(first, second)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_retrieved_memories"):
        KNNAttention(8, num_retrieved_memories=0)
    with pytest.raises(ValueError, match="dropout"):
        KNNAttention(8, dropout=1.5)
    with pytest.raises(ValueError, match="attn_scale_init"):
        KNNAttention(8, attn_scale_init=0)
    attn = KNNAttention(8, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="dim_head=4"):
        attn(torch.randn(1, 3, 8), knn_memory=KNNMemory(8, 10, 1))
    with pytest.raises(ValueError, match="batch, seq, dim"):
        attn(torch.randn(3, 8), knn_memory=KNNMemory(4, 10, 1))
    with pytest.raises(ValueError, match="mask"):
        attn(torch.randn(1, 3, 8), knn_memory=KNNMemory(4, 10, 1), mask=torch.ones(1, 4, dtype=torch.bool))
    assert "num_retrieved_memories=32" in repr(attn)


# -- TransformerLM with KNN layers ----------------------------------------------------------------------------

def knn_lm(**kwargs):
    torch.manual_seed(0)
    args = dict(num_tokens=16, dim=16, depth=3, seq_len=8, heads=2, dim_head=8, pkm_layers=(),
                knn_layers=(2,), knn_kwargs=dict(num_retrieved_memories=4))
    args.update(kwargs)
    return TransformerLM(**args)


def test_knn_layers_are_one_based_and_combine_with_pkm():
    model = knn_lm(knn_layers=(1, 3), pkm_layers=(3,), pkm_kwargs=dict(heads=2, num_keys=4, topk=2, dim_head=8))
    assert [type(b.attn).__name__ for b in model.blocks] == ["KNNAttention", "CausalSelfAttention", "KNNAttention"]
    assert isinstance(model.blocks[2].ff, PKM) and model.knn_layers == (1, 3)
    assert model.blocks[0].attn.heads == 2 and model.blocks[0].attn.num_retrieved_memories == 4
    memories = model.create_knn_memories(2, max_memories=32)
    assert isinstance(memories, KNNMemoryList) and [m.dim for m in memories] == [8, 8]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 16, (2, 4, 9))
    for segment in tokens.unbind(1):  # a document of 4 segments
        loss = model.loss(segment, memories)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [m.count.tolist() for m in memories] == [[32, 32], [32, 32]]
    assert model.blocks[0].attn.gate.grad is not None and model.blocks[2].ff.values.weight.grad is not None
    assert "knn_layers=(1, 3)" in repr(model)


@pytest.mark.parametrize("knn_layers", [0, 4, (True,), 2.0])
def test_bad_knn_layers_name_the_argument(knn_layers):
    with pytest.raises(ValueError, match="knn_layers"):
        knn_lm(knn_layers=knn_layers)


def test_forward_without_memories_says_how_to_make_them():
    model = knn_lm()
    tokens = torch.randint(0, 16, (2, 8))
    with pytest.raises(ValueError, match="create_knn_memories"):
        model(tokens)
    with pytest.raises(ValueError, match="batch size 2"):
        model(tokens, model.create_knn_memories(3))
    with pytest.raises(TypeError, match="knn_kwargs"):
        knn_lm(knn_kwargs=[1])
    with pytest.raises(ValueError, match="clear_memories_on_sos_token_id"):
        knn_lm(clear_memories_on_sos_token_id=16)
    with pytest.raises(ValueError, match="no knn_layers"):
        knn_lm(knn_layers=())(tokens, [KNNMemory(8, 4, 2)])


def test_knn_model_is_causal_within_a_segment():
    model = knn_lm()
    memories = model.create_knn_memories(2, max_memories=64)
    model(torch.randint(0, 16, (2, 8)), memories)
    tokens = torch.randint(0, 16, (2, 8))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 16
    a = model(tokens, memories, add_knn_memory=False)
    b = model(changed, memories, add_knn_memory=False)
    assert_close(a[:, :5], b[:, :5])


def test_sos_token_clears_its_rows_and_stores_only_the_new_document():
    model = knn_lm(clear_memories_on_sos_token_id=1)
    memories = model.create_knn_memories(2, max_memories=64)
    model(torch.randint(2, 16, (2, 8)), memories)
    model(torch.randint(2, 16, (2, 8)), memories)
    segment = torch.randint(2, 16, (2, 8))
    segment[1, 5] = 1  # a document starts in row 1 at position 5
    model(segment, memories)
    assert memories[0].count.tolist() == [24, 3], "row 1: cleared, then positions 5, 6, 7 written"


def test_generate_with_memories_reads_them_and_stores_tokens_leaving_the_context():
    model = knn_lm()
    memories = model.create_knn_memories(2, max_memories=64)
    model(torch.randint(0, 16, (2, 8)), memories)
    assert memories[0].count.tolist() == [8, 8]
    prompt = torch.randint(0, 16, (2, 5))
    sample = model.generate(prompt, 10, temperature=0.0, knn_memories=memories)
    # 15 tokens with a context of 8: the first 7 slid out and were stored
    assert sample.shape == (2, 10) and memories[0].count.tolist() == [15, 15]
    with pytest.raises(ValueError, match="create_knn_memories"):
        model.generate(prompt, 2)


def test_generate_with_memories_matches_segment_by_segment_greedy_loop():
    model = knn_lm(knn_layers=(1,), depth=2).eval()
    a_mem, b_mem = model.create_knn_memories(1, max_memories=64), model.create_knn_memories(1, max_memories=64)
    prompt = torch.randint(0, 16, (1, 3))
    sample = model.generate(prompt, 12, temperature=0.0, knn_memories=a_mem)
    out = prompt
    with torch.no_grad():
        for _ in range(12):
            context = out[:, -8:]
            logits = model(context, b_mem, add_knn_memory=False)[:, -1]
            if out.shape[1] >= 8:  # store the token about to leave, as it was computed in this context
                with torch.no_grad():
                    block = model.blocks[0]
                    x = model.token_emb(context) + model.pos_emb(torch.arange(8))
                    k, v = block.attn.to_kv(block.attn_norm(x)).chunk(2, dim=-1)
                    b_mem[0].add(torch.stack((F.normalize(k, dim=-1), v), dim=-2)[:, :1])
            out = torch.cat((out, logits.argmax(-1, keepdim=True)), -1)
    assert torch.equal(sample, out[:, 3:])
    assert torch.equal(a_mem[0].buffer, b_mem[0].buffer)


def test_scale_is_learned_per_head_from_attn_scale_init():
    attn = KNNAttention(8, heads=3, dim_head=4, attn_scale_init=10)
    assert_close(attn.log_scale, torch.full((3,), math.log(10)))


@pytest.mark.cuda
def test_knn_model_on_cuda_equals_cpu_and_syncs_no_host():
    """A document of three segments with a start token, memories on the GPU: the same logits and memories."""
    cpu_model = knn_lm(clear_memories_on_sos_token_id=1).eval()
    gpu_model = knn_lm(clear_memories_on_sos_token_id=1).eval().cuda()
    cpu_mem = cpu_model.create_knn_memories(2, max_memories=64)
    gpu_mem = gpu_model.create_knn_memories(2, max_memories=64)
    assert gpu_mem[0].device.type == "cuda"
    segments = torch.randint(2, 16, (3, 2, 8))
    segments[2, 1, 4] = 1
    with torch.no_grad():
        for segment in segments:
            want = cpu_model(segment, cpu_mem)
            tokens = segment.cuda()
            torch.cuda.set_sync_debug_mode("error")  # a host sync in the forward or the memory would raise
            try:
                got = gpu_model(tokens, gpu_mem)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(gpu_mem[0].count.cpu(), cpu_mem[0].count)
    assert_close(gpu_mem[0].buffer.cpu(), cpu_mem[0].buffer, atol=1e-5, rtol=1e-5)


def test_read_only_call_with_sos_token_changes_no_memory():
    model = knn_lm(clear_memories_on_sos_token_id=1)
    memories = model.create_knn_memories(2, max_memories=64)
    model(torch.randint(2, 16, (2, 8)), memories)
    before = [m.state_dict() for m in memories]
    segment = torch.randint(2, 16, (2, 8))
    segment[1, 5] = 1
    model(segment, memories, add_knn_memory=False)
    for memory, state in zip(memories, before):
        assert memory.count.tolist() == state["count"].tolist() == [8, 8], "a read-only call clears nothing"
        assert torch.equal(memory.buffer, state["buffer"]) and torch.equal(memory.write_pos, state["write_pos"])


def test_memmap_memories_get_one_file_per_layer_and_match_in_memory(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(32, 16, 3, 8, knn_layers=(1, 3), pkm_layers=(), heads=2, dim_head=8)
    in_memory = model.create_knn_memories(2, max_memories=64)
    mapped = model.create_knn_memories(2, max_memories=64, memmap_filename=str(tmp_path / "knn.memmap"))
    for _ in range(3):
        tokens = torch.randint(0, 32, (2, 8))
        assert_close(model(tokens, mapped), model(tokens, in_memory))
    for a, b in zip(mapped, in_memory):
        assert torch.equal(a.buffer, b.buffer), "each layer's memories its own"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn.memmap.layer1", "knn.memmap.layer3"]


def test_generate_reads_a_prompt_longer_than_the_context_into_the_memories():
    model = knn_lm(knn_layers=(1,), depth=2).eval()
    a_mem, b_mem = model.create_knn_memories(1, max_memories=64), model.create_knn_memories(1, max_memories=64)
    prompt = torch.randint(0, 16, (1, 20))  # seq_len 8: 12 tokens never fit in the first context
    sample = model.generate(prompt, 4, temperature=0.0, knn_memories=a_mem)
    out = prompt
    with torch.no_grad():
        model(prompt[:, :8], b_mem)  # read as a document, segment by segment
        model(prompt[:, 8:12], b_mem)
        for _ in range(4):
            context = out[:, -8:]
            logits = model(context, b_mem, add_knn_memory=False)[:, -1]
            block = model.blocks[0]
            x = model.token_emb(context) + model.pos_emb(torch.arange(8))
            k, v = block.attn.to_kv(block.attn_norm(x)).chunk(2, dim=-1)
            b_mem[0].add(torch.stack((F.normalize(k, dim=-1), v), dim=-2)[:, :1])  # the token leaving
            out = torch.cat((out, logits.argmax(-1, keepdim=True)), -1)
    assert a_mem[0].count.tolist() == [16], "the 12 tokens before the context, then one per step"
    assert torch.equal(sample, out[:, 20:])
    assert torch.equal(a_mem[0].buffer, b_mem[0].buffer)
