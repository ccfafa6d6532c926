"""The committed tables of examples/ (benchmarks/results/*.md) are what the scripts render from the committed
results (benchmarks/results/*.json), and say the command that wrote them. Nothing is re-run here: the
scripts' own tests check, on tiny runs, that they write the .json and render the .md from it."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = ["memory_usage", "knn_long_document", "train_lm"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_table_is_rendered_from_the_committed_results(name):
    results = json.loads((RESULTS / f"{name}.json").read_text())
    table = (RESULTS / f"{name}.md").read_text()
    assert table == load(name).render(results), f"re-run: {results['command']}"
    assert results["command"].startswith(f"python examples/{name}.py"), results["command"]
    assert "--results benchmarks/results" in results["command"], "the committed files come from the documented run"
    assert f"`{results['command']}`" in table.splitlines()[0], "the table's caption names its command"
