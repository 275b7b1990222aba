#!/usr/bin/env bash
# The one script for a GPU booking (no network there; system Python 3.12 with torch+cu130, triton, cupy, pybind11,
# cmake, ninja, nvcc): phases, each under its own time limit and all under one deadline, so that one device call
# ends inside its limit and keeps everything it measured.
#
#   DZ_COMMIT=<sha> bash scripts/gpu_run.sh [--budget-s S] [--small] [PHASE ...]
#
# PHASE (run in the order given; default: build tests convergence bench:copy,attention,kv_cache,fused_ops,quant):
#   build               install the carried wheels (wheelhouse/, from scripts/fetch_wheels.sh) that are missing,
#                       build dz_kernels._C in place; every other phase needs it first
#   tests[:ARGS]        the whole suite, `pytest -n 16` (ARGS: extra pytest arguments, comma-separated), and its
#                       record tests.json (dz_bench.suite_record)
#   convergence         300 training steps of the tiny model with and without the fast ops, on the GPU kernels
#   tune:NAME[,NAME]    tuning sweeps (python -m dz_bench.tune NAME): the chosen configurations as JSON tables
#   bench:NAME[,NAME]   benchmarks through dz_bench, each row printed and appended to rows.jsonl as it is measured
#
# --budget-s: the whole run's deadline in seconds (default 530: one device call of at most 9 minutes). A phase
# gets at most its own limit and never more than what is left; a phase cut by its limit is reported and the next
# one runs. Output in $OUT (default <repo>/out/gpu), at most 4 files, as the device tool returns at most 8:
#   log.txt         everything printed
#   rows.jsonl      every bench row, appended the moment it is measured
#   tests.json      the suite's record (device, versions, commit, counts, every skip reason and failure)
#   gpu_run.tar.gz  everything else (build.log, env.txt, pytest.log, junit.xml, convergence.json, tune/, and
#                   results/<device-slug>/<bench>.{json,md,png}), repacked after every phase
# Commit what came back under bench/results/<device-slug>/ (python -m dz_bench.report regenerates the reports).
# Exit status: 0 when every phase ran and passed, 1 otherwise (a later phase still runs after a failed one).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/out/gpu}"
WORK="$REPO/out/gpu-work"
WHEELHOUSE="${DZ_WHEELHOUSE:-$REPO/wheelhouse}"
BUDGET_S=530
SMALL=""
PHASES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) BUDGET_S="$2"; shift ;;
    --small) SMALL="--small" ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    build|tests|tests:*|convergence|tune:*|bench:*) PHASES+=("$1") ;;
    *) echo "gpu_run.sh: unknown argument '$1' (phases: build tests[:ARGS] convergence tune:NAME bench:NAME; --help)" >&2
       exit 2 ;;
  esac
  shift
done
[ ${#PHASES[@]} -gt 0 ] || PHASES=(build tests convergence bench:copy,attention,kv_cache,fused_ops,quant)
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/results" "$WORK/tune"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
export DZ_OFFLINE=1        # no package index there: tests that must install from PyPI skip, saying so
if [ -z "${DZ_COMMIT:-}" ]; then
  DZ_COMMIT="$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
fi
export DZ_COMMIT
RC=0

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(date +%s) )); }
pack() { tar -czf "$OUT/gpu_run.tar.gz.tmp" -C "$WORK" . && mv "$OUT/gpu_run.tar.gz.tmp" "$OUT/gpu_run.tar.gz"; }
# run_limited LIMIT_S CMD...: the command under min(LIMIT_S, time left - 10 s); returns its status (124: cut).
run_limited() {
  local limit="$1"; shift
  local avail=$(( $(left) - 10 ))
  [ "$avail" -lt "$limit" ] && limit="$avail"
  if [ "$limit" -le 5 ]; then echo "   (no time left for this phase)"; return 124; fi
  timeout -k 10 "$limit" "$@"
}

echo "== gpu_run: commit $DZ_COMMIT, $("$PY" --version 2>&1), budget ${BUDGET_S}s, phases: ${PHASES[*]}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: n/a"

