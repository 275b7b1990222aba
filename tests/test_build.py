"""Build, extension loader, env vars, and the KV-cache row write (dz_kernels._ext.write_rows).

Env parsing, the loader's report of an absent extension, error messages, nvcc compiling every csrc/*.cu for sm_90a
and sm_100a, a build that fails loudly, the NVRTC-safety of the sources. The row write runs on the suite's device
(tests/conftest.py) with every backend that runs there (the torch path everywhere; the extension and cupy on a
GPU, skipped elsewhere with the reason) against exact copies with NaN-poisoned caches; CUDA graphs on a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dz_kernels import _ext, env
from dz_kernels.testing import poisoned

from conftest import DEVICE, requires_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
NVCC = env.nvcc_path()
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDACXX, CUDA_HOME, PATH)")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def fresh_ext():
    """Reset the loader before and after, so a test's env var does not leak into the rest of the run."""
    _ext._reset_cuda_ext()
    yield
    _ext._reset_cuda_ext()


# ----------------------------------------------------------------------------------------------------------------
# env.py
# ----------------------------------------------------------------------------------------------------------------
def test_every_env_var_is_in_the_docstring_table():
    for var in env.ENV_VARS:
        assert f"| `{var.name}` |" in env.__doc__, f"{var.name} missing from the table in dz_kernels/env.py"
    names = re.findall(r"^\| `([A-Z_]+)` \|", env.__doc__, flags=re.M)
    assert sorted(names) == sorted(v.name for v in env.ENV_VARS)


