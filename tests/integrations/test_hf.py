import os

import pytest
import torch
from torch.testing import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny random configs only: never download
from .._extras import importorskip
transformers = importorskip("transformers")

from product_key_memory import PKM, fetch_optimizer_parameters  # noqa: E402
from product_key_memory.integrations.hf import add_pkm, apply_pkm_from_config, find_blocks, from_pretrained  # noqa: E402

PKM_KWARGS = dict(heads=2, num_keys=8, topk=4, dim_head=16)


def gpt2():
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(params=[gpt2, llama], ids=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    return request.param()


def test_add_pkm_swaps_only_the_chosen_feedforwards(model):
    before = [type(b.mlp) for b in find_blocks(model)]
    add_pkm(model, [0, 2], **PKM_KWARGS)
    after = [type(b.mlp) for b in find_blocks(model)]
    assert after == [PKM, before[1], PKM]
    assert model.config.pkm == {"layers": [0, 2], "mlp_attr": "mlp", "kwargs": PKM_KWARGS}
    assert all(p.dim == model.config.hidden_size for p in model.modules() if isinstance(p, PKM))


def test_forward_loss_and_training_steps(model):
    add_pkm(model, 1, **PKM_KWARGS)
    tokens = torch.randint(0, 64, (4, 16))
    opt = torch.optim.Adam(fetch_optimizer_parameters(model, pkm_learning_rate=1e-2), lr=3e-3)
    pkm = find_blocks(model)[1].mlp
    keys_before = pkm.keys.detach().clone()
    out = model(tokens, labels=tokens)
    first = out.loss.item()
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert_close(out.loss, expected, msg="the model's own loss is unchanged by the swap")
    for _ in range(8):
        opt.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        opt.step()
    assert model(tokens, labels=tokens).loss.item() < first
    assert not torch.equal(pkm.keys, keys_before), "the PKM trains with the model"


def test_save_pretrained_and_reload(model, tmp_path):
    add_pkm(model, [1], **PKM_KWARGS)
    model.eval()
    tokens = torch.randint(0, 64, (2, 12))
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)

    for cls in (type(model), transformers.AutoModelForCausalLM):
        loaded = from_pretrained(cls, tmp_path).eval()
        assert isinstance(loaded, type(model)) and isinstance(find_blocks(loaded)[1].mlp, PKM)
        assert_close(loaded(tokens).logits, expected, msg=f"logits after reload through {cls.__name__}")
        assert loaded.config.pkm == model.config.pkm

    # by hand: a model from the saved config, the PKMs put back, then the state dict
    config = type(model.config).from_pretrained(tmp_path)
    rebuilt = apply_pkm_from_config(type(model)(config)).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert_close(rebuilt(tokens).logits, expected)


def test_from_pretrained_without_pkm_is_plain(tmp_path):
    model = gpt2().eval()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(transformers.GPT2LMHeadModel, tmp_path).eval()
    tokens = torch.randint(0, 64, (1, 8))
    assert not any(isinstance(m, PKM) for m in loaded.modules())
    assert_close(loaded(tokens).logits, model(tokens).logits)


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="layers"):
        add_pkm(model, [3], **PKM_KWARGS)
    with pytest.raises(ValueError, match="mlp_attr"):
        add_pkm(model, [0], mlp_attr="feed_forward", **PKM_KWARGS)
    with pytest.raises(TypeError, match="values"):
        add_pkm(model, [0], values=torch.nn.Embedding(64, 32))
    add_pkm(model, [0], **PKM_KWARGS)
    with pytest.raises(ValueError, match="already"):
        add_pkm(model, [1], **PKM_KWARGS)
    with pytest.raises(TypeError, match="config"):
        find_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "placement", [dict(dtype=torch.float64), dict(device="cpu"), dict(dtype=torch.float16, device="cpu")]
)
def test_add_pkm_refuses_its_own_dtype_and_device(model, placement):
    with pytest.raises(TypeError, match="add_pkm does not take .*(dtype|device)=.*model.to"):
        add_pkm(model, [1], **placement, **PKM_KWARGS)
    assert not getattr(model.config, "pkm", None), "nothing recorded"
    add_pkm(model.to(torch.float64), [1], **PKM_KWARGS)  # the way to get a float64 PKM
    assert find_blocks(model)[1].mlp.keys.dtype == torch.float64


@pytest.mark.parametrize("memory, kwargs, cls_name", [
    ("memory_plus", PKM_KWARGS, "MemoryPlus"),
    ("peer", dict(heads=2, num_experts=256, num_experts_per_head=4), "PEER"),
    ("ultramem", dict(heads=2, num_keys=8, topk=4, rank=2, cores=2), "UltraMem"),
])
def test_other_memory_kinds_save_and_reload(memory, kwargs, cls_name, tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    add_pkm(model, [1], memory=memory, **kwargs)
    assert type(find_blocks(model)[1].mlp).__name__ == cls_name and model.config.pkm["memory"] == memory
    model.eval()
    tokens = torch.randint(0, 64, (2, 12))
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(type(model), tmp_path).eval()
    assert type(find_blocks(loaded)[1].mlp).__name__ == cls_name
    assert_close(loaded(tokens).logits, expected)
    with pytest.raises(ValueError, match="memory must be one of"):
        add_pkm(gpt2(), [1], memory="ultra")
