"""Every number table of the docs is a results file: each quoted block equals the file it names, each named
file exists, no table outside a quoted block holds measured figures, and each benchmark's committed table
equals what its ``--render`` writes from the committed JSON (nothing is re-measured here)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from .test_readme import ROOT

spec = importlib.util.spec_from_file_location("sync_tables", ROOT / "scripts" / "sync_tables.py")
sync_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync_tables)

PAGES = sync_tables.pages(ROOT)
QUOTES = [q for page in PAGES for q in sync_tables.quotes(page)]
# a figure with a unit of measurement or a ratio: "1.53x", "61%", "575 ms", "108 MiB", "3 s"
MEASURED = re.compile(r"\d\s*(?:x|%|ms|us|s|KiB|MiB|GiB|MB|GB|tok/s|steps?/s)(?![\w])")
RENDERED = {  # benchmark -> its committed JSON; --render writes the .md beside it
    "bench_pkm.py": "bench_pkm.json",
    "bench_inference.py": "bench_inference.json",
    "bench_peer.py": "bench_peer.json",
    "bench_knn.py": "bench_knn.json",
    "bench_knn_lm.py": "bench_knn_lm.json",
}


def rel(page):
    return page.relative_to(ROOT).as_posix()


def test_readme_quotes_a_results_table():
    assert any(q.page.name == "README.md" for q in QUOTES), "README.md quotes no results table"


@pytest.mark.parametrize("quote", QUOTES, ids=lambda q: f"{rel(q.page)}:{q.line}:{q.source}")
def test_quoted_table_equals_its_file(quote):
    source = ROOT / quote.source
    assert quote.source.startswith(("benchmarks/results/", "docs/")), f"{quote.source}: not a results folder"
    assert source.is_file(), f"{rel(quote.page)}:{quote.line} quotes {quote.source}, which does not exist"
    assert quote.body == sync_tables.expected(quote.source, ROOT), (
        f"{rel(quote.page)}:{quote.line} differs from {quote.source}: run python scripts/sync_tables.py")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_markers_pair_up(page):
    text = page.read_text(encoding="utf-8")
    opened, closed = text.count("<!-- results:"), text.count("<!-- /results -->")
    parsed = len(list(sync_tables.quotes(page)))
    assert opened == closed == parsed, f"{rel(page)}: {opened} opening, {closed} closing markers, {parsed} blocks"


def outside_quotes_and_code(text):
    """The lines of a page that are neither in a quoted results block nor in a fenced code block."""
    text = sync_tables.BLOCK.sub("", text)
    keep, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            keep.append(line)
    return keep


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_measured_table_outside_a_results_block(page):
    for line in outside_quotes_and_code(page.read_text(encoding="utf-8")):
        if line.lstrip().startswith("|"):
            cells = re.sub(r"`[^`]*`", "", line)  # code spans are options and formulas, not measurements
            assert not MEASURED.search(cells), (
                f"{rel(page)}: a table row with measured figures outside a results block (quote the results "
                f"file between <!-- results: PATH --> and <!-- /results -->):\n{line}")


def test_measured_pattern():
    assert all(MEASURED.search(s) for s in ("| 1.53x |", "| 61% |", "| 575 ms |", "| 108 MiB |", "| 1,564 ms |"))
    assert not any(MEASURED.search(s) for s in ("| `heads` | 4 |", "| 1M x 1024 |", "| `1.0` |", "| 0 |"))


@pytest.mark.parametrize("script", [s for s, j in RENDERED.items() if (ROOT / "benchmarks/results" / j).is_file()])
def test_committed_table_is_the_render_of_the_committed_json(script, tmp_path):
    committed = ROOT / "benchmarks" / "results" / RENDERED[script]
    copy = tmp_path / committed.name
    shutil.copy(committed, copy)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--render", "--out", str(copy)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    table = committed.with_suffix(".md")
    assert table.is_file(), f"{table.name} is not committed: run python benchmarks/{script} --render"
    assert table.read_text(encoding="utf-8") == copy.with_suffix(".md").read_text(encoding="utf-8"), (
        f"{table.name} is not the render of {committed.name}: run python benchmarks/{script} --render")