for phase in "${PHASES[@]}"; do
  name="${phase%%:*}"
  arg=""
  [ "$phase" != "$name" ] && arg="${phase#*:}"
  echo "== [$(elapsed)s] phase $phase ($(left)s left)"
  rc=0
  case "$name" in
    build)
      if [ -d "$WHEELHOUSE" ]; then
        for whl in "$WHEELHOUSE"/*.whl; do
          [ -e "$whl" ] || continue
          dist="$(basename "$whl" | cut -d- -f1)"
          if ! "$PY" -m pip show "$dist" >/dev/null 2>&1; then
            echo "   installing $dist from $(basename "$whl")"
            "$PY" -m pip install -q --no-deps --no-index "$whl" || rc=1
          fi
        done
      else
        echo "   no wheelhouse at $WHEELHOUSE (bash scripts/fetch_wheels.sh here, then carry it): extras stay missing"
      fi
      run_limited 240 "$PY" -m pip install -v --no-deps --no-build-isolation -e . > "$WORK/build.log" 2>&1 || rc=$?
      if [ "$rc" -ne 0 ]; then
        tail -n 40 "$WORK/build.log"
        echo "gpu_run.sh: the build failed (build.log in the tarball); the later phases need it" >&2
        pack
        exit 1
      fi
      grep -E "^\s*dz_kernels:" "$WORK/build.log" || true
      "$PY" -m dz_kernels.cli env > "$WORK/env.txt" 2>&1 || rc=1
      cat "$WORK/env.txt"
      ;;
    tests)
      extra=()
      [ -n "$arg" ] && IFS=',' read -r -a extra <<< "$arg"
      par=()
      "$PY" -c "import xdist" 2>/dev/null && par=(-n 16)
      t0=$(date +%s)
      run_limited 300 "$PY" -m pytest -q tests "${par[@]}" -ra -p no:cacheprovider --junitxml="$WORK/junit.xml" \
        "${extra[@]}" > "$WORK/pytest.log" 2>&1 || rc=$?
      grep -E "^(FAILED|ERROR)|passed|failed" "$WORK/pytest.log" | tail -n 60
      if [ -f "$WORK/junit.xml" ]; then
        "$PY" -m dz_bench.suite_record "$WORK/junit.xml" "$OUT/tests.json" --duration-s $(( $(date +%s) - t0 )) \
          && cp "$OUT/tests.json" "$WORK/tests.json"
      else
        echo "   no junit.xml: pytest did not finish (exit $rc)"
      fi
      ;;
    convergence)
      run_limited 120 "$PY" - > "$WORK/convergence.json" 2> "$WORK/convergence.log" <<'PY' || rc=$?
import json, sys
sys.path.insert(0, "tests")
from test_convergence import check_convergence, run_convergence
r = run_convergence(steps=300, device="cuda")
json.dump({k: v for k, v in r._asdict().items()}, sys.stdout, indent=1)
check_convergence(r)
PY
      tail -n 5 "$WORK/convergence.log"
      ;;
    tune)
      IFS=',' read -r -a names <<< "$arg"
      for n in "${names[@]}"; do
        run_limited 600 "$PY" -m dz_bench.tune "$n" --out "$WORK/tune" --budget-s $(( $(left) - 20 )) || rc=$?
      done
      ;;
    bench)
      IFS=',' read -r -a names <<< "$arg"
      run_limited 600 "$PY" -m dz_bench "${names[@]}" $SMALL --out "$WORK/results" --echo --no-progress \
        --rows "$OUT/rows.jsonl" --budget-s $(( $(left) - 30 )) || rc=$?
      ;;
  esac
  [ "$rc" -eq 124 ] && echo "   phase $phase was cut by its time limit"
  echo "== [$(elapsed)s] phase $phase: exit $rc"
  [ "$rc" -ne 0 ] && RC=1
  pack
done
echo "== gpu_run: done in $(elapsed)s, exit $RC; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$RC"
