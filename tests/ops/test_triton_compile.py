"""Every Triton kernel variant that an op lists in ``compile_cases()`` builds for Hopper (sm_90) and
Ampere (sm_80) without a GPU, and the configurations the library launches by default use no spill
memory. Registers and spills per kernel are printed (``pytest -s``) and written by
``benchmarks/triton_compile_report.py``."""

import pytest
from .._extras import importorskip

from product_key_memory.ops import _compile

from ._compiled import CCS, records


@pytest.mark.parametrize("op", _compile.triton_ops())
def test_every_variant_builds_for_sm90_and_sm80_without_spills_at_defaults(op):
    recs = records(op)
    missing = [r["missing"] for r in recs if "missing" in r]
    if missing:
        pytest.skip(missing[0])
    assert recs, f"{op}: compile_cases() listed no case"
    table = _compile.markdown(recs)
    print(f"\n{op}\n{table}")
    assert {r["cc"] for r in recs} == set(CCS)
    failed = [f"{r['kernel']} [{r['case']}] sm_{r['cc']}: {r['error']}" for r in recs if r["error"]]
    assert not failed, f"{op}: {len(failed)} variant(s) did not build:\n" + "\n".join(failed)
    spilled = [f"{r['kernel']} [{r['case']}] sm_{r['cc']}: {r['registers']} registers, "
               f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
               for r in recs if r["default"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, f"{op}: default configurations spill registers:\n" + "\n".join(spilled) + "\n" + table


def test_harness_reports_spills_and_build_errors():
    """The harness on a kernel made to spill, and on a case that cannot build (sm_90 only)."""
    importorskip("triton")
    result = _compile.build_in_child(["tests.ops._compile_fixture"], ccs=(90,), timeout=600)
    if "unavailable" in result:
        pytest.skip(f"Triton cannot build kernels for CUDA here: {result['unavailable']}")
    recs = {r["case"]: r for r in result["records"]}
    fits, spills, bad = recs["fits"], recs["spills"], recs["bad signature"]
    assert fits["error"] is None and fits["spill_stores"] == fits["spill_loads"] == 0 and fits["registers"] > 0
    assert spills["error"] is None and spills["spill_stores"] > 0 and spills["spill_loads"] > 0, spills
    assert "z_ptr" in bad["error"], bad
    assert "| spills |" in _compile.markdown(result["records"])
