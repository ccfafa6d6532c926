"""examples/knn_long_document.py: a tiny end-to-end run prints every promised line and writes every file."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from .._extras import importorskip

importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("knn_long_document", ROOT / "examples" / "knn_long_document.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_documents_put_each_fact_where_the_questions_expect_it(example):
    args = example.argparse.Namespace(segments=3, seq_len=32, num_keys=8, num_values=8, num_filler=8,
                                      distant_facts=1, local_facts=2)
    tokens, targets, kind = example.make_documents(args, 16, torch.Generator().manual_seed(0))
    assert tokens.shape == (16, 3, 33) and targets.shape == kind.shape == (16, 3, 32)
    for b in range(16):
        answers = (kind[b, -1] > 0).nonzero().flatten().tolist()
        assert len(answers) == 3 and sorted(kind[b, -1, answers].tolist()) == [1, 2, 2]
        for t in answers:
            key, value = tokens[b, -1, t].item(), targets[b, -1, t].item()
            assert tokens[b, -1, t - 1] == example.QUERY
            where = 0 if kind[b, -1, t] == 1 else -1  # distant facts in segment 0, local ones earlier in the last
            seg = tokens[b, where].tolist()
            stated = [i for i in range(len(seg) - 2) if seg[i:i + 3] == [example.MARK, value, key]]
            assert len(stated) == 1 and (where == 0 or stated[0] + 2 < t)
    assert (targets[:, :-1] == example.IGNORE).all(), "only the last segment is asked"


def test_tiny_run_prints_the_table_and_saves_plot_and_results(example, tmp_path):
    lines = []
    results = example.main(["--quick", "--steps", "2", "--eval-every", "1", "--eval-batches", "1",
                            "--batch-size", "4", "--segments", "2", "--out", str(tmp_path)], log=lines.append)
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| model | parameters | distant facts | local facts | train time |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["knn", "local"]
    assert any(line.startswith("chance: ") for line in lines)
    assert lines[-1] == (f"saved {tmp_path / 'accuracy.png'}, {tmp_path / 'results.json'}, "
                         f"{tmp_path / 'knn_long_document.json'} and {tmp_path / 'knn_long_document.md'}")
    table = json.loads((tmp_path / "knn_long_document.json").read_text())
    assert (tmp_path / "knn_long_document.md").read_text() == example.render(table)
    assert table["command"].startswith("python examples/knn_long_document.py --quick --steps 2 ")
    for name in ("knn", "local"):
        assert table["models"][name] == dict(params=results[name]["params"], **results[name]["final"])
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["steps"] == 2 and set(saved["results"]) == {"knn", "local"}
    for name in ("knn", "local"):
        assert [s for s, _ in saved["results"][name]["curve"]] == [1, 2]
        assert set(saved["results"][name]["final"]) == {"distant", "local"}
    assert all(results[name]["params"] > 0 for name in ("knn", "local"))
