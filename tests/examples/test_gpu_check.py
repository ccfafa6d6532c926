"""benchmarks/gpu_check.sh --dry-run runs every step of the GPU check end to end on CPU (the CUDA tests
skip, bench_gpu.py runs --smoke) and leaves the files a GPU run leaves."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {"env.txt", "steps.txt", "pytest_cuda.log", "bench_readme.log", "bench_keys1024.log", "bench_gpu.json"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_runs_every_step_and_writes_logs_and_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # bench_gpu --smoke sets its own
    env.update(PYTHON=sys.executable, PKM_PEER_WHEEL="")
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", "--budget", "400"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert FILES <= {p.name for p in out.iterdir()}, sorted(p.name for p in out.iterdir())
    assert len(list(out.iterdir())) <= 8, "the device tool returns at most 8 files"

    steps = {line.rsplit(" ", 2)[0]: line.rsplit(" ", 2)[1] for line in (out / "steps.txt").read_text().splitlines()[1:]}
    for name in ("environment", "pytest -m cuda", "bench_gpu readme", "bench_gpu keys1024", "total"):
        assert steps.get(name) == "0", f"{name}: {steps}"
    assert "torch " in (out / "env.txt").read_text()
    assert " passed" in (out / "pytest_cuda.log").read_text() or " skipped" in (out / "pytest_cuda.log").read_text()

    results = json.loads((out / "bench_gpu.json").read_text())
    assert results["smoke"] and not results["missing"]
    assert [r["complete"] for r in results["runs"]] == [True, True]
    rows = results["rows"]
    assert {r["config"] for r in rows} == {"readme", "keys1024"}
    reads = {(r["config"], r["precision"], r["distribution"]) for r in rows if r["phase"] == "read fwd" and "median_ms" in r}
    assert reads == {(c, p, d) for c in ("readme", "keys1024") for p in ("float32", "bfloat16")
                     for d in ("uniform", "zipf", "hot")}
    assert {r["phase"] for r in rows} >= {"forward", "fwd+bwd", "step", "decode", "read fwd", "read bwd"}
    assert not [r for r in rows if "error" in r and r["lib"] != "0.3.0"], [r for r in rows if "error" in r]


def test_bad_arguments_are_refused(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--budget", "soon"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "--budget" in res.stderr
