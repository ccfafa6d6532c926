"""The command lines of examples/ and benchmarks/ on a base install: --help, missing extras, missing launcher.

Every script runs in one subprocess (torch is imported once) with the optional packages blocked
(``sys.modules[name] = None`` makes their import fail as if absent) and no launcher variables, in an
empty working directory. A ``SystemExit`` is turned into the status and message the interpreter
would give, so each script is seen as a user sees it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("tqdm", "matplotlib", "faiss", "transformers", "triton")  # extras, not dependencies
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
EXTRA_LINE = 'pip install -e ".[examples]" in a checkout of product-key-memory'

SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for folder in ("examples", "benchmarks")
                 for p in (ROOT / folder).glob("*.py") if "ArgumentParser" in p.read_text())

RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
blocked, runs, out_file = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name in blocked:
    sys.modules[name] = None
results = {}
for key, script, args in runs:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            if isinstance(exit.code, int) or exit.code is None:
                code = exit.code or 0
            else:  # sys.exit("message"): the interpreter prints it to stderr and exits with 1
                print(exit.code, file=sys.stderr)
                code = 1
        except BaseException:  # as the interpreter would report it, without stopping the other scripts
            traceback.print_exc()
            code = 1
    results[key] = dict(code=code, stdout=out.getvalue(), stderr=err.getvalue())
with open(out_file, "w") as f:
    json.dump(results, f)
"""

RUNS = [(f"help:{s}", s, ["--help"]) for s in SCRIPTS] + [
    ("extras:train_lm", "examples/train_lm.py", ["--quick"]),
    ("extras:memory_usage", "examples/memory_usage.py", []),
    ("extras:knn_long_document", "examples/knn_long_document.py", ["--quick"]),
    ("launcher:train_sharded", "examples/train_sharded.py", ["--steps", "3"]),
    ("launcher:sharded_read", "benchmarks/sharded_read.py", []),
    ("run:quickstart", "examples/quickstart.py", ["--steps", "2"]),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{key: dict(code, stdout, stderr)}`` for every entry of RUNS, and the files they left in the cwd."""
    cwd = tmp_path_factory.mktemp("cwd")
    out_file = tmp_path_factory.mktemp("runs") / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), COLUMNS="100")
    runs = [(key, str(ROOT / script), args) for key, script, args in RUNS]
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(OPTIONAL), json.dumps(runs), str(out_file)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and out_file.exists(), proc.stdout + proc.stderr
    return json.loads(out_file.read_text()), sorted(p.name for p in cwd.iterdir())


def options_without_default(help_text: str) -> list:
    """Options of an argparse --help whose entry has no ``(default: ...)``, ``-h`` aside."""
    entries, current = [], None
    for line in help_text.splitlines():
        if re.match(r"  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return [e[0].split()[0].rstrip(",") for e in entries
            if "(default:" not in " ".join(e) and not e[0].lstrip().startswith("-h")]


def test_scripts_found():
    assert "examples/train_lm.py" in SCRIPTS and "benchmarks/bench_pkm.py" in SCRIPTS, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_without_extras_shows_defaults(runs, script):
    r = runs[0][f"help:{script}"]
    assert r["code"] == 0, r["stderr"]
    assert "usage:" in r["stdout"], r["stdout"]
    assert options_without_default(r["stdout"]) == [], r["stdout"]


@pytest.mark.parametrize("name", ["train_lm", "memory_usage", "knn_long_document"])
def test_missing_extra_fails_before_training_with_the_install_line(runs, name):
    r = runs[0][f"extras:{name}"]
    assert r["code"] != 0, r["stdout"]
    assert EXTRA_LINE in r["stderr"], r["stderr"]
    assert len(r["stderr"].strip().splitlines()) == 1, r["stderr"]  # one line: no usage block, no traceback
    assert r["stdout"] == "", r["stdout"]  # nothing started


@pytest.mark.parametrize("name", ["train_sharded", "sharded_read"])
def test_without_torchrun_prints_the_command(runs, name):
    r = runs[0][f"launcher:{name}"]
    assert r["code"] == 2, r["stdout"] + r["stderr"]
    assert "torchrun --" in r["stderr"] and "Traceback" not in r["stderr"], r["stderr"]


def test_quickstart_takes_steps(runs):
    r = runs[0]["run:quickstart"]
    assert r["code"] == 0, r["stderr"]
    assert [line.split()[1] for line in r["stdout"].splitlines()] == ["0", "1"], r["stdout"]


def test_nothing_written_to_the_working_directory(runs):
    assert runs[1] == [], "scripts must write only under --out, and not before training starts"
