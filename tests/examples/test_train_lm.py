"""examples/train_lm.py: equal compute per token for both models, a deterministic split, and a tiny end-to-end run."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from .._extras import importorskip

importorskip("tqdm")
importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_lm():
    spec = importlib.util.spec_from_file_location("train_lm_example", ROOT / "examples" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validation_split_is_a_function_of_the_path(train_lm):
    names = [f"pkg{i}/mod{i}.py" for i in range(2000)]
    split = [train_lm.is_validation(n, 5.0) for n in names]
    assert split == [train_lm.is_validation(n, 5.0) for n in names]
    assert 0.03 < sum(split) / len(split) < 0.07


def test_tiny_run_end_to_end(train_lm, tmp_path, capsys):
    argv = ["--quick", "--steps", "2", "--eval-every", "1", "--eval-batches", "1", "--batch-size", "2",
            "--seq-len", "16", "--sample-bytes", "4"]
    results = train_lm.main([*argv, "--out", str(tmp_path)])
    assert results["pkm"]["macs_per_token"] == results["dense"]["macs_per_token"], "compute per token must match"
    assert results["pkm"]["params"] > results["dense"]["params"]
    assert [s for s, _ in results["pkm"]["curve"]] == [0, 1, 2]
    assert (tmp_path / "val_curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert saved["pkm"]["usage"][-1][1]["blocks.2.ff"]["slots"] == 128**2  # module paths in the JSON
    printed = capsys.readouterr().out
    assert "PKM in block 3 (blocks.2.ff)" in printed and "  block 3 (blocks.2.ff): 16,384 slots" in printed, printed
    table = json.loads((tmp_path / "train_lm.json").read_text())
    assert (tmp_path / "train_lm.md").read_text() == train_lm.render(table)
    assert table["command"] == "python examples/train_lm.py " + " ".join(argv), "--out is left out of the command"
    assert table["models"]["pkm"]["curve"] == [list(p) for p in results["pkm"]["curve"]]
    assert table["usage"]["pkm"]["blocks.2.ff"]["slots"] == 128**2


def saved_paths(line: str) -> set:
    """The paths of a ``saved a, b and c`` line."""
    assert line.startswith("saved "), line
    head, _, last = line[len("saved "):].rpartition(" and ")
    return set(filter(None, head.split(", "))) | {last}


def test_the_saved_line_names_every_file_written(train_lm, tmp_path, capsys):
    out, tables = tmp_path / "out", tmp_path / "tables"
    train_lm.main(["--quick", "--steps", "1", "--eval-every", "1", "--eval-batches", "1", "--batch-size", "2",
                   "--seq-len", "16", "--sample-bytes", "2", "--out", str(out), "--results", str(tables)])
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    written = {str(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert saved_paths(last) == written, last
    assert {Path(p).name for p in written} == {"val_curves.png", "results.json", "memory_usage_pkm.png",
                                                "train_lm.json", "train_lm.md"}
    assert {p.name for p in tables.iterdir()} == {"train_lm.json", "train_lm.md"}


def test_block_label(train_lm):
    assert train_lm.block_label("blocks.0.ff") == "block 1 (blocks.0.ff)"
    assert train_lm.block_label("memory") == "memory"


@pytest.mark.parametrize("memory", ["memory_plus", "peer", "ultramem"])
def test_tiny_run_with_another_memory(train_lm, tmp_path, memory):
    results = train_lm.main(["--quick", "--memory", memory, "--steps", "2", "--eval-every", "1", "--eval-batches",
                             "1", "--batch-size", "2", "--seq-len", "16", "--sample-bytes", "4", "--num-keys", "16",
                             "--topk", "4", "--out", str(tmp_path)])
    assert results["pkm"]["macs_per_token"] == results["dense"]["macs_per_token"], "compute per token must match"
    args = SimpleNamespace(memory=memory, pkm_heads=2, num_keys=16, topk=4, pkm_dim_head=8, dim=32, depth=4,
                           seq_len=16, heads=2, ff_mult=4, pkm_layers=[3])
    models, _ = train_lm.build_models(args)
    assert type(models["pkm"].blocks[2].ff).__name__ == {"memory_plus": "MemoryPlus", "peer": "PEER", "ultramem": "UltraMem"}[memory]
