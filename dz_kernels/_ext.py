"""The one place the compiled CUDA extension `dz_kernels._C` is imported, its NVRTC fallback, and the Python
wrappers of the kernels in csrc/.

- `cuda_ext()` returns the extension module, or None with the reason in `cuda_ext_reason()` (not built because
  nvcc was missing or DZ_SKIP_CUDA=1 at install time, disabled by DZ_DISABLE_CUDA_EXT=1, or an import error).
- `cupy_module("kv_cache.cu")` compiles csrc/kv_cache.cu with `cupy.RawModule` (NVRTC): the same source, whose host
  code is guarded by `#ifndef __CUDACC_RTC__`. cupy is optional.
- `write_rows(dst, src, offset)` writes new rows into a preallocated KV cache on the GPU through the extension,
  else cupy, else plain torch ops; `write_rows_reference` is the plain PyTorch reference.

The extension binds raw device pointers and sizes (no libtorch headers, so no ABI tie to a torch build); the
checks on dtype, device, shape and strides happen in Python (here, with the row and offset rules the KV-cache
ops share in _cache_rows.py) and raise TypeError/ValueError naming the problem.
"""
from __future__ import annotations

import importlib
import os
import threading

import torch

from dz_kernels import env
from dz_kernels._cache_rows import check_offset, check_rows_contiguous, host_offset, write_rows_masked
from dz_kernels._common import call, custom_op

__all__ = [
    "cuda_ext", "cuda_ext_reason", "csrc_dir", "cupy_available", "cupy_module", "cupy_launch", "write_rows",
    "write_rows_reference", "write_rows_backend", "WRITE_ROWS_DTYPES",
]

_EXT_MODULE = "dz_kernels._C"
_lock = threading.Lock()
_ext_state: dict = {"loaded": False, "module": None, "reason": None}
_cupy_modules: dict = {}

WRITE_ROWS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BACKENDS = ("auto", "cuda", "cupy", "torch")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def cuda_ext():
    """The compiled module `dz_kernels._C`, or None when it cannot be used here (see `cuda_ext_reason()`).

    Loaded once per process. Importing it needs no GPU (the CUDA runtime is linked statically); its functions need
    one."""
    with _lock:
        if not _ext_state["loaded"]:
            module, reason = None, None
            if env.disable_cuda_ext():
                reason = "disabled by DZ_DISABLE_CUDA_EXT=1"
            else:
                try:
                    module = importlib.import_module(_EXT_MODULE)
                except ImportError as e:
                    reason = (f"{_EXT_MODULE} is not built (the install found no nvcc, or DZ_SKIP_CUDA=1 was set; "
                              f"reinstall with nvcc on PATH to build it): {type(e).__name__}: {e}")
            _ext_state.update(loaded=True, module=module, reason=reason)
        return _ext_state["module"]


def cuda_ext_reason() -> str | None:
    """Why `cuda_ext()` is None, or None when the extension loaded."""
    cuda_ext()
    return _ext_state["reason"]


def _reset_cuda_ext() -> None:
    """Forget the loaded state so the next `cuda_ext()` tries again (for tests)."""
    with _lock:
        _ext_state.update(loaded=False, module=None, reason=None)


