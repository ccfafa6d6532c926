"""benchmarks/bench_knn_lm.py --quick runs end to end against the peer (skipped where the peer is not installed)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("memorizing_transformers_pytorch") is None,
                    reason="memorizing-transformers-pytorch 0.4.1 not installed (pip install --no-deps "
                           "memorizing-transformers-pytorch==0.4.1 faiss-cpu joblib cloudpickle einops-exts)")
def test_quick_mode_measures_both_libraries(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_knn_lm import main

    rows = main(["--quick", "--out", str(tmp_path / "out.json")])
    assert {r["library"] for r in rows} == {"ours default", "peer"}
    ours = next(r for r in rows if r["library"] == "ours default")
    assert ours["recall_at_32"] == 1.0, "the exact search finds every true top-32 memory"
    assert (tmp_path / "out.json").exists()
