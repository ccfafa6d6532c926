"""Build every op's Triton kernel variants (:class:`._triton.CompileCase`) for a CUDA target without a
GPU, and report registers and spills per kernel.

Each ``ops/<op>/triton_impl.py`` lists its variants in ``compile_cases()``. A case is built with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, which needs no driver; its PTX
then goes through the ``ptxas`` that Triton itself would use for that target (the one it ships under
``triton/backends/nvidia/bin``, or ``TRITON_PTXAS_PATH``) with ``-v``, whose log gives the
registers per thread and the bytes of spill stores and loads (Triton reads registers and spills
only when it loads a kernel onto a device, so its metadata has none here).

Kernels defined under ``TRITON_INTERPRET=1`` are interpreter objects that cannot be compiled, and the
test process sets it; so :func:`build_in_child` builds in a fresh Python process with it unset:

    python -m product_key_memory.ops._compile --cc 90 80            # JSON, one record a line
    python benchmarks/triton_compile_report.py                       # the same as a markdown table
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import multiprocessing
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

OPS_DIR = Path(__file__).resolve().parent
ROOT = OPS_DIR.parents[1]
DEFAULT_CCS = (90, 80)
# the fields of one record, in the order the table prints them
FIELDS = ("op", "kernel", "case", "cc", "num_warps", "num_stages", "default", "registers", "spill_stores",
          "spill_loads", "stack", "shared", "seconds", "error")

__all__ = ["triton_ops", "available", "ptxas_usage", "build", "build_op", "build_in_child", "markdown", "main"]


def triton_ops() -> List[str]:
    """The ops with a Triton implementation (``ops/<op>/triton_impl.py``), found without importing them."""
    return sorted(p.parent.name for p in OPS_DIR.glob("*/triton_impl.py"))


def _ptxas(cc: int) -> str:
    """The ``ptxas`` Triton uses for ``sm_<cc>`` (3.6 and 3.9 both have ``get_ptxas(arch)``)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(cc)
        if tool is not None and getattr(tool, "path", None):
            return tool.path
    except (ImportError, AttributeError, TypeError):
        pass
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists():
        raise FileNotFoundError(f"no ptxas in this Triton ({path}); set TRITON_PTXAS_PATH")
    return str(path)


