"""Every ```python block of every page of the docs site (docs/**/*.md) runs as pasted, as the README's blocks
do (tests/test_readme.py): alone, in a fresh interpreter, in an empty folder."""

import os
import subprocess
import sys

import pytest

from .test_readme import ROOT, TIMEOUT_S, block_id, python_blocks

PAGES = sorted((ROOT / "docs").rglob("*.md"))
BLOCKS = [(page, block) for page in PAGES for block in python_blocks(page.read_text(encoding="utf-8"))]


def page_name(page):
    return page.relative_to(ROOT / "docs").with_suffix("").as_posix().replace("/", ".")


def test_topic_pages_have_python_blocks():
    with_blocks = {page.name for page, _ in BLOCKS}
    for name in ("peer.md", "layer.md", "parts.md", "memory_plus.md", "knn.md", "training.md", "inference.md",
                 "compile_export.md", "huggingface.md", "paper.md", "scale_out.md"):
        assert name in with_blocks, f"docs/{name} has no ```python block"


@pytest.mark.parametrize("page, block", [pytest.param(p, b, id=f"{page_name(p)}-{block_id(b)}") for p, b in BLOCKS])
def test_docs_block_runs(page, block, tmp_path):
    script = tmp_path / f"{page.stem}_L{block.line}.py"
    script.write_text(block.code + "\n", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a block is run as a reader pastes it, not under a launcher
    try:
        run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"docs/{page.relative_to(ROOT / 'docs')} line {block.line}: still running after {TIMEOUT_S} s")
    if run.returncode != 0:
        pytest.fail(f"docs/{page.relative_to(ROOT / 'docs')} line {block.line} ({block.heading}) exited "
                    f"{run.returncode}:\n{run.stderr[-3000:]}", pytrace=False)
