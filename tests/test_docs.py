"""Every ```python block of every page of the docs site (docs/**/*.md) runs as pasted, as the README's blocks
do (tests/test_readme.py): alone, in a fresh interpreter, in an empty folder."""

import pytest

from .test_readme import ROOT, block_id, python_blocks, run_block

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
    run_block(block, f"docs/{page.relative_to(ROOT / 'docs').as_posix()}", tmp_path)
