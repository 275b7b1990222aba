"""The CUDA version of the KV-cache kernels (csrc/qk_norm_rope.cu), through the compiled extension or cupy/NVRTC.

Two ways to run the same source:
- the extension dz_kernels._C (built by CMakeLists.txt, which compiles every csrc/*.cu): its functions
  `qk_norm_rope_kv` and `kv_write` take raw device pointers (tensor.data_ptr()), element strides and the stream;
- cupy.RawModule over csrc/qk_norm_rope.cu (NVRTC; the host part of the file is behind #ifndef __CUDACC_RTC__),
  launched on torch's current stream, when the extension lacks these functions or is absent.

Callers go through dz_kernels.kv_cache.ops (backend="cuda" or "cupy"), which checks every argument first.
Supported: activations float32/bfloat16/float16, a cache in the activations' dtype or float8_e4m3fn.
"""
from __future__ import annotations

import torch

from .._common import FP8_AMAX_FLOOR, FP8_DTYPE

__all__ = ["available", "launch_qk_norm_rope_kv", "launch_kv_write", "threads_per_block", "SOURCE"]

SOURCE = "qk_norm_rope.cu"
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DTYPE_NAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def threads_per_block(H: int) -> int:
    """One warp per head, at most 8 warps: the rule of dz::qk_norm_rope_threads in csrc/qk_norm_rope.cu."""
    return 32 * max(1, min(8, H))


def _ext_with_kernels():
    """The compiled extension when it binds this file's launchers, else None."""
    try:
        from dz_kernels import _ext
    except Exception:  # the extension helper itself failed to import
        return None
    ext = _ext.cuda_ext()
    if ext is None or not (hasattr(ext, "qk_norm_rope_kv") and hasattr(ext, "kv_write")):
        return None
    return ext