def csrc_dir() -> str:
    """Folder holding the csrc/*.cu sources: DZ_CSRC_DIR, else dz_kernels/_csrc (a wheel install ships a copy
    there), else the repository's csrc/ beside the package (an editable install). Raises FileNotFoundError."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    override = env.csrc_dir_override()
    candidates = [override] if override else [os.path.join(pkg, "_csrc"), os.path.join(os.path.dirname(pkg), "csrc")]
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise FileNotFoundError(f"csrc/ sources not found; looked in {candidates} (set DZ_CSRC_DIR to the folder)")


def cupy_available() -> tuple[bool, str | None]:
    """(True, None) when cupy imports, else (False, reason)."""
    try:
        importlib.import_module("cupy")
    except Exception as e:  # cupy raises more than ImportError when its CUDA libraries are missing
        return False, f"cupy is not importable: {type(e).__name__}: {e}"
    return True, None


def cupy_module(source_name: str):
    """`cupy.RawModule` compiled by NVRTC from csrc/<source_name> (e.g. "kv_cache.cu"), cached per source.

    Kernels are found with `.get_function(name)`; they have C linkage, so plain names work. Raises RuntimeError
    when cupy is missing and FileNotFoundError when the source is."""
    if os.path.basename(source_name) != source_name or not source_name.endswith(".cu"):
        raise ValueError(f"source_name must be a file name like 'kv_cache.cu' inside csrc/, got {source_name!r}")
    with _lock:
        if source_name in _cupy_modules:
            return _cupy_modules[source_name]
    ok, reason = cupy_available()
    if not ok:
        raise RuntimeError(f"the NVRTC fallback needs cupy ({reason}); install cupy-cuda13x or build the extension")
    import cupy

    folder = csrc_dir()
    path = os.path.join(folder, source_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        code = f.read()
    module = cupy.RawModule(code=code, options=("--std=c++17", f"-I{folder}"), backend="nvrtc")
    with _lock:
        _cupy_modules.setdefault(source_name, module)
        return _cupy_modules[source_name]


def cupy_launch(source_name: str, kernel_name: str, grid: tuple, block: tuple, args: tuple,
                device: torch.device) -> None:
    """Launch csrc/<source_name>'s kernel `kernel_name` through cupy (`cupy_module`) on torch's current stream of
    `device`, so it is ordered with the surrounding torch work (and captured with it in a CUDA graph)."""
    import cupy

    kernel = cupy_module(source_name).get_function(kernel_name)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        with stream:
            kernel(grid, block, args)


# ----------------------------------------------------------------------------------------------------------------
# write_rows: copy new keys/values into a preallocated cache at a device-side row offset
# ----------------------------------------------------------------------------------------------------------------
def _check_write_rows(dst, src, offset, backend) -> None:
    for name, t in (("dst", dst), ("src", src), ("offset", offset)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"write_rows: {name} must be a torch.Tensor, got {type(t).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"write_rows: backend must be one of {_BACKENDS}, got {backend!r}")
    if dst.dim() != 4 or src.dim() != 4:
        raise ValueError(f"write_rows: dst must be [B, capacity, H, D] and src [B, T, H, D]; "
                         f"got dst {tuple(dst.shape)} and src {tuple(src.shape)}")
    if dst.dtype != src.dtype:
        raise TypeError(f"write_rows: dst and src dtypes differ ({dst.dtype} vs {src.dtype})")
    if dst.dtype not in WRITE_ROWS_DTYPES:
        raise TypeError(f"write_rows: dtype {dst.dtype} is not supported; use one of {WRITE_ROWS_DTYPES}")
    B, cap, H, D = dst.shape
    if src.shape[0] != B or tuple(src.shape[2:]) != (H, D):
        raise ValueError(f"write_rows: src {tuple(src.shape)} does not match dst {tuple(dst.shape)} in B, H or D "
                         f"(expected [{B}, T, {H}, {D}])")
    if src.shape[1] > cap:
        raise ValueError(f"write_rows: src has T={src.shape[1]} rows, more than the cache capacity {cap}")
    if src.device != dst.device:
        raise ValueError(f"write_rows: dst is on {dst.device} but src is on {src.device}")
    check_offset("offset", offset, dst.device, prefix="write_rows: ")
    for name, t in (("dst", dst), ("src", src)):
        check_rows_contiguous(name, t, prefix="write_rows: ")


def write_rows_reference(dst: torch.Tensor, src: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: dst[:, o:o+T] = src with o = int(offset). Reads the offset on the host.

    dst: [B, capacity, H, D]; src: [B, T, H, D] (same dtype and device); offset: int32, one element.
    Returns dst (modified in place). Raises ValueError when o < 0 or o + T > capacity."""
    _check_write_rows(dst, src, offset, "torch")
    off, T, cap = int(offset.reshape(()).item()), src.shape[1], dst.shape[1]
    if off < 0 or off + T > cap:
        raise ValueError(f"write_rows: offset {off} with T={T} rows is outside the cache capacity {cap}")
    dst[:, off:off + T].copy_(src)
    return dst


