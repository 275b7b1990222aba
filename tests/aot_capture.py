"""Compile, for a CUDA architecture and without a GPU, every Triton launch that the fused ops and the KV-cache ops
make: a CPU check of the GPU path of their kernels (the interpreter never compiles it). Run as a program with
TRITON_INTERPRET=0 (tests/test_aot_launches.py does):

    TRITON_INTERPRET=0 python tests/aot_capture.py [fused] [kv_cache] [--arch 90] [--dtypes bf16,fp32]

The public ops are called on CPU tensors of the droid-14b widths; Triton's launch (JITFunction.run) is replaced by a
recorder, so nothing runs; each distinct (kernel, signature, constants, warps, stages) is then compiled to a cubin
with Triton's bundled ptxas (triton.compile of an ASTSource, as dz_kernels.attention.compile_check and
dz_kernels.quant._aot do for their kernels). Prints one line per kernel variant; exit status 1 if any failed."""
from __future__ import annotations

import argparse
import os
import sys

import torch

TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
      torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


def record_launches() -> list:
    """Replace Triton's launch by a recorder; returns the list it appends (kernel, args, kwargs) to."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs)))

    JITFunction.run = record
    return launches


def signature(fn, args, kw) -> tuple[dict, dict]:
    """Triton's signature and constexprs of one recorded launch."""
    vals = dict(zip(fn.arg_names, args))
    vals.update(kw)
    sig, consts = {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        v = vals.get(name, p.default)
        if p.is_constexpr or v is None:
            sig[name] = "constexpr"
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TY[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    return sig, consts


def compile_launches(launches: list, arch: int) -> list:
    """Compile each distinct launch for `arch`; returns the names of the kernels that failed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target, seen, failed = GPUTarget("cuda", arch, 32), set(), []
    for fn, args, kw in launches:
        kw = dict(kw)
        warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
        sig, consts = signature(fn, args, kw)
        key = (fn.__name__, tuple(sorted(sig.items())), repr(sorted(consts.items())), warps, stages)
        if key in seen:
            continue
        seen.add(key)
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                               options={"num_warps": warps, "num_stages": stages})
            print(f"ok   sm_{arch} {fn.__name__:32s} warps={warps:<2d} stages={stages} shared={k.metadata.shared} B")
        except Exception as e:  # noqa: BLE001 -- every failure is reported, then the status says so
            failed.append(fn.__name__)
            print(f"FAIL sm_{arch} {fn.__name__}: {type(e).__name__}: {str(e)[:600]}")
    return failed


def fused_launches(dtypes: tuple, C: int = 5120, rows: tuple = (2, 37)) -> None:
    """Forward and backward of every fused op, activations in `dtypes` with float32 modulation, the FP8 outputs of
    the two LayerNorm ops."""
    from dz_kernels import fused
    import dz_kernels.fused._common as fcm

    fcm.kernels_interpreted = lambda: True          # its device check only: CPU tensors reach the launchers
    for dt in dtypes:
        def r(*s, d=dt):
            return torch.randn(*s, dtype=d, requires_grad=True)
        x, y = r(*rows, C), r(*rows, C)
        g, sh, sc = (r(*rows, C, d=torch.float32) for _ in range(3))
        w, b, w_act = r(C, d=torch.float32), r(C, d=torch.float32), r(C)
        for fn, a in [(fused.layernorm_modulate, (x, sh, sc, 1e-6)), (fused.layernorm_modulate, (x, None, None, 1e-6, w, b)),
                      (fused.gated_residual_layernorm_modulate, (x, y, g, sh, sc, 1e-6)),
                      (fused.gated_residual_layernorm_modulate, (x, y, None, sh, sc, 1e-6)),
                      (fused.gated_residual, (x, y, g)), (fused.rms_norm, (x, w_act)), (fused.gelu_tanh, (x,))]:
            out = fn(*a)
            (out[1] if isinstance(out, tuple) else out).float().sum().backward()
        with torch.no_grad():
            fused.layernorm_modulate(x, sh, sc, 1e-6, fp8=True)
            fused.gated_residual_layernorm_modulate(x, y, None, sh, sc, 1e-6, fp8=True)


def kv_cache_launches(dtypes: tuple, B: int = 2, L: int = 37, H: int = 40, D: int = 128, T: int = 100) -> None:
    """The fused q/k RMSNorm + RoPE + cache write and the plain write, activations in `dtypes`, weights in the
    activation dtype or float32, every cache dtype (FP8 with its scales)."""
    import dz_kernels.kv_cache.ops as kops
    from dz_kernels.kv_cache import kv_cache_write, qk_norm_rope_kv_write

    kops.kernels_interpreted = lambda: True         # its backend and device checks only
    for act in dtypes:
        for cache in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
            for wdt in {act, torch.float32}:
                q, k, v = (torch.randn(B, L, H * D, dtype=act) for _ in range(3))
                wq, wk = torch.randn(H * D, dtype=wdt), torch.randn(H * D, dtype=wdt)
                cos, sin = torch.randn(L, D // 2), torch.randn(L, D // 2)
                kc, vc = torch.zeros(B, T, H, D, dtype=cache), torch.zeros(B, T, H, D, dtype=cache)
                ks = vs = None
                if cache == torch.float8_e4m3fn:
                    ks, vs = torch.zeros(B, T, H), torch.zeros(B, T, H)
                pos = torch.zeros(1, dtype=torch.int32)
                with torch.no_grad():
                    qk_norm_rope_kv_write(q, k, v, wq, wk, 1e-6, cos, sin, H, kc, vc, pos, ks, vs, backend="triton",
                                          check=False)
                    kv_cache_write(k.view(B, L, H, D), v.view(B, L, H, D), kc, vc, pos, ks, vs, backend="triton",
                                   check=False)


FAMILIES = {"fused": fused_launches, "kv_cache": kv_cache_launches}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("families", nargs="*", help=f"of {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtypes", default="bf16,fp32", help="activation dtypes, comma-separated (bf16, fp16, fp32)")
    a = p.parse_args(argv)
    unknown = sorted(set(a.families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    if os.environ.get("TRITON_INTERPRET") != "0":
        print("run with TRITON_INTERPRET=0: the kernels must be compilable functions, not interpreted ones",
              file=sys.stderr)
        return 2
    launches = record_launches()
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = tuple(names[d] for d in a.dtypes.split(","))
    for fam in a.families or list(FAMILIES):
        FAMILIES[fam](dtypes)
    if not launches:
        print("no launch was recorded: the ops did not reach their Triton kernels", file=sys.stderr)
        return 1
    failed = compile_launches(launches, a.arch)
    print(f"{len(launches)} launches recorded; {'failed: ' + ', '.join(failed) if failed else 'every variant compiled'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
