"""The documentation site builds with ``mkdocs build --strict`` (a broken link, a missing page or image, an API
reference that does not resolve, a page left out of the nav: each is a warning, and strict makes it an error),
and the README's and the pages' images are relative paths to files of this repository."""

import re
import subprocess
import sys

import pytest

from ._extras import importorskip
from .test_readme import ROOT, README

PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
IMAGE = re.compile(r"""<img\s[^>]*?src=["']([^"']+)["']|!\[[^\]]*\]\(([^)\s]+)""")


def test_site_builds_strict(tmp_path):
    importorskip("mkdocs")
    importorskip("mkdocstrings")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    problems = [line for line in run.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert run.returncode == 0 and not problems, "mkdocs build --strict failed:\n" + (
        "\n".join(problems) or run.stderr[-3000:])
    assert (tmp_path / "site" / "api" / "layers" / "index.html").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_images_are_relative_files(page):
    for m in IMAGE.finditer(page.read_text(encoding="utf-8")):
        src = m.group(1) or m.group(2)
        assert "://" not in src and not src.startswith("/"), f"{page.name}: image {src!r} is not a relative path"
        assert (page.parent / src).is_file(), f"{page.name}: image {src!r} does not exist beside the page"
