"""Compile the layout-attention kernels ahead of time for a CUDA architecture, without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never sees the GPU code path (bf16 tensor-core dots,
full-precision fp32 dots, atomics, shared-memory limits). This compiles every kernel of the tile configs the config
table gives for that architecture (dz_kernels/configs/attention.json, modes train and infer) for bf16, fp16 and
fp32 and head dims 16..128 down to a cubin with Triton's bundled ptxas, and prints what each one needs: shared
memory, registers per thread, and the bytes of register spills (local-memory stores) ptxas reports for it, with the
matrix instruction its dots use (wgmma on sm_90, mma.sync otherwise):

    python -m dz_kernels.attention.compile_check [--arch 90] [--dtypes bf16,fp16,fp32] [--head-dims 16,32,64,128]
                                                 [--kernels fwd,...] [--config JSON] [--max-spill BYTES]

Spills are a fact of the compiled code, not a timing: a kernel that spills in its key loop moves hundreds of bytes
per thread through local memory on every tile. --max-spill fails (exit 1) when a kernel spills more than BYTES.

--config compiles one TileConfig given as a JSON object of its fields instead (e.g. '{"fwd_ws": true}' or
'{"fwd": [128, 128], "heads_first": true}'): how a tuning candidate is checked here before a GPU times it.
Run it with TRITON_INTERPRET=0: under the interpreter the kernels are interpreted functions, not compilable (and on
a machine without CUDA, dz_kernels turns the interpreter on when the variable is unset).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


def ptxas_resources(ptx: str, arch: int) -> dict:
    """{"regs", "spill_stores", "spill_loads"} (registers per thread, bytes) of a kernel's PTX, from `ptxas -v` of the
    ptxas Triton bundles for `arch` (the one that built the cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {proc.stderr[-2000:]}")

    def field(pattern: str) -> int:
        m = re.search(pattern, proc.stderr)
        if m is None:
            raise RuntimeError(f"ptxas -v printed no '{pattern}': {proc.stderr[-2000:]}")
        return int(m.group(1))
    return {"regs": field(r"Used (\d+) registers"), "spill_stores": field(r"(\d+) bytes spill stores"),
            "spill_loads": field(r"(\d+) bytes spill loads")}


def mma_kind(ptx: str) -> str:
    """The matrix instruction a kernel's dots compiled to: "wgmma", "mma.sync", both, or "-" (no dot)."""
    kinds = [k for k, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if op in ptx]
    return "+".join(kinds) or "-"


def compile_all(arch: int = 90, dtypes=("bf16", "fp16", "fp32"), head_dims=(16, 32, 64, 128), kernels=None,
                verbose=True, config: dict | None = None, max_spill: int | None = None) -> list:
    """Compile each kernel (all, or those named in `kernels`) for each (dtype, head dim) at the table's configs
    (or at TileConfig.from_dict(config)); returns [(kernel, dtype, head dim, {"shared", "regs", "spill_stores",
    "spill_loads", "mma", "warps", "stages", "blocks"})]. max_spill: raise when a kernel's spill stores exceed it."""
    from .._common import kernels_interpreted

    if kernels_interpreted():
        raise RuntimeError("compile_check needs TRITON_INTERPRET=0 (the kernels are interpreted functions under the "
                           "interpreter, which dz_kernels turns on without CUDA when the variable is unset)")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .config import TileConfig, table_config
    from .schedule import nwin
    from .triton_bwd import PRE_BLOCK_M, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
    from .triton_common import _row_flags_kernel
    from .triton_fwd import _fwd_kernel

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    target = GPUTarget("cuda", arch, 32)
    results = []

    def build(fn, elem: str, consts: dict, warps: int, stages: int) -> dict:
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "X"):
                sig[name] = "*" + elem
            elif name in ("V_BAD", "Q_FLAGS", "K_FLAGS", "FLAGS"):
                sig[name] = "*i8"
            elif name in ("LSE", "DELTA", "DQ_ACC", "DLSE"):
                sig[name] = "*fp32"
            elif name in ("Q_SEG", "K_SEG", "QK_BITS", "KQ_BITS", "ROWS", "COLS", "TILES"):
                sig[name] = "*i32"
            elif name in ("qk_scale", "sm_scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        ptx = kernel.asm["ptx"]
        return {"shared": int(kernel.metadata.shared), **ptxas_resources(ptx, arch), "mma": mma_kind(ptx),
                "warps": warps, "stages": stages,
                "blocks": [consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK") if k in consts]}

    done = set()
    for dt in dtypes:
        for d in head_dims:
            if config is not None:
                cfgs = [TileConfig.from_dict(config)]
            else:
                cfgs = [table_config(f"sm{arch}", torch_dtype[dt], d, mode)[0] for mode in ("train", "infer")]
            jobs = []
            for cfg in cfgs:
                (fm, fn_), (km, kn), (qm, qn) = cfg.fwd, cfg.dkv, cfg.dq
                hf = cfg.heads_first
                jobs += [
                    ("fwd", _fwd_kernel, dict(BLOCK_M=fm, BLOCK_N=fn_, HEAD_DIM=d, NWIN=nwin(fn_), INTERPRET=False,
                                              HEADS_FIRST=hf, WS=cfg.fwd_ws), cfg.fwd_warps, cfg.fwd_stages),
                    ("dkdv-atomic-dq", _bwd_dkdv_kernel, dict(BLOCK_M=km, BLOCK_N=kn, HEAD_DIM=d, NWIN=nwin(km),
                                                              ATOMIC_DQ=True, INTERPRET=False, HEADS_FIRST=hf),
                     cfg.bwd_warps, cfg.bwd_stages),
                    ("dkdv", _bwd_dkdv_kernel, dict(BLOCK_M=km, BLOCK_N=kn, HEAD_DIM=d, NWIN=nwin(km),
                                                    ATOMIC_DQ=False, INTERPRET=False, HEADS_FIRST=hf),
                     cfg.bwd_warps, cfg.bwd_stages),
                    ("dq", _bwd_dq_kernel, dict(BLOCK_M=qm, BLOCK_N=qn, HEAD_DIM=d, NWIN=nwin(qn), INTERPRET=False,
                                                HEADS_FIRST=hf), cfg.dq_warps or cfg.bwd_warps,
                     cfg.dq_stages or cfg.bwd_stages),
                    ("preprocess", _bwd_preprocess_kernel, dict(HAS_DLSE=True, BLOCK_M=PRE_BLOCK_M, HEAD_DIM=d), 4,
                     1),
                    ("row-flags", _row_flags_kernel, dict(BLOCK=fn_, HEAD_DIM=d), 4, 1),
                ]
            for name, fn, consts, warps, stages in jobs:
                ident = (name, dt, tuple(sorted(consts.items())), warps, stages)
                if ident in done:      # the train and infer configs often share kernels
                    continue
                done.add(ident)
                if kernels is not None and name not in kernels:
                    continue
                res = build(fn, dt, consts, warps, stages)
                if verbose:
                    blocks = "x".join(str(b) for b in res["blocks"])
                    print(f"sm_{arch} {name:15s} {dt} D={d:<4d} {blocks:>7s} w{warps} s{stages} shared "
                          f"{res['shared']:7d} B  regs {res['regs']:3d}  spills {res['spill_stores']:5d} B  "
                          f"{res['mma']}", flush=True)
                limit = _SHARED_LIMIT.get(arch)
                if limit is not None and res["shared"] > limit:
                    raise RuntimeError(f"{name} {dt} D={d} needs {res['shared']} bytes of shared memory, over the "
                                       f"{limit} of sm_{arch}")
                if max_spill is not None and res["spill_stores"] > max_spill:
                    raise RuntimeError(f"{name} {dt} D={d} at {res['blocks']} w{warps} s{stages} spills "
                                       f"{res['spill_stores']} bytes of registers on sm_{arch}, over --max-spill "
                                       f"{max_spill}")
                results.append((name, dt, d, res))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="16,32,64,128")
    parser.add_argument("--kernels", default=None, help="comma-separated subset of fwd,dkdv-atomic-dq,dkdv,dq,"
                                                          "preprocess,row-flags (default: all)")
    parser.add_argument("--max-spill", type=int, default=None, help="fail when a kernel spills more than this many "
                                                                        "bytes of registers (default: report only)")
    parser.add_argument("--config", default=None, help="one TileConfig as a JSON object of its fields (default: "
                                                             "the config table's train and infer configs)")
    args = parser.parse_args(argv)
    config = None
    if args.config is not None:
        import json

        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as e:
            parser.error(f"--config is not valid JSON ({e}); example: --config '{{\"fwd\": [128, 128]}}'")
        if not isinstance(config, dict):
            parser.error("--config must be a JSON object of TileConfig fields")
    try:
        compile_all(args.arch, tuple(args.dtypes.split(",")), tuple(int(x) for x in args.head_dims.split(",")),
                    kernels=None if args.kernels is None else tuple(args.kernels.split(",")), config=config,
                    max_spill=args.max_spill)
    except RuntimeError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
