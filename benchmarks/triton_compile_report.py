"""Registers and spills of every Triton kernel variant, built for Hopper (sm_90) and Ampere (sm_80)
without a GPU: each ``product_key_memory/ops/<op>/triton_impl.py``'s ``compile_cases()``, compiled by
``product_key_memory.ops._compile`` in a child process (``TRITON_INTERPRET`` unset), registers and
spill bytes from ``ptxas -v`` (the ptxas bundled with Triton).

    python benchmarks/triton_compile_report.py                 # every op, sm_90 and sm_80
    python benchmarks/triton_compile_report.py --ops sparse_adam --cc 90

Prints a markdown table and writes ``benchmarks/results/triton_compile.json`` and ``.md`` (``--out``).
Exits non-zero when a variant fails to build or a default configuration spills, as
``tests/ops/test_triton_compile.py`` fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from product_key_memory.ops import _compile  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=None, help="ops (default: every ops/<op>/triton_impl.py)")
    parser.add_argument("--cc", nargs="+", type=int, default=list(_compile.DEFAULT_CCS), help="compute capabilities (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "triton_compile",
                        help="output path without suffix: writes .json and .md (default: %(default)s)")
    args = parser.parse_args(argv)

    result = _compile.build_in_child(args.ops, args.cc)
    if "unavailable" in result:
        print(f"Triton cannot build kernels for CUDA here: {result['unavailable']}")
        return 2
    records = result["records"]
    for r in records:
        r.pop("ptx", None)
        r.pop("seconds", None)  # varies from run to run
    table = _compile.markdown(records)
    head = (f"Triton {result['triton']}, ptxas {result.get('ptxas_version')} (`{Path(result['ptxas']).name}` "
            "bundled with it), "
            f"compute capabilities {', '.join(map(str, args.cc))}; built on {platform.machine()} without a GPU. "
            "registers: per thread; spill_stores / spill_loads / stack: bytes per thread; shared: bytes per program; "
            "default: a configuration the library launches by default (must not spill).")
    print(head + "\n\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(triton=result["triton"], ptxas=Path(result["ptxas"]).name, ptxas_version=result.get("ptxas_version"),
                ccs=args.cc,
                python=platform.python_version())
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    args.out.with_suffix(".md").write_text(head + "\n\n" + table + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")
    bad = [r for r in records if r.get("error") or (r.get("default") and (r.get("spill_stores") or r.get("spill_loads")))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
