"""Checks and dispatch rules shared by the FP8 and NVFP4 kernels of dz_kernels.quant.

Dispatch: a public kernel function runs its Triton kernel on CUDA tensors, and on CPU tensors when the kernels run
in the Triton CPU interpreter (TRITON_INTERPRET=1 before import; the tests). On a CPU without the interpreter it
runs the plain-PyTorch reference of reference.py, which has the same numerics (bit-exact for the quantizers).
Output buffers come from dz_kernels._common.empty (the tests' NaN-poisoning hook).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .._common import FP8_DTYPE, empty, kernels_interpreted, triton_runs_on  # noqa: F401

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def launch_config(family: str, kind: str, device, **key) -> dict:
    """Launch parameters of kernel `kind` of `family` ("fp8", "nvfp4") for `device`'s architecture, from
    dz_kernels/configs/<family>.json (tuned entries where a sweep measured them, else the defaults there)."""
    from dz_kernels import configs

    return configs.lookup(family, kind, configs.arch_of(device), **key).config


def check_tensor(name: str, t, dtypes: Iterable[torch.dtype], dims: Optional[Iterable[int]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")
    if dims is not None:
        dims = tuple(dims)
        if t.dim() not in dims:
            raise ValueError(f"{name} must have {' or '.join(str(d) for d in dims)} dims, got shape {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} of shape {tuple(t.shape)} with strides {t.stride()} is not contiguous; quantized "
                         "weights and their scales must be contiguous (call .contiguous() when making them)")


def check_same_device(named: dict, ref: torch.Tensor, ref_name: str) -> None:
    for n, t in named.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{n} is on {t.device} but {ref_name} is on {ref.device}; all tensors must share a device")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")


def as_rows(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """[..., K] -> [M, K] with a unit stride along K (a view when possible, else a copy)."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got a scalar")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def broadcast_rows(name: str, t: Optional[torch.Tensor], M: int, N: int, lead_shape) -> Optional[torch.Tensor]:
    """An epilogue operand (gate, residual) as an [M, N] view, broadcast dims with stride 0 (no copy).

    Accepts a tensor that broadcasts to the output's shape [..., N] (e.g. [B, L, N], [B, 1, N] when the output is
    [B, L, N]; [N] or [1, N] for one row shared by every token) and returns it as [M, N]."""
    if t is None:
        return None
    check_tensor(name, t, FLOAT_DTYPES)
    full = tuple(lead_shape) + (N,)
    try:
        e = t.expand(full)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the output shape {full}") from None
    if e.dim() == 1:
        e = e.unsqueeze(0).expand(M, N)
    try:
        return e.view(M, N)
    except RuntimeError:  # broadcast over an inner dim that view cannot flatten: materialize once
        return e.reshape(M, N).contiguous()
