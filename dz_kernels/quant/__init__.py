"""FP8 (E4M3) and NVFP4 quantization: Triton kernels, plain-PyTorch references, `quantize_`, ModelOpt checkpoints.

    formats.py      constants, bit layouts, and the reference of every kernel (read its docstring for the numerics)
    fp8.py          FP8 quantization kernels (per row, 1x128, 128x128), dequantization, FP8 GEMM + fused epilogue
    nvfp4.py        NVFP4 quantize / dequantize, W4A16 GEMM (Hopper), W4A4 GEMM (tl.dot_scaled on sm_100)
    api.py          quantize_ / dequantize_ / calibrate_, the config dataclasses, Float8Linear and NVFP4Linear
    modelopt_io.py  ModelOpt FP8 / NVFP4 checkpoint tensors (weight, weight_scale, weight_scale_2, input_scale)
Every kernel is also a `torch.ops.dz.*` custom op with a fake implementation (torch.compile, CUDA graphs).
"""
from .api import (  # noqa: F401
    DEFAULT_EXCLUDED, Float8BlockScaled, Float8DynamicActivationFloat8Weight, Float8Linear, NVFP4, NVFP4Linear,
    NVFP4WeightOnly, calibrate_, default_filter, dequantize_, quantize_,
)
from .formats import (  # noqa: F401
    dequantize_fp8_reference, dequantize_nvfp4_reference, fp8_gemm_reference, nvfp4_gemm_w4a4_reference,
    nvfp4_gemm_w4a16_reference, quantize_fp8_reference, quantize_nvfp4_reference,
)
from .fp8 import dequantize_fp8, fp8_gemm, fp8_linear, quantize_fp8_blockwise, quantize_fp8_rowwise  # noqa: F401
from .modelopt_io import export_modelopt, load_modelopt_, read_modelopt, save_modelopt  # noqa: F401
from .nvfp4 import (  # noqa: F401
    dequantize_nvfp4, dot_scaled_available, nvfp4_gemm_w4a4, nvfp4_gemm_w4a16, nvfp4_linear, quantize_nvfp4,
)
