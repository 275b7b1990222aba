#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment: pinned dependencies, then an editable install of the repo,
# which compiles csrc/ into dz_kernels._C where nvcc exists (setup.py; DZ_SKIP_CUDA=1 skips it).
# Shared by .ci/run, scripts/test.sh and scripts/bench.sh.
#
#   bash scripts/setup_env.sh [VENV]                 # default VENV: $DZ_VENV, else <repo>/.venv
#   source scripts/setup_env.sh; dz_setup_env [VENV]  # the same, and sets DZ_PY to the venv's python
#
# A stamp in the venv (a hash of the pins, the build files, csrc/ and the build switches) skips the install when
# nothing it depends on changed. Python edits need no reinstall (editable); csrc/ edits trigger a rebuild.

DZ_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Exact versions (torch 2.13.0 is the CPU wheel on this machine's disk; pip finds it through its find-links).
# nvidia-modelopt (the ModelOpt bit-exact tests) needs torch >= 2.8 and keeps this torch: its own new dependencies
# are the last three pins (about 10 s more on top of the rest).
DZ_BOOTSTRAP_PINS=(pip==26.3 setuptools==84.2.1 wheel==0.48.0)
DZ_PINS=(
  torch==2.13.0 triton==3.9.0 numpy==2.4.6 pytest==9.2.0 safetensors==0.8.0 scipy==1.17.1 tqdm==4.70.1
  matplotlib==3.11.2 msgpack==1.2.4 websockets==17.4 transformers==5.23.0 diffusers==0.42.1 av==18.1.0
  pyarrow==26.0.1 pybind11==3.1.0 cmake==4.4.5 ninja==1.13.2 tensorboard==2.21.0
  nvidia-modelopt==0.47.0 nvidia-ml-py==13.615.71 omegaconf==2.4.0 pulp==3.3.2
)

_dz_stamp() {
  {
    printf '%s\n' "${DZ_BOOTSTRAP_PINS[@]}" "${DZ_PINS[@]}"
    echo "DZ_SKIP_CUDA=${DZ_SKIP_CUDA:-} DZ_CUDA_ARCHS=${DZ_CUDA_ARCHS:-} nvcc=$(command -v nvcc || true)"
    (cd "$DZ_REPO" && cat setup.py pyproject.toml CMakeLists.txt dz_kernels/env.py csrc/* 2>/dev/null) || true
  } | sha256sum | cut -d' ' -f1
}

dz_setup_env() {
  local venv="${1:-${DZ_VENV:-$DZ_REPO/.venv}}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating virtual environment $venv"
    python3 -m venv "$venv"
  fi
  DZ_PY="$venv/bin/python"
  export DZ_PY
  local stamp
  stamp="$(_dz_stamp)"
  if [ -f "$venv/.dz-setup-stamp" ] && [ "$(cat "$venv/.dz-setup-stamp")" = "$stamp" ]; then
    echo "== reusing $venv (dependencies and build inputs unchanged)"
    return 0
  fi
  rm -f "$venv/.dz-setup-stamp"
  echo "== installing pinned dependencies into $venv"
  "$DZ_PY" -m pip install --quiet "${DZ_BOOTSTRAP_PINS[@]}"
  "$DZ_PY" -m pip install --quiet "${DZ_PINS[@]}"
  echo "== installing dz-kernels (editable; compiles csrc/ when nvcc is present)"
  "$DZ_PY" -m pip install --no-build-isolation --no-deps -e "$DZ_REPO"
  "$DZ_PY" -m pip check
  echo "$stamp" > "$venv/.dz-setup-stamp"
}

# Fails when nvcc is present (and DZ_SKIP_CUDA unset) but dz_kernels._C did not build or does not import.
dz_check_ext() {
  "${1:-$DZ_PY}" - <<'PY'
from dz_kernels import _ext, env
if env.skip_cuda():
    print("== DZ_SKIP_CUDA is set: dz_kernels._C is not expected")
elif env.nvcc_path() is None:
    print("== no nvcc here: dz_kernels._C is not expected")
else:
    ext = _ext.cuda_ext()
    if ext is None:
        raise SystemExit(f"nvcc is present but dz_kernels._C is missing: {_ext.cuda_ext_reason()}")
    print(f"== dz_kernels._C built for {ext.compiled_archs}: {ext.__file__}")
PY
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  dz_setup_env "$@"
  dz_check_ext
fi
