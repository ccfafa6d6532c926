"""The two mask polarities: ``input_mask`` (True = real token) and ``padding_mask`` (True = padding,
PyTorch's), and a PKM inside ``nn.TransformerEncoderLayer``, whose fused eval path skips ``_ff_block``."""

import pytest
import torch
from torch import nn

from product_key_memory import PKM, MemoryPlus

SMALL = dict(heads=2, num_keys=8, topk=4, dim_head=8)


@pytest.mark.parametrize("layer", ["pkm", "memory_plus"])
def test_padding_mask_is_the_complement_of_input_mask(layer):
    torch.manual_seed(0)
    pkm = PKM(32, **SMALL)
    module = pkm if layer == "pkm" else MemoryPlus(32, memory=pkm)
    x = torch.randn(3, 5, 32)
    pad = torch.rand(3, 5) > 0.6
    by_padding = module(x, padding_mask=pad)
    torch.testing.assert_close(by_padding, module(x, input_mask=~pad), rtol=0, atol=0)
    assert not by_padding[pad].any() and by_padding[~pad].abs().sum() > 0
    with pytest.raises(ValueError, match="input_mask .* or padding_mask .* not both"):
        module(x, input_mask=~pad, padding_mask=pad)
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor, got torch.float32"):
        module(x, padding_mask=pad.float())
    with pytest.raises(ValueError, match="input_mask must have shape"):
        module(x, padding_mask=pad[:, :4])


class NaiveEncoderLayer(nn.TransformerEncoderLayer):
    """What a first try looks like: only ``_ff_block`` replaced (the fused eval path never calls it)."""

    def __init__(self, d_model, nhead, pkm):
        super().__init__(d_model, nhead, batch_first=True, dropout=0.0)
        self.pkm = pkm

    def _ff_block(self, x):
        return self.dropout2(self.pkm(x))


class PKMEncoderLayer(nn.TransformerEncoderLayer):
    """The README's recipe (section "Inside nn.TransformerEncoderLayer")."""

    def __init__(self, d_model, nhead, pkm):
        super().__init__(d_model, nhead, batch_first=True, dropout=0.0)
        del self.linear1, self.linear2
        self.activation_relu_or_gelu = False
        self.pkm = pkm

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        self._padding = src_key_padding_mask
        return super().forward(src, src_mask, src_key_padding_mask, is_causal)

    def _ff_block(self, x):
        return self.dropout2(self.pkm(x, padding_mask=self._padding))


def train_and_eval(layer, x, pad):
    train = layer.train()(x, src_key_padding_mask=pad)
    with torch.no_grad():
        return train.detach(), layer.eval()(x, src_key_padding_mask=pad)


def test_in_torch_encoder_layer_eval_equals_training_without_dropout():
    torch.manual_seed(0)
    x, pad = torch.randn(2, 10, 64), torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    naive_train, naive_eval = train_and_eval(NaiveEncoderLayer(64, 4, PKM(64, **SMALL)), x, pad)
    assert not torch.allclose(naive_eval[~pad], naive_train[~pad], atol=1e-3)  # the trap: linear1/linear2 ran
    train, eval_ = train_and_eval(PKMEncoderLayer(64, 4, PKM(64, **SMALL)), x, pad)
    torch.testing.assert_close(eval_[~pad], train[~pad], rtol=1e-5, atol=1e-5)
