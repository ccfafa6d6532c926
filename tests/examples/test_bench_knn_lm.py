"""benchmarks/bench_knn_lm.py --quick runs end to end against the peer (skipped where the peer is not installed)."""

import sys
from pathlib import Path

from .._extras import needs

ROOT = Path(__file__).resolve().parents[2]


@needs("memorizing_transformers_pytorch")
def test_quick_mode_measures_both_libraries(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_knn_lm import main

    rows = main(["--quick", "--out", str(tmp_path / "out.json")])
    assert {r["library"] for r in rows} == {"ours default", "peer"}
    ours = next(r for r in rows if r["library"] == "ours default")
    assert ours["recall_at_32"] == 1.0, "the exact search finds every true top-32 memory"
    assert (tmp_path / "out.json").exists()
