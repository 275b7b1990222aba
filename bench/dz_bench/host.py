"""python -m dz_bench.host [--calls N] [--small]: host time of each public op's Python around its kernel launches.

Every op is called at the control step's shapes (droid-14b: 2 x 1785 tokens, C = 5120, 40 heads x 128, the
control step's attention layout; --small: 2 x 37 tokens) on CPU tensors under the Triton interpreter, with the
interpreter's launch replaced by a no-op, so no kernel runs: what is timed is what a call does before and around
its launches (argument checks, config lookups, output allocation, the custom op's dispatch), in plain eager
inference (torch.no_grad). A host figure of this machine's CPU, not a GPU time. On a GPU it comes on top of
Triton's own launch cost for every eager call, and the harness's CUDA-event timing shows it whenever it is longer
than the kernel: a fused norm at 2 x 1785 tokens moves about 150 MB, about 35 us at the H200's copy bandwidth.
CPU-side allocations here cost more than on CUDA (the caching allocator), so --small shows the Python part alone.
Prints one line per op: median microseconds per call over --calls calls (after 20 warm-up calls).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time


@contextlib.contextmanager
def _launches_skipped():
    """The interpreter's kernel launch replaced by a no-op inside the block."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _ops(small: bool):
    """(name, zero-argument call) of each public op at the control step's shapes."""
    import torch

    from dreamzero.config import get_config
    from dreamzero.layout import layout_for_config
    from dz_kernels import fused
    from dz_kernels.attention import layout_attention
    from dz_kernels.kv_cache import qk_norm_rope_kv_write
    from dz_kernels.quant import fp8_gemm, fp8_linear, quantize_fp8_rowwise

    cfg = get_config("droid-14b")
    B, L, C, H, D = (2, 37, 5120, 40, 128) if small else (2, 1785, 5120, 40, 128)
    bf = torch.bfloat16

    def t(*shape, dtype=bf):
        return torch.zeros(*shape, dtype=dtype)

    x, y, mod = t(B, L, C), t(B, L, C), t(B, 1, C)
    w32 = t(C, dtype=torch.float32)
    qkv = t(B, L, 3 * C)
    q, k, v = qkv.split(C, dim=-1)
    T = 4 * L + 128
    kc, vc = t(B, T, H, D), t(B, T, H, D)
    cos, sin = t(L, D // 2, dtype=torch.float32), t(L, D // 2, dtype=torch.float32)
    pos = torch.zeros(1, dtype=torch.int32)
    wq, ws = quantize_fp8_rowwise(t(C, C))
    a, sa = quantize_fp8_rowwise(x)
    bias = t(C)
    ops = [
        ("layernorm_modulate", lambda: fused.layernorm_modulate(x, mod, mod, 1e-6)),
        ("gated_residual_layernorm_modulate",
         lambda: fused.gated_residual_layernorm_modulate(x, y, mod, mod, mod, 1e-6, w32, w32)),
        ("layernorm_modulate fp8=True", lambda: fused.layernorm_modulate(x, mod, mod, 1e-6, fp8=True)),
        ("gated_residual", lambda: fused.gated_residual(x, y, mod)),
        ("rms_norm", lambda: fused.rms_norm(x, t(C), 1e-6)),
        ("gelu_tanh", lambda: fused.gelu_tanh(x)),
        ("qk_norm_rope_kv_write",
         lambda: qk_norm_rope_kv_write(q, k, v, w32, w32, 1e-6, cos, sin, H, kc, vc, pos, check=False)),
        ("quantize_fp8_rowwise", lambda: quantize_fp8_rowwise(x)),
        ("fp8_linear (quantizer + GEMM)", lambda: fp8_linear(x, wq, ws, bias)),
        ("fp8_gemm (pre-quantized rows)", lambda: fp8_gemm(a.view(-1, C), sa.view(-1, 1), wq, ws, bias=bias)),
    ]
    if not small:       # the control step's layout (the tiny shapes have no layout of their own)
        lay = layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7)))
        pat = lay.attention_pattern()
        qa, ka = t(1, pat.q_len, H, D), t(1, pat.k_len, H, D)
        ops.append(("layout_attention (control step, B=1)", lambda: layout_attention(qa, ka, ka, lay)))
    return ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dz_bench.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="timed calls per op (default 200)")
    p.add_argument("--small", action="store_true", help="2 x 37 tokens: the Python part without large allocations")
    a = p.parse_args(argv)
    if a.calls < 1:
        p.error(f"--calls must be at least 1, got {a.calls}")
    from dz_kernels import env

    env.default_triton_interpret()
    if not env.triton_interpret():
        print("dz_bench.host times the ops around the Triton interpreter's launch: unset TRITON_INTERPRET or set it "
              "to 1", file=sys.stderr)
        return 2
    import torch

    from dz_kernels import _common

    if not _common.kernels_interpreted():
        print("the Triton interpreter is off in this process (triton was imported before TRITON_INTERPRET was "
              "set)", file=sys.stderr)
        return 2
    print(f"host time per call, us (median of {a.calls}; CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__}; launches skipped, nothing runs)")
    with torch.no_grad(), _launches_skipped():
        for name, fn in _ops(a.small):
            for _ in range(20):
                fn()
            times = []
            for _ in range(a.calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            print(f"  {name:40s} {statistics.median(times) * 1e6:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
