"""Every ```python block of docs/*.md runs as pasted, as the README's blocks do (tests/test_readme.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_readme import ROOT, TIMEOUT_S, block_id, python_blocks

PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [(page, block) for page in PAGES for block in python_blocks(page.read_text(encoding="utf-8"))]


def test_peer_page_has_a_python_block():
    assert any(page.name == "peer.md" for page, _ in BLOCKS), "docs/peer.md has no ```python block"


@pytest.mark.parametrize("page, block", [pytest.param(p, b, id=f"{p.stem}-{block_id(b)}") for p, b in BLOCKS])
def test_docs_block_runs(page, block, tmp_path):
    script = tmp_path / f"{page.stem}_L{block.line}.py"
    script.write_text(block.code + "\n", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{page.name} line {block.line}: still running after {TIMEOUT_S} s")
    if run.returncode != 0:
        pytest.fail(f"{page.name} line {block.line} ({block.heading}) exited {run.returncode}:\n{run.stderr[-3000:]}",
                    pytrace=False)
