"""What ran: the ``pkm`` ops a call dispatched, and the graphs ``torch.compile`` / ``torch.export`` built."""

from __future__ import annotations

from typing import List

from torch.utils._python_dispatch import TorchDispatchMode


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched_pkm_ops(fn, *args, **kwargs):
    """``(result, names)``: ``fn``'s result and every ``pkm::`` op it sent through the dispatcher."""
    with _Recorder() as rec:
        result = fn(*args, **kwargs)
    return result, [op for op in rec.ops if op.startswith("pkm.")]


class GraphCapture:
    """A ``torch.compile`` backend that keeps each graph and runs it as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def call_targets(gm) -> set:
    """The names of every function a graph module calls (``pkm.search.default``, ``aten.topk.default``...)."""
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


def pkm_targets(gm) -> set:
    return {t for t in call_targets(gm) if t.startswith("pkm.")}
