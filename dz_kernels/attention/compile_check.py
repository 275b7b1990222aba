"""Compile the layout-attention kernels ahead of time for a CUDA architecture, without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never sees the GPU code path (bf16 tensor-core dots,
full-precision fp32 dots, atomics, shared-memory limits). This compiles every kernel of the default tile configs
(`op.default_config` on CUDA) for bf16, fp16 and fp32 and head dims 16..128 down to a cubin with Triton's bundled
ptxas, and prints the shared memory each one needs:

    python -m dz_kernels.attention.compile_check [--arch 90] [--dtypes bf16,fp16,fp32] [--head-dims 16,32,64,128]

Run it with TRITON_INTERPRET unset: under the interpreter the kernels are interpreted functions, not compilable.
"""
from __future__ import annotations

import argparse
import os
import sys

_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


def compile_all(arch: int = 90, dtypes=("bf16", "fp16", "fp32"), head_dims=(16, 32, 64, 128), kernels=None,
                verbose=True) -> list:
    """Compile each kernel (all, or those named in `kernels`) for each (dtype, head dim); returns
    [(kernel, dtype, head dim, shared bytes)]."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels are interpreted functions "
                           "under the interpreter)")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
    from ._fwd import _fwd_kernel
    from .op import default_config
    from .schedule import nwin

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    target = GPUTarget("cuda", arch, 32)
    results = []

    def build(fn, elem: str, consts: dict, warps: int, stages: int) -> int:
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
                sig[name] = "*" + elem
            elif name in ("LSE", "DELTA", "DQ_ACC", "DLSE"):
                sig[name] = "*fp32"
            elif name in ("Q_SEG", "K_SEG", "QK_BITS", "KQ_BITS", "ROWS", "COLS"):
                sig[name] = "*i32"
            elif name in ("qk_scale", "sm_scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        return int(kernel.metadata.shared)

    for dt in dtypes:
        for d in head_dims:
            cfg = default_config(torch.device("cuda"), torch_dtype[dt], d)
            (fm, fn_), (km, kn), (qm, qn) = cfg.fwd, cfg.dkv, cfg.dq
            jobs = [
                ("fwd", _fwd_kernel, dict(BLOCK_M=fm, BLOCK_N=fn_, HEAD_DIM=d, NWIN=nwin(fn_), INTERPRET=False),
                 cfg.fwd_warps, cfg.fwd_stages),
                ("dkdv-atomic-dq", _bwd_dkdv_kernel, dict(BLOCK_M=km, BLOCK_N=kn, HEAD_DIM=d, NWIN=nwin(km),
                                                          ATOMIC_DQ=True, INTERPRET=False),
                 cfg.bwd_warps, cfg.bwd_stages),
                ("dkdv", _bwd_dkdv_kernel, dict(BLOCK_M=km, BLOCK_N=kn, HEAD_DIM=d, NWIN=nwin(km), ATOMIC_DQ=False,
                                                INTERPRET=False), cfg.bwd_warps, cfg.bwd_stages),
                ("dq", _bwd_dq_kernel, dict(BLOCK_M=qm, BLOCK_N=qn, HEAD_DIM=d, NWIN=nwin(qn), INTERPRET=False),
                 cfg.bwd_warps, cfg.bwd_stages),
                ("preprocess", _bwd_preprocess_kernel, dict(HAS_DLSE=True, BLOCK_M=64, HEAD_DIM=d), 4, 1),
            ]
            for name, fn, consts, warps, stages in jobs:
                if kernels is not None and name not in kernels:
                    continue
                shared = build(fn, dt, consts, warps, stages)
                limit = _SHARED_LIMIT.get(arch)
                if limit is not None and shared > limit:
                    raise RuntimeError(f"{name} {dt} D={d} needs {shared} bytes of shared memory, over the "
                                       f"{limit} of sm_{arch}")
                results.append((name, dt, d, shared))
                if verbose:
                    print(f"sm_{arch} {name:15s} {dt} D={d:<4d} shared {shared:7d} B")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="16,32,64,128")
    parser.add_argument("--kernels", default=None, help="comma-separated subset of fwd,dkdv-atomic-dq,dkdv,dq,"
                                                          "preprocess (default: all)")
    args = parser.parse_args(argv)
    compile_all(args.arch, tuple(args.dtypes.split(",")), tuple(int(x) for x in args.head_dims.split(",")),
                kernels=None if args.kernels is None else tuple(args.kernels.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