def test_env_parsing(monkeypatch):
    monkeypatch.delenv("DZ_CUDA_ARCHS", raising=False)
    assert env.cuda_archs() == ["90a", "100a"]
    monkeypatch.setenv("DZ_CUDA_ARCHS", "90a, 120f")
    assert env.cuda_archs() == ["90a", "120f"]
    monkeypatch.setenv("DZ_CUDA_ARCHS", "sm_90a")
    with pytest.raises(ValueError, match="DZ_CUDA_ARCHS"):
        env.cuda_archs()
    for raw, expected in (("1", True), ("TRUE", True), ("on", True), ("0", False), ("", False), ("no", False)):
        monkeypatch.setenv("DZ_SKIP_CUDA", raw)
        assert env.skip_cuda() is expected
    monkeypatch.setenv("DZ_SKIP_CUDA", "maybe")
    with pytest.raises(ValueError, match="DZ_SKIP_CUDA"):
        env.skip_cuda()
    monkeypatch.setenv("DZ_MAX_JOBS", "3")
    assert env.max_jobs() == 3
    monkeypatch.setenv("DZ_MAX_JOBS", "0")
    with pytest.raises(ValueError, match="DZ_MAX_JOBS"):
        env.max_jobs()
    monkeypatch.delenv("DZ_MAX_JOBS")
    assert 1 <= env.max_jobs() <= (os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------------------
def test_loader_reports_disabled_extension(monkeypatch, fresh_ext):
    monkeypatch.setenv("DZ_DISABLE_CUDA_EXT", "1")
    assert _ext.cuda_ext() is None
    assert "DZ_DISABLE_CUDA_EXT" in _ext.cuda_ext_reason()


def test_loader_reports_missing_extension(monkeypatch, fresh_ext):
    monkeypatch.delenv("DZ_DISABLE_CUDA_EXT", raising=False)
    monkeypatch.setattr(_ext, "_EXT_MODULE", "dz_kernels._C_not_there")
    assert _ext.cuda_ext() is None
    reason = _ext.cuda_ext_reason()
    assert "not built" in reason and "ModuleNotFoundError" in reason
    # without the extension and without cupy, "auto" on a GPU resolves to the torch path; "cuda" names the reason
    monkeypatch.setattr(_ext, "cupy_available", lambda: (False, "cupy is not importable: test"))
    assert _ext.write_rows_backend("cuda", "auto") == "torch"
    with pytest.raises(RuntimeError, match="not built"):
        _ext.write_rows_backend("cuda", "cuda")
    with pytest.raises(RuntimeError, match="cupy"):
        _ext.write_rows_backend("cuda", "cupy")


def test_csrc_dir_and_cupy_module_errors(monkeypatch, tmp_path):
    assert os.path.isfile(os.path.join(_ext.csrc_dir(), "kv_cache.cu"))
    monkeypatch.setenv("DZ_CSRC_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="DZ_CSRC_DIR"):
        _ext.csrc_dir()
    monkeypatch.delenv("DZ_CSRC_DIR")
    with pytest.raises(ValueError, match="file name"):
        _ext.cupy_module("../setup.py")
    monkeypatch.setattr(_ext, "cupy_available", lambda: (False, "cupy is not importable: test"))
    monkeypatch.setattr(_ext, "_cupy_modules", {})
    with pytest.raises(RuntimeError, match="needs cupy"):
        _ext.cupy_module("kv_cache.cu")


def _built_ext():
    ext = _ext.cuda_ext()
    if ext is None:
        pytest.skip(f"dz_kernels._C is not built here: {_ext.cuda_ext_reason()}")
    return ext


def test_built_extension_holds_the_configured_archs(fresh_ext):
    ext = _built_ext()
    archs = ext.compiled_archs.split(",")
    assert archs and all(re.fullmatch(r"[0-9]{2,3}[af]?", a) for a in archs), ext.compiled_archs
    with open(ext.__file__, "rb") as f:
        blob = f.read()
    for arch in archs:
        assert f"sm_{arch}".encode() in blob, f"no sm_{arch} code in {ext.__file__}"
    assert ext.cuda_runtime_version() >= 12000


def test_extension_vector_width_matches_python_rule(fresh_ext):
    """The host helper needs no GPU: the Python copy of the rule (used by the cupy path) must agree with it."""
    ext = _built_ext()
    base = 1 << 20
    for dst_off in (0, 2, 4, 8, 16):
        for src_off in (0, 4, 16):
            for row_bytes in (2, 6, 8, 24, 256, 4096):
                for tstride in (row_bytes, row_bytes * 3, 2 * row_bytes + 8):
                    args = (base + dst_off, base + src_off, row_bytes, 0, tstride, 0, row_bytes)
                    assert ext.write_rows_vector_bytes(*args) == _ext._vector_bytes(*args), args


def test_extension_rejects_bad_arguments_before_launch(fresh_ext):
    ext = _built_ext()
    with pytest.raises(ValueError, match="null device pointer"):
        ext.write_rows(0, 0, 0, 1, 1, 4, 16, 0, 16, 0, 16, 0)
    with pytest.raises(ValueError, match="capacity"):
        ext.write_rows(16, 16, 16, 1, 5, 4, 16, 0, 16, 0, 16, 0)


# ----------------------------------------------------------------------------------------------------------------
# Compiling the sources
# ----------------------------------------------------------------------------------------------------------------
@requires_nvcc
@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("name", CU_FILES)
def test_nvcc_compiles_csrc(name, arch, tmp_path):
    """Every source compiles for the architectures setup.py builds, without a warning."""
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-I", CSRC, "-c", os.path.join(CSRC, name), "-o",
           str(tmp_path / (name + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
    assert os.path.getsize(tmp_path / (name + ".o")) > 0


NVRTC_HEADERS = {"cuda_bf16.h", "cuda_fp16.h", "cuda_fp8.h", "cuda_fp4.h"}


def _nvrtc_visible_lines(text: str) -> list[str]:
    """Lines NVRTC would see: those outside `#ifndef __CUDACC_RTC__` blocks (nested #if's followed, #else flips)."""
    stack: list[bool] = []  # per open #if: True while its current branch is hidden from NVRTC
    visible = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#if"):
            stack.append(s.split()[:2] == ["#ifndef", "__CUDACC_RTC__"]
                         or s.replace(" ", "").startswith("#if!defined(__CUDACC_RTC__)"))
        elif s.startswith("#else") and stack:
            stack[-1] = False  # the #else of a host-only block is NVRTC's; other #else branches stay visible
        elif s.startswith("#endif") and stack:
            stack.pop()
        elif not any(stack):
            visible.append(line)
    return visible


def _nvrtc_visible_includes(text: str) -> list[str]:
    return [re.sub(r"^#include\s*[<\"]([^>\"]+)[>\"].*$", r"\1", line.strip())
            for line in _nvrtc_visible_lines(text) if line.strip().startswith("#include")]


def test_nvrtc_visible_includes_parser():
    src = "#include <cuda_bf16.h>\n#ifndef __CUDACC_RTC__\n#include <cstdint>\n#if X\n#include <a.h>\n#endif\n" \
          "#endif\n#include \"b.h\"\n"
    assert _nvrtc_visible_includes(src) == ["cuda_bf16.h", "b.h"]


@pytest.mark.parametrize("name", CU_FILES)
def test_cu_sources_are_nvrtc_safe(name):
    """NVRTC (the cupy fallback) cannot open <cstdint>, <cuda_runtime.h> or other host headers: everything but the
    CUDA type headers must sit inside #ifndef __CUDACC_RTC__."""
    with open(os.path.join(CSRC, name)) as f:
        text = f.read()
    bad = [h for h in _nvrtc_visible_includes(text) if h not in NVRTC_HEADERS]
    assert not bad, f"{name}: {bad} are visible to NVRTC; guard them with #ifndef __CUDACC_RTC__"
    code = [line.split("//")[0] for line in _nvrtc_visible_lines(text)]
    fixed = [line for line in code if re.search(r"\b(u?int(8|16|32|64)_t|size_t)\b", line)]
    assert not fixed, f"{name}: NVRTC has no <cstdint>; use long long/int in kernels: {fixed}"


def _copy_build_tree(dst, with_kernels=True):
    for name in ("setup.py", "CMakeLists.txt", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, name), dst / name)
    shutil.copytree(CSRC, dst / "csrc", ignore=None if with_kernels else shutil.ignore_patterns("*.cu"))
    (dst / "dz_kernels").mkdir()
    shutil.copy(os.path.join(REPO, "dz_kernels", "env.py"), dst / "dz_kernels" / "env.py")
    (dst / "dz_kernels" / "__init__.py").write_text("")


def test_build_skips_cuda_with_one_line(tmp_path):
    _copy_build_tree(tmp_path)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, DZ_SKIP_CUDA="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping the CUDA extension dz_kernels._C: DZ_SKIP_CUDA is set" in proc.stdout
    assert not list(tmp_path.rglob("_C*.so")), "the extension was built although DZ_SKIP_CUDA=1"


@requires_nvcc
def test_build_fails_loudly_when_a_kernel_does_not_compile(tmp_path):
    pytest.importorskip("pybind11", reason="the CUDA build needs pybind11 (a build requirement)")
    pytest.importorskip("cmake", reason="the CUDA build needs cmake from pip (a build requirement)")
    _copy_build_tree(tmp_path, with_kernels=False)  # the broken kernel alone: fails fast
    (tmp_path / "csrc" / "broken.cu").write_text("__global__ void broken_kernel() { this is not cuda; }\n")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, DZ_CUDA_ARCHS="90a"))
    assert proc.returncode != 0, "a CUDA build with a broken kernel must fail"
    assert "CUDA extension build failed" in proc.stdout + proc.stderr
    assert "broken.cu" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# write_rows on the suite's device: every backend that runs there against the reference; errors
# ----------------------------------------------------------------------------------------------------------------
def _backends():
    """"auto" and "torch" everywhere; the extension ("cuda") and cupy where they run (a GPU), else skipped."""
    out = ["auto", "torch"]
    for name in ("cuda", "cupy"):
        reason = None
        if DEVICE.type != "cuda":
            reason = "needs a CUDA GPU; none on this machine"
        else:
            try:
                _ext.write_rows_backend("cuda", name)
            except RuntimeError as e:
                reason = str(e)
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")))
    return out


def _case(B, cap, T, H, D, dtype):
    dst = poisoned((B, cap, H, D), dtype, DEVICE)
    src = torch.randn(B, T, H, D).to(DEVICE, dtype)
    return dst, src


def _assert_written(dst, src, off):
    T = src.shape[1]
    assert torch.equal(dst[:, off:off + T], src), "written rows differ from src"
    assert torch.isnan(dst[:, :off]).all() and torch.isnan(dst[:, off + T:]).all(), "rows outside were touched"


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


SHAPES = [(1, 7, 3, 1, 5, 4), (2, 33, 5, 3, 24, 0), (3, 65, 17, 2, 64, 48), (2, 9, 9, 4, 8, 0), (1, 40, 1, 5, 128, 39),
          pytest.param((3, 300, 129, 8, 128, 100), marks=requires_cuda),
          pytest.param((2, 4096, 1785, 4, 64, 2000), marks=requires_cuda)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", _backends())
def test_write_rows_matches_reference(backend, shape, dtype):
    B, cap, T, H, D, off = shape
    dst, src = _case(B, cap, T, H, D, dtype)
    for offset in (torch.tensor([off], dtype=torch.int32, device=DEVICE), torch.tensor(off, dtype=torch.int32,
                                                                                        device=DEVICE)):
        ref = _ext.write_rows_reference(dst.clone(), src, offset)
        _assert_written(ref, src, off)
        out = dst.clone()
        assert _ext.write_rows(out, src, offset, backend=backend) is out
        _sync()
        _assert_written(out, src, off)
        assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))


