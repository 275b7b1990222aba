"""The KV-cache ops: argument checks, backend choice, torch.library custom ops, public functions.

Two ops, each with four interchangeable backends (same contract, same numerics):

- ``qk_norm_rope_kv_write``: the fused projection epilogue of one layer -- RMSNorm of q and k over the full hidden
  size with their weights, RoPE in fp32 from per-token cos/sin, the rotated q as output, the rotated k and the v
  written into their cache rows (quantized when the cache is FP8).
- ``kv_cache_write``: only the cache write, for keys that are already normalized and rotated.

Backends: "triton" (triton_kernels.py; the default where the kernels run in the CPU interpreter, and on CUDA unless
the config table says "cuda" for the cache dtype), "cuda" (csrc/qk_norm_rope.cu through the compiled extension
dz_kernels._C, else the same source through cupy/NVRTC), "cupy"
(NVRTC only), "torch" (the plain reference chain of reference.py; the default on a CPU without the interpreter).
"auto" picks the default. Each op is a custom op in the ``dz`` namespace that mutates the cache tensors, with a
fake implementation, so torch.compile (fullgraph) traces it and CUDA graphs capture it: the write position is a
one-element int32 tensor on the device, read by the kernel, never by the host (unless ``check=True``).
The ops are inference-only (no autograd: they write into a cache).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._cache_rows import check_offset, check_rows_contiguous, host_offset, write_rows_masked
from .._common import FP8_DTYPE, call, custom_op, empty, kernels_interpreted
from . import reference as ref

__all__ = ["qk_norm_rope_kv_write", "kv_cache_write", "resolve_backend", "BACKENDS", "ACT_DTYPES", "CACHE_DTYPES"]

BACKENDS = ("auto", "triton", "cuda", "cupy", "torch")
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CACHE_DTYPES = ACT_DTYPES + (FP8_DTYPE,)


def resolve_backend(device, backend: str = "auto", cache_dtype: Optional[torch.dtype] = None,
                    act_dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs on `device` for the requested one ("auto": on CUDA the config table's choice for the
    cache dtype (dz_kernels/configs/kv_cache.json, kind backend: "triton" unless a tuning run measured the CUDA
    kernels faster; "cuda" only where they can run these dtypes), where the kernels run in the Triton interpreter
    "triton", else "torch"). Raises ValueError for an unknown name or one that cannot run on that device;
    availability of "cuda"/"cupy" (extension built, cupy installed) is checked when they launch."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return _table_backend(device, cache_dtype, act_dtype)
        return "triton" if kernels_interpreted() else "torch"
    if backend == "triton" and device.type != "cuda" and not kernels_interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                         f"the tensors are on {device}")
    if backend in ("cuda", "cupy") and device.type != "cuda":
        raise ValueError(f"backend {backend!r} needs CUDA tensors; the tensors are on {device}")
    return backend


def _table_backend(device, cache_dtype, act_dtype) -> str:
    from dz_kernels import configs

    key = {} if cache_dtype is None else {"cache": configs.dtype_name(cache_dtype)}
    choice = configs.lookup("kv_cache", "backend", configs.arch_of(device), **key).config["backend"]
    if choice not in ("triton", "cuda"):
        raise ValueError(f"config table kv_cache: backend {choice!r} is not 'triton' or 'cuda'")
    if choice == "cuda":
        from . import cuda as kv_cuda

        dtypes_ok = act_dtype is None or (act_dtype in ACT_DTYPES and cache_dtype in (None, act_dtype, FP8_DTYPE))
        if not (dtypes_ok and kv_cuda.available()[0]):
            choice = "triton"
    return choice


# ---------------------------------------------------------------------------------------------------------- checks
def _is_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_cache(k_cache, v_cache, k_scale, v_scale, B: int, H: int, D: int, device) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _is_tensor(name, t)
        if t.dim() != 4 or t.shape[0] != B or tuple(t.shape[2:]) != (H, D):
            raise ValueError(f"{name} must be [B, T, H, D] = [{B}, T, {H}, {D}], got {tuple(t.shape)}")
        if t.dtype not in CACHE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16, float8_e4m3fn")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
        check_rows_contiguous(name, t)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or v_cache.stride() != k_cache.stride():
        raise ValueError(f"k_cache and v_cache must have the same shape, dtype and strides; got {tuple(k_cache.shape)} "
                         f"{k_cache.dtype} {k_cache.stride()} and {tuple(v_cache.shape)} {v_cache.dtype} "
                         f"{v_cache.stride()}")
    T = k_cache.shape[1]
    if k_cache.dtype == FP8_DTYPE:
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if t is None:
                raise ValueError(f"an FP8 cache needs {name} [B, T, H] float32 (one scale per token and head)")
            _is_tensor(name, t)
            if tuple(t.shape) != (B, T, H) or t.dtype != torch.float32:
                raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}] float32, got {tuple(t.shape)} {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
            if (H > 1 and t.stride(2) != 1) or min(t.stride()) < 0:
                raise ValueError(f"{name} must be contiguous along heads (strides {t.stride()})")
        if v_scale.stride() != k_scale.stride():
            raise ValueError(f"k_scale and v_scale must have the same strides, got {k_scale.stride()} and "
                             f"{v_scale.stride()}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale/v_scale are only used with a float8_e4m3fn cache; this cache is {k_cache.dtype}")


def _check_distinct(k_cache, v_cache, k_scale, v_scale) -> None:
    """The keys and the values need their own memory: with one tensor (or two views of the same elements) passed
    as both, the values would overwrite the keys without a word. (_check_cache has already made the shapes, dtypes
    and strides equal, so an equal data pointer means the very same elements. Under torch.compile, which cannot
    trace data pointers, the check is identity only.)"""
    pairs = [("k_cache", k_cache, "v_cache", v_cache)]
    if isinstance(k_scale, torch.Tensor) and isinstance(v_scale, torch.Tensor):
        pairs.append(("k_scale", k_scale, "v_scale", v_scale))
    for na, a, nb, b in pairs:
        if a is b or (not torch.compiler.is_compiling() and a.numel() and a.data_ptr() == b.data_ptr()):
            raise ValueError(f"{na} and {nb} are the same memory: pass two separate tensors (the values would "
                             f"overwrite the keys)")


def _check_pos(pos, device) -> None:
    _is_tensor("pos", pos)
    check_offset("pos", pos, device)


def _host_range_check(pos, L: int, T: int, check: bool, device) -> None:
    p = host_offset(pos, device) if check and L else None
    if p is not None and (p < 0 or p + L > T):
        raise ValueError(f"cache rows [{p}, {p + L}) are outside the cache's {T} rows")


def _check_no_grad(*ts) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts):
        raise ValueError("the KV-cache ops are inference-only (they write into a cache, no backward); run them "
                         "under torch.no_grad() / torch.inference_mode()")


def _check_fused(q, k, v, wq, wk, eps, cos, sin, num_heads, k_cache, v_cache, k_scale, v_scale, pos) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("wq", wq), ("wk", wk), ("cos", cos), ("sin", sin)):
        _is_tensor(name, t)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, L, C], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape [B, L, C]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in ACT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float32, bfloat16, float16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, L, C = q.shape
    if not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing the hidden size C={C}")
    D = C // num_heads
    if D % 2:
        raise ValueError(f"head dim {D} (C={C} / {num_heads} heads) must be even: RoPE rotates pairs")
    device = q.device
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
        if C > 1 and t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (strides {t.stride()}); the batch and row "
                             f"strides may be anything (e.g. a slice of a fused qkv projection)")
        if min(t.stride()) < 0:
            raise ValueError(f"{name} has a negative stride {t.stride()}")
    for name, w in (("wq", wq), ("wk", wk)):
        if tuple(w.shape) != (C,):
            raise ValueError(f"{name} must be [C] = [{C}], got {tuple(w.shape)}")
        if w.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"{name} has dtype {w.dtype}; it must be q's dtype ({q.dtype}) or float32")
        if w.device != device:
            raise ValueError(f"{name} is on {w.device} but q is on {device}")
        if C > 1 and w.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    if wk.dtype != wq.dtype:
        raise TypeError(f"wq and wk must share one dtype, got {wq.dtype} and {wk.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (L, D // 2):
            raise ValueError(f"{name} must be [L, D/2] = [{L}, {D // 2}], got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
        if D > 2 and t.stride(1) != 1 or min(t.stride()) < 0:
            raise ValueError(f"{name} must be contiguous in its last dim (strides {t.stride()})")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    _check_cache(k_cache, v_cache, k_scale, v_scale, B, num_heads, D, device)
    _check_distinct(k_cache, v_cache, k_scale, v_scale)
    _check_pos(pos, device)
    if L > k_cache.shape[1]:
        raise ValueError(f"{L} new tokens do not fit a cache of {k_cache.shape[1]} rows")


def _check_write(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos) -> None:
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        _is_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, L, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in ACT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if t.shape[3] > 1 and t.stride(3) != 1 or min(t.stride()) < 0:
            raise ValueError(f"{name} must be contiguous in its last dim (strides {t.stride()})")
    if v_new.shape != k_new.shape or v_new.dtype != k_new.dtype:
        raise ValueError(f"k_new and v_new must have the same shape and dtype; got {tuple(k_new.shape)} {k_new.dtype}"
                         f" and {tuple(v_new.shape)} {v_new.dtype}")
    if v_new.device != k_new.device:
        raise ValueError(f"v_new is on {v_new.device} but k_new is on {k_new.device}")
    B, L, H, D = k_new.shape
    _check_cache(k_cache, v_cache, k_scale, v_scale, B, H, D, k_new.device)
    _check_distinct(k_cache, v_cache, k_scale, v_scale)
    _check_pos(pos, k_new.device)
    if L > k_cache.shape[1]:
        raise ValueError(f"{L} new tokens do not fit a cache of {k_cache.shape[1]} rows")


# ------------------------------------------------------------------------------------------------------ custom ops
@custom_op("dz::qk_norm_rope_kv_write", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _qk_norm_rope_kv_write_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], pos: torch.Tensor, backend: str,
) -> torch.Tensor:
    B, L, C = q.shape
    backend = resolve_backend(q.device, backend, k_cache.dtype, q.dtype)
    if backend == "torch":
        q_rot, k_rot = ref.qk_norm_rope_reference(q, k, wq, wk, eps, cos, sin, num_heads)
        vh = v.unflatten(-1, (num_heads, -1))
        if k_cache.dtype == FP8_DTYPE:
            kq, ks = ref.quantize_fp8_per_head(k_rot)
            vq, vs = ref.quantize_fp8_per_head(vh)
            pairs = [(k_cache, kq), (v_cache, vq), (k_scale, ks), (v_scale, vs)]
        else:
            pairs = [(k_cache, k_rot.to(k_cache.dtype)), (v_cache, vh.to(v_cache.dtype))]
        write_rows_masked(pairs, pos)      # like the kernels: an out-of-range position writes no cache row
        return q_rot
    q_rot = empty((B, L, num_heads, C // num_heads), q.dtype, q.device)
    if backend == "triton":
        from .triton_kernels import launch_qk_norm_rope_kv

        launch_qk_norm_rope_kv(q, k, v, wq, wk, eps, cos, sin, num_heads, k_cache, v_cache, k_scale, v_scale, pos,
                               q_rot)
    else:
        from . import cuda

        cuda.launch_qk_norm_rope_kv(q, k, v, wq, wk, eps, cos, sin, num_heads, k_cache, v_cache, k_scale, v_scale,
                                    pos, q_rot, use_cupy=(backend == "cupy"))
    return q_rot


@_qk_norm_rope_kv_write_op.register_fake
def _(q, k, v, wq, wk, eps, cos, sin, num_heads, k_cache, v_cache, k_scale, v_scale, pos, backend):
    B, L, C = q.shape
    return q.new_empty((B, L, num_heads, C // num_heads))


@custom_op("dz::kv_cache_write", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _kv_cache_write_op(
    k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], pos: torch.Tensor, backend: str,
) -> None:
    backend = resolve_backend(k_new.device, backend, k_cache.dtype, k_new.dtype)
    if backend == "torch":
        if k_cache.dtype == FP8_DTYPE:
            kq, ks = ref.quantize_fp8_per_head(k_new)
            vq, vs = ref.quantize_fp8_per_head(v_new)
            pairs = [(k_cache, kq), (v_cache, vq), (k_scale, ks), (v_scale, vs)]
        else:
            pairs = [(k_cache, k_new.to(k_cache.dtype)), (v_cache, v_new.to(v_cache.dtype))]
        write_rows_masked(pairs, pos)      # out of range: nothing written, as the kernels
    elif backend == "triton":
        from .triton_kernels import launch_kv_write

        launch_kv_write(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos)
    else:
        from . import cuda

        cuda.launch_kv_write(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos, use_cupy=(backend == "cupy"))


@_kv_cache_write_op.register_fake
def _(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos, backend):
    return None


# ------------------------------------------------------------------------------------------------------ public API
def qk_norm_rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                          eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None, *,
                          backend: str = "auto", check: bool = True) -> torch.Tensor:
    """Fused q/k RMSNorm + RoPE + KV-cache write of one layer; returns the rotated queries.

    Args:
        q, k, v: ``[B, L, C]`` straight from the projections (C = H * D), float32/bfloat16/float16, one dtype;
            contiguous in the last dim, any batch and row strides (slices of a fused ``[B, L, 3C]`` qkv work).
        wq, wk: RMSNorm weights ``[C]`` in q's dtype or float32.
        eps: RMSNorm epsilon. cos, sin: ``[L, D/2]`` float32 per-token RoPE tables (rope.rope_tables).
        num_heads: H.
        k_cache, v_cache: ``[B, T, H, D]`` float32/bfloat16/float16/float8_e4m3fn, each ``[H, D]`` row contiguous,
            equal strides. Rows ``pos .. pos + L - 1`` receive the rotated keys and the values (converted to the
            cache dtype, or quantized per (token, head) for FP8).
        pos: one-element int32 tensor on the device: the first cache row written.
        k_scale, v_scale: ``[B, T, H]`` float32, required with an FP8 cache (the dequantization scales of the rows
            written), None otherwise.
        backend: "auto", "triton", "cuda", "cupy" or "torch" (see the module doc).
        check: read ``pos`` on the host and raise ValueError when the rows fall outside the cache (one device sync;
            skipped during CUDA graph capture). Without it an out-of-range pos writes no cache row.

    Returns:
        q_rot ``[B, L, H, D]`` contiguous, in q's dtype. Inference-only.
    """
    _check_fused(q, k, v, wq, wk, eps, cos, sin, num_heads, k_cache, v_cache, k_scale, v_scale, pos)
    _check_no_grad(q, k, v, wq, wk)
    resolve_backend(q.device, backend)
    _host_range_check(pos, q.shape[1], k_cache.shape[1], check, q.device)
    return call(_qk_norm_rope_kv_write_op, q, k, v, wq, wk, float(eps), cos, sin, int(num_heads), k_cache,
                v_cache, k_scale, v_scale, pos, backend)


def kv_cache_write(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   pos: torch.Tensor, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                   *, backend: str = "auto", check: bool = True) -> None:
    """Write k_new, v_new ``[B, L, H, D]`` (contiguous last dim, any other strides) into rows ``pos .. pos + L - 1``
    of k_cache, v_cache ``[B, T, H, D]``: converted to the cache dtype, or quantized per (token, head) into an FP8
    cache with its scales in k_scale/v_scale ``[B, T, H]`` float32. `pos`, `backend`, `check`: as in
    :func:`qk_norm_rope_kv_write`."""
    _check_write(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos)
    _check_no_grad(k_new, v_new)
    resolve_backend(k_new.device, backend)
    _host_range_check(pos, k_new.shape[1], k_cache.shape[1], check, k_new.device)
    call(_kv_cache_write_op, k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos, backend)
