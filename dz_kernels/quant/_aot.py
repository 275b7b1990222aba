"""Ahead-of-time compilation of the quant kernels for a GPU this machine may not have (no driver needed).

`python -m dz_kernels.quant._aot [NAME ...]` records the launches the quant launchers make (dz_kernels._aot: Triton's
launch replaced by a recorder, CPU tensors, the GPU's launch rules) and compiles, for each NAME (all by default),
the first launch of its kernel, specialized as Triton's launcher specializes it, with Triton's own compiler and
ptxas:
    fp8_gemm_row_sm90, fp8_gemm_block_sm90   FP8 GEMM, row / block scales, sm_90 (Hopper: expects FP8 wgmma)
    nvfp4_w4a16_sm90                         tiled W4A16 (bf16 wgmma after in-register dequantization)
    nvfp4_w4a16_splitk_sm90                  split-K W4A16 (small M: bf16 mma on [16, BLOCK_K] activation tiles)
    nvfp4_w4a4_dot_scaled_sm100              W4A4 through tl.dot_scaled, sm_100 (Blackwell: expects tcgen05.mma
                                             kind::mxf4nvf4 block16)
    nvfp4_w4a4_dequant_sm90                  W4A4, register dequantization (the Hopper emulation)
and prints a JSON object {name: [distinct MMA instructions found in the PTX]}. It must run with TRITON_INTERPRET=0
(the interpreter replaces @triton.jit functions by Python ones that cannot be compiled, and dz_kernels turns it on
without CUDA when the variable is unset).
The tests use it to check that the GPU paths compile and reach the intended tensor-core instructions on a CPU-only
machine; whether they compute the right numbers there is checked by the CUDA tests where a GPU is present.
`record_quant_launches` is also the quant family of tests/aot_capture.py (every launch and autotune config).
"""
from __future__ import annotations

import contextlib
import json
import sys

import torch

from .._aot import N_SM, compile_launches, record_launches

# name: (kernel, the constants its launch must have, the architecture it is compiled for)
KERNELS = {
    "fp8_gemm_row_sm90": ("_fp8_gemm_kernel", {"BLOCK_SCALED": False}, 90),
    "fp8_gemm_block_sm90": ("_fp8_gemm_kernel", {"BLOCK_SCALED": True}, 90),
    "nvfp4_w4a16_sm90": ("_nvfp4_w4a16_kernel", {}, 90),
    "nvfp4_w4a4_dot_scaled_sm100": ("_nvfp4_w4a4_kernel", {"USE_DOT_SCALED": True}, 100),
    "nvfp4_w4a4_dequant_sm90": ("_nvfp4_w4a4_kernel", {"USE_DOT_SCALED": False}, 90),
    "nvfp4_w4a16_splitk_sm90": ("_nvfp4_w4a16_splitk_kernel", {}, 90),
}
NAMES = tuple(KERNELS)


@contextlib.contextmanager
def gpu_launch_rules():
    """Inside the block the quant launchers take their GPU choices on CPU tensors: the config tables and autotuned
    wrappers instead of the interpreter's fixed tiles, and split-K's plan over N_SM multiprocessors. Restored after."""
    from types import SimpleNamespace

    from . import _common as qcm

    saved = qcm.kernels_interpreted, torch.cuda.get_device_properties
    qcm.kernels_interpreted = lambda: False
    torch.cuda.get_device_properties = lambda *_: SimpleNamespace(multi_processor_count=N_SM)
    try:
        yield
    finally:
        qcm.kernels_interpreted, torch.cuda.get_device_properties = saved


def record_quant_launches(small: bool = False, dot_scaled: bool = False) -> None:
    """Call the quant launchers at the bench's Wan shape K = N = 5120 (small: 256), M = 1785 (one denoising pass) and
    M = 16 (decode-like; the NVFP4 split-K path), bf16 activations and outputs with a bias: FP8 per-row and block
    quantization, dequantization, the FP8 GEMM (row and block scales), NVFP4 quantization and dequantization, the
    W4A16 tiled GEMM, the split-K GEMM and its reduction / scaled epilogue, and the W4A4 register-dequantization GEMM
    (the Hopper emulation path; dot_scaled: also its tl.dot_scaled path). Inside record_launches() nothing runs, and
    an autotuned GEMM records every config its autotuner would time."""
    from . import triton_fp8 as f8, triton_nvfp4 as f4, triton_nvfp4_splitk as sk

    K = N = 256 if small else 5120
    bf, e4 = torch.bfloat16, torch.float8_e4m3fn
    bias = torch.empty(N, dtype=bf)
    with gpu_launch_rules():
        for M in (1785, 16):
            x = torch.empty(M, K, dtype=bf)
            f8.launch_fp8_quant_rows(x)
            f8.launch_fp8_quant_blocks(x, True)
            a, b = torch.empty(M, K, dtype=e4), torch.empty(N, K, dtype=e4)
            f8.launch_fp8_dequant(a, torch.empty(M, 1), "row", bf)
            f8.launch_fp8_gemm(a, torch.empty(M, 1), b, torch.empty(N, 1), False, bias, None, None, None, bf)
            if M > 16:
                f8.launch_fp8_quant_blocks(x, False)
                f8.launch_fp8_gemm(a, torch.empty(M, K // 128), b, torch.empty(N // 128, K // 128), True, bias, None,
                                   None, None, bf)
            g = torch.ones((), dtype=torch.float32)
            f4.launch_nvfp4_quant(x, g)
            w, ws = torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(N, K // 16, dtype=e4)
            if M > 16:
                f4.launch_nvfp4_dequant(w, ws, g, bf)                 # the "dequant" path: then cuBLAS, then
                sk.launch_scaled_epilogue(torch.empty(M, N), g, bias, 0, (x, 0, 0, x, 0, 0), False, False,
                                          torch.empty(M, N, dtype=bf))    # the global scale and the bias in one pass
                f4.launch_w4a16(x, w, ws, g, bias, None, None, None, bf, path="tiled")
                for use_ds in (False, True) if dot_scaled else (False,):
                    f4.launch_w4a4(w[:M], ws[:M], g, w, ws, g, bias, None, None, None, bf, use_dot_scaled=use_ds)
            else:
                f4.launch_w4a16(x, w, ws, g, bias, None, None, None, bf, path="splitk")


def main(names=NAMES) -> dict:
    """{name: MMA instructions} for the requested subset of NAMES."""
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {NAMES}")

    from .._common import kernels_interpreted

    if kernels_interpreted():
        raise RuntimeError("the kernels were built for the Triton interpreter: run with TRITON_INTERPRET=0 (dz_kernels "
                           "turns the interpreter on without CUDA when the variable is unset)")
    with record_launches() as launches:
        record_quant_launches(small=True, dot_scaled="nvfp4_w4a4_dot_scaled_sm100" in names)
    out = {}
    for name in names:
        kernel, consts, arch = KERNELS[name]
        first = next((ln for ln in launches if ln[0].__name__ == kernel
                      and all(ln[2].get(c) == v for c, v in consts.items())), None)
        if first is None:
            raise RuntimeError(f"{name}: the quant launchers made no launch of {kernel} with {consts}")
        records, failed = compile_launches([first], arch, verbose=False)
        if failed:
            raise RuntimeError(f"{name}: {kernel} did not compile for sm_{arch} (the error is printed above)")
        out[name] = records[0]["mma"]
    return out


if __name__ == "__main__":
    json.dump(main(tuple(sys.argv[1:]) or NAMES), sys.stdout)
    sys.stdout.write("\n")
