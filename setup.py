"""Build script: pure-Python packages plus the optional CUDA extension (see CMakeLists.txt)."""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# import name -> folder
PACKAGE_DIRS = {"dz_kernels": "dz_kernels", "dreamzero": "model", "dz_bench": "bench"}


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


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
