"""Replay a module's fixed-shape forward as a CUDA graph (for decoding steps).

A decoding step of a small model is dominated by kernel-launch overhead; a CUDA graph
launches the whole forward at once. :class:`GraphedForward` captures
``module(*example_args)`` once and replays it on new inputs of the same shapes, dtypes
and devices. Pure PyTorch; needs a CUDA device.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

__all__ = ["GraphedForward"]


class GraphedForward:
    """``module(*args)`` captured as a CUDA graph and replayed with new inputs.

    Args:
        module: the module (or any callable) to capture. Its parameters and buffers are read
            in place at every replay, so weight updates are seen; a change of shape is not.
        example_args: the tensor arguments of one call, on a CUDA device; every later call
            must pass tensors of exactly these shapes, dtypes and devices.
        warmup: eager calls on a side stream before capture (lazy initialisation, cuBLAS
            workspaces, autotuning must happen outside the graph).
        no_grad: capture (and replay) without autograd, as a decoding step runs.
        pool: a memory pool handle (``torch.cuda.graph_pool_handle()``) to share between graphs.

    Aliasing: the returned output lives in static buffers owned by the graph and is
    **overwritten by the next call**; ``.clone()`` it to keep it. The inputs are copied
    into static buffers, so the caller's tensors may be reused freely.

    Example::

        >>> step = GraphedForward(model, torch.zeros(1, 1, dtype=torch.long, device="cuda"))
        >>> logits = step(tokens[:, -1:]).clone()
    """

    def __init__(
        self,
        module: Callable[..., Any],
        *example_args: Tensor,
        warmup: int = 3,
        no_grad: bool = True,
        pool: Optional[Any] = None,
    ):
        if not example_args:
            raise ValueError("GraphedForward needs at least one example tensor argument")
        for i, a in enumerate(example_args):
            if not isinstance(a, Tensor):
                raise TypeError(f"example_args[{i}] must be a tensor, got {type(a).__name__}")
            if a.device.type != "cuda":
                raise RuntimeError(
                    f"GraphedForward captures CUDA graphs: example_args[{i}] is on {a.device}; "
                    "move the module and inputs to a CUDA device, or call the module directly on CPU"
                )
        if isinstance(module, nn.Module):
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                if t.device.type != "cuda":
                    raise RuntimeError(f"GraphedForward: module tensor {name!r} is on {t.device}, not on a CUDA device")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (lazy initialisation cannot happen inside a capture), got {warmup}")
        self.module = module
        self.no_grad = no_grad
        self.static_inputs = tuple(a.detach().clone() for a in example_args)
        self.graph = torch.cuda.CUDAGraph()

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.set_grad_enabled(not no_grad):
            for _ in range(warmup):
                module(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.set_grad_enabled(not no_grad), torch.cuda.graph(self.graph, pool=pool):
            self.static_output = module(*self.static_inputs)

    def __call__(self, *args: Tensor) -> Any:
        """Copy ``args`` into the static inputs, replay, return the static output (see Aliasing)."""
        self._check(args)
        for dst, src in zip(self.static_inputs, args):
            dst.copy_(src)
        self.graph.replay()
        return self.static_output

    def _check(self, args: Sequence[Tensor]) -> None:
        if len(args) != len(self.static_inputs):
            raise TypeError(f"expected {len(self.static_inputs)} tensor arguments, got {len(args)}")
        for i, (a, s) in enumerate(zip(args, self.static_inputs)):
            if not isinstance(a, Tensor) or a.shape != s.shape or a.dtype != s.dtype or a.device != s.device:
                got = f"{a.dtype} {tuple(a.shape)} on {a.device}" if isinstance(a, Tensor) else type(a).__name__
                raise ValueError(
                    f"argument {i} must match the captured {s.dtype} {tuple(s.shape)} on {s.device}, got {got}; "
                    "capture another GraphedForward for another shape"
                )

    @property
    def outputs(self) -> list:
        """The static output tensors, flattened."""
        return tree_flatten(self.static_output)[0]