@pytest.mark.parametrize("backend", _backends())
def test_strided_cache_and_source(backend):
    """dst a layer slice of a bigger cache, src a strided part of a fused tensor; odd row sizes (2-byte accesses)
    and a misaligned base (storage offset) for the vectorized CUDA path."""
    full = poisoned((3, 2, 20, 4, 16), torch.bfloat16, DEVICE)  # [layers, B, cap, H, D]
    kv = torch.randn(2, 6, 2, 4, 16).to(DEVICE, torch.bfloat16)
    dst, src = full[1], kv[:, :, 0]
    _ext.write_rows(dst, src, torch.tensor([11], dtype=torch.int32, device=DEVICE), backend=backend)
    _sync()
    _assert_written(dst, src, 11)
    assert torch.isnan(full[0]).all() and torch.isnan(full[2]).all()
    full = poisoned((2, 3, 50, 3, 7), torch.float16, DEVICE)
    dst = full[:, 1]
    src = torch.randn(3, 9, 2, 3, 7).to(DEVICE, torch.float16)[:, :, 1][1:]
    _ext.write_rows(dst, src, torch.tensor(13, dtype=torch.int32, device=DEVICE), backend=backend)
    _sync()
    _assert_written(dst, src, 13)
    assert torch.isnan(full[:, 0]).all() and torch.isnan(full[:, 2]).all()