def write_rows_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend `write_rows` uses on `device` for the requested `backend`: "cuda" (the extension), "cupy"
    (NVRTC), or "torch" (index_copy_, and the only one on CPU). Raises RuntimeError when the one asked for is
    unavailable."""
    device = torch.device(device)
    if backend not in _BACKENDS:
        raise ValueError(f"write_rows: backend must be one of {_BACKENDS}, got {backend!r}")
    if device.type != "cuda":
        if backend in ("cuda", "cupy"):
            raise ValueError(f"write_rows: backend {backend!r} needs CUDA tensors, got device {device}")
        return "torch"
    if backend == "cuda":
        if cuda_ext() is None:
            raise RuntimeError(f"write_rows: backend 'cuda' is unavailable: {cuda_ext_reason()}")
        return "cuda"
    if backend == "cupy":
        ok, reason = cupy_available()
        if not ok:
            raise RuntimeError(f"write_rows: backend 'cupy' is unavailable: {reason}")
        return "cupy"
    if backend == "torch":
        return "torch"
    if cuda_ext() is not None:
        return "cuda"
    if cupy_available()[0]:
        return "cupy"
    return "torch"


def _vector_bytes(dst_ptr, src_ptr, row_bytes, *strides) -> int:
    """Same rule as dz::write_rows_vector_bytes in csrc/kv_cache.cu: the widest of 16/8/4/2/1 bytes that divides
    both addresses, the row size and every stride."""
    bits = dst_ptr | src_ptr | row_bytes
    for s in strides:
        bits |= s
    for w in (16, 8, 4, 2):
        if bits % w == 0:
            return w
    return 1


def _launch_shape(units: int, rows: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Same launch shape as launch_shape() in csrc/kv_cache.cu: (grid, block)."""
    tx = min(256, ((units + 31) // 32) * 32)
    ty = 256 // tx
    return (min(-(-units // tx), 65535), min(-(-rows // ty), 65535), 1), (tx, ty, 1)


def _byte_geometry(dst, src):
    """(B, T, capacity, row_bytes, dst_bstride, dst_tstride, src_bstride, src_tstride), strides in bytes; the
    stride of a size-1 dim is set to 0 so it cannot spoil the alignment."""
    es = dst.element_size()
    B, cap, H, D = dst.shape
    T = src.shape[1]

    def stride(t, dim):
        return 0 if t.shape[dim] == 1 else t.stride(dim) * es

    return B, T, cap, H * D * es, stride(dst, 0), stride(dst, 1), stride(src, 0), stride(src, 1)


def _write_rows_cuda(dst, src, offset):
    ext = cuda_ext()
    geo = _byte_geometry(dst, src)
    with torch.cuda.device(dst.device):
        stream = torch.cuda.current_stream(dst.device).cuda_stream
        ext.write_rows(dst.data_ptr(), src.data_ptr(), offset.data_ptr(), *geo, stream)


def _write_rows_cupy(dst, src, offset):
    import numpy as np

    B, T, cap, row_bytes, dbs, dts, sbs, sts = _byte_geometry(dst, src)
    if B == 0 or T == 0 or row_bytes == 0:
        return
    w = _vector_bytes(dst.data_ptr(), src.data_ptr(), row_bytes, dbs, dts, sbs, sts)
    units = row_bytes // w
    grid, block = _launch_shape(units, B * T)
    args = (np.uint64(dst.data_ptr()), np.uint64(src.data_ptr()), np.uint64(offset.data_ptr()),
            np.int64(B), np.int64(T), np.int64(cap), np.int64(units),
            np.int64(dbs // w), np.int64(dts // w), np.int64(sbs // w), np.int64(sts // w))
    cupy_launch("kv_cache.cu", f"dz_write_rows_v{w}", grid, block, args, dst.device)


@custom_op("dz_kernels::write_rows", mutates_args=("dst",))
def _write_rows_op(dst: torch.Tensor, src: torch.Tensor, offset: torch.Tensor, backend: str, check: bool) -> None:
    T, cap = src.shape[1], dst.shape[1]
    off = host_offset(offset, dst.device) if check else None
    if off is not None and (off < 0 or off + T > cap):
        raise ValueError(f"write_rows: offset {off} with T={T} rows is outside the cache capacity {cap}")
    chosen = write_rows_backend(dst.device, backend)
    if chosen == "cuda":
        _write_rows_cuda(dst, src, offset)
    elif chosen == "cupy":
        _write_rows_cupy(dst, src, offset)
    else:       # index_copy_ with the offset kept on the device; out of range it writes nothing, like the kernels
        write_rows_masked([(dst, src)], offset)


@_write_rows_op.register_fake
def _write_rows_fake(dst, src, offset, backend, check):
    return None


def write_rows(dst: torch.Tensor, src: torch.Tensor, offset: torch.Tensor, backend: str = "auto",
               check: bool = True) -> torch.Tensor:
    """Write new keys/values into a preallocated cache: dst[:, o:o+T] = src, o read from the `offset` tensor.

    dst:    [B, capacity, H, D] bf16/fp16/fp32, modified in place; each [H, D] row contiguous (batch and token
            strides are free, so a slice of a larger cache works).
    src:    [B, T, H, D], same dtype and device, rows contiguous likewise.
    offset: int32 tensor with one element, on dst's device. The kernel reads it on the device, so the call can be
            captured in a CUDA graph and replayed after the offset tensor is advanced in place.
    backend: "auto" (the extension, else cupy/NVRTC, else torch), "cuda", "cupy" or "torch".
    check:  read the offset on the host and raise ValueError when o < 0 or o + T > capacity (one device sync). It is
            skipped while a CUDA graph is being captured; without the check an out-of-range offset writes nothing.
    Returns dst. Registered as the custom op torch.ops.dz_kernels.write_rows (torch.compile and CUDA graphs work).

    Example::
        cache = torch.zeros(2, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
        pos = torch.tensor([0], dtype=torch.int32, device="cuda")
        write_rows(cache, new_k, pos)   # new_k: [2, T, 8, 128]
        pos += T
    """
    _check_write_rows(dst, src, offset, backend)
    call(_write_rows_op, dst, src, offset, backend, check)
    return dst
