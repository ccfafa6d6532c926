"""The sparse Adam kernel builds for Hopper (sm_90) and Ampere (sm_80) without a GPU, moves float32
rows with 16-byte vector loads and stores when the row width is a multiple of 16 (what Triton
specializes a launch on), and uses no local memory (no register spills)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..._extras import importorskip
importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from product_key_memory.ops.sparse_adam.triton_impl import _sparse_adam_row_kernel as kernel, launch_config
import torch
sig = dict(p_ptr="*fp32", m_ptr="*fp32", v_ptr="*fp32", rows_ptr="*i64", g_ptr="*fp32", c_ptr="*fp64", D="i32",
           lr="fp32", beta1="fp32", beta2="fp32", eps="fp32", weight_decay="fp32", step_size="fp32", bc2_sqrt="fp32")
names = ["HAS_GRAD", "HAS_CATCH_UP", "MAXIMIZE", "HAS_WD", "DECOUPLED", "ALIGNED", "VEC", "BLOCK_D"]
sig.update({n: "constexpr" for n in names})
t = torch.empty(1, 512)
vec, block_d, num_warps = launch_config(t, t, t)
for cc in (90, 80):
    for catch_up in (False, True):
        consts = dict(HAS_GRAD=True, HAS_CATCH_UP=catch_up, MAXIMIZE=False, HAS_WD=True, DECOUPLED=True,
                      ALIGNED=True, VEC=vec, BLOCK_D=block_d)
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}  # pointers and D=512, as a launch sees them
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps)).asm["ptx"]
        print(cc, catch_up, sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))), ".local" in ptx)
"""


def test_kernel_builds_for_sm90_and_sm80_with_16_byte_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0 and ("ptxas" in res.stderr or "GPUTarget" in res.stderr):
        pytest.skip(f"this Triton cannot build for CUDA without a GPU: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4, res.stdout
    for line in lines:
        assert "ld.global.v4.b32" in line and "st.global.v4.b32" in line, f"not 16-byte vectors: {line}"
        assert line.endswith("False"), f"local memory (spills): {line}"
        assert not re.search(r"st\.global\.b32", line), f"scalar stores left: {line}"