def _ptxas_version(cc: int) -> Optional[str]:
    res = subprocess.run([_ptxas(cc), "--version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"release (\d+\.\d+)", res.stdout)
    return found.group(1) if found else None


def _arch(cc: int) -> str:
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        return sm_arch_from_capability(cc)
    except ImportError:
        return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def available() -> Optional[str]:
    """``None`` where this Python can build Triton kernels for CUDA, else the reason it cannot."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: kernels are interpreted functions (build in a child process)"
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"Triton cannot build ahead of time here ({type(e).__name__}: {e})"
    try:
        exe = _ptxas(DEFAULT_CCS[0])
        subprocess.run([exe, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"Triton's ptxas does not run here ({type(e).__name__}: {e})"
    return None


_USAGE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_usage(ptx: str, cc: int) -> Dict[str, int]:
    """Registers per thread, spill store / load bytes and stack frame bytes of the one kernel in ``ptx``,
    from ``ptxas -v`` for ``sm_<cc>``."""
    with tempfile.TemporaryDirectory(prefix="pkm-ptxas-") as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        res = subprocess.run([_ptxas(cc), "-lineinfo", "-v", f"--gpu-name={_arch(cc)}", str(src), "-o", str(out)],
                             capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {log[-2000:]}")
    usage = {}
    for key, pattern in _USAGE.items():
        found = pattern.findall(log)
        if not found:
            raise RuntimeError(f"ptxas -v printed no {key!r}: {log[-2000:]}")
        usage[key] = max(int(n) for n in found)
    return usage


def _jit_function(kernel):
    """The ``JITFunction`` under ``@triton.autotune`` / ``@triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        inner = getattr(kernel, "fn", None)
        if inner is None:
            raise TypeError(f"{kernel!r} is not a @triton.jit function (was it defined under TRITON_INTERPRET=1?)")
        kernel = inner
    return kernel


def build(case, cc: int, keep_ptx: bool = False) -> dict:
    """Compile one :class:`._triton.CompileCase` for ``sm_<cc>`` and return its record (``error`` set,
    not raised, when the build or ptxas fails)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    fn = _jit_function(case.kernel)
    rec = dict(kernel=fn.__name__, case=case.name, cc=cc, num_warps=case.num_warps, num_stages=case.num_stages,
               default=case.default, error=None)
    try:
        unknown = (set(case.signature) | set(case.constexprs)) - set(fn.arg_names)
        if unknown:
            raise ValueError(f"not arguments of {fn.__name__}: {sorted(unknown)}")
        # every argument in the kernel's order; constexprs typed as such (Triton 3.6 and 3.9 alike)
        signature = {n: ("constexpr" if n in case.constexprs else case.signature[n]) for n in fn.arg_names}
        names = list(case.signature)
        attrs = {(fn.arg_names.index(names[i]),): [["tt.divisibility", 16]] for i in case.divisible}
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(case.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
        ptx = compiled.asm["ptx"]
        rec.update(ptxas_usage(ptx, cc))
        rec["shared"] = int(getattr(compiled.metadata, "shared", 0) or 0)
        # the distinct global load/store forms, e.g. ld.global.v4.b32 for 16-byte vectors
        rec["accesses"] = sorted(set(re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx)))
        if keep_ptx:
            rec["ptx"] = ptx
    except Exception as e:  # a record per failure, so one bad variant does not hide the others
        rec["error"] = f"{type(e).__name__}: {e}"[-3000:]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _module_name(op: str) -> str:
    """``op`` names a folder of ``ops/``, or (with a dot) any importable module."""
    return op if "." in op else f"product_key_memory.ops.{op}.triton_impl"


@functools.lru_cache(maxsize=None)
def _cases(op: str):
    """``ops/<op>/triton_impl.py``'s ``compile_cases()``, or ``None`` when it defines none."""
    module = importlib.import_module(_module_name(op))
    cases_fn = getattr(module, "compile_cases", None)
    return None if cases_fn is None else tuple(cases_fn())


def _build_one(job) -> dict:
    op, i, cc = job
    return dict(op=op, **build(_cases(op)[i], cc))


def build_op(op: str, ccs: Sequence[int] = DEFAULT_CCS, jobs: int = 1) -> List[dict]:
    """Every case of ``ops/<op>/triton_impl.py``'s ``compile_cases()`` for every ``cc`` (on ``jobs``
    forked processes); one record with ``missing`` when the module defines none."""
    cases = _cases(op)
    if cases is None:
        return [dict(op=op, missing=f"{_module_name(op)} defines no compile_cases()")]
    work = [(op, i, cc) for i in range(len(cases)) for cc in ccs]
    if jobs <= 1 or len(work) < 2:
        return [_build_one(job) for job in work]
    ctx = multiprocessing.get_context("fork")  # the workers inherit the imported cases; kernels never pickle
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(_build_one, work))


def build_in_child(ops: Optional[Sequence[str]] = None, ccs: Sequence[int] = DEFAULT_CCS,
                   timeout: float = 900) -> dict:
    """Run :func:`main` in a fresh Python with ``TRITON_INTERPRET`` unset and this checkout first on the
    path. Returns ``{"unavailable": reason}`` where Triton cannot build for CUDA here, else
    ``{"triton": version, "records": [...]}``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch gets; silences Triton 3.9's warning
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "product_key_memory.ops._compile", "--cc", *map(str, ccs)]
    if ops:
        cmd += ["--ops", *ops]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    return str(value)


def markdown(records: Sequence[dict]) -> str:
    """The records as one markdown table (errors cut to their first line)."""
    cols = [f for f in FIELDS if f != "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in records:
        if "missing" in r:
            lines.append("| " + " | ".join([r["op"], "", r["missing"]] + [""] * (len(cols) - 3)) + " |")
            continue
        row = dict(r, error=(r.get("error") or "").splitlines()[0][:120] if r.get("error") else None)
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=None,
                        help="ops to build (default: every ops/<op>/triton_impl.py); a dotted name is a module")
    parser.add_argument("--cc", nargs="+", type=int, default=list(DEFAULT_CCS), help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="builds at a time")
    args = parser.parse_args(argv)
    reason = available()
    if reason is not None:
        print(json.dumps(dict(unavailable=reason)))
        return
    import triton

    records = []
    for op in args.ops or triton_ops():
        records += build_op(op, args.cc, args.jobs)
        for r in records:
            if r["op"] == op:  # progress on stderr; the JSON answer is stdout's last line
                print(json.dumps({k: r.get(k) for k in FIELDS if k in r} | {"missing": r.get("missing")}),
                      file=sys.stderr)
    print(json.dumps(dict(triton=triton.__version__, ptxas=_ptxas(args.cc[0]), ptxas_version=_ptxas_version(args.cc[0]),
                          records=records)))


if __name__ == "__main__":
    main()
