"""The FP8 and NVFP4 ops: public functions (every argument checked, clear errors), dispatch (the Triton kernels of
triton_fp8.py / triton_nvfp4.py on CUDA tensors, and on CPU tensors when the kernels run in the interpreter; else
the plain-PyTorch references of reference.py, bit-identical for the quantizers), and the ``dz::`` custom ops with
their fake implementations (torch.compile, CUDA graphs). Inference only: no backward.

FP8 E4M3. Public functions (each also registered as a ``dz::`` custom op with a fake implementation):
    quantize_fp8_rowwise(x)               x [..., K]  -> q [..., K] e4m3, scale [..., 1] float32 (per token / per
                                                         output channel when x is a weight [N, K])
    quantize_fp8_blockwise(x, block)      block "1x128": x [..., K] -> scale [..., K/128];
                                          block "128x128": x [R, K] -> scale [ceil(R/128), K/128]
    dequantize_fp8(q, scale, granularity) -> q * scale
    fp8_gemm(a, a_scale, b, b_scale, ...) a [M, K] e4m3, b [N, K] e4m3 (nn.Linear weight layout) -> [M, N]
    fp8_linear(x, weight, weight_scale, ...)   quantizes x (per token, or 1x128 blocks) and runs fp8_gemm
There is no backward: these are inference kernels (the ops raise if asked for a gradient).

NVFP4. Public functions (each registered as a ``dz::`` custom op with a fake implementation):
    quantize_nvfp4(x, global_scale=None)   x [..., K] -> packed uint8 [..., K/2], scale e4m3 [..., K/16], global f32 []
    dequantize_nvfp4(packed, scale, global_scale)                      -> [..., K]
    nvfp4_gemm_w4a16(x, w, w_scale, w_global, ...)   x [M, K] bf16/fp16 @ dequant(w [N, K/2])^T -> [M, N]
    nvfp4_gemm_w4a4(a, a_scale, a_global, w, w_scale, w_global, ...)   both operands NVFP4 -> [M, N]
    nvfp4_linear(x, w, w_scale, w_global, ..., act_quant=...)           quantizes x for W4A4, then the GEMM
    w4a16_path(M, N, K, device)            which W4A16 kernel runs for a shape ("splitk", "tiled", "dequant": the
                                           config table's choice, dz_kernels/configs/nvfp4.json kind w4a16_path)
All GEMMs take the same fused epilogue as the FP8 GEMM (bias, GELU-tanh, residual + gate * (.)).
Which FP8 linear path runs for a shape (our GEMM, cuBLAS's FP8 GEMM, bf16): dispatch.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._common import call, custom_op
from . import _common as cm
from . import triton_fp8, triton_nvfp4
from .reference import (
    FP8_BLOCK, NVFP4_BLOCK, dequantize_fp8_reference, dequantize_nvfp4_reference, fp8_gemm_reference,
    fp8_scale_shape, nvfp4_gemm_w4a4_reference, nvfp4_gemm_w4a16_reference, nvfp4_global_scale,
    quantize_fp8_reference, quantize_nvfp4_reference,
)
from .triton_common import activation_code
from .triton_nvfp4 import dot_scaled_available

__all__ = ["quantize_fp8_rowwise", "quantize_fp8_blockwise", "dequantize_fp8", "fp8_gemm", "fp8_linear",
           "quantize_nvfp4", "dequantize_nvfp4", "nvfp4_gemm_w4a16", "nvfp4_gemm_w4a4", "nvfp4_linear",
           "dot_scaled_available", "w4a16_path", "W4A16_PATHS"]


# ================================================================================================================ FP8
# -------------------------------------------------------------------------------------------------------- custom ops
@custom_op("dz::fp8_quantize_rowwise", mutates_args=())
def _op_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cm.triton_runs_on(x):
        return triton_fp8.launch_fp8_quant_rows(x)
    return quantize_fp8_reference(x, "row")


@_op_quant_rows.register_fake
def _(x):
    M, K = x.shape
    return x.new_empty((M, K), dtype=cm.FP8_DTYPE), x.new_empty((M, 1), dtype=torch.float32)


@custom_op("dz::fp8_quantize_blockwise", mutates_args=())
def _op_quant_blocks(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cm.triton_runs_on(x):
        return triton_fp8.launch_fp8_quant_blocks(x, per_row)
    return quantize_fp8_reference(x, "block1x128" if per_row else "block128x128")


@_op_quant_blocks.register_fake
def _(x, per_row):
    R, C = x.shape
    shape = fp8_scale_shape("block1x128" if per_row else "block128x128", R, C)
    return x.new_empty((R, C), dtype=cm.FP8_DTYPE), x.new_empty(shape, dtype=torch.float32)


@custom_op("dz::fp8_dequantize", mutates_args=())
def _op_dequant(q: torch.Tensor, scale: torch.Tensor, granularity: str, out_dtype: torch.dtype) -> torch.Tensor:
    if cm.triton_runs_on(q):
        return triton_fp8.launch_fp8_dequant(q, scale, granularity, out_dtype)
    return dequantize_fp8_reference(q, scale, granularity, out_dtype)


@_op_dequant.register_fake
def _(q, scale, granularity, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype)


@custom_op("dz::fp8_gemm", mutates_args=())
def _op_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, block_scaled: bool,
             bias: Optional[torch.Tensor], activation: str, gate: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    act = None if activation == "none" else activation
    if cm.triton_runs_on(a):
        return triton_fp8.launch_fp8_gemm(a, a_scale, b, b_scale, block_scaled, bias, act, gate, residual, out_dtype)
    return fp8_gemm_reference(a, a_scale, b, b_scale, block_scaled=block_scaled, bias=bias, activation=act,
                              gate=gate, residual=residual, out_dtype=out_dtype)


@_op_gemm.register_fake
def _(a, a_scale, b, b_scale, block_scaled, bias, activation, gate, residual, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------------------------- public functions
def _check_quant_input(x: torch.Tensor) -> None:
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")


def quantize_fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 quantization with one scale per row (Triton on CUDA / interpreter, else the reference).

    x: [..., K] float32/bfloat16/float16 (an activation: one scale per token; a weight [N, K]: one scale per output
    channel). Returns q [..., K] float8_e4m3fn and scale [..., 1] float32 with x ~= q * scale,
    scale = max(rowmax|x|, 1e-12) / 448."""
    _check_quant_input(x)
    x2 = cm.as_rows(x)
    q, s = call(_op_quant_rows, x2)
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


