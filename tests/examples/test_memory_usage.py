"""examples/memory_usage.py: a tiny run writes the picture, the results and the table rendered from them."""

import importlib.util
import json
from pathlib import Path

import pytest

from .._extras import importorskip

importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("memory_usage_example", ROOT / "examples" / "memory_usage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_results_and_their_table(example, tmp_path, capsys):
    out, tables = tmp_path / "out", tmp_path / "tables"
    results = example.main(["--steps", "2", "--out", str(out), "--results", str(tables)])
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    json_path, md_path = tables / "memory_usage.json", tables / "memory_usage.md"
    assert last == f"saved {out / 'memory_usage.png'}, {json_path} and {md_path}"
    assert json.loads(json_path.read_text()) == results
    assert results["command"] == f"python examples/memory_usage.py --steps 2 --results {tables}"
    assert set(results["rows"]) == {"layernorm", "channel_batchnorm", "none"}
    assert md_path.read_text() == example.render(results)
    assert md_path.read_text().count("\n| `") == 3, "one row per query norm"
