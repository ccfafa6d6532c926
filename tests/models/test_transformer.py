import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from product_key_memory import PKM, TransformerLM, lm_loss
from product_key_memory.models.transformer import CausalSelfAttention, FeedForward

PKM_KWARGS = dict(heads=2, num_keys=8, topk=4, dim_head=8)


def small_lm(**kwargs):
    torch.manual_seed(0)
    args = dict(num_tokens=32, dim=16, depth=3, seq_len=12, heads=2, dim_head=8, pkm_layers=(2,), pkm_kwargs=PKM_KWARGS)
    args.update(kwargs)
    return TransformerLM(**args)


def kinds(model):
    return ["pkm" if isinstance(b.ff, PKM) else "ff" for b in model.blocks]


@pytest.mark.parametrize(
    "pkm_layers, expected",
    [((1, 3), ["pkm", "ff", "pkm"]), (2, ["ff", "pkm", "ff"]), ([3], ["ff", "ff", "pkm"]), ((), ["ff"] * 3),
     (None, ["ff", "pkm", "ff"])],
)
def test_pkm_layers_are_one_based_block_numbers(pkm_layers, expected):
    model = small_lm(pkm_layers=pkm_layers)
    assert kinds(model) == expected
    assert model.pkm_layers == tuple(i + 1 for i, k in enumerate(expected) if k == "pkm")


@pytest.mark.parametrize("pkm_layers", [0, 4, (1, 5), (True,), 1.0])
def test_bad_pkm_layers_name_the_argument(pkm_layers):
    with pytest.raises(ValueError, match="pkm_layers"):
        small_lm(pkm_layers=pkm_layers)


def test_bad_sizes_and_pkm_kwargs():
    with pytest.raises(ValueError, match="dim"):
        small_lm(dim=0)
    with pytest.raises(TypeError, match="pkm_kwargs"):
        small_lm(pkm_kwargs=[("heads", 2)])
    with pytest.raises(TypeError):
        small_lm(pkm_kwargs=dict(not_an_option=1))
    with pytest.raises(ValueError, match="seq_len"):
        small_lm()(torch.zeros(1, 13, dtype=torch.long))


def test_pkm_kwargs_reach_every_pkm():
    model = small_lm(pkm_layers=(1, 2), pkm_kwargs=dict(PKM_KWARGS, topk=3, norm_output=True))
    pkms = [b.ff for b in model.blocks if isinstance(b.ff, PKM)]
    assert len(pkms) == 2 and all(p.topk == 3 and isinstance(p.output_norm, torch.nn.LayerNorm) for p in pkms)


def test_attention_matches_masked_softmax_reference():
    torch.manual_seed(0)
    attn = CausalSelfAttention(dim=16, heads=2, dim_head=8)
    x = torch.randn(3, 7, 16, requires_grad=True)
    q, k, v = attn.to_qkv(x).view(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
    sim = q @ k.transpose(-1, -2) / math.sqrt(8)
    sim = sim.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.to_out((sim.softmax(-1) @ v).transpose(1, 2).reshape(3, 7, 16))
    out = attn(x)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, msg="attention output")
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expected, x, g)[0], atol=1e-5, rtol=1e-5,
                 msg="attention input gradient")


@pytest.mark.parametrize("pkm_kwargs", [PKM_KWARGS, dict(PKM_KWARGS, concat_values_and_combine=True)])
def test_model_is_causal(pkm_kwargs):
    model = small_lm(pkm_kwargs=pkm_kwargs).train()  # LayerNorm queries: causal in training mode too
    tokens = torch.randint(0, 32, (2, 12))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 32
    assert_close(model(tokens)[:, :6], model(changed)[:, :6], msg="logits before position 6 changed")


def test_forward_takes_any_leading_dims():
    model = small_lm().eval()
    tokens = torch.randint(0, 32, (2, 3, 10))
    assert_close(model(tokens), model(tokens.view(6, 10)).view(2, 3, 10, 32))
    assert_close(model(tokens[0, 0]), model(tokens[:1, 0])[0], atol=1e-6, rtol=1e-5)


def test_loss_is_mean_next_token_cross_entropy():
    model = small_lm()
    tokens = torch.randint(0, 32, (3, 11))
    logits = model(tokens[:, :-1])
    expected = -logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).mean()
    assert_close(model.loss(tokens), expected)
    assert_close(lm_loss(logits, tokens[:, 1:]), F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]))
    targets = tokens[:, 1:].clone()
    targets[0] = -100
    assert_close(lm_loss(logits, targets), F.cross_entropy(logits[1:].transpose(1, 2), tokens[1:, 1:]))


