#!/usr/bin/env bash
# The one script for the GPU machine (no network; system Python 3.12 with torch+cu130, triton, cupy, pybind11,
# cmake, ninja, nvcc): install missing packages from carried wheels, build dz_kernels._C in place, run the test
# suite and the benchmarks, and copy records and logs into $OUT.
#
#   DZ_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_run.sh [--no-tests] [--no-bench] [--bench "copy attention"]
#                                                           [--small] [-- extra pytest args]
# Wheels: every *.whl in $DZ_WHEELHOUSE (default <repo>/wheelhouse) whose distribution is not installed is
# installed with --no-deps --no-index. Output: $OUT/gpu_run.tar.gz ($OUT defaults to <repo>/out/gpu) holding build.log, env.txt, pytest.log,
# junit.xml, convergence.json, bench.log, results/<device-slug>/<bench>.{json,md,png}. Exit status: non-zero when the build or the
# tests failed (the benchmarks still run after failing tests).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/out/gpu}"
# Everything is written under WORK, then packed into $OUT/gpu_run.tar.gz (the device tool returns at most 8 files).
WORK="$REPO/out/gpu-work"
rm -rf "$WORK"
WHEELHOUSE="${DZ_WHEELHOUSE:-$REPO/wheelhouse}"
RUN_TESTS=1
RUN_BENCH=1
BENCHES=""
BENCH_SIZE=""
PYTEST_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) RUN_TESTS=0 ;;
    --no-bench) RUN_BENCH=0 ;;
    --bench) BENCHES="$2"; shift ;;
    --small) BENCH_SIZE="--small" ;;
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    *) echo "gpu_run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT" "$WORK"
if [ -z "${DZ_COMMIT:-}" ]; then
  DZ_COMMIT="$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
fi
export DZ_COMMIT
echo "== gpu_run: commit $DZ_COMMIT, $("$PY" --version 2>&1), out $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"

if [ -d "$WHEELHOUSE" ]; then
  for whl in "$WHEELHOUSE"/*.whl; do
    [ -e "$whl" ] || continue
    dist="$(basename "$whl" | cut -d- -f1)"
    if ! "$PY" -m pip show "$dist" >/dev/null 2>&1; then
      echo "== installing $dist from $whl"
      "$PY" -m pip install --no-deps --no-index "$whl" || { echo "failed to install $whl" >&2; exit 1; }
    fi
  done
fi

echo "== building dz_kernels._C (pip install --no-deps --no-build-isolation -e .)"
if ! "$PY" -m pip install -v --no-deps --no-build-isolation -e . > "$WORK/build.log" 2>&1; then
  tail -n 60 "$WORK/build.log"
  echo "gpu_run.sh: the build failed (full log in $WORK/build.log)" >&2
  exit 1
fi
grep -E "^\s*dz_kernels:" "$WORK/build.log" || true
"$PY" -m dz_kernels.cli env | tee "$WORK/env.txt"

test_rc=0
if [ "$RUN_TESTS" = 1 ]; then
  echo "== tests"
  "$PY" -m pytest -q tests -ra --junitxml="$WORK/junit.xml" "${PYTEST_EXTRA[@]}" 2>&1 | tee "$WORK/pytest.log"
  test_rc=${PIPESTATUS[0]}
  [ "$test_rc" -eq 5 ] && test_rc=1
fi

if [ "$RUN_TESTS" = 1 ]; then
  echo "== convergence: 300 training steps of the tiny model with and without the fast ops (on the GPU kernels)"
  if ! "$PY" - > "$WORK/convergence.json" 2> "$WORK/convergence.log" <<'PY'
import json, sys
sys.path.insert(0, "tests")
from test_convergence import check_convergence, run_convergence
r = run_convergence(steps=300, device="cuda")
json.dump({k: v for k, v in r._asdict().items()}, sys.stdout, indent=1)
check_convergence(r)
PY
  then
    tail -n 20 "$WORK/convergence.log"
    test_rc=1
  fi
fi

if [ "$RUN_BENCH" = 1 ]; then
  echo "== benchmarks"
  if [ -n "$BENCHES" ]; then
    # shellcheck disable=SC2086
    "$PY" -m dz_bench $BENCHES $BENCH_SIZE --out "$WORK/results" --no-progress 2>&1 | tee "$WORK/bench.log"
  else
    "$PY" -m dz_bench --all $BENCH_SIZE --out "$WORK/results" --no-progress 2>&1 | tee "$WORK/bench.log"
  fi
fi
tar -czf "$OUT/gpu_run.tar.gz" -C "$WORK" .
echo "== gpu_run: tests exit $test_rc; everything packed in $OUT/gpu_run.tar.gz (unpack into bench/results/.. to commit)"
exit "$test_rc"
