"""bench_gpu.py's read distributions draw what they say, and --merge joins runs."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_gpu  # noqa: E402


@pytest.mark.parametrize("dist", bench_gpu.READ_DISTRIBUTIONS)
def test_read_indices_in_range_and_shaped(dist):
    gen = torch.Generator().manual_seed(0)
    idx = bench_gpu.read_indices(dist, 1000, (50, 40), gen)
    assert idx.shape == (50, 40) and idx.dtype == torch.int64
    assert 0 <= int(idx.min()) and int(idx.max()) < 1000


def test_hot_slot_takes_a_quarter_of_reads_and_zipf_follows_its_law():
    gen = torch.Generator().manual_seed(0)
    n, slots = 200_000, 10_000
    hot = torch.bincount(bench_gpu.read_indices("hot", slots, (n,), gen), minlength=slots)
    share = hot.max().item() / n  # 25% of reads, plus its uniform share
    assert abs(share - (0.25 + 0.75 / slots)) < 0.01, share
    zipf = torch.bincount(bench_gpu.read_indices("zipf", slots, (n,), gen, zipf_s=1.0), minlength=slots)
    counts = zipf.sort(descending=True).values.double()
    harmonic = (1.0 / torch.arange(1, slots + 1, dtype=torch.float64)).sum().item()
    assert abs(counts[0].item() / n - 1 / harmonic) < 0.01  # rank 1: 1 / H(slots)
    assert abs(counts[0].item() / counts[1].item() - 2.0) < 0.2  # rank 1 read twice as often as rank 2
    uniform = torch.bincount(bench_gpu.read_indices("uniform", slots, (n,), gen), minlength=slots)
    assert uniform.max().item() / n < 0.001
    with pytest.raises(ValueError, match="dist"):
        bench_gpu.read_indices("gauss", slots, (n,), gen)


def test_merge_joins_rows_and_names_missing_runs(tmp_path):
    a = dict(device="x", configs={"readme": {}}, complete=True, rows=[dict(config="readme", phase="forward")])
    b = dict(device="x", configs={"keys1024": {}}, complete=False, rows=[dict(config="keys1024", phase="forward")])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "m.json"
    bench_gpu.merge([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"], out)
    got = json.loads(out.read_text())
    assert [r["config"] for r in got["rows"]] == ["readme", "keys1024"]
    assert set(got["configs"]) == {"readme", "keys1024"} and got["device"] == "x"
    assert [r["complete"] for r in got["runs"]] == [True, False]
    assert len(got["missing"]) == 1 and "c.json" in got["missing"][0]
