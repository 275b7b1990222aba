#!/usr/bin/env bash
# Every benchmark: set up (or reuse) the venv, then `python -m dz_bench --all` (small shapes on a CPU, the real
# shapes on a GPU). Records: bench/results/<device-slug>/<bench>.{json,md,png}.
#   bash scripts/bench.sh [dz_bench args...]     e.g. --out /tmp/results, --small
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$REPO/scripts/setup_env.sh"
dz_setup_env
cd "$REPO"
exec "$DZ_PY" -m dz_bench --all "$@"
