"""Copy each results table into the pages that quote it, or check that they agree (``--check``).

A page quotes a results file between two markers; everything between them is the file's text:

    <!-- results: benchmarks/results/bench_pkm.md -->

    | layer | threads | ... |

    <!-- /results -->

(a blank line on each side of the table, so that every Markdown renderer ends the comment before it).

The results files are written by the benchmarks and examples that measured them (``--render``
rewrites a benchmark's table from its committed JSON without re-running it). Pages: README.md and
docs/**/*.md.

    python scripts/sync_tables.py            # rewrite the blocks from the files
    python scripts/sync_tables.py --check    # exit 1 and name each block that differs or file that is missing
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterator, List, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- results: (?P<path>\S+) -->\n(?P<body>.*?)^<!-- /results -->$", re.M | re.S)


class Quote(NamedTuple):
    page: Path
    line: int  # 1-based line of the opening marker
    source: str  # the results file, relative to the repository root
    body: str  # the text between the markers


def pages(root: Path = ROOT) -> List[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def quotes(page: Path) -> Iterator[Quote]:
    text = page.read_text(encoding="utf-8")
    for m in BLOCK.finditer(text):
        yield Quote(page, text.count("\n", 0, m.start()) + 1, m.group("path"), m.group("body"))


def expected(source: str, root: Path = ROOT) -> str:
    """The block's text: a blank line, the results file, a blank line."""
    return "\n" + (root / source).read_text(encoding="utf-8").strip("\n") + "\n\n"


def sync(page: Path, root: Path = ROOT) -> bool:
    """Rewrite the page's blocks from their files (a block whose file is missing stays); True if it changed."""
    def block(m):
        if not (root / m.group("path")).is_file():
            return m.group(0)
        return f"<!-- results: {m.group('path')} -->\n{expected(m.group('path'), root)}<!-- /results -->"

    text = page.read_text(encoding="utf-8")
    new = BLOCK.sub(block, text)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


def problems(root: Path = ROOT) -> List[str]:
    found = []
    for page in pages(root):
        for q in quotes(page):
            where = f"{page.relative_to(root)}:{q.line}"
            if not (root / q.source).is_file():
                found.append(f"{where}: {q.source} does not exist")
            elif q.body != expected(q.source, root):
                found.append(f"{where}: the table differs from {q.source} (run python scripts/sync_tables.py)")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        print("\n".join(found) if found else "every quoted table equals its results file")
        return 1 if found else 0
    for page in pages():
        if sync(page):
            print(f"updated {page.relative_to(ROOT)}")
    missing = [p for p in problems() if p.endswith("does not exist")]
    if missing:
        print("\n".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
