"""Build script: pure-Python packages plus the optional CUDA extension dz_kernels._C (see CMakeLists.txt).

The CUDA build runs through CMake + pybind11 + ninja (build requirements in pyproject.toml) when nvcc is found:
- no nvcc, or DZ_SKIP_CUDA=1: one line says the extension is skipped, and the install succeeds without it;
- nvcc found and the build fails: the install fails (a kernel that does not compile must not pass CI).
Variables (documented in dz_kernels/env.py): DZ_SKIP_CUDA, DZ_CUDA_ARCHS, DZ_MAX_JOBS, CUDACXX, CUDA_HOME.
The csrc/ sources are also copied into the package (dz_kernels/_csrc) for non-editable installs, so the cupy/NVRTC
fallback can compile them at run time; an editable install reads the repository's csrc/ directly.
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# import name -> its package folder: dz_kernels at the top, dreamzero and dz_bench under the source roots model/ and bench/
PACKAGE_DIRS = {"dz_kernels": "dz_kernels", "dreamzero": "model/dreamzero", "dz_bench": "bench/dz_bench"}
CSRC_PATTERNS = ("*.cu", "*.cuh", "*.h", "*.cpp")


def _packages():
    pkgs, dirs = [], {}
    for name, folder in PACKAGE_DIRS.items():
        root = os.path.join(HERE, folder)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" not in filenames:
                continue
            rel = os.path.relpath(dirpath, root)
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            pkgs.append(pkg)
            dirs[pkg] = os.path.relpath(dirpath, HERE)
    return pkgs, dirs


def _load_env_module():
    """dz_kernels/env.py, loaded by path: importing the package would import torch, which a build may not have."""
    spec = importlib.util.spec_from_file_location("_dz_build_env", os.path.join(HERE, "dz_kernels", "env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str):
        super().__init__(name, sources=[])
        self.sourcedir = sourcedir


class CMakeBuild(build_ext):
    """Builds CMakeExtension entries with CMake + ninja; skips them (one line) when CUDA cannot be built here."""

    def run(self):
        env = _load_env_module()
        reason = None
        if env.skip_cuda():
            reason = "DZ_SKIP_CUDA is set"
        elif env.nvcc_path() is None:
            reason = "nvcc not found (set CUDACXX or CUDA_HOME to build it)"
        if reason is not None:
            print(f"dz_kernels: skipping the CUDA extension dz_kernels._C: {reason}", flush=True)
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        super().run()

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        env = _load_env_module()
        nvcc = env.nvcc_path()
        archs = env.cuda_archs()
        jobs = env.max_jobs()
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("building dz_kernels._C needs pybind11 (pip install pybind11 cmake ninja)") from e
        cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
        ninja = _tool("ninja", "ninja", "BIN_DIR")

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(out_path)
        os.makedirs(out_dir, exist_ok=True)
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake-" + ext.name)
        os.makedirs(build_dir, exist_ok=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        configure = [
            cmake, "-S", ext.sourcedir, "-B", build_dir, "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDZ_OUTPUT_DIR={out_dir}",
            f"-DDZ_EXT_SUFFIX={suffix}",
        ]
        build = [cmake, "--build", build_dir, "--parallel", str(jobs)]
        print(f"dz_kernels: building the CUDA extension for sm_{', sm_'.join(archs)} with {nvcc} "
              f"({jobs} parallel job{'s' if jobs > 1 else ''})", flush=True)
        for cmd in (configure, build):
            proc = subprocess.run(cmd, cwd=HERE)
            if proc.returncode != 0:
                raise RuntimeError(f"dz_kernels: CUDA extension build failed (exit {proc.returncode}): "
                                   f"{' '.join(cmd)}\nSet DZ_SKIP_CUDA=1 to install without it.")
        if not os.path.isfile(out_path):
            raise RuntimeError(f"dz_kernels: CMake finished but {out_path} was not produced")


def _tool(name: str, module: str, attr: str) -> str:
    """A build tool from its pip package (cmake/ninja put the binary beside the module), else from PATH."""
    try:
        mod = __import__(module)
        path = os.path.join(getattr(mod, attr), name)
        if os.path.isfile(path):
            return path
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"building dz_kernels._C needs {name} (pip install pybind11 cmake ninja)")


class BuildPyWithCsrc(build_py):
    """Also ships csrc/ inside the package (dz_kernels/_csrc) so the NVRTC fallback finds the sources."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "dz_kernels", "_csrc")
        os.makedirs(target, exist_ok=True)
        for pattern in CSRC_PATTERNS:
            for src in glob.glob(os.path.join(HERE, "csrc", pattern)):
                self.copy_file(src, os.path.join(target, os.path.basename(src)))


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"dz_kernels.configs": ["*.json"]},  # the kernels' tuned launch configurations
    ext_modules=[CMakeExtension("dz_kernels._C", sourcedir=HERE)],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithCsrc},
)