@pytest.mark.parametrize("backend", _backends())
def test_out_of_range_offset(backend):
    """check=True raises naming the offset; check=False (graph capture) writes nothing."""
    dst, src = _case(2, 10, 4, 2, 8, torch.float32)
    for off in (7, -1, 10):
        offset = torch.tensor([off], dtype=torch.int32, device=DEVICE)
        with pytest.raises(ValueError, match=f"offset {off} with T=4 rows is outside the cache capacity 10"):
            _ext.write_rows(dst, src, offset, backend=backend)
        with pytest.raises(ValueError, match="outside the cache capacity"):
            _ext.write_rows_reference(dst, src, offset)
        _ext.write_rows(dst, src, offset, backend=backend, check=False)
        _sync()
        assert torch.isnan(dst).all()


def test_error_messages():
    """Argument checks (CPU tensors on every machine)."""
    dst, src = poisoned((2, 10, 2, 8), torch.float32), torch.randn(2, 4, 2, 8)
    off = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(TypeError, match="src must be a torch.Tensor"):
        _ext.write_rows(dst, src.numpy(), off)
    with pytest.raises(ValueError, match=r"dst must be \[B, capacity, H, D\]"):
        _ext.write_rows(dst[0], src, off)
    with pytest.raises(TypeError, match="dtypes differ"):
        _ext.write_rows(dst, src.half(), off)
    with pytest.raises(TypeError, match="not supported"):
        _ext.write_rows(dst.double(), src.double(), off)
    with pytest.raises(ValueError, match="does not match dst"):
        _ext.write_rows(dst, src[:, :, :1], off)
    with pytest.raises(ValueError, match="does not match dst"):
        _ext.write_rows(dst, src[:1], off)
    with pytest.raises(ValueError, match="more than the cache capacity"):
        _ext.write_rows(dst, torch.randn(2, 11, 2, 8), off)
    with pytest.raises(TypeError, match="offset must be a one-element int32 tensor"):
        _ext.write_rows(dst, src, off.long())
    with pytest.raises(ValueError, match=r"offset must be a one-element int32 tensor \(shape \[\] or \[1\]\)"):
        _ext.write_rows(dst, src, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be contiguous"):
        _ext.write_rows(dst, src.transpose(2, 3).contiguous().transpose(2, 3), off)
    with pytest.raises(ValueError, match="backend must be one of"):
        _ext.write_rows(dst, src, off, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _ext.write_rows(dst, src, off, backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _ext.write_rows(dst, src, off, backend="cupy")


def test_custom_op_compiles_fullgraph():
    """torch.compile(fullgraph) of the custom op: inductor on a GPU, aot_eager on a CPU (no C++ toolchain needed)."""
    dst, src = _case(2, 12, 3, 2, 8, torch.float16)
    off = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    fn = torch.compile(lambda d, s, o: _ext.write_rows(d, s, o), fullgraph=True,
                       backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    fn(dst, src, off)
    _sync()
    _assert_written(dst, src, 5)


@requires_cuda
@pytest.mark.parametrize("backend", _backends())
def test_gpu_cuda_graph_replay_follows_the_offset(backend):
    dst, src = _case(2, 64, 8, 4, 64, torch.bfloat16)
    offset = torch.zeros(1, dtype=torch.int32, device="cuda")
    _ext.write_rows(dst, src, offset, backend=backend)  # warm-up (compiles the cupy module outside capture)
    dst.fill_(float("nan"))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _ext.write_rows(dst, src, offset, backend=backend)
    for step in range(3):
        offset.fill_(8 * step + 3)
        graph.replay()
    torch.cuda.synchronize()
    for step in range(3):
        assert torch.equal(dst[:, 8 * step + 3: 8 * step + 11], src)
    assert torch.isnan(dst[:, :3]).all() and torch.isnan(dst[:, 27:]).all()
