"""The README's torchrun command for examples/train_sharded.py runs on CPU with gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
DONE = ("step    2", "rank 0: columns [0:32)", "rank 1: columns [32:64)")


def _run():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "train_sharded.py"), "--steps", "3"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes():
    run = _run()
    if run.returncode != 0 and all(s in run.stdout for s in DONE) and "SIGABRT" in run.stderr:
        # A worker that finished all its work has been seen to abort at interpreter exit
        # ("terminate called without an active exception"): about 1 run in 13 while the value
        # backward used MKL's CSR addmm, 0 in 46 torchrun runs since that route was removed,
        # yet one full-suite run failed here afterwards with its cause not captured. Only
        # that exact signature (all work printed, then SIGABRT) gets one retry.
        run = _run()
    assert run.returncode == 0, run.stdout + run.stderr
    for line in DONE:
        assert line in run.stdout, run.stdout
