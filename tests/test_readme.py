"""Every ```python block of README.md runs as pasted: alone, in a fresh interpreter, in an empty folder.

One test per block; its id holds the block's line in README.md, the heading above it and its first
line, so a failure points at the block. Code that needs torchrun, a GPU or names the reader supplies
belongs in a ```bash or ```text block (or defines those names): every python block must pass.
Offline: ``HF_HUB_OFFLINE=1``, so a block that downloads a model fails here unless it is cached.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

from . import _extras

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_INFO = {"python", "py", "python3"}  # the info strings GitHub highlights as Python
TIMEOUT_S = 600


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    heading: str
    code: str


def python_blocks(text: str) -> List[Block]:
    """The fenced Python blocks of a Markdown text (CommonMark fences: ``` or ~~~, up to 3 spaces of indent)."""
    blocks, heading, fence = [], "top", None
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            m = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)", line)
            if m:
                fence, indent, info, start, body = m.group(1), len(line) - len(line.lstrip(" ")), m.group(2), number, []
            elif re.match(r"^ {0,3}#{1,6}\s", line):
                heading = line.strip().lstrip("#").strip()
        elif re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", line):
            if info.lower() in PYTHON_INFO:
                blocks.append(Block(start, heading, "\n".join(b[indent:] if b[:indent].isspace() else b for b in body)))
            fence = None
        else:
            body.append(line)
    return blocks


def block_id(block: Block) -> str:
    first = next((ln.strip() for ln in block.code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    slug = lambda s, n: re.sub(r"[^A-Za-z0-9_.=()]+", "_", s).strip("_")[:n]
    return f"L{block.line}-{slug(block.heading, 30)}-{slug(first, 40)}"


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block (or this test's fence parser broke)"


def test_fence_parser():
    text = "# A\n```bash\n```python\n```\n## B ~\n  ```python title\n  x = 1\n    y = 2\n  ```\n~~~py\nz\n~~~\n"
    assert python_blocks(text) == [Block(6, "B ~", "x = 1\n  y = 2"), Block(10, "B ~", "z")]


def run_block(block: Block, where: str, folder: Path) -> None:
    """Run ``block`` as a reader pastes it: alone, in a fresh interpreter, in the empty ``folder``. ``where``
    names its page in messages. A block of an optional integration skips on an install without its extra
    (tests/_extras.py names it)."""
    script = folder / f"{Path(where).stem}_L{block.line}.py"
    script.write_text(block.code + "\n", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a block is run as a reader pastes it, not under a launcher
    try:
        run = subprocess.run([sys.executable, script.name], cwd=folder, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where} line {block.line} ({block.heading}): still running after {TIMEOUT_S} s")
    if run.returncode != 0:
        missing = re.findall(r"ModuleNotFoundError: No module named '([\w.]+)'", run.stderr)
        if missing and missing[-1].split(".")[0] in _extras.EXTRAS and _extras.missing(missing[-1].split(".")[0]):
            pytest.skip(_extras.reason(missing[-1].split(".")[0]))
        pytest.fail(f"{where} line {block.line} ({block.heading}) exited {run.returncode}:\n{run.stderr[-3000:]}",
                    pytrace=False)


@pytest.mark.parametrize("block", [pytest.param(b, id=block_id(b)) for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    run_block(block, "README.md", tmp_path)
