#!/usr/bin/env bash
# Download, here (a machine with network), the wheels the GPU machine lacks, for its Python 3.12 on manylinux
# x86-64, into wheelhouse/ (git-ignored). scripts/gpu_run.sh installs them there with --no-deps --no-index; the
# device call carries the folder (`carry: ["wheelhouse"]`).
#
#   bash scripts/fetch_wheels.sh            # into <repo>/wheelhouse (DZ_WHEELHOUSE overrides)
#
# What is missing there (read off the GPU image, 2026-11-29): av, diffusers, websockets; the rest of what the
# tests import is in the image. Versions are the project's pins (scripts/setup_env.sh). nvidia-modelopt is not
# carried: with its own needs (pulp alone is 17 MB) it does not fit the 64 MiB a device call may carry beside the
# repository; its bit-exact test runs in CI on the CPU, and on the GPU machine it skips saying it is not installed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$REPO/scripts/setup_env.sh"
OUTDIR="${DZ_WHEELHOUSE:-$REPO/wheelhouse}"
# Pinned names from DZ_PINS, plus what those need that the image lacks (with --no-deps pip fetches nothing else).
GPU_MISSING=(av diffusers websockets)
EXTRA=(importlib_metadata==8.7.0)

pins=()
for name in "${GPU_MISSING[@]}"; do
  pin=""
  for p in "${DZ_PINS[@]}"; do
    if [ "${p%%==*}" = "$name" ]; then pin="$p"; fi
  done
  if [ -z "$pin" ]; then echo "fetch_wheels.sh: $name has no pin in scripts/setup_env.sh" >&2; exit 2; fi
  pins+=("$pin")
done
mkdir -p "$OUTDIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
  -d "$OUTDIR" "${pins[@]}" "${EXTRA[@]}"
echo "== wheelhouse $OUTDIR:"
ls -la "$OUTDIR"
du -sh "$OUTDIR"
