#!/usr/bin/env bash
# The project's test command: set up (or reuse) the venv, then run the whole suite.
#   bash scripts/test.sh [pytest args...]        (venv: $DZ_VENV, else <repo>/.venv)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$REPO/scripts/setup_env.sh"
dz_setup_env
cd "$REPO"
set +e
"$DZ_PY" -m pytest -q tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
