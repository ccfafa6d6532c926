"""Every Triton kernel variant that an op lists in ``compile_cases()`` builds for Hopper (sm_90) and
Ampere (sm_80) without a GPU, and the configurations the library launches by default use no spill
memory. Registers and spills per kernel are printed (``pytest -s``) and written by
``benchmarks/triton_compile_report.py``."""

import pytest

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
