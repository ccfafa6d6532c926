#!/usr/bin/env bash
# The one GPU check: the CUDA tests, then benchmarks/bench_gpu.py at the README layer and at keys1024
# (uniform, Zipf and hot-slot reads), in under 8 minutes, writing logs and JSON into OUT_DIR.
#
#   benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--peer-wheel PATH] [--budget SECONDS]
#
# Run it from a checkout on a machine with one CUDA GPU, torch and Triton installed and no network.
# The product-key-memory 0.3.0 columns need its wheel: --peer-wheel PATH, else PKM_PEER_WHEEL, else
# .cache/peer/product_key_memory-0.3.0-*.whl. Loading 0.3.0 imports colt5_attention; where that is
# missing, pure-Python wheels in .cache/peer/deps/ are installed into a temporary folder first. Fill
# both where there is network (git ignores .cache/):
#
#   pip download product-key-memory==0.3.0 --no-deps -d .cache/peer
#   pip download --no-deps -d .cache/peer/deps colt5-attention==0.11.2 local-attention==1.11.2 \
#       hyper-connections==0.4.11 torch-einops-utils==0.2.0
#
# Without them the 0.3.0 columns are skipped and everything else runs.
#
# With this workplace's device tool (a lent H100; .cache/ is git-ignored, so carry it):
#
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".cache/peer"], timeout_s=540)
#
# then commit $OUT's bench_gpu.json as benchmarks/results/bench_gpu.json. OUT_DIR receives six files
# (the tool returns at most 8): env.txt (nvidia-smi, GPU, torch, Triton, Python), pytest_cuda.log,
# bench_readme.log, bench_keys1024.log, bench_gpu.json (both configurations merged) and steps.txt
# (each step's exit status and seconds).
#
# Time: every step runs under `timeout`, capped and within --budget (default 450 s) overall:
# environment 20 s, pytest -m cuda 180 s, each configuration 120 s. bench_gpu.py rewrites its JSON
# after every part, so a configuration cut off by its limit still leaves its finished rows.
#
# --dry-run: the same steps on CPU, quickly: pytest -m cuda (every test skips without CUDA) and
# bench_gpu.py --smoke (tiny sizes, Triton interpreted). tests/benchmarks/test_gpu_check.py runs it.
#
# Exit status: 0 when every step succeeded, 1 when one failed or ran out of time (steps.txt says which).

set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run] [--peer-wheel PATH] [--budget SECONDS]" >&2; exit 2; }

OUT_DIR="" DRY_RUN=0 PEER_WHEEL="${PKM_PEER_WHEEL:-}" BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --peer-wheel) [ $# -ge 2 ] || usage; PEER_WHEEL="$2"; shift ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) [ -z "$OUT_DIR" ] || usage; OUT_DIR="$1" ;;
  esac
  shift
done
[ -n "$OUT_DIR" ] || usage
case "$BUDGET" in ''|*[!0-9]*) echo "--budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS DEADLINE=$((SECONDS + BUDGET)) FAILED=0
STEPS="$OUT_DIR/steps.txt"
echo "step rc seconds (budget ${BUDGET}s, dry run: $DRY_RUN)" > "$STEPS"

# step NAME CAP LOG CMD...: CMD under `timeout`, at most CAP seconds and what is left of the budget
step() {
  local name="$1" cap="$2" log="$3"; shift 3
  local left=$((DEADLINE - SECONDS - 5)) t0=$SECONDS rc
  [ "$cap" -lt "$left" ] || cap=$left
  if [ "$cap" -lt 10 ]; then
    echo "$name skipped 0 (out of budget)" >> "$STEPS"; echo "== $name: skipped, out of budget"; FAILED=1; return
  fi
  echo "== $name (limit ${cap}s): $(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-160)"
  timeout -k 10 "$cap" "$@" > "$log" 2>&1
  rc=$?
  echo "$name $rc $((SECONDS - t0))$([ $rc -eq 124 ] && echo ' (time limit)')" >> "$STEPS"
  echo "   rc $rc in $((SECONDS - t0))s; log $log"
  [ $rc -eq 0 ] || FAILED=1
}

# -- the 0.3.0 wheel and what loading it imports ----------------------------------------------------
if [ -z "$PEER_WHEEL" ]; then
  PEER_WHEEL="$(ls "$ROOT"/.cache/peer/product_key_memory-0.3.0-*.whl 2>/dev/null | head -n1)"
fi
BENCH_ARGS=()
if [ -n "$PEER_WHEEL" ] && [ -f "$PEER_WHEEL" ]; then
  BENCH_ARGS+=(--peer-wheel "$PEER_WHEEL")
  if ! "$PYTHON" -c "import colt5_attention" 2>/dev/null; then
    if ls "$ROOT"/.cache/peer/deps/*.whl >/dev/null 2>&1; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$TMP/site" "$ROOT"/.cache/peer/deps/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$TMP/site"
    fi
    "$PYTHON" -c "import colt5_attention" 2>/dev/null \
      || echo "note: colt5_attention is not importable, so 0.3.0 cannot load; its columns will be skipped"
  fi
else
  echo "note: no product-key-memory 0.3.0 wheel (--peer-wheel, PKM_PEER_WHEEL or .cache/peer); its columns will be skipped"
  export PIP_NO_INDEX=1  # so bench_gpu.py's download attempt fails at once instead of waiting on a network
  PEER_WHEEL=""
fi

# -- the machine ------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  echo "dry run: $DRY_RUN; peer wheel: ${PEER_WHEEL:-none}"
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    nvidia-smi 2>&1
  else
    echo "nvidia-smi: not found"
  fi
} > "$OUT_DIR/env.txt"
step environment 20 "$TMP/env_python.txt" "$PYTHON" -c '
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "capability", "%d.%d" % (p.major, p.minor),
          "multiprocessors", p.multi_processor_count, "memory_gib", round(p.total_memory / 2**30, 1))
else:
    print("device none (CPU only)")
'
cat "$TMP/env_python.txt" >> "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt" | grep -E '^(python|torch|triton|device) '

# -- the CUDA tests -----------------------------------------------------------------------------------
step "pytest -m cuda" 180 "$OUT_DIR/pytest_cuda.log" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider -rfEs
tail -n 3 "$OUT_DIR/pytest_cuda.log"

# -- the benchmark, one configuration a run -----------------------------------------------------------
SMOKE=()
[ "$DRY_RUN" -eq 0 ] || SMOKE=(--smoke)
RUNS=()
for config in readme keys1024; do
  step "bench_gpu $config" 120 "$OUT_DIR/bench_$config.log" "$PYTHON" benchmarks/bench_gpu.py "${SMOKE[@]}" \
    --configs "$config" --reads uniform zipf hot --out "$TMP/bench_$config.json" "${BENCH_ARGS[@]}"
  RUNS+=("$TMP/bench_$config.json")
done
"$PYTHON" benchmarks/bench_gpu.py --merge "${RUNS[@]}" --out "$OUT_DIR/bench_gpu.json" || FAILED=1

echo "total $FAILED $((SECONDS - START))" >> "$STEPS"
cat "$STEPS"
exit $FAILED