def quantize_fp8_blockwise(x: torch.Tensor, block: str = "1x128") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 quantization with block scales, K % 128 == 0.

    block="1x128":   x [..., K] (activations) -> q [..., K], scale [..., K/128]
    block="128x128": x [R, K]   (weights)     -> q [R, K],   scale [ceil(R/128), K/128] (the last row block may be
                     partial). scale = max(block amax, 1e-12) / 448 float32; x ~= q * scale."""
    _check_quant_input(x)
    if block not in ("1x128", "128x128"):
        raise ValueError(f"block={block!r}: expected '1x128' or '128x128'")
    K = x.shape[-1]
    if K % FP8_BLOCK:
        raise ValueError(f"{block} FP8 block scaling needs K (the last dim) to be a multiple of {FP8_BLOCK}, got {K}")
    if block == "128x128" and x.dim() != 2:
        raise ValueError(f"128x128 block scaling takes a 2-D weight [N, K], got shape {tuple(x.shape)}")
    x2 = cm.as_rows(x)
    q, s = call(_op_quant_blocks, x2, block == "1x128")
    if block == "1x128":
        return q.view(x.shape), s.view(*x.shape[:-1], K // FP8_BLOCK)
    return q, s


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: str = "row",
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q [R, C] float8_e4m3fn, scale float32 (shape: reference.fp8_scale_shape(granularity, R, C); "row" also takes
    [R], "tensor" any one-element tensor) -> q * scale [R, C] in out_dtype."""
    cm.check_tensor("q", q, (cm.FP8_DTYPE,), dims=(2,))
    cm.check_tensor("scale", scale, (torch.float32,))
    cm.check_out_dtype(out_dtype)
    R, C = q.shape
    if granularity == "tensor" and scale.numel() == 1:
        scale = scale.reshape(())
    elif granularity == "row" and tuple(scale.shape) == (R,):
        scale = scale.view(R, 1)
    cm.check_shape("scale", scale, fp8_scale_shape(granularity, R, C))
    cm.check_same_device({"scale": scale}, q, "q")
    return call(_op_dequant, q.contiguous(), scale.contiguous(), granularity, out_dtype)


