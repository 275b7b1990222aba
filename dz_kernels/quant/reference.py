"""The FP8 (E4M3) and NVFP4 formats: constants, bit layout, and the plain-PyTorch reference of every quant kernel.

FP8 E4M3 (torch.float8_e4m3fn)
    max 448, no infinities. A quantized tensor is (q, scale) with x ~= q * scale: scale is float32 and is the
    *dequantization* multiplier, scale = max(amax, FP8_AMAX_FLOOR) / 448 over the scaling group (the floor keeps
    an all-zero group finite: it quantizes to 0). q = e4m3(clamp(x / scale, -448, 448)), division and cast
    rounding to nearest-even. This is ModelOpt's convention (scale = amax / 448, q = (x / scale).to(e4m3)) for
    every group whose amax is above the floor, and the row scale the fused LayerNorm kernels write. The one
    definition of the convention, NaN included (a group holding a NaN gets a NaN scale and NaN values), is
    dz_kernels/_common.py; `/ 448` is an IEEE division on every device there.
    Granularities for a 2-D tensor [R, C] (activations [M, K] or nn.Linear weights [N, K]):
      "tensor"        one scale, shape []
      "row"           one scale per row, shape [R, 1]: per token for activations, per output channel for weights
      "block1x128"    one scale per 1x128 block along C, shape [R, C/128] (C % 128 == 0): activations of the
                      block-scaled GEMM (DeepSeek-V3 style)
      "block128x128"  one scale per 128x128 tile, shape [ceil(R/128), C/128] (C % 128 == 0; R may be ragged):
                      weights of the block-scaled GEMM (ModelOpt "fp8_pb_wo" layout)

NVFP4 (docs/reference.md#formats; ModelOpt's NVFP4QTensor, modelopt/torch/quantization/qtensor/nvfp4_tensor.py)
    element: E2M1, codes 0..15 = sign (bit 3), exponent (bits 2..1), mantissa (bit 0):
        0b0000 0   0b0001 0.5   0b0010 1   0b0011 1.5   0b0100 2   0b0101 3   0b0110 4   0b0111 6
        0b1xxx the negatives (0b1000 is -0).
    packing: two codes per uint8 along the last (K) dim; element 2j in the LOW nibble (bits 3..0) of byte j and
        element 2j+1 in the HIGH nibble (bits 7..4), as ModelOpt packs (`(q[..., 1::2] << 4) | q[..., 0::2]`),
        as Triton's `tl.dot_scaled` "e2m1" operands and the Blackwell tensor cores read it.
        A tensor [R, C] packs into uint8 [R, C/2]; C % 16 == 0.
    block scale: one float8_e4m3fn per 16 consecutive elements along K, shape [R, C/16].
    global scale: one float32 per tensor. The format's description writes it in the quantization direction,
        global = 448 * 6 / amax; ModelOpt stores its reciprocal, the dequantization multiplier
        `weight_scale_2` = amax / (448 * 6) (and `input_scale`, same definition, for activations). Everything in
        this package stores and takes the ModelOpt (dequantization) value, called `global_scale` here.
    quantization of x with global scale g (all float32, every division and product rounded to nearest-even):
        s_b  = block_amax / (6 * g)           per block of 16; s_b == 0 -> 1.0; clamp to [2^-9, 448]
        s8_b = e4m3(s_b)                      round to nearest-even
        v    = x / (float(s8_b) * g)
        code = E2M1 round-to-nearest-even of |v| (saturating at 6), sign bit = (v < 0)
    dequantization: x ~= e2m1(code) * (float(s8_b) * g).
    For an all-zero tensor (amax 0) g is set to 1.0, so every code and scale is finite (ModelOpt divides 0 by 0).

Accuracy bars the tests hold (SQNR in dB against float64; tests/test_quant_*.py):
    quantize -> dequantize of Gaussian data      FP8 E4M3 >= 28 (about 31.5 measured), NVFP4 >= 18 (about 20)
    Triton quantizers vs these references        bit-exact (and these are bit-exact with ModelOpt 0.47)
    GEMM vs float64 dequantize-then-matmul       >= 60 with float32 output, >= 40 with bfloat16 output
    linear vs float64 unquantized product        FP8 >= 25, NVFP4 W4A16 >= 17, NVFP4 W4A4 >= 14
    tiny 3-linear-deep model vs its bf16 output  FP8 >= 20, W4A16 >= 12, W4A4 >= 10
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._common import E4M3_MAX, FP8_AMAX_FLOOR, FP8_DTYPE, fp8_scale, quantize_e4m3

__all__ = [
    "E4M3_MAX", "E2M1_MAX", "FP8_AMAX_FLOOR", "FP8_BLOCK", "NVFP4_BLOCK", "E4M3_MIN_SCALE",
    "E2M1_VALUES", "FP8_GRANULARITIES",
    "e2m1_encode", "e2m1_decode", "pack_e2m1", "unpack_e2m1",
    "fp8_scale_shape", "quantize_fp8_reference", "dequantize_fp8_reference",
    "nvfp4_global_scale", "nvfp4_global_scale_from_amax", "quantize_nvfp4_reference", "dequantize_nvfp4_reference",
    "gelu_tanh_reference", "epilogue_reference",
    "fp8_gemm_reference", "nvfp4_gemm_w4a16_reference", "nvfp4_gemm_w4a4_reference",
]

E2M1_MAX = 6.0
FP8_BLOCK = 128
NVFP4_BLOCK = 16
E4M3_MIN_SCALE = 2.0 ** -9  # smallest positive E4M3 (subnormal): the floor of an NVFP4 block scale, as ModelOpt
FP8_GRANULARITIES = ("tensor", "row", "block1x128", "block128x128")

# E2M1 code -> value (index = 4-bit code).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# --------------------------------------------------------------------------------------------------------- E2M1 codes
def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """float tensor (already divided by its scale) -> uint8 E2M1 codes (0..15), same shape.

    Round to nearest, ties to the even code, saturating at +-6; the sign bit is (v < 0), so a small negative value
    that rounds to zero gives -0 (code 8), as ModelOpt does. The magnitude thresholds are the midpoints
    0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5; at 0.75, 1.75 and 3.5 a tie goes up (to the even code), at the others down.
    """
    a = v.abs().float()
    code = ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8) + (a > 1.25).to(torch.uint8)
            + (a >= 1.75).to(torch.uint8) + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
            + (a > 5.0).to(torch.uint8))
    return code | ((v < 0).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) -> float32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=code.device)
    return table[code.long() & 0xF]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., C] (C even) -> packed uint8 [..., C/2]: element 2j low nibble, element 2j+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dim, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [..., C/2] -> uint8 codes [..., C] (inverse of pack_e2m1)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed E2M1 data must be uint8, got {packed.dtype}")
    out = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------------------------- FP8
def _check_2d_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [R, C], got shape {tuple(x.shape)}")


def fp8_scale_shape(granularity: str, R: int, C: int) -> tuple:
    """The scale tensor's shape for an [R, C] tensor quantized with `granularity` (raises on a bad C)."""
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return (R, 1)
    if granularity in ("block1x128", "block128x128"):
        if C % FP8_BLOCK:
            raise ValueError(f"{granularity} FP8 scaling needs the last dim (K) to be a multiple of {FP8_BLOCK}, "
                             f"got {C}")
        rows = R if granularity == "block1x128" else -(-R // FP8_BLOCK)
        return (rows, C // FP8_BLOCK)
    raise ValueError(f"unknown FP8 granularity {granularity!r}; expected one of {FP8_GRANULARITIES}")


def _fp8_group_amax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    R, C = x.shape
    a = x.abs().float()
    if granularity == "tensor":
        return a.amax()
    if granularity == "row":
        return a.amax(dim=1, keepdim=True)
    if granularity == "block1x128":
        return a.view(R, C // FP8_BLOCK, FP8_BLOCK).amax(dim=2)
    Rp = -(-R // FP8_BLOCK) * FP8_BLOCK
    a = F.pad(a, (0, 0, 0, Rp - R))
    return a.view(Rp // FP8_BLOCK, FP8_BLOCK, C // FP8_BLOCK, FP8_BLOCK).amax(dim=(1, 3))


def _expand_scale(scale: torch.Tensor, granularity: str, R: int, C: int) -> torch.Tensor:
    if granularity in ("tensor", "row"):
        return scale
    rb = 1 if granularity == "block1x128" else FP8_BLOCK
    return scale.repeat_interleave(rb, dim=0)[:R].repeat_interleave(FP8_BLOCK, dim=1)


def quantize_fp8_reference(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch FP8 E4M3 quantization (the module docstring gives the numerics).

    x: [R, C] float32/bfloat16/float16. Returns (q [R, C] float8_e4m3fn, scale float32 of
    fp8_scale_shape(granularity, R, C)), with x ~= q * scale."""
    _check_2d_float("x", x)
    R, C = x.shape
    fp8_scale_shape(granularity, R, C)  # validates C
    scale = fp8_scale(_fp8_group_amax(x, granularity))
    return quantize_e4m3(x, _expand_scale(scale, granularity, R, C)), scale


def dequantize_fp8_reference(q: torch.Tensor, scale: torch.Tensor, granularity: str = "row",
                             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [R, C] float8_e4m3fn, scale float32 (shape per granularity) -> q * scale in out_dtype (float32 math)."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"q must be float8_e4m3fn, got {q.dtype}")
    R, C = q.shape
    if tuple(scale.shape) != fp8_scale_shape(granularity, R, C):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {fp8_scale_shape(granularity, R, C)} for "
                         f"{granularity} scaling of a [{R}, {C}] tensor")
    return (q.float() * _expand_scale(scale.float(), granularity, R, C)).to(out_dtype)


# -------------------------------------------------------------------------------------------------------------- NVFP4
def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-tensor float32 scale of NVFP4 in ModelOpt's convention: amax(|x|) / (448 * 6), a 0-dim tensor on x's
    device (no host sync), 1.0 for an all-zero tensor (and for one holding a NaN: the NaN then shows in the block
    scales). It is `weight_scale_2` for weights and `input_scale` for activations. IEEE division on every device
    (a Python-scalar divisor would be a multiplication by its reciprocal on CUDA)."""
    return nvfp4_global_scale_from_amax(torch.linalg.vector_norm(x.detach(), ord=float("inf")))


def nvfp4_global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / (448 * 6) in float32 (IEEE division), 1.0 where amax is 0 or NaN (see nvfp4_global_scale)."""
    amax = amax.float()
    g = amax / torch.full((), E2M1_MAX * E4M3_MAX, dtype=torch.float32, device=amax.device)
    return torch.where(amax > 0, g, torch.ones_like(g))


def _check_global_scale(g: torch.Tensor) -> None:
    if not isinstance(g, torch.Tensor) or g.dtype != torch.float32 or g.numel() != 1:
        raise TypeError("global_scale must be a float32 tensor with one element (ModelOpt's weight_scale_2 / "
                        f"input_scale = amax / 2688), got {g!r}")


def quantize_nvfp4_reference(x: torch.Tensor, global_scale: Optional[torch.Tensor] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch NVFP4 quantization (numerics in the module docstring; bit-exact with ModelOpt).

    x: [R, C] float, C % 16 == 0. global_scale: float32 one-element tensor (ModelOpt's weight_scale_2 /
    input_scale), computed from x when None.
    Returns (packed uint8 [R, C/2], block scales float8_e4m3fn [R, C/16], global_scale float32 0-dim)."""
    _check_2d_float("x", x)
    R, C = x.shape
    if C % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the last dim (K) to be a multiple of {NVFP4_BLOCK}, got {C}")
    g = nvfp4_global_scale(x) if global_scale is None else global_scale
    _check_global_scale(g)
    g = g.reshape(()).to(x.device)
    xb = x.float().view(R, C // NVFP4_BLOCK, NVFP4_BLOCK)
    s = xb.abs().amax(dim=2) / (E2M1_MAX * g)
    s = torch.where(s == 0, torch.ones_like(s), s)
    s8 = s.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(FP8_DTYPE)
    v = xb / (s8.float() * g).unsqueeze(-1)
    codes = e2m1_encode(v).view(R, C)
    return pack_e2m1(codes), s8, g


def dequantize_nvfp4_reference(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed uint8 [R, C/2], scale float8_e4m3fn [R, C/16], global_scale float32 -> [R, C] in out_dtype:
    e2m1(code) * (float(scale) * global_scale), float32 math, one final rounding."""
    if packed.dtype != torch.uint8 or scale.dtype != FP8_DTYPE:
        raise TypeError(f"packed must be uint8 and scale float8_e4m3fn, got {packed.dtype} and {scale.dtype}")
    _check_global_scale(global_scale)
    R, half = packed.shape
    C = 2 * half
    if tuple(scale.shape) != (R, C // NVFP4_BLOCK) or C % NVFP4_BLOCK:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {(R, C // NVFP4_BLOCK)} for packed data "
                         f"{tuple(packed.shape)} (K = {C} must be a multiple of {NVFP4_BLOCK})")
    vals = e2m1_decode(unpack_e2m1(packed)).view(R, C // NVFP4_BLOCK, NVFP4_BLOCK)
    bs = scale.float() * global_scale.reshape(()).to(packed.device)
    return (vals * bs.unsqueeze(-1)).view(R, C).to(out_dtype)


# ----------------------------------------------------------------------------------------------------- GEMM references
def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def epilogue_reference(acc: torch.Tensor, bias=None, activation: Optional[str] = None, gate=None, residual=None
                       ) -> torch.Tensor:
    """out = residual + gate * act(acc + bias), each term optional; computed in acc's dtype (float32/float64).
    gate/residual broadcast to acc's shape [M, N]."""
    out = acc
    if bias is not None:
        out = out + bias.to(acc.dtype)
    if activation == "gelu_tanh":
        out = gelu_tanh_reference(out)
    elif activation not in (None, "none"):
        raise ValueError(f"unknown activation {activation!r}; expected None or 'gelu_tanh'")
    if gate is not None:
        out = gate.to(acc.dtype) * out
    if residual is not None:
        out = residual.to(acc.dtype) + out
    return out


def fp8_gemm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
                       block_scaled: bool = False, bias=None, activation=None, gate=None, residual=None,
                       out_dtype: Optional[torch.dtype] = torch.bfloat16, compute_dtype=torch.float32) -> torch.Tensor:
    """Dequantize-then-matmul reference of fp8_gemm: a [M, K] and b [N, K] float8_e4m3fn; row scaling
    (a_scale [M, 1] or one element, b_scale [N, 1] / [N] or one element) or, with block_scaled=True, a_scale
    [M, K/128] and b_scale [ceil(N/128), K/128]. Returns epilogue(a_deq @ b_deq^T) [M, N] in out_dtype
    (compute_dtype=torch.float64 and out_dtype=None give the float64 ground truth)."""
    if block_scaled:
        ad = dequantize_fp8_reference(a, a_scale, "block1x128", compute_dtype)
        bd = dequantize_fp8_reference(b, b_scale, "block128x128", compute_dtype)
    else:
        ad = a.to(compute_dtype) * a_scale.to(compute_dtype).reshape(-1, 1)
        bd = b.to(compute_dtype) * b_scale.to(compute_dtype).reshape(-1, 1)
    out = epilogue_reference(ad @ bd.t(), bias, activation, gate, residual)
    return out if out_dtype is None else out.to(out_dtype)


def nvfp4_gemm_w4a16_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor, *,
                               bias=None, activation=None, gate=None, residual=None,
                               out_dtype: Optional[torch.dtype] = torch.bfloat16, compute_dtype=torch.float32):
    """x [M, K] (float) @ dequant(w [N, K/2] packed, w_scale [N, K/16], w_global)^T with the epilogue."""
    wd = dequantize_nvfp4_reference(w, w_scale, w_global, compute_dtype)
    out = epilogue_reference(x.to(compute_dtype) @ wd.t(), bias, activation, gate, residual)
    return out if out_dtype is None else out.to(out_dtype)


def nvfp4_gemm_w4a4_reference(a: torch.Tensor, a_scale: torch.Tensor, a_global: torch.Tensor, w: torch.Tensor,
                              w_scale: torch.Tensor, w_global: torch.Tensor, *, bias=None, activation=None, gate=None,
                              residual=None, out_dtype: Optional[torch.dtype] = torch.bfloat16,
                              compute_dtype=torch.float32):
    """dequant(a: packed [M, K/2], [M, K/16], a_global) @ dequant(w: [N, K/2], [N, K/16], w_global)^T, epilogue."""
    ad = dequantize_nvfp4_reference(a, a_scale, a_global, compute_dtype)
    wd = dequantize_nvfp4_reference(w, w_scale, w_global, compute_dtype)
    out = epilogue_reference(ad @ wd.t(), bias, activation, gate, residual)
    return out if out_dtype is None else out.to(out_dtype)