def greedy_reference(model, prompt, n):
    out = prompt
    for _ in range(n):
        out = torch.cat((out, model(out[:, -model.seq_len:])[:, -1].argmax(-1, keepdim=True)), dim=-1)
    return out[:, prompt.shape[1]:]


def test_generate_greedy_and_top1_match_reference_loop_past_seq_len():
    model = small_lm().train()
    prompt = torch.randint(0, 32, (2, 5))
    greedy = model.generate(prompt, 15, temperature=0.0)  # 20 tokens > seq_len: the context slides
    assert model.training, "generate must give the model its training mode back"
    model.eval()
    expected = greedy_reference(model, prompt, 15)
    assert greedy.shape == (2, 15) and torch.equal(greedy, expected)
    assert torch.equal(model.generate(prompt, 15, top_k=1), expected)


def test_generate_samples_are_reproducible_with_a_generator():
    model = small_lm()
    prompt = torch.randint(0, 32, (3, 4))
    a = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.long and ((a >= 0) & (a < 32)).all()
    with pytest.raises(ValueError, match="prompt"):
        model.generate(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)


def test_a_few_training_steps_fit_a_batch():
    model = small_lm()
    tokens = torch.randint(0, 32, (4, 13))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(tokens).item()
    for _ in range(10):
        opt.zero_grad()
        model.loss(tokens).backward()
        opt.step()
    assert model.loss(tokens).item() < 0.8 * first
    pkm = model.blocks[1].ff
    assert pkm.values.weight.grad is not None and pkm.keys.grad.abs().sum() > 0


def test_dense_feedforward_shape():
    ff = FeedForward(16, 40)
    assert ff(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    assert sum(p.numel() for p in ff.parameters()) == 16 * 40 + 40 + 40 * 16 + 16


def test_generate_gives_the_training_mode_back_when_it_raises():
    model = small_lm().train()
    with pytest.raises(IndexError):
        model.generate(torch.full((1, 3), 99), 2)  # token ids beyond num_tokens: the embedding raises
    assert model.training, "generate must restore the mode on an error too"


def tied_lm():
    """Every next-token logit is 16 for tokens 3, 5 and 7 (a three-way tie) and 0 for the others."""
    model = small_lm()
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)
        model.to_logits.weight.zero_()
        model.to_logits.weight[[3, 5, 7]] = 1.0
    return model


@pytest.mark.parametrize("top_k, allowed", [(1, {3}), (2, {3, 5}), (3, {3, 5, 7})])
def test_top_k_keeps_exactly_k_tokens_and_ties_go_to_lower_ids(top_k, allowed):
    model = tied_lm()
    sample = model.generate(torch.zeros(64, 1, dtype=torch.long), 1, top_k=top_k,
                            generator=torch.Generator().manual_seed(0))
    assert set(sample.flatten().tolist()) == allowed


@pytest.mark.parametrize(
    "kwargs, error, match",
    [(dict(top_k=0), ValueError, "top_k must be None .* got 0"), (dict(top_k=-1), ValueError, "top_k.*-1"),
     (dict(top_k=2.0), TypeError, "top_k"), (dict(top_k=True), TypeError, "top_k"),
     (dict(temperature=float("nan")), ValueError, "temperature.*nan"),
     (dict(temperature=float("inf")), ValueError, "temperature.*finite"),
     (dict(temperature="1"), TypeError, "temperature")],
)
def test_bad_sampling_arguments_name_the_argument(kwargs, error, match):
    model = small_lm()
    with pytest.raises(error, match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, **kwargs)
    with pytest.raises(ValueError, match="num_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)


def test_top_k_none_and_at_least_vocab_sample_from_every_token():
    model = tied_lm()
    with torch.no_grad():
        model.to_logits.weight.zero_()  # every logit 0: uniform
    for top_k in (None, 32, 100):
        sample = model.generate(torch.zeros(400, 1, dtype=torch.long), 1, top_k=top_k,
                                generator=torch.Generator().manual_seed(0))
        assert len(set(sample.flatten().tolist())) > 28


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_replays_a_cuda_graph_with_the_eager_result():
    torch.manual_seed(0)
    model = TransformerLM(32, dim=32, depth=2, seq_len=8, heads=2, dim_head=16, pkm_layers=(2,),
                          pkm_kwargs=dict(heads=2, num_keys=8, topk=4, dim_head=8)).cuda()
    prompt = torch.randint(0, 32, (2, 5), device="cuda")
    graphed = model.generate(prompt, 12, temperature=0, cuda_graph=True)
    eager = model.generate(prompt, 12, temperature=0, cuda_graph=False)
    assert torch.equal(graphed, eager)


def test_generate_on_cpu_ignores_cuda_graph():
    torch.manual_seed(0)
    model = TransformerLM(32, dim=32, depth=2, seq_len=8, heads=2, dim_head=16, pkm_layers=(2,),
                          pkm_kwargs=dict(heads=2, num_keys=8, topk=4, dim_head=8))
    prompt = torch.randint(0, 32, (2, 5))
    assert torch.equal(model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0, cuda_graph=False))


