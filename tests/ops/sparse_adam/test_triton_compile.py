"""The sparse Adam kernel (its ``compile_cases()``, built for sm_90 and sm_80 by
``tests/ops/_compiled.py``) moves rows with 16-byte vector loads and stores wherever the parameter and
both moments share a dtype and the row width is a multiple of 16 (what Triton specializes a launch on)."""

from .._compiled import records

# every case whose three tables share one dtype and whose width is a multiple of 16
VECTOR_CASES = ("readme fp32", "readme bf16", "readme fp32 adamw", "readme fp32 catch-up",
                "readme fp32 catch-up alone", "dim 4096 fp32 catch-up", "dim 4096 bf16",
                # the step count read from the device (capturable) changes nothing in the row's accesses
                "readme fp32 capturable", "readme bf16 capturable", "readme fp32 adamw capturable",
                "readme fp32 catch-up capturable", "dim 4096 bf16 capturable")


def test_kernel_moves_rows_with_16_byte_accesses():
    recs = {(r["case"], r["cc"]): r for r in records("sparse_adam")}
    for case in VECTOR_CASES:
        for cc in (90, 80):
            r = recs[(case, cc)]
            assert r["error"] is None, r["error"]
            acc = r["accesses"]
            assert "ld.global.v4.b32" in acc and "st.global.v4.b32" in acc, f"{case} sm_{cc}: not 16-byte: {acc}"
            scalar = [a for a in acc if a.startswith("st.global.") and ".v" not in a]
            assert not scalar, f"{case} sm_{cc}: scalar stores left: {acc}"
            assert r["spill_stores"] == r["spill_loads"] == 0, f"{case} sm_{cc}: spills {r}"
