"""Checks and launch configuration shared by the fused row-wise kernels (rounding, FP8 convention and output
allocation come from dz_kernels._common).

Shape convention of every row op here: an activation `x` is `[B, L, C]` (or `[N, C]`, read as `[1, N, C]`); a
row is one token, `C` the hidden dim. A "modulation" tensor (shift, scale, gate) is any tensor that broadcasts to
`x` (`[B, L, C]` per token, `[B, 1, C]` per sample, `[C]`, ...): it is expanded, never copied, and the kernels
address it through its (batch, token) strides, 0 along broadcast dims. The last dim of every tensor must be
contiguous (stride 1).

Dtypes: float32, bfloat16 and float16; math is float32 inside the kernels. One call may mix float32 with a single
low-precision dtype (e.g. a float32 residual stream with a bfloat16 branch output, or bfloat16 activations with
float32 modulation, both as Wan2.1 does), never bfloat16 with float16.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._common import FP8_AMAX_FLOOR, FP8_DTYPE, empty, kernels_interpreted, next_pow2  # noqa: F401

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_C = 16384  # the whole row lives in registers: one program holds next_pow2(C) float32 values per tensor


def launch_config(kind: str, device, **key) -> dict:
    """This package's launch parameters of `kind` ("row_fwd", "row_bwd", "elementwise") for `device`'s
    architecture, from dz_kernels/configs/fused.json (tuned entries where a sweep measured them, else defaults)."""
    from dz_kernels import configs

    arch = configs.arch_of(device) if device is not None else "cpu"
    return configs.lookup("fused", kind, arch, **key).config


def row_config(C: int, backward: bool = False, device=None) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for a kernel that holds one whole row of C elements in registers: BLOCK_C =
    next_pow2(C), num_warps from the config table (kind row_fwd / row_bwd, key block_c). The defaults were chosen
    from ptxas register reports for sm_90 (triton 3.9): at BLOCK_C 8192 the forward kernels fit 16 warps without
    spilling; the backward kernels keep more values live and spill least with 32 warps (8 values per thread per
    tensor); at 16384 everything takes 32 warps."""
    block = next_pow2(C)
    cfg = launch_config("row_bwd" if backward else "row_fwd", device, block_c=block)
    return block, int(cfg["num_warps"])


def partial_programs(n_rows: int, device: torch.device, C: int | None = None) -> int:
    """How many programs a reducing backward launches (each sums dweight over a contiguous block of rows into its
    own float32 partial row; the partials are summed afterwards in torch: deterministic for a given device):
    programs_per_sm (config table, kind row_bwd) per multiprocessor on CUDA."""
    if device.type == "cuda":
        block = next_pow2(C) if C else 0
        per_sm = launch_config("row_bwd", device, block_c=block)["programs_per_sm"]
        target = int(per_sm) * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few programs, so multi-row blocks and a short last block are exercised
        target = 4
    return max(1, min(n_rows, target))


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")


def check_mixed_precision(named: dict[str, Optional[torch.Tensor]]) -> None:
    """At most one low-precision dtype per call; float32 may be mixed with it."""
    low = {n: t.dtype for n, t in named.items() if t is not None and t.dtype != torch.float32}
    if len(set(low.values())) > 1:
        desc = ", ".join(f"{n}={d}" for n, d in low.items())
        raise TypeError(f"mixed low-precision dtypes ({desc}): use one of bfloat16/float16, optionally with float32")


def check_device(named: dict[str, Optional[torch.Tensor]], ref: torch.Tensor, ref_name: str = "x") -> None:
    for n, t in named.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{n} is on {t.device} but {ref_name} is on {ref.device}; all tensors must share a device")
    if ref.device.type != "cuda" and not kernels_interpreted():
        raise ValueError(f"{ref_name} is on {ref.device}: the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)} != 1); "
                         "call .contiguous() first")


def check_activation(name: str, x: torch.Tensor) -> None:
    """x: [B, L, C] or [N, C], last dim contiguous, 1 <= C <= MAX_C."""
    check_float(name, x)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [B, L, C] or [N, C], got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C < 1 or C > MAX_C:
        raise ValueError(f"{name} has hidden dim C={C}; supported 1 <= C <= {MAX_C}")
    check_last_dim_contiguous(name, x)


def check_broadcast(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """t must broadcast to x's shape without changing it (sizes equal or 1, no more dims than x)."""
    check_float(name, t)
    ok = t.dim() <= x.dim() and all(ts in (1, xs) for ts, xs in zip(reversed(t.shape), reversed(x.shape)))
    if not ok:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to x of shape {tuple(x.shape)} "
                         "(expected [B, L, C], [B, 1, C], [C], ...)")
    if t.dim() == 0 or t.shape[-1] != x.shape[-1]:
        raise ValueError(f"{name} of shape {tuple(t.shape)} must have the full hidden dim C={x.shape[-1]} last")
    check_last_dim_contiguous(name, t)


def check_same_shape(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    check_float(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}; they must match")
    check_last_dim_contiguous(name, t)


def check_vector(name: str, t: torch.Tensor, C: int) -> None:
    check_float(name, t)
    if t.shape != (C,):
        raise ValueError(f"{name} must have shape [C]=[{C}], got {tuple(t.shape)}")
    check_last_dim_contiguous(name, t)


def check_out(name: str, out: torch.Tensor, shape, dtypes, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {out.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")
    if out.device != x.device:
        raise ValueError(f"{name} is on {out.device} but x is on {x.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_no_grad_for_out(*tensors: Optional[torch.Tensor]) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("out= writes into a given buffer and has no backward; call without out= when gradients "
                         "are needed, or run under torch.no_grad()")


def rows_shape(shape) -> tuple[int, int, int]:
    """(B, L, C) of an activation shape [B, L, C], or [N, C] read as [1, N, C]."""
    return (shape[0], shape[1], shape[2]) if len(shape) == 3 else (1, shape[0], shape[1])


def rows_view(t: torch.Tensor, x_shape) -> tuple[torch.Tensor, int, int]:
    """(t, batch stride, token stride) of t broadcast to x_shape as [B, L, C] (rows_shape); broadcast dims get
    stride 0. t itself comes back (the kernels read its data pointer with these strides): no view, no copy."""
    shape, stride = t.shape, t.stride()
    off = len(x_shape) - len(shape)
    if off < 0 or any(n != 1 and n != x_shape[off + j] for j, n in enumerate(shape)):
        raise ValueError(f"a tensor of shape {tuple(shape)} does not broadcast to {tuple(x_shape)}")
    if shape and shape[-1] > 1 and stride[-1] != 1:
        raise ValueError(f"a tensor of shape {tuple(shape)} has last-dim stride {stride[-1]}; the kernels need 1")

    def dim_stride(i):                      # t's stride along dim i of x_shape (0 where t broadcasts)
        j = i - off
        return 0 if j < 0 or shape[j] == 1 else stride[j]
    if len(x_shape) == 2:
        return t, 0, dim_stride(0)
    return t, dim_stride(0), dim_stride(1)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has stride 1, else a contiguous copy (autograd may hand over expanded grads)."""
    return t if (t.shape[-1] <= 1 or t.stride(-1) == 1) else t.contiguous()


def reduce_to(grad_full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum a per-row gradient shaped like x down to target's (broadcast) shape, in float32, cast to target's dtype."""
    g = grad_full
    if g.shape != target.shape:
        g = g.float().sum_to_size(target.shape)
    return g.to(target.dtype)