def _check_gemm_args(a, a_scale, b, b_scale, block_scaled, bias, out_dtype):
    cm.check_tensor("a", a, (cm.FP8_DTYPE,), dims=(2,))
    cm.check_tensor("b (the weight)", b, (cm.FP8_DTYPE,), dims=(2,))
    cm.check_tensor("a_scale", a_scale, (torch.float32,))
    cm.check_tensor("b_scale", b_scale, (torch.float32,))
    cm.check_out_dtype(out_dtype)
    M, K = a.shape
    N, Kb = b.shape
    if K != Kb:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [N, K] = {tuple(b.shape)}: K differs")
    if a.shape[1] > 1 and a.stride(1) != 1:
        raise ValueError(f"a must be contiguous along K (stride {a.stride(1)}); call .contiguous()")
    cm.check_contiguous("b (the weight)", b)
    cm.check_contiguous("b_scale", b_scale)
    cm.check_same_device({"a_scale": a_scale, "b": b, "b_scale": b_scale, "bias": bias}, a, "a")
    if block_scaled:
        if K % FP8_BLOCK:
            raise ValueError(f"block-scaled FP8 GEMM needs K to be a multiple of {FP8_BLOCK}, got K={K}")
        cm.check_shape("a_scale (1x128 blocks)", a_scale, (M, K // FP8_BLOCK))
        cm.check_shape("b_scale (128x128 blocks)", b_scale, (-(-N // FP8_BLOCK), K // FP8_BLOCK))
    else:
        if a_scale.numel() != 1 and tuple(a_scale.shape) not in ((M, 1), (M,)):
            raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}; row scaling takes [M, 1] = [{M}, 1], [M] "
                             "or one element")
        if b_scale.numel() != 1 and tuple(b_scale.shape) not in ((N, 1), (N,)):
            raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}; per-channel scaling takes [N, 1] = "
                             f"[{N}, 1], [N] or one element")
    if bias is not None:
        cm.check_tensor("bias", bias, cm.FLOAT_DTYPES)
        cm.check_shape("bias", bias, (N,))
        cm.check_contiguous("bias", bias)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
             block_scaled: bool = False, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
             gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 GEMM with fused epilogue: out = residual + gate * act((a*sa) @ (b*sb)^T + bias), [M, N] in out_dtype.

    a: [M, K] float8_e4m3fn (quantized activation, K contiguous); b: [N, K] float8_e4m3fn (nn.Linear weight
    layout, contiguous). Row scaling (block_scaled=False): a_scale [M, 1] / [M] (per token) and b_scale [N] / [N, 1]
    (per output channel); either may be one element (per tensor). Block scaling: a_scale [M, K/128] (1x128),
    b_scale [ceil(N/128), K/128] (128x128), K % 128 == 0. All scales float32 dequantization multipliers.
    bias: [N]; activation: None or "gelu_tanh"; gate, residual: broadcastable to [M, N] (the adaLN gate is per
    token and channel, [M, N]; [N] shares one row). Float32 accumulation and epilogue, one rounding at the end."""
    _check_gemm_args(a, a_scale, b, b_scale, block_scaled, bias, out_dtype)
    activation_code(activation)
    M, N = a.shape[0], b.shape[0]
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None:
            cm.broadcast_rows(name, t, M, N, (M,))  # validates shape and dtype
            cm.check_same_device({name: t}, a, "a")
    return call(_op_gemm, a, a_scale, b, b_scale, block_scaled, bias, activation or "none", gate, residual,
                out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               *, block_scaled: bool = False, activation: Optional[str] = None, gate: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(x @ dequant(weight)^T) with x quantized to FP8 on the fly.

    x: [..., K] float (quantized per token, or in 1x128 blocks when block_scaled); weight: [N, K] float8_e4m3fn;
    weight_scale: [N] / [N, 1] per output channel (or one element), or [ceil(N/128), K/128] when block_scaled.
    gate / residual broadcast to [..., N]. Returns [..., N] in out_dtype (default: x's dtype)."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight is [N, K] = {tuple(weight.shape)}: "
                         "the last dim of x must be K")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    N = weight.shape[0]
    M = 1
    for d in lead:
        M *= d
    x2 = cm.as_rows(x)
    if block_scaled:
        a, sa = quantize_fp8_blockwise(x2, "1x128")
    else:
        a, sa = quantize_fp8_rowwise(x2)
    gate2 = cm.broadcast_rows("gate", gate, M, N, lead)
    res2 = cm.broadcast_rows("residual", residual, M, N, lead)
    y = fp8_gemm(a, sa, weight, weight_scale, block_scaled=block_scaled, bias=bias, activation=activation,
                 gate=gate2, residual=res2, out_dtype=out_dtype)
    return y.view(*lead, N)


# ============================================================================================================== NVFP4
W4A16_PATHS = ("splitk", "tiled", "dequant")


def w4a16_path(M: int, N: int, K: int, device) -> str:
    """Which W4A16 kernel runs for an [M, K] x [N, K] product on `device`: "splitk" (triton_nvfp4_splitk.py,
    decode-like M), "dequant" (the weight dequantized to the activation dtype by the NVFP4 dequantize kernel, then
    the dense GEMM of torch, cuBLAS on a GPU, float32 accumulation and output, then one epilogue pass) or "tiled"
    (the tiled GEMM of triton_nvfp4.py, dequantizing in registers), from the config table
    (dz_kernels/configs/nvfp4.json, kind w4a16_path)."""
    path = cm.launch_config("nvfp4", "w4a16_path", device, m=M, n=N, k=K)["path"]
    if path not in W4A16_PATHS:
        raise ValueError(f"config table nvfp4: w4a16_path {path!r} is not one of {W4A16_PATHS}")
    return path


# -------------------------------------------------------------------------------------------------------- custom ops
@custom_op("dz::nvfp4_quantize", mutates_args=())
def _op_nvfp4_quant(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cm.triton_runs_on(x):
        return triton_nvfp4.launch_nvfp4_quant(x, global_scale)
    q, s, _ = quantize_nvfp4_reference(x, global_scale)
    return q, s


@_op_nvfp4_quant.register_fake
def _(x, global_scale):
    R, C = x.shape
    return x.new_empty((R, C // 2), dtype=torch.uint8), x.new_empty((R, C // NVFP4_BLOCK), dtype=cm.FP8_DTYPE)


@custom_op("dz::nvfp4_dequantize", mutates_args=())
def _op_nvfp4_dequant(q: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    if cm.triton_runs_on(q):
        return triton_nvfp4.launch_nvfp4_dequant(q, scale, global_scale, out_dtype)
    return dequantize_nvfp4_reference(q, scale, global_scale, out_dtype)


@_op_nvfp4_dequant.register_fake
def _(q, scale, global_scale, out_dtype):
    return q.new_empty((q.shape[0], 2 * q.shape[1]), dtype=out_dtype)


@custom_op("dz::nvfp4_gemm_w4a16", mutates_args=())
def _op_w4a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor,
              bias: Optional[torch.Tensor], activation: str, gate: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    act = None if activation == "none" else activation
    if cm.triton_runs_on(x):
        path = w4a16_path(x.shape[0], w.shape[0], x.shape[1], x.device)
        return triton_nvfp4.launch_w4a16(x, w, w_scale, w_global, bias, act, gate, residual, out_dtype, path)
    return nvfp4_gemm_w4a16_reference(x, w, w_scale, w_global, bias=bias, activation=act, gate=gate,
                                      residual=residual, out_dtype=out_dtype)


@_op_w4a16.register_fake
def _(x, w, w_scale, w_global, bias, activation, gate, residual, out_dtype):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


@custom_op("dz::nvfp4_gemm_w4a4", mutates_args=())
def _op_w4a4(a: torch.Tensor, a_scale: torch.Tensor, a_global: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             w_global: torch.Tensor, bias: Optional[torch.Tensor], activation: str, gate: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], out_dtype: torch.dtype, use_dot_scaled: bool) -> torch.Tensor:
    act = None if activation == "none" else activation
    if cm.triton_runs_on(a):
        return triton_nvfp4.launch_w4a4(a, a_scale, a_global, w, w_scale, w_global, bias, act, gate, residual,
                                        out_dtype, use_dot_scaled)
    return nvfp4_gemm_w4a4_reference(a, a_scale, a_global, w, w_scale, w_global, bias=bias, activation=act,
                                     gate=gate, residual=residual, out_dtype=out_dtype)


@_op_w4a4.register_fake
def _(a, a_scale, a_global, w, w_scale, w_global, bias, activation, gate, residual, out_dtype, use_dot_scaled):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------------------------- public functions
def _check_global(name: str, g, ref: torch.Tensor) -> torch.Tensor:
    if not isinstance(g, torch.Tensor) or g.dtype != torch.float32 or g.numel() != 1:
        raise TypeError(f"{name} must be a float32 tensor with one element (ModelOpt's amax / 2688), got "
                        f"{g if not isinstance(g, torch.Tensor) else (g.dtype, tuple(g.shape))}")
    cm.check_same_device({name: g}, ref, "the data")
    return g.reshape(())


def quantize_nvfp4(x: torch.Tensor, global_scale: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 quantization (Triton on CUDA / interpreter, else the bit-identical reference).

    x: [..., K] float32/bfloat16/float16, K % 16 == 0. global_scale: float32 one-element tensor in ModelOpt's
    convention (weight_scale_2 / input_scale = amax / (6 * 448)); computed from x when None.
    Returns (packed uint8 [..., K/2], block scale float8_e4m3fn [..., K/16], global_scale float32 [])."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")
    K = x.shape[-1]
    if K % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs K (the last dim) to be a multiple of {NVFP4_BLOCK}, got {K}")
    g = nvfp4_global_scale(x) if global_scale is None else _check_global("global_scale", global_scale, x)
    x2 = cm.as_rows(x)
    q, s = call(_op_nvfp4_quant, x2, g)
    return q.view(*x.shape[:-1], K // 2), s.view(*x.shape[:-1], K // NVFP4_BLOCK), g


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """packed uint8 [..., K/2], scale float8_e4m3fn [..., K/16], global_scale float32 -> [..., K] in out_dtype,
    e2m1 * (float(scale) * global_scale) in float32 with one rounding."""
    cm.check_tensor("packed", packed, (torch.uint8,))
    cm.check_tensor("scale", scale, (cm.FP8_DTYPE,))
    cm.check_out_dtype(out_dtype)
    K = 2 * packed.shape[-1]
    if packed.dim() < 1 or K % NVFP4_BLOCK or tuple(scale.shape) != (*packed.shape[:-1], K // NVFP4_BLOCK):
        raise ValueError(f"packed {tuple(packed.shape)} and scale {tuple(scale.shape)} do not describe an NVFP4 "
                         f"tensor: expected scale [..., K/16] with K = 2 * packed.shape[-1] a multiple of 16")
    g = _check_global("global_scale", global_scale, packed)
    cm.check_same_device({"scale": scale}, packed, "packed")
    q2 = packed.reshape(-1, K // 2).contiguous()
    s2 = scale.reshape(-1, K // NVFP4_BLOCK).contiguous()
    out = call(_op_nvfp4_dequant, q2, s2, g, out_dtype)
    return out.view(*packed.shape[:-1], K)


def _check_packed_weight(w, w_scale, K_expected: Optional[int] = None) -> tuple[int, int]:
    cm.check_tensor("w (packed NVFP4 weight)", w, (torch.uint8,), dims=(2,))
    cm.check_tensor("w_scale", w_scale, (cm.FP8_DTYPE,), dims=(2,))
    N, Kh = w.shape
    K = 2 * Kh
    if K % NVFP4_BLOCK:
        raise ValueError(f"the packed weight has K = {K} (2 x {Kh}); NVFP4 needs K to be a multiple of {NVFP4_BLOCK}")
    if K_expected is not None and K != K_expected:
        raise ValueError(f"the activation has K = {K_expected} but the packed weight [N, K/2] = {tuple(w.shape)} "
                         f"holds K = {K}")
    cm.check_contiguous("w (packed NVFP4 weight)", w)
    cm.check_shape("w_scale", w_scale, (N, K // NVFP4_BLOCK))
    cm.check_contiguous("w_scale", w_scale)
    return N, K


def _check_epilogue(bias, gate, residual, M, N, ref, out_dtype, activation):
    cm.check_out_dtype(out_dtype)
    activation_code(activation)
    if bias is not None:
        cm.check_tensor("bias", bias, cm.FLOAT_DTYPES)
        cm.check_shape("bias", bias, (N,))
        cm.check_contiguous("bias", bias)
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None:
            cm.broadcast_rows(name, t, M, N, (M,))
    cm.check_same_device({"bias": bias, "gate": gate, "residual": residual}, ref, "the activation")


def nvfp4_gemm_w4a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                     gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Weight-only NVFP4 GEMM: out = epilogue(x @ dequant(w)^T), [M, N] in out_dtype.

    x: [M, K] bfloat16/float16 (float32 is rounded to bfloat16 for the tensor cores), K contiguous;
    w: [N, K/2] uint8 packed E2M1 (contiguous); w_scale: [N, K/16] float8_e4m3fn; w_global: float32 one element.
    Epilogue arguments as in fp8_gemm."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES, dims=(2,))
    M, K = x.shape
    N, _ = _check_packed_weight(w, w_scale, K)
    g = _check_global("w_global", w_global, w)
    if K > 1 and x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along K (stride {x.stride(1)}); call .contiguous()")
    cm.check_same_device({"w": w, "w_scale": w_scale}, x, "x")
    _check_epilogue(bias, gate, residual, M, N, x, out_dtype, activation)
    return call(_op_w4a16, x, w, w_scale, g, bias, activation or "none", gate, residual, out_dtype)


def nvfp4_gemm_w4a4(a: torch.Tensor, a_scale: torch.Tensor, a_global: torch.Tensor, w: torch.Tensor,
                    w_scale: torch.Tensor, w_global: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                    activation: Optional[str] = None, gate: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                    use_dot_scaled: Optional[bool] = None) -> torch.Tensor:
    """NVFP4 x NVFP4 GEMM: out = epilogue(dequant(a) @ dequant(w)^T), [M, N] in out_dtype.

    a: [M, K/2] uint8, a_scale [M, K/16] e4m3, a_global float32 (from quantize_nvfp4 of the activation);
    w: [N, K/2] uint8, w_scale [N, K/16] e4m3, w_global float32. use_dot_scaled: None picks tl.dot_scaled on
    sm_100 and register dequantization elsewhere; True off sm_100 raises (see the module docstring)."""
    cm.check_tensor("a", a, (torch.uint8,), dims=(2,))
    cm.check_tensor("a_scale", a_scale, (cm.FP8_DTYPE,), dims=(2,))
    M = a.shape[0]
    K = 2 * a.shape[1]
    N, _ = _check_packed_weight(w, w_scale, K)
    cm.check_shape("a_scale", a_scale, (M, K // NVFP4_BLOCK))
    if a.shape[1] > 1 and a.stride(1) != 1:
        raise ValueError("a must be contiguous along K")
    if a_scale.shape[1] > 1 and a_scale.stride(1) != 1:
        raise ValueError("a_scale must be contiguous along K")
    ag = _check_global("a_global", a_global, a)
    wg = _check_global("w_global", w_global, w)
    cm.check_same_device({"a_scale": a_scale, "w": w, "w_scale": w_scale}, a, "a")
    _check_epilogue(bias, gate, residual, M, N, a, out_dtype, activation)
    available = dot_scaled_available(a.device) and not cm.kernels_interpreted()
    if use_dot_scaled is None:
        use_dot_scaled = available
    elif use_dot_scaled and not available:
        raise ValueError("use_dot_scaled=True needs a CUDA device of compute capability 10.x (sm_100, Blackwell); "
                         f"tensors are on {a.device}. The Triton interpreter cannot emulate NVFP4 dot_scaled (it "
                         "decodes scales as E8M0); use use_dot_scaled=None for the register-dequantization path")
    return call(_op_w4a4, a, a_scale, ag, w, w_scale, wg, bias, activation or "none", gate, residual,
                out_dtype, bool(use_dot_scaled))


def nvfp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, *, act_quant: bool = False,
                 input_scale: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                 gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None, use_dot_scaled: Optional[bool] = None) -> torch.Tensor:
    """y = epilogue(x @ dequant(w)^T) for x [..., K]: W4A16 when act_quant is False, else x is quantized to NVFP4
    first (W4A4) with global scale `input_scale` (a static, calibrated ModelOpt input_scale) or, when None, one
    computed from this x's amax. gate / residual broadcast to [..., N]; returns [..., N] in out_dtype (default
    x's dtype)."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != 2 * w.shape[-1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but the packed weight [N, K/2] = {tuple(w.shape)} holds "
                         f"K = {2 * w.shape[-1]}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    N = w.shape[0]
    x2 = cm.as_rows(x)
    M = x2.shape[0]
    gate2 = cm.broadcast_rows("gate", gate, M, N, lead)
    res2 = cm.broadcast_rows("residual", residual, M, N, lead)
    if act_quant:
        a, a_s, ag = quantize_nvfp4(x2, input_scale)
        y = nvfp4_gemm_w4a4(a, a_s, ag, w, w_scale, w_global, bias=bias, activation=activation, gate=gate2,
                            residual=res2, out_dtype=out_dtype, use_dot_scaled=use_dot_scaled)
    else:
        y = nvfp4_gemm_w4a16(x2, w, w_scale, w_global, bias=bias, activation=activation, gate=gate2,
                             residual=res2, out_dtype=out_dtype)
    return y.view(*lead, N)
