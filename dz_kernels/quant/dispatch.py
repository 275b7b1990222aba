"""Which kernel an FP8 linear runs, per shape: the config table's choice between three paths.

    "triton"     our per-token activation quantizer + our Triton FP8 GEMM (ops.fp8_linear): every epilogue
                 (bias, GELU-tanh, residual + gate * (.)) fused, row or block scales;
    "scaled_mm"  our per-token activation quantizer + torch._scaled_mm (cuBLAS FP8, rowwise scales, bias fused):
                 row scaling, bf16 output, K and N multiples of 16, no activation / gate / residual;
    "bf16"       F.linear with the bf16 weight the module kept (Float8Linear keeps its original nn.Linear when
                 quantize_ ran with reversible=True): for shapes where FP8 cannot beat bf16 cuBLAS (measured by the
                 tuning), at the cost of holding both weights.

`fp8_linear_path(...)` applies the table (dz_kernels/configs/fp8.json, kind linear_path, key m, n, k,
block_scaled) and then the paths' own requirements: a path that cannot run the call falls back to "triton", which
runs everything. `fp8_linear_dispatch(...)` runs the call on the chosen path and returns the output; the path it
took is `fp8_linear_path` of the same arguments (pure: the bench records it beside each row).
`fp8_rows_dispatch(...)` is the same for an activation a producer already quantized per token (api.Float8Rows):
no quantization pass on any path ("bf16" dequantizes the rows first).

Both take `path=`, a path fp8_linear_path already gave for the call's arguments: Float8Linear resolves its path once
per input shape and passes it, so its forward does no table lookup (see Float8Linear._path).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common as cm
from .ops import dequantize_fp8, fp8_gemm, fp8_linear, quantize_fp8_rowwise

__all__ = ["PATHS", "fp8_linear_path", "fp8_linear_dispatch", "fp8_rows_dispatch", "scaled_mm_linear"]

PATHS = ("triton", "scaled_mm", "bf16")


def _scaled_mm_ok(M: int, K: int, N: int, device, block_scaled: bool, out_dtype: torch.dtype) -> bool:
    return (hasattr(torch, "_scaled_mm") and not block_scaled and out_dtype == torch.bfloat16 and K % 16 == 0
            and N % 16 == 0 and M > 0 and (torch.device(device).type == "cuda" or cm.kernels_interpreted()))


def fp8_linear_path(M: int, K: int, N: int, device, *, block_scaled: bool = False, has_bf16_weight: bool = False,
                    epilogue: bool = False, out_dtype: torch.dtype = torch.bfloat16) -> str:
    """The path ("triton", "scaled_mm" or "bf16") an FP8 linear of M tokens, K inputs and N outputs runs on
    `device`. epilogue: the call fuses an activation, gate or residual (only "triton" does; "bf16" applies them
    in torch). has_bf16_weight: a bf16 weight is at hand for the "bf16" path."""
    path = cm.launch_config("fp8", "linear_path", device, m=M, n=N, k=K, block_scaled=bool(block_scaled))["path"]
    if path not in PATHS:
        raise ValueError(f"config table fp8: linear_path {path!r} is not one of {PATHS}")
    if path == "bf16" and not has_bf16_weight:
        path = "triton"
    if path == "scaled_mm" and (epilogue or not _scaled_mm_ok(M, K, N, device, block_scaled, out_dtype)):
        path = "triton"
    return path


def _check_given_path(path: str, bf16_weight: Optional[torch.Tensor], block_scaled: bool) -> None:
    """A path handed to a dispatch function must be one fp8_linear_path can give for the call."""
    if path not in PATHS or (path == "bf16" and bf16_weight is None) or (path == "scaled_mm" and block_scaled):
        raise ValueError(f"path={path!r} cannot run this call (bf16 weight given: {bf16_weight is not None}, "
                         f"block_scaled: {block_scaled}); pass a path fp8_linear_path returned for it, or None")


def scaled_mm_linear(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """x2 [M, K] float -> [M, N]: our per-token quantizer, then torch._scaled_mm with rowwise scales (the weight
    [N, K] e4m3 row-major is cuBLAS's column-major B; weight_scale [N] or [N, 1] float32)."""
    a, sa = quantize_fp8_rowwise(x2)
    return _scaled_mm(a, sa, weight, weight_scale, bias, out_dtype)


def _scaled_mm(a, sa, weight, weight_scale, bias, out_dtype):
    N = weight.shape[0]
    sb = weight_scale.reshape(1, N) if weight_scale.numel() == N else weight_scale.reshape(1, 1).expand(1, N)
    return torch._scaled_mm(a, weight.t(), scale_a=sa.reshape(-1, 1), scale_b=sb.contiguous(),
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)


def fp8_linear_dispatch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, *, block_scaled: bool = False,
                        bf16_weight: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                        path: Optional[str] = None) -> torch.Tensor:
    """y = x @ dequant(weight)^T + bias for x [..., K], on the path fp8_linear_path picks (see the module doc).
    weight [N, K] float8_e4m3fn with weight_scale as ops.fp8_linear takes them; bf16_weight [N, K] (optional): the
    unquantized weight, for the "bf16" path. path: fp8_linear_path's answer for these arguments, when the caller
    already has it (None: looked up here)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    K, N = x.shape[-1], weight.shape[0]
    if path is None:
        M = x.numel() // K if K else 0
        path = fp8_linear_path(M, K, N, x.device, block_scaled=block_scaled, has_bf16_weight=bf16_weight is not None,
                               out_dtype=out_dtype)
    else:
        _check_given_path(path, bf16_weight, block_scaled)
    if path == "bf16":
        y = F.linear(x.to(bf16_weight.dtype), bf16_weight, None if bias is None else bias.to(bf16_weight.dtype))
        return y.to(out_dtype)
    if path == "scaled_mm":
        x2 = cm.as_rows(x)
        return scaled_mm_linear(x2, weight, weight_scale, bias, out_dtype).view(*x.shape[:-1], N)
    return fp8_linear(x, weight, weight_scale, bias, block_scaled=block_scaled, out_dtype=out_dtype)


def fp8_rows_dispatch(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, *, out_dtype: torch.dtype = torch.bfloat16,
                      bf16_weight: Optional[torch.Tensor] = None, path: Optional[str] = None) -> torch.Tensor:
    """y = (a * a_scale) @ dequant(weight)^T + bias for an activation already quantized per token: a [M, K]
    float8_e4m3fn, a_scale [M, 1] float32; weight [N, K] e4m3 with per-channel weight_scale. The path is
    fp8_linear_path's for (M, K, N, out_dtype) (or `path`, when the caller already has it): "triton" runs
    ops.fp8_gemm, "scaled_mm" torch._scaled_mm on `a` itself, "bf16" dequantizes `a` (one pass) and runs F.linear
    with bf16_weight."""
    if path is None:
        M, K = a.shape
        path = fp8_linear_path(M, K, weight.shape[0], a.device, has_bf16_weight=bf16_weight is not None,
                               out_dtype=out_dtype)
    else:
        _check_given_path(path, bf16_weight, False)
    if path == "bf16":
        x = dequantize_fp8(a, a_scale, "row", bf16_weight.dtype)
        y = F.linear(x, bf16_weight, None if bias is None else bias.to(bf16_weight.dtype))
        return y.to(out_dtype)
    if path == "scaled_mm":
        return _scaled_mm(a, a_scale, weight, weight_scale, bias, out_dtype)
    return fp8_gemm(a, a_scale, weight, weight_scale, bias=bias, out_dtype=out_dtype)
