"""Ahead-of-time compilation of the quant GEMM kernels for a GPU this machine may not have (no driver needed).

`python -m dz_kernels.quant._aot [NAME ...]` compiles (all by default), with Triton's own compiler and ptxas:
    fp8_gemm (row and block scales)  for sm_90   (Hopper: expects FP8 wgmma)
    nvfp4_w4a16                      for sm_90   (bf16 wgmma after in-register dequantization)
    nvfp4_w4a16 split-K (small M)    for sm_90   (the same, on [16, BLOCK_K] activation tiles)
    nvfp4_w4a4, dot_scaled           for sm_100  (Blackwell: expects tcgen05.mma kind::mxf4nvf4 block16)
    nvfp4_w4a4, register dequant     for sm_90
and prints a JSON object {name: [distinct MMA instructions found in the PTX]}. It must run with TRITON_INTERPRET=0
(the interpreter replaces @triton.jit functions by Python ones that cannot be compiled, and dz_kernels turns it on
without CUDA when the variable is unset).
The tests use it to check that the GPU paths compile and reach the intended tensor-core instructions on a CPU-only
machine; whether they compute the right numbers there is checked by the CUDA tests where a GPU is present.
"""
from __future__ import annotations

import json
import sys

from .._aot import mma_instructions as _mma


def _sig(ptr_types: dict, n_ints: int, int_names, constexprs: dict) -> tuple[dict, dict]:
    sig = dict(ptr_types)
    for name in int_names[:n_ints]:
        sig[name] = "i32"
    for name in constexprs:
        sig[name] = "constexpr"
    return sig, constexprs


def _compile(fn, signature: dict, constexprs: dict, cap: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 8, "num_stages": 3}).asm["ptx"]


NAMES = ("fp8_gemm_row_sm90", "fp8_gemm_block_sm90", "nvfp4_w4a16_sm90", "nvfp4_w4a4_dot_scaled_sm100",
         "nvfp4_w4a4_dequant_sm90", "nvfp4_w4a16_splitk_sm90")


def main(names=NAMES) -> dict:
    """{name: MMA instructions} for the requested subset of NAMES."""
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {NAMES}")

    from .._common import kernels_interpreted

    if kernels_interpreted():
        raise RuntimeError("the kernels were built for the Triton interpreter: run with TRITON_INTERPRET=0 (dz_kernels "
                           "turns the interpreter on without CUDA when the variable is unset)")
    from . import triton_fp8 as fp8, triton_nvfp4 as nvfp4

    epi = {"HAS_BIAS": True, "ACT": 1, "HAS_GATE": True, "HAS_RES": True}
    tiles = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}
    out = {}

    fp8_ints = ["M", "N", "K", "stride_am", "stride_bn", "stride_asm", "stride_ask", "stride_bsn", "stride_bsk",
                "stride_gm", "stride_gn", "stride_rm", "stride_rn", "stride_om"]
    fp8_ptrs = {"A": "*fp8e4nv", "B": "*fp8e4nv", "AS": "*fp32", "BS": "*fp32", "BIAS": "*bf16", "GATE": "*bf16",
                "RES": "*bf16", "OUT": "*bf16"}
    for block in (False, True):
        ce = {"BLOCK_SCALED": block, **epi, **tiles}
        sig, ce = _sig(fp8_ptrs, len(fp8_ints), fp8_ints, ce)
        name = f"fp8_gemm_{'block' if block else 'row'}_sm90"
        if name in names:
            out[name] = _mma(_compile(fp8._fp8_gemm_kernel, sig, ce, 90))

    w16_ints = ["M", "N", "K", "stride_xm", "stride_wn", "stride_wsn", "stride_gm", "stride_gn", "stride_rm",
                "stride_rn", "stride_om"]
    w16_ptrs = {"X": "*bf16", "W": "*u8", "WS": "*fp8e4nv", "WG": "*fp32", "BIAS": "*bf16", "GATE": "*bf16",
                "RES": "*bf16", "OUT": "*bf16"}
    sig, ce = _sig(w16_ptrs, len(w16_ints), w16_ints, {**epi, "INTERPRET": False, **tiles})
    if "nvfp4_w4a16_sm90" in names:
        out["nvfp4_w4a16_sm90"] = _mma(_compile(nvfp4._nvfp4_w4a16_kernel, sig, ce, 90))

    if "nvfp4_w4a16_splitk_sm90" in names:
        from . import triton_nvfp4_splitk as nvfp4_splitk

        sk_ints = ["M", "N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_wsn", "stride_ps", "stride_pm",
                   "stride_gm", "stride_gn", "stride_rm", "stride_rn", "stride_om"]
        sk_ptrs = {**w16_ptrs, "PART": "*fp32"}
        sig, ce = _sig(sk_ptrs, len(sk_ints), sk_ints, {**epi, "SINGLE": False, "INTERPRET": False, "BLOCK_M": 16,
                                                         "BLOCK_N": 64, "BLOCK_K": 256})
        out["nvfp4_w4a16_splitk_sm90"] = _mma(_compile(nvfp4_splitk._nvfp4_w4a16_splitk_kernel, sig, ce, 90))

    w4_ints = ["M", "N", "K", "stride_am", "stride_asm", "stride_wn", "stride_wsn", "stride_gm", "stride_gn",
               "stride_rm", "stride_rn", "stride_om"]
    w4_ptrs = {"A": "*u8", "AS": "*fp8e4nv", "AG": "*fp32", "W": "*u8", "WS": "*fp8e4nv", "WG": "*fp32",
               "BIAS": "*bf16", "GATE": "*bf16", "RES": "*bf16", "OUT": "*bf16"}
    for use_ds, cap in ((True, 100), (False, 90)):
        sig, ce = _sig(w4_ptrs, len(w4_ints), w4_ints,
                       {**epi, "USE_DOT_SCALED": use_ds, "INTERPRET": False, **tiles})
        name = "nvfp4_w4a4_dot_scaled_sm100" if use_ds else "nvfp4_w4a4_dequant_sm90"
        if name in names:
            out[name] = _mma(_compile(nvfp4._nvfp4_w4a4_kernel, sig, ce, cap))
    return out


if __name__ == "__main__":
    json.dump(main(tuple(sys.argv[1:]) or NAMES), sys.stdout)
    sys.stdout.write("\n")
