"""Compile, for a CUDA architecture and without a GPU, every Triton launch that the fused ops, the KV-cache ops and the
quant kernels make, and report the static facts of each compiled kernel: a CPU check of the GPU path of their
kernels (the interpreter never compiles it). Run as a program with TRITON_INTERPRET=0 (tests/test_aot_launches.py
does):

    TRITON_INTERPRET=0 python tests/aot_capture.py [fused] [kv_cache] [quant] [--arch 90] [--dtypes bf16,fp32]
                                                   [--small] [--json PATH]

The public ops (fused, kv_cache) and the quant launchers are called on CPU tensors at the bench's shapes (droid-14b:
C = 5120, 40 heads x 128, 2 x 1785 rows; quant M = 1785 and 16 at K = N = 5120, plus the tile candidates of the
quant tuning sweeps; --small: a few rows); Triton's launch (JITFunction.run) is replaced by a recorder, so nothing
runs, and an autotuned kernel records every config its autotuner would time. Each distinct launch is specialized as Triton's own launcher specializes it (its binder: the 16-byte
divisibility of pointers and integers, integers equal to 1 made constant; the launch options, num_warps, num_stages,
enable_fp_fusion) and compiled to a cubin with Triton's bundled ptxas (triton.compile of an ASTSource). For each
one line: registers per thread, spill stores/loads (bytes per thread; ptxas -v), shared memory, MMA instructions,
the global loads and stores by bytes per thread per instruction (16B: ld.global.v4.b32, eight bf16 at once; 2B:
one bf16 per instruction), cp.async / TMA copies, the grid, programs resident per SM (registers, threads, shared
memory on sm_90: 64K registers, 2048 threads, 227 KB) and waves over 132 SMs. --json writes the same as a list of
records. Exit status 1 if any launch failed to compile."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # dz_kernels from this checkout when run as a program
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "bench"))   # and dz_bench

from dz_kernels._aot import compile_launches, record_launches  # noqa: E402


def fused_launches(dtypes: tuple, small: bool = False, C: int = 5120) -> None:
    """Forward and backward of every fused op, activations in `dtypes` with modulation in the activation dtype (the
    bench's) or float32 (the model's), the FP8 outputs of the two LayerNorm ops; rows 2 x 1785 (--small: 2 x 37)."""
    from dz_kernels import fused
    import dz_kernels.fused._common as fcm

    fcm.kernels_interpreted = lambda: True          # its device check only: CPU tensors reach the launchers
    rows = (2, 37) if small else (2, 1785)
    for dt in dtypes:
        def r(*s, d=dt):
            return torch.empty(*s, dtype=d, requires_grad=True)
        x, y = r(*rows, C), r(*rows, C)
        w, b, w_act = r(C, d=torch.float32), r(C, d=torch.float32), r(C)
        calls = [(fused.layernorm_modulate, (x, None, None, 1e-6, w, b)), (fused.rms_norm, (x, w_act)),
                 (fused.gelu_tanh, (x,))]
        for md in dict.fromkeys((dt, torch.float32)):
            g, sh, sc = (r(*rows, C, d=md) for _ in range(3))
            calls += [(fused.layernorm_modulate, (x, sh, sc, 1e-6)),
                      (fused.gated_residual_layernorm_modulate, (x, y, g, sh, sc, 1e-6)),
                      (fused.gated_residual_layernorm_modulate, (x, y, None, sh, sc, 1e-6)),
                      (fused.gated_residual, (x, y, g))]
            with torch.no_grad():
                fused.layernorm_modulate(x, sh, sc, 1e-6, fp8=True)
                fused.gated_residual_layernorm_modulate(x, y, None, sh, sc, 1e-6, fp8=True)
        for fn, a in calls:
            out = fn(*a)
            (out[1] if isinstance(out, tuple) else out).float().sum().backward()


def kv_cache_launches(dtypes: tuple, small: bool = False, B: int = 2, H: int = 40, D: int = 128) -> None:
    """The fused q/k RMSNorm + RoPE + cache write and the plain write, activations in `dtypes`, weights in the
    activation dtype or float32, every cache dtype (FP8 with its scales); the bench's observe pass: a chunk of
    L = 1760 tokens into a cache of T = 7920 rows, q/k/v column slices of one [B, L, 3C] projection (--small:
    L = 37, T = 100)."""
    import dz_kernels.kv_cache.ops as kops
    from dz_kernels.kv_cache import kv_cache_write, qk_norm_rope_kv_write

    kops.kernels_interpreted = lambda: True         # its backend and device checks only
    L, T = (37, 100) if small else (1760, 7920)
    for act in dtypes:
        for cache in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
            for wdt in dict.fromkeys((act, torch.float32)):
                q, k, v = torch.empty(B, L, 3 * H * D, dtype=act).split(H * D, dim=-1)
                wq, wk = torch.empty(H * D, dtype=wdt), torch.empty(H * D, dtype=wdt)
                cos, sin = torch.empty(L, D // 2), torch.empty(L, D // 2)
                kc, vc = torch.empty(B, T, H, D, dtype=cache), torch.empty(B, T, H, D, dtype=cache)
                ks = vs = None
                if cache == torch.float8_e4m3fn:
                    ks, vs = torch.empty(B, T, H), torch.empty(B, T, H)
                pos = torch.zeros(1, dtype=torch.int32)
                with torch.no_grad():
                    qk_norm_rope_kv_write(q, k, v, wq, wk, 1e-6, cos, sin, H, kc, vc, pos, ks, vs, backend="triton",
                                          check=False)
                    kn = torch.empty(B, L, H, D, dtype=act)
                    kv_cache_write(kn, kn, kc, vc, pos, ks, vs, backend="triton", check=False)


def quant_launches(dtypes: tuple, small: bool = False) -> None:
    """The quant launchers (dz_kernels.quant._aot.record_quant_launches: FP8 and NVFP4 quantization, the GEMMs with
    every config their autotuners would time, split-K, at K = N = 5120, M = 1785 and 16), then the candidates the
    tuning sweeps time (dz_bench.tune.quant: FP8 GEMM tiles, split-K tiles). `dtypes` is not used: the quant kernels
    take bf16 activations here."""
    from dz_bench.tune.quant import gemm_configs, splitk_configs
    from dz_kernels import configs
    from dz_kernels.quant import triton_fp8 as f8, triton_nvfp4 as f4
    from dz_kernels.quant._aot import gpu_launch_rules, record_quant_launches

    record_quant_launches(small)
    K = N = 256 if small else 5120
    bf, e4 = torch.bfloat16, torch.float8_e4m3fn
    bias = torch.empty(N, dtype=bf)
    splitk_default = configs.table("nvfp4")["defaults"]["splitk"][-1]["config"]
    with gpu_launch_rules():
        for M in (1785, 16):
            a, b = torch.empty(M, K, dtype=e4), torch.empty(N, K, dtype=e4)
            for cfg in gemm_configs(small, M)[1:]:
                with configs.forced("fp8", "gemm", cfg):
                    f8.launch_fp8_gemm(a, torch.empty(M, 1), b, torch.empty(N, 1), False, bias, None, None, None, bf)
        x = torch.empty(16, K, dtype=bf)
        w, ws = torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(N, K // 16, dtype=e4)
        for cfg in splitk_configs(small, splitk_default)[1:]:
            with configs.forced("nvfp4", "splitk", cfg):
                f4.launch_w4a16(x, w, ws, torch.ones(()), bias, None, None, None, bf, path="splitk")


FAMILIES = {"fused": fused_launches, "kv_cache": kv_cache_launches, "quant": quant_launches}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("families", nargs="*", help=f"of {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtypes", default="bf16,fp32", help="activation dtypes, comma-separated (bf16, fp16, fp32)")
    p.add_argument("--small", action="store_true", help="a few rows instead of the bench's shapes")
    p.add_argument("--json", help="write the records (one per compiled variant) to this file")
    p.add_argument("--dump", help="write each variant's PTX into this folder")
    p.add_argument("--kernels", help="compile only these kernels (comma-separated names)")
    a = p.parse_args(argv)
    unknown = sorted(set(a.families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    if os.environ.get("TRITON_INTERPRET") != "0":
        print("run with TRITON_INTERPRET=0: the kernels must be compilable functions, not interpreted ones",
              file=sys.stderr)
        return 2
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = tuple(names[d] for d in a.dtypes.split(","))
    with record_launches() as launches:
        for fam in a.families or list(FAMILIES):
            FAMILIES[fam](dtypes, small=a.small)
    if not launches:
        print("no launch was recorded: the ops did not reach their Triton kernels", file=sys.stderr)
        return 1
    records, failed = compile_launches(launches, a.arch, a.dump, a.kernels and a.kernels.split(","))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    print(f"{len(launches)} launches recorded; {'failed: ' + ', '.join(failed) if failed else 'every variant compiled'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