def available(use_cupy: bool = False) -> tuple[bool, str | None]:
    """(True, None) when the CUDA path can run here (a CUDA device, and the extension with these kernels or cupy;
    with use_cupy=True cupy only), else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if not use_cupy and _ext_with_kernels() is not None:
        return True, None
    try:
        from dz_kernels import _ext
    except Exception as e:
        return False, f"dz_kernels._ext failed to import: {type(e).__name__}: {e}"
    ok, reason = _ext.cupy_available()
    if ok:
        return True, None
    ext_reason = _ext.cuda_ext_reason() or "dz_kernels._C does not bind qk_norm_rope_kv/kv_write"
    return False, f"extension: {ext_reason}; cupy: {reason}"


def _check_dtypes(act: torch.dtype, cache: torch.dtype) -> None:
    if act not in _DTYPE_CODE:
        raise TypeError(f"the CUDA kernels take float32/bfloat16/float16 activations, got {act}")
    if cache not in (act, FP8_DTYPE):
        raise TypeError(f"the CUDA kernels write a cache in the activations' dtype ({act}) or float8_e4m3fn; this "
                        f"cache is {cache} (use backend 'triton' or 'torch' for mixed dtypes)")


def _cupy_launch(name: str, grid: int, block: int, args: tuple, device: torch.device) -> None:
    from dz_kernels import _ext

    _ext.cupy_launch(SOURCE, name, (grid,), (block,), args, device)


def launch_qk_norm_rope_kv(q, k, v, wq, wk, eps, cos, sin, num_heads, k_cache, v_cache, k_scale, v_scale, pos,
                           q_out, use_cupy: bool = False) -> None:
    """Run dz_qk_norm_rope_kv_<act>_<cache> (arguments checked by ops.py; q_out [B, L, H, D] contiguous)."""
    ok, reason = available(use_cupy)
    if not ok:
        raise RuntimeError(f"the CUDA qk_norm_rope_kv kernel cannot run: {reason}")
    _check_dtypes(q.dtype, k_cache.dtype)
    B, L, C = q.shape
    if B * L == 0:
        return
    H, D, T = num_heads, C // num_heads, k_cache.shape[1]
    fp8 = k_cache.dtype == FP8_DTYPE
    w_f32 = int(wq.dtype == torch.float32)  # fp32 weights: the product is not rounded to the activation dtype
    ksp = k_scale.data_ptr() if fp8 else 0
    vsp = v_scale.data_ptr() if fp8 else 0
    ssb, sst = (k_scale.stride(0), k_scale.stride(1)) if fp8 else (0, 0)
    ext = None if use_cupy else _ext_with_kernels()
    if ext is not None:
        stream = torch.cuda.current_stream(q.device).cuda_stream
        ext.qk_norm_rope_kv(_DTYPE_CODE[q.dtype], int(fp8), q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(),
                            k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), wq.data_ptr(),
                            wk.data_ptr(), w_f32, cos.data_ptr(), cos.stride(0), sin.data_ptr(), sin.stride(0),
                            q_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                            k_cache.stride(1), ksp, vsp, ssb, sst, pos.data_ptr(), B, L, T, H, D, float(eps),
                            FP8_AMAX_FLOOR, stream)
        return
    import numpy as np

    name = f"dz_qk_norm_rope_kv_{_DTYPE_NAME[q.dtype]}_{'fp8' if fp8 else _DTYPE_NAME[q.dtype]}"
    i64, ptr = np.int64, np.uint64
    args = (ptr(q.data_ptr()), i64(q.stride(0)), i64(q.stride(1)), ptr(k.data_ptr()), i64(k.stride(0)),
            i64(k.stride(1)), ptr(v.data_ptr()), i64(v.stride(0)), i64(v.stride(1)), ptr(wq.data_ptr()),
            ptr(wk.data_ptr()), np.int32(w_f32), ptr(cos.data_ptr()), i64(cos.stride(0)), ptr(sin.data_ptr()),
            i64(sin.stride(0)), ptr(q_out.data_ptr()), ptr(k_cache.data_ptr()), ptr(v_cache.data_ptr()),
            i64(k_cache.stride(0)), i64(k_cache.stride(1)), ptr(ksp), ptr(vsp), i64(ssb), i64(sst),
            ptr(pos.data_ptr()), i64(L), i64(T), np.int32(H), np.int32(D), np.float32(eps),
            np.float32(FP8_AMAX_FLOOR))
    _cupy_launch(name, B * L, threads_per_block(H), args, q.device)


def launch_kv_write(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos, use_cupy: bool = False) -> None:
    """Run dz_kv_write_<act>_<cache> (arguments checked by ops.py)."""
    ok, reason = available(use_cupy)
    if not ok:
        raise RuntimeError(f"the CUDA kv_write kernel cannot run: {reason}")
    _check_dtypes(k_new.dtype, k_cache.dtype)
    B, L, H, D = k_new.shape
    if B * L == 0:
        return
    T = k_cache.shape[1]
    fp8 = k_cache.dtype == FP8_DTYPE
    ksp = k_scale.data_ptr() if fp8 else 0
    vsp = v_scale.data_ptr() if fp8 else 0
    ssb, sst = (k_scale.stride(0), k_scale.stride(1)) if fp8 else (0, 0)
    ext = None if use_cupy else _ext_with_kernels()
    if ext is not None:
        stream = torch.cuda.current_stream(k_new.device).cuda_stream
        ext.kv_write(_DTYPE_CODE[k_new.dtype], int(fp8), k_new.data_ptr(), k_new.stride(0), k_new.stride(1),
                     k_new.stride(2), v_new.data_ptr(), v_new.stride(0), v_new.stride(1), v_new.stride(2),
                     k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), ksp, vsp, ssb, sst,
                     pos.data_ptr(), B, L, T, H, D, FP8_AMAX_FLOOR, stream)
        return
    import numpy as np

    name = f"dz_kv_write_{_DTYPE_NAME[k_new.dtype]}_{'fp8' if fp8 else _DTYPE_NAME[k_new.dtype]}"
    i64, ptr = np.int64, np.uint64
    args = (ptr(k_new.data_ptr()), i64(k_new.stride(0)), i64(k_new.stride(1)), i64(k_new.stride(2)),
            ptr(v_new.data_ptr()), i64(v_new.stride(0)), i64(v_new.stride(1)), i64(v_new.stride(2)),
            ptr(k_cache.data_ptr()), ptr(v_cache.data_ptr()), i64(k_cache.stride(0)), i64(k_cache.stride(1)),
            ptr(ksp), ptr(vsp), i64(ssb), i64(sst), ptr(pos.data_ptr()), i64(L), i64(T), np.int32(H), np.int32(D),
            np.float32(FP8_AMAX_FLOOR))
    _cupy_launch(name, B * L, threads_per_block(H), args, k_new.device)
