"""Rows of a preallocated cache written at an offset that lives on the device (a one-element int32 tensor): the
argument checks and the plain-PyTorch masked write shared by `dz_kernels._ext.write_rows` and the KV-cache ops
(kv_cache/ops.py). Torch only: `_ext` imports it and must not import triton.
"""
from __future__ import annotations

import torch

__all__ = ["check_offset", "check_rows_contiguous", "host_offset", "write_rows_masked"]


def check_offset(name: str, t: torch.Tensor, device: torch.device, prefix: str = "") -> None:
    """`t` is a one-element int32 tensor on `device`: the kernels read it there, so a CUDA graph replays with its
    current value and the launch needs no host copy. TypeError for the dtype, ValueError for the shape or device;
    `prefix` starts each message (the op's name)."""
    if t.dtype != torch.int32:
        raise TypeError(f"{prefix}{name} must be a one-element int32 tensor, got {t.dtype} of shape "
                        f"{tuple(t.shape)}")
    if t.numel() != 1:
        raise ValueError(f"{prefix}{name} must be a one-element int32 tensor (shape [] or [1]), got shape "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{prefix}{name} is on {t.device} but the cache is on {device} (keep it on the device: the "
                         f"kernels read it there, so a CUDA graph replays with its current value)")


def check_rows_contiguous(name: str, t: torch.Tensor, prefix: str = "") -> None:
    """Each [H, D] row of the 4-D `t` ([B, T, H, D]) is contiguous and no stride is negative; the batch and token
    strides are free (a layer slice of a larger cache, or a part of a fused tensor, works)."""
    _, _, H, D = t.shape
    if (D > 1 and t.stride(3) != 1) or (H > 1 and t.stride(2) != D) or min(t.stride()) < 0:
        raise ValueError(f"{prefix}each [H, D] row of {name} must be contiguous (strides {t.stride()}); batch and "
                         f"token strides may be anything non-negative")


def host_offset(offset: torch.Tensor, device: torch.device) -> int | None:
    """The offset read on the host (one device sync), or None while a CUDA graph is being captured on `device`
    (it cannot be read then: the range check is skipped and the kernels write nothing out of range)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    return int(offset.reshape(()).item())


def write_rows_masked(pairs, offset: torch.Tensor) -> None:
    """cache[:, o:o + L] = new for each (cache, new) of `pairs` (all with L new rows into T cache rows), o read on
    the device: when the rows fall outside the cache nothing is written, as the kernels do (no host sync, so it is
    capture-safe). FP8 tensors move as their bytes (index_copy_/where have no float8 kernels)."""
    cache0, new0 = pairs[0]
    L, T = new0.shape[1], cache0.shape[1]
    if L == 0:
        return
    o = offset.reshape(()).to(torch.int64)
    ok = (o >= 0) & (o + L <= T)
    rows = torch.where(ok, o, torch.zeros_like(o)) + torch.arange(L, device=cache0.device)
    for cache, new in pairs:
        if cache.dtype == torch.float8_e4m3fn:
            cache, new = cache.view(torch.uint8), new.view(torch.uint8)
        cache.index_copy_(1, rows, torch.where(ok, new, cache.index_select(1, rows)))
