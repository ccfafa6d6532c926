"""Every default value-read kernel variant (:func:`..triton_impl.compile_cases`) builds for Hopper
(sm_90) and Ampere (sm_80) without a GPU, with no local memory in its PTX and, where Triton's
bundled ``ptxas`` can read that PTX, no register spills in the machine code."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ..._extras import importorskip

importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import os, re, subprocess, sys, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from product_key_memory.ops.value_read.triton_impl import compile_cases
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = [os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))]
tmp = tempfile.mkdtemp()
for cc in (90, 80):
    for case in compile_cases():
        if not case.default:
            continue
        sig = {**case.signature, **{k: "constexpr" for k in case.constexprs}}
        attrs = {(i,): [["tt.divisibility", 16]] for i in case.divisible}
        src = ASTSource(fn=case.kernel, signature=sig, constexprs=case.constexprs, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                             options=dict(num_warps=case.num_warps, num_stages=case.num_stages)).asm["ptx"]
        regs = spill = "?"
        for exe in ptxas:
            path = os.path.join(tmp, "k.ptx")
            open(path, "w").write(ptx)
            arch = "sm_90a" if cc == 90 else f"sm_{cc}"
            res = subprocess.run([exe, "-v", f"-arch={arch}", path, "-o", path + ".cubin"], capture_output=True,
                                 text=True)
            if res.returncode == 0:
                regs = re.findall(r"Used (\d+) registers", res.stderr)[0]
                spill = re.findall(r"(\d+) bytes spill stores", res.stderr)[0]
                break
        print(cc, case.name, ".local" in ptx, regs, spill)
"""


def test_default_variants_build_for_sm90_and_sm80_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0 and ("ptxas" in res.stderr or "GPUTarget" in res.stderr):
        pytest.skip(f"this Triton cannot build for CUDA without a GPU: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) >= 2 * 20, res.stdout
    for line in lines:
        cc, name, local, regs, spill = line.split()
        assert local == "False", f"local memory in the PTX of {name} for sm_{cc}"
        assert spill in ("0", "?"), f"{name} spills {spill} bytes on sm_{cc} ({regs} registers)"
