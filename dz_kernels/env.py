"""Every environment variable that dz_kernels, its build, its benchmarks and its scripts read, in one place.

| variable | read by | default | meaning |
|---|---|---|---|
| `DZ_SKIP_CUDA` | setup.py | `0` | `1` skips building the CUDA extension `dz_kernels._C` (the install still succeeds) |
| `DZ_CUDA_ARCHS` | setup.py | `90a;100a` | CUDA architectures to compile csrc/ for, `;`- or `,`-separated (e.g. `90a`, `90a;100a`, `120f`) |
| `DZ_MAX_JOBS` | setup.py | from cores and memory | parallel compile jobs for the CUDA build (each nvcc job may take a few GiB) |
| `CUDACXX` | setup.py | unset | path of nvcc; else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH, else `/usr/local/cuda/bin/nvcc` |
| `CUDA_HOME` | setup.py | unset | CUDA toolkit root, used to find nvcc when `CUDACXX` is unset |
| `DZ_DISABLE_CUDA_EXT` | dz_kernels._ext | `0` | `1` makes `cuda_ext()` report the extension as absent (forces the cupy/torch fallbacks) |
| `DZ_CSRC_DIR` | dz_kernels._ext | the package's csrc | folder holding the `.cu` sources that the cupy (NVRTC) fallback compiles |
| `TRITON_INTERPRET` | Triton, dz_kernels, tests, dz_bench | `1` without CUDA, else unset | `1` runs Triton kernels in the CPU interpreter; when unset on a machine without CUDA, `import dz_kernels` sets it to `1` (if triton is not imported yet); `0` keeps the kernels compilable (the ahead-of-time checks) |
| `DZ_COMMIT` | dz_bench | `git rev-parse HEAD` | commit written into benchmark records (for a copy of the tree without `.git`) |
| `DZ_CONFIG_DIR` | dz_kernels.configs | unset | folder whose `<family>.json` replace the packaged kernel config tables (e.g. a tuning run's output) |
| `WORLD_SIZE` | dreamzero.train | `1` | processes in a distributed run (set by torchrun); above 1 the trainer joins the process group |
| `LOCAL_RANK` | dreamzero.train | `0` | this process's GPU on its machine (set by torchrun) |
| `DZ_VENV` | scripts/*.sh | `<repo>/.venv` | virtual environment that scripts/test.sh and scripts/bench.sh create or reuse |
| `DZ_WHEELHOUSE` | scripts/gpu_run.sh | `<repo>/wheelhouse` | folder of wheels installed (`--no-deps`) on the GPU machine when a package is missing there |
| `DZ_FAULT_AT` | dreamzero.train.checkpoint_dir | unset | tests only: the process ends at once (`os._exit`) at this point of a save (`FAULT_POINTS`), as if killed |

Booleans accept 1/0, true/false, yes/no, on/off (any case); anything else raises ValueError naming the variable.
This module uses only the standard library: setup.py loads it by path before anything is installed.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple


class EnvVar(NamedTuple):
    name: str
    read_by: str
    default: str
    meaning: str


# Keep in step with the table in the module docstring (tests/test_build.py checks that every name appears there).
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("DZ_SKIP_CUDA", "setup.py", "0", "skip building the CUDA extension dz_kernels._C"),
    EnvVar("DZ_CUDA_ARCHS", "setup.py", "90a;100a", "CUDA architectures compiled into dz_kernels._C"),
    EnvVar("DZ_MAX_JOBS", "setup.py", "auto", "parallel compile jobs for the CUDA build"),
    EnvVar("CUDACXX", "setup.py", "", "path of nvcc"),
    EnvVar("CUDA_HOME", "setup.py", "", "CUDA toolkit root (nvcc at $CUDA_HOME/bin/nvcc)"),
    EnvVar("DZ_DISABLE_CUDA_EXT", "dz_kernels._ext", "0", "report dz_kernels._C as absent (use the fallbacks)"),
    EnvVar("DZ_CSRC_DIR", "dz_kernels._ext", "", "folder of the .cu sources for the cupy/NVRTC fallback"),
    EnvVar("TRITON_INTERPRET", "triton, dz_kernels, tests, dz_bench", "1 without CUDA",
           "run Triton kernels in the CPU interpreter (set by dz_kernels when unset and no CUDA)"),
    EnvVar("DZ_COMMIT", "dz_bench", "", "commit recorded in benchmark records"),
    EnvVar("DZ_CONFIG_DIR", "dz_kernels.configs", "", "folder of kernel config tables replacing the packaged ones"),
    EnvVar("WORLD_SIZE", "dreamzero.train", "1", "processes in a distributed run (set by torchrun)"),
    EnvVar("LOCAL_RANK", "dreamzero.train", "0", "this process's GPU on its machine (set by torchrun)"),
    EnvVar("DZ_VENV", "scripts/*.sh", "<repo>/.venv", "virtual environment used by the scripts"),
    EnvVar("DZ_WHEELHOUSE", "scripts/gpu_run.sh", "<repo>/wheelhouse", "wheels installed on the GPU machine"),
    EnvVar("DZ_FAULT_AT", "dreamzero.train.checkpoint_dir", "", "tests only: end the process at this point of a save"),
)

DEFAULT_CUDA_ARCHS = ("90a", "100a")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_ARCH_RE = re.compile(r"^[0-9]{2,3}[af]?$")


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def _int(name: str, minimum: int) -> int | None:
    """An integer variable (None when unset); ValueError naming it when it is not an integer >= minimum."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