def test_memory_kinds_per_block_train_with_the_recommended_optimizer():
    from product_key_memory import MemoryPlus, PEER, build_optimizer, fetch_pkm_value_parameters

    torch.manual_seed(0)
    small = dict(num_keys=8, topk=4, dim_head=8)
    model = TransformerLM(64, dim=32, depth=4, seq_len=16, heads=2, dim_head=16, pkm_layers=(2, 3, 4),
                          memory={3: "peer", 4: "memory_plus"}, pkm_kwargs=dict(heads=2),
                          memory_kwargs={"pkm": small, "memory_plus": small,
                                         "peer": dict(num_experts=256, num_experts_per_head=4)})
    kinds = [type(b.ff).__name__ for b in model.blocks]
    assert kinds == ["FeedForward", "PKM", "PEER", "MemoryPlus"]
    assert "memory={2: 'pkm', 3: 'peer', 4: 'memory_plus'}" in repr(model)
    values, _ = fetch_pkm_value_parameters(model)
    experts = model.blocks[2].ff.experts
    assert {id(p) for p in experts.value_parameters()} <= {id(p) for p in values}
    opt = build_optimizer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.loss(torch.randint(0, 64, (2, 17))).backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    for block in ("blocks.1.ff.", "blocks.2.ff.", "blocks.3.ff."):
        assert any(n.startswith(block) for n in moved), block
    every = TransformerLM(64, dim=32, depth=2, seq_len=16, heads=2, dim_head=16, pkm_layers=2, memory="peer",
                          pkm_kwargs=dict(heads=2, num_experts=64, num_experts_per_head=2))
    assert isinstance(every.blocks[1].ff, PEER) and not isinstance(every.blocks[0].ff, MemoryPlus)


def test_ultramem_blocks_train_with_their_aux_loss():
    from product_key_memory import UltraMem, build_optimizer
    from product_key_memory.layers.ultramem import ultramem_aux_loss

    torch.manual_seed(0)
    model = TransformerLM(64, dim=32, depth=3, seq_len=16, heads=2, dim_head=16, pkm_layers=(2, 3),
                          memory={3: "ultramem"}, pkm_kwargs=dict(heads=2),
                          memory_kwargs={"pkm": dict(num_keys=8, topk=4, dim_head=8),
                                         "ultramem": dict(num_keys=8, topk=4, rank=2, cores=2)})
    assert [type(b.ff).__name__ for b in model.blocks] == ["FeedForward", "PKM", "UltraMem"]
    layer = model.blocks[2].ff
    assert isinstance(layer, UltraMem) and layer.heads == 2
    opt = build_optimizer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (model.loss(torch.randint(0, 64, (2, 17))) + 1e-3 * ultramem_aux_loss(model)).backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name in ("blocks.2.ff.values.store.weight", "blocks.2.ff.values.proj.weight", "blocks.2.ff.keys.core"):
        assert name in moved, name


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(memory="ultra"), ValueError, "memory of block 2 must be one of"),
    (dict(memory={1: "peer"}), ValueError, r"memory names blocks \[1\] that are not memory blocks"),
    (dict(memory=3), TypeError, "memory must be a memory kind or a dict"),
    (dict(memory_kwargs={"nope": {}}), ValueError, "memory_kwargs must map memory kinds"),
])
def test_memory_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        TransformerLM(64, dim=32, depth=2, seq_len=16, pkm_layers=2, **kwargs)
