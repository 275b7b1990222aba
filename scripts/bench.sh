#!/usr/bin/env bash
# Every benchmark: set up (or reuse) the venv, then `python -m dz_bench --all` (small shapes on a CPU, the real
# shapes on a GPU). Records: bench/results/<device-slug>/<bench>.{json,md,png}.
#   bash scripts/bench.sh [NAME ...] [dz_bench args...]     e.g. stacked forward, --out /tmp/results, --small
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$REPO/scripts/setup_env.sh"
dz_setup_env
cd "$REPO"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$DZ_PY" -m dz_bench "$@"          # bench names given: run those
fi
exec "$DZ_PY" -m dz_bench --all "$@"
