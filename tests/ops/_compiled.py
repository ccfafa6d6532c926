"""Every op's Triton kernel variants built once per test session for sm_90 and sm_80 (in one child
process, ``product_key_memory.ops._compile``), shared by the tests that read the records."""

from __future__ import annotations

import functools
from typing import List

import pytest
from .._extras import importorskip

from product_key_memory.ops import _compile

CCS = (90, 80)


@functools.lru_cache(maxsize=None)
def _build_all() -> dict:
    return _compile.build_in_child(ccs=CCS, timeout=600)


def records(op: str) -> List[dict]:
    """``op``'s build records; skips the calling test where Triton cannot build for CUDA here."""
    importorskip("triton")
    result = _build_all()
    if "unavailable" in result:
        pytest.skip(f"Triton cannot build kernels for CUDA here: {result['unavailable']}")
    return [r for r in result["records"] if r["op"] == op]
