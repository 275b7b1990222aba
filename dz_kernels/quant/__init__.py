"""FP8 (E4M3) and NVFP4 quantization: Triton kernels, plain-PyTorch references, `quantize_`, ModelOpt checkpoints.

    ops.py            the public functions, their checks and dispatch, the dz:: custom ops (FP8 and NVFP4)
    triton_fp8.py     FP8 kernels: quantization (per row, 1x128, 128x128), dequantization, GEMM + fused epilogue
    triton_nvfp4.py   NVFP4 kernels: quantize / dequantize, W4A16 GEMM (Hopper), W4A4 GEMM (tl.dot_scaled, sm_100)
    triton_nvfp4_splitk.py   the split-K W4A16 GEMM for decode-like M, and the one-pass scaled epilogue
    triton_common.py  what the GEMMs share: the epilogue, the tile order, the launch rule, E2M1 codes, the W4A16 K step
    reference.py      constants, bit layouts, and the plain-PyTorch reference of every kernel (the numerics)
    dispatch.py       which FP8 linear path runs per shape (our GEMM, cuBLAS's FP8 GEMM, bf16), by config table
    api.py            quantize_ / dequantize_ / calibrate_, the config dataclasses, Float8Linear and NVFP4Linear,
                      Float8Rows (an activation a producer already quantized per token) and quantize_rows
    modelopt_io.py    ModelOpt FP8 / NVFP4 checkpoint tensors (weight, weight_scale, weight_scale_2, input_scale)
Every kernel is also a `torch.ops.dz.*` custom op with a fake implementation (torch.compile, CUDA graphs).
"""
from .api import (  # noqa: F401
    DEFAULT_EXCLUDED, Float8BlockScaled, Float8DynamicActivationFloat8Weight, Float8Linear, Float8Rows, NVFP4,
    NVFP4Linear, NVFP4WeightOnly, calibrate_, default_filter, dequantize_, quantize_, quantize_rows,
)
from .reference import (  # noqa: F401
    dequantize_fp8_reference, dequantize_nvfp4_reference, fp8_gemm_reference, nvfp4_gemm_w4a4_reference,
    nvfp4_gemm_w4a16_reference, quantize_fp8_reference, quantize_nvfp4_reference,
)
from .ops import (  # noqa: F401
    dequantize_fp8, dequantize_nvfp4, dot_scaled_available, fp8_gemm, fp8_linear, nvfp4_gemm_w4a4, nvfp4_gemm_w4a16,
    nvfp4_linear, quantize_fp8_blockwise, quantize_fp8_rowwise, quantize_nvfp4,
)
from .modelopt_io import export_modelopt, load_modelopt_, read_modelopt, save_modelopt  # noqa: F401
