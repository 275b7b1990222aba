#!/usr/bin/env bash
# The project's test command: set up (or reuse) the venv, then run the whole suite (or the tests named).
#   bash scripts/test.sh [pytest args...]        (venv: $DZ_VENV, else <repo>/.venv)
# It adds -q unless the arguments set the verbosity themselves (-q, -qq, -v, --quiet, --verbose, --verbosity=N),
# and the folder tests unless they name tests of their own (tests/..., tests/x.py::name): nothing is passed twice.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The pytest arguments for "$@", one a line.
dz_pytest_args() {
  local quiet=1 all=1 prev="" a
  for a in "$@"; do
    case "$prev" in      # the value of an option that takes one (-k tests) names no tests
      -k|-m|-p|-o|-c|-W|-r|-n|--deselect|--ignore|--ignore-glob|--junitxml|--basetemp|--rootdir|--confcutdir) ;;
      *) case "$a" in
           --quiet|--verbose|--verbosity=*) quiet=0 ;;
           tests|tests/*|./tests|./tests/*) all=0 ;;
         esac
         [[ "$a" =~ ^-(q+|v+)$ ]] && quiet=0 ;;
    esac
    prev="$a"
  done
  [ "$quiet" -eq 1 ] && echo "-q"
  [ "$all" -eq 1 ] && echo "tests"
  for a in "$@"; do echo "$a"; done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  # shellcheck source=scripts/setup_env.sh
  source "$REPO/scripts/setup_env.sh"
  dz_setup_env
  cd "$REPO"
  mapfile -t ARGS < <(dz_pytest_args "$@")
  set +e
  "$DZ_PY" -m pytest "${ARGS[@]}"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
  fi
  exit "$rc"
fi
