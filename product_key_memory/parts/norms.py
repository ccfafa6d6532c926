"""Query normalisations that take the padding mask of the tokens they see."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["QueryLayerNorm", "MaskedBatchNorm"]


class QueryLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim; the mask is accepted and not needed (per-token)."""

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return super().forward(x)


class MaskedBatchNorm(nn.Module):
    """Batch norm over the last dim of ``(tokens, ..., features)`` that skips padded tokens.

    Statistics are taken per feature over every token and every inner position
    (e.g. heads and query halves); tokens where ``mask`` is ``False`` are left out
    of the batch statistics and of the running averages. Without a mask this is
    exactly ``nn.BatchNorm1d`` applied to ``x.reshape(-1, features)``.

    Parameters and buffers live in the child ``fn`` (an ``nn.BatchNorm1d``), so the
    state dict matches product-key-memory 0.3.0 (``norm.fn.running_mean`` ...).

    Args:
        num_features: size of the last dim.
        eps, momentum: as ``nn.BatchNorm1d``.

    Shape:
        - x: ``(N, ..., num_features)``; mask: ``(N,)`` bool or ``None``.
        - output: same shape as ``x``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, *, device=None, dtype=None):
        super().__init__()
        self.fn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Running statistics and the affine parameters as ``nn.BatchNorm1d`` starts them."""
        self.fn.reset_parameters()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        bn = self.fn
        c = x.shape[-1]
        flat = x.reshape(-1, c)
        use_batch_stats = self.training or bn.running_mean is None
        if flat.shape[0] == 0:
            return x
        if mask is None or not use_batch_stats:
            return bn(flat).view_as(x)
        return self._masked_train(x, mask).view_as(x)

    def _masked_train(self, x: Tensor, mask: Tensor) -> Tensor:
        bn = self.fn
        c = x.shape[-1]
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        keep = mask.view(mask.shape[0], *([1] * (x.dim() - 1)))
        xs = torch.where(keep, x.to(stat_dtype), 0.0)  # padded values (even NaN) never reach the statistics
        dims = tuple(range(x.dim() - 1))
        count = keep.expand(*x.shape[:-1], 1).sum(dims).to(stat_dtype)  # (1,)
        denom = count.clamp(min=1.0)
        mean = xs.sum(dims) / denom
        centered = torch.where(keep, xs - mean, 0.0)
        var = centered.pow(2).sum(dims) / denom
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                has = count > 0
                unbiased = var * count / (count - 1).clamp(min=1.0)
                bn.running_mean.copy_(torch.where(has, torch.lerp(bn.running_mean, mean.to(bn.running_mean.dtype), momentum), bn.running_mean))
                bn.running_var.copy_(torch.where(has, torch.lerp(bn.running_var, unbiased.to(bn.running_var.dtype), momentum), bn.running_var))
        out = (xs - mean) * torch.rsqrt(var + bn.eps)  # padded rows come out finite, and are the caller's to drop
        if bn.affine:
            out = out * bn.weight + bn.bias
        return out.reshape(-1, c).to(x.dtype)