def skip_cuda() -> bool:
    """DZ_SKIP_CUDA: True when the CUDA extension should not be built."""
    return _flag("DZ_SKIP_CUDA")


def cuda_archs() -> list[str]:
    """DZ_CUDA_ARCHS as a list, e.g. ["90a", "100a"] (the default). Raises ValueError on a malformed entry."""
    raw = os.environ.get("DZ_CUDA_ARCHS", "")
    if not raw.strip():
        return list(DEFAULT_CUDA_ARCHS)
    archs = [a.strip() for a in re.split(r"[;,\s]+", raw) if a.strip()]
    bad = [a for a in archs if not _ARCH_RE.match(a)]
    if bad or not archs:
        raise ValueError(f"DZ_CUDA_ARCHS={raw!r}: expected entries like '90a' or '100a' separated by ';', "
                         f"got {bad or raw!r}")
    return archs


def _available_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return None


def max_jobs() -> int:
    """DZ_MAX_JOBS, or by default min(cores, available GiB / 3): an nvcc job for two architectures can take
    a few GiB, so memory rather than cores bounds the parallelism on small machines."""
    jobs = _int("DZ_MAX_JOBS", 1)
    if jobs is not None:
        return jobs
    cores = os.cpu_count() or 1
    mem = _available_memory_gib()
    by_mem = cores if mem is None else max(1, int(mem // 3))
    return max(1, min(cores, by_mem))


def nvcc_path() -> str | None:
    """The nvcc the build uses: CUDACXX, else $CUDA_HOME/bin/nvcc, else nvcc on PATH, else /usr/local/cuda/bin/nvcc;
    None when none of them exists."""
    import shutil

    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(on_path)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def disable_cuda_ext() -> bool:
    """DZ_DISABLE_CUDA_EXT: True when dz_kernels._ext must not load the compiled extension."""
    return _flag("DZ_DISABLE_CUDA_EXT")


def csrc_dir_override() -> str | None:
    """DZ_CSRC_DIR, or None when unset."""
    value = os.environ.get("DZ_CSRC_DIR", "").strip()
    return value or None


def triton_interpret() -> bool:
    """TRITON_INTERPRET: True when Triton kernels run in the CPU interpreter."""
    return _flag("TRITON_INTERPRET")


def interpret_without_cuda() -> str:
    """The CPU rule of dz_kernels, run when `dz_kernels` is imported: when TRITON_INTERPRET is unset (or empty),
    triton is not imported yet and torch sees no CUDA device, set TRITON_INTERPRET=1, so that triton (which reads
    it when it is imported and when it defines a kernel) runs every kernel in its CPU interpreter on CPU tensors.
    A value given (0 included: the ahead-of-time compile checks) is kept. Returns what it found:
      "given"   the variable was set;      "set"    it set TRITON_INTERPRET=1;     "cuda"  CUDA is available;
      "late"    no CUDA, but triton was imported before with the variable unset: the interpreter cannot be turned
                on any more in this process (import dz_kernels first, or set TRITON_INTERPRET=1 before Python starts);
      "no-torch" torch is not installed (nothing of dz_kernels runs kernels then)."""
    if os.environ.get("TRITON_INTERPRET", "").strip():
        return "given"
    import sys

    try:
        import torch
    except ImportError:
        return "no-torch"
    if torch.cuda.is_available():
        return "cuda"
    if "triton" in sys.modules:
        return "late"
    os.environ["TRITON_INTERPRET"] = "1"
    return "set"


def commit_override() -> str | None:
    """DZ_COMMIT, or None when unset."""
    value = os.environ.get("DZ_COMMIT", "").strip()
    return value or None


def config_dir_override() -> str | None:
    """DZ_CONFIG_DIR, or None when unset."""
    value = os.environ.get("DZ_CONFIG_DIR", "").strip()
    return value or None


def default_triton_interpret() -> None:
    """Set TRITON_INTERPRET=1 unless it is set already: a run without a GPU runs the Triton kernels in the
    interpreter. Only takes effect before triton is first imported."""
    os.environ.setdefault("TRITON_INTERPRET", "1")


def world_size() -> int:
    """WORLD_SIZE (torchrun sets it): the number of processes of the run; 1 when unset."""
    value = _int("WORLD_SIZE", 1)
    return 1 if value is None else value


def local_rank() -> int:
    """LOCAL_RANK (torchrun sets it): this process's GPU index on its machine; 0 when unset."""
    value = _int("LOCAL_RANK", 0)
    return 0 if value is None else value


def fault_at() -> str | None:
    """DZ_FAULT_AT (the kill tests' fault-injection point), or None when unset."""
    value = os.environ.get("DZ_FAULT_AT", "").strip()
    return value or None


def current_values() -> dict[str, str | None]:
    """Every documented variable and its value in this process (None when unset)."""
    return {v.name: os.environ.get(v.name) for v in ENV_VARS}
