"""fused_ops: the memory-bound chains of a droid-14b DiT block (dz_kernels.fused) against eager and torch.compile.

Shapes: hidden C = 5120 (FFN hidden 13824 for GELU), bf16 activations and per-token bf16 modulation ([B, L, C]);
rows = 1x1785 and 2x1785 (one denoising pass, one or both CFG branches batched) forward only, and 1x15940 (the
teacher-forcing training sequence) forward and backward. One Wan-style per-sample case ([B, 1, C] shift/scale) at
2x1785. Small (CPU) run: 1x64 rows, C 256, FFN 512.

Implementations: "dz" is the dz_kernels.fused public function; peers "eager" (the plain-PyTorch reference chain,
the function that defines each op) and "torch-compile" (torch.compile(fullgraph=True, dynamic=False) of that same
chain, compiled afresh for each case after torch._dynamo.reset(): one shape, one compile, no recompile limit; a
compile that fails or yields no graph is an error row, never an eager number under the peer's name).
Timing: forward cases replay each impl from a CUDA graph (params["timed"]; GPU time, as the model's captured runs
see it: at 1785 rows an eager call of a few tens of microseconds measures Python dispatch more than the kernel);
backward cases time torch.autograd.grad eagerly.
On the H200 (evidence 2026-11-29) the whole bench ran in about 60 s; compile peers take a few seconds per case.
bytes = what the op must read and write at least: each input once, each output once (the FP8 row scales
included; the 8-byte-a-row LayerNorm statistics and the [C] weight gradients are left out; shift's gradient is
the output gradient itself and moves nothing), so GB/s is comparable with the copy bench.
check = max abs error against the eager chain's result (the forward output, or the input gradients).
"""
from __future__ import annotations

import torch

from dz_bench.cases._peers import compile_peer, graphed
from dz_bench.harness import Case, Unavailable, lazy, register

C_FULL, FFN_FULL = 5120, 13824
C_SMALL, FFN_SMALL = 256, 512
INFER_ROWS = [(1, 1785), (2, 1785)]
TRAIN_ROWS = [(1, 15940)]
SMALL_ROWS = [(1, 64)]
DTYPE = torch.bfloat16
EPS = 1e-6


def _fz():
    import dz_kernels.fused as fz

    return fz


# ---------------------------------------------------------------------------------------------------- op table
# Each op: inputs(B, L, C, F, device) -> list of tensors (positional args), the dz function and the reference chain
# over those args, and bytes moved forward / backward as a function of (B, L, C, F, e) with e the element size.
def _ln_mod_inputs(B, L, C, F, dev, per_sample=False):
    Lm = 1 if per_sample else L
    return [torch.randn(B, L, C, device=dev).to(DTYPE), (0.5 * torch.randn(B, Lm, C, device=dev)).to(DTYPE),
            (0.5 * torch.randn(B, Lm, C, device=dev)).to(DTYPE)]


def _res_ln_inputs(B, L, C, F, dev):
    return [torch.randn(B, L, C, device=dev).to(DTYPE), torch.randn(B, L, C, device=dev).to(DTYPE)] + \
        [(0.5 * torch.randn(B, L, C, device=dev)).to(DTYPE) for _ in range(3)]


def _gated_inputs(B, L, C, F, dev):
    return [torch.randn(B, L, C, device=dev).to(DTYPE) for _ in range(2)] + \
        [(0.5 * torch.randn(B, L, C, device=dev)).to(DTYPE)]


def _rms_inputs(B, L, C, F, dev):
    return [torch.randn(B, L, C, device=dev).to(DTYPE), (1 + 0.1 * torch.randn(C, device=dev)).to(DTYPE)]


def _gelu_inputs(B, L, C, F, dev):
    return [(2 * torch.randn(B, L, F, device=dev)).to(DTYPE)]


OPS = {
    # name: (inputs, dz(fz, *args), reference(fz, *args), fwd bytes, bwd bytes or None)
    "layernorm_modulate": (
        _ln_mod_inputs,
        lambda fz, x, sh, sc: fz.layernorm_modulate(x, sh, sc, EPS),
        lambda fz, x, sh, sc: fz.layernorm_modulate_reference(x, sh, sc, EPS),
        lambda N, C, F, e: N * C * e * 4,                     # x, shift, scale -> out
        lambda N, C, F, e: N * C * e * 5,                     # dout, x, scale -> dx, dscale
    ),
    "layernorm_modulate_fp8": (
        _ln_mod_inputs,
        lambda fz, x, sh, sc: fz.layernorm_modulate(x, sh, sc, EPS, fp8=True),
        lambda fz, x, sh, sc: fz.layernorm_modulate_reference(x, sh, sc, EPS, fp8=True),
        lambda N, C, F, e: N * C * (3 * e + 1) + N * 4,       # x, shift, scale -> q (1 byte) + row scale
        None,
    ),
    "gated_residual_layernorm_modulate": (
        _res_ln_inputs,
        lambda fz, x, y, g, sh, sc: fz.gated_residual_layernorm_modulate(x, y, g, sh, sc, EPS),
        lambda fz, x, y, g, sh, sc: fz.gated_residual_layernorm_modulate_reference(x, y, g, sh, sc, EPS),
        lambda N, C, F, e: N * C * e * 7,                     # x, y, gate, shift, scale -> x_new, out
        lambda N, C, F, e: N * C * e * 10,                    # dout, dx_new, x_new, y, gate, scale -> dx, dy, dg, dsc
    ),
    "gated_residual": (
        _gated_inputs,
        lambda fz, x, y, g: fz.gated_residual(x, y, g),
        lambda fz, x, y, g: fz.gated_residual_reference(x, y, g),
        lambda N, C, F, e: N * C * e * 4,                     # x, y, gate -> out
        lambda N, C, F, e: N * C * e * 5,                     # dout, y, gate -> dy, dgate (dx is dout)
    ),
    "rms_norm": (
        _rms_inputs,
        lambda fz, x, w: fz.rms_norm(x, w, EPS),
        lambda fz, x, w: fz.rms_norm_reference(x, w, EPS),
        lambda N, C, F, e: N * C * e * 2 + C * e,             # x, weight -> out
        lambda N, C, F, e: N * C * e * 3 + C * e,             # dout, x, weight -> dx
    ),
    "gelu_tanh": (
        _gelu_inputs,
        lambda fz, x: fz.gelu_tanh(x),
        lambda fz, x: fz.gelu_tanh_reference(x),
        lambda N, C, F, e: N * F * e * 2,                     # x -> out
        lambda N, C, F, e: N * F * e * 3,                     # dout, x -> dx
    ),
}


# ------------------------------------------------------------------------------------------------------ helpers
def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _flat(v):
    out = []
    for t in _as_tuple(v):
        out.extend(_flat(t) if isinstance(t, tuple) else [t])
    return out


def _max_err(ref, got) -> float:
    err = 0.0
    for r, g in zip(_flat(ref), _flat(got)):
        if r.dtype == torch.float8_e4m3fn:
            r, g = r.float(), g.float()
        err = max(err, (r.float() - g.float()).abs().max().item())  # nan when memory was left unwritten
    return err


def _dz_available(ctx):
    if ctx.device != "cuda":
        from dz_kernels._common import kernels_interpreted

        if not kernels_interpreted():
            raise Unavailable("the Triton kernels need CUDA (or TRITON_INTERPRET=1 set before import, for the "
                              "CPU interpreter)")




def _fwd_case(ctx, op, B, L, C, F, tag=""):
    make, dz, ref, fwd_bytes, _ = OPS[op]
    per_sample = tag == "per-sample"
    inputs = lazy(lambda: make(B, L, C, F, ctx.device, per_sample) if per_sample else make(B, L, C, F, ctx.device))
    expected = lazy(lambda: ref(_fz(), *inputs()))

    name = f"{op}/fwd/{B}x{L}" + (f"/{tag}" if tag else "")
    params = {"op": op, "pass": "fwd", "B": B, "L": L, "C": C, "dtype": "bfloat16",
              "modulation": "per-sample [B,1,C]" if per_sample else "per-token [B,L,C]",
              "timed": "CUDA graph replay" if ctx.device == "cuda" else "eager"}

    def impl_dz():
        _dz_available(ctx)
        fz, args = _fz(), inputs()
        return graphed(lambda: dz(fz, *args), ctx, params, "dz")

    def impl_eager():
        fz, args = _fz(), inputs()
        return graphed(lambda: ref(fz, *args), ctx, params, "eager")

    def impl_compile():
        fz, args = _fz(), inputs()
        cf, _ = compile_peer(lambda *a: ref(fz, *a), *args)
        return graphed(lambda: cf(*args), ctx, params, "torch-compile")

    if op == "gelu_tanh":
        params["F"] = F
    nbytes = fwd_bytes(B * L, C, F, 2)
    if per_sample:  # shift and scale are read once per sample, not per token
        nbytes -= 2 * (B * L - B) * C * 2
    return Case(case=name, params=params, flops=None, bytes=nbytes,
                impls={"dz": impl_dz, "eager": impl_eager, "torch-compile": impl_compile},
                check=lambda out: _max_err(expected(), out))


def _bwd_case(ctx, op, B, L, C, F):
    make, dz, ref, _, bwd_bytes = OPS[op]

    state = lazy(lambda: [t.requires_grad_(True) for t in make(B, L, C, F, ctx.device)])

    def grads_for(outs):
        # one fixed upstream gradient per output, shared by all impls (made from a fixed seed)
        g = torch.Generator(device=ctx.device).manual_seed(1234)
        return [torch.randn(o.shape, device=ctx.device, generator=g).to(o.dtype) for o in outs]

    def backward_of(fn):
        args = state()
        outs = _as_tuple(fn(*args))
        gs = grads_for(outs)
        return lambda: torch.autograd.grad(outs, args, gs, retain_graph=True)

    expected = lazy(lambda: backward_of(lambda *a: ref(_fz(), *a))())

    def impl_dz():
        _dz_available(ctx)
        fz = _fz()
        return backward_of(lambda *a: dz(fz, *a))

    def impl_eager():
        fz = _fz()
        return backward_of(lambda *a: ref(fz, *a))

    def impl_compile():
        fz, args = _fz(), state()
        cf, _ = compile_peer(lambda *a: ref(fz, *a), *args)   # compiles the forward and its backward graph
        return backward_of(cf)

    params = {"op": op, "pass": "bwd", "B": B, "L": L, "C": C, "dtype": "bfloat16", "modulation": "per-token [B,L,C]",
              "timed": "torch.autograd.grad of every input, forward graph kept (retain_graph)"}
    if op == "gelu_tanh":
        params["F"] = F
    return Case(case=f"{op}/bwd/{B}x{L}", params=params, flops=None, bytes=bwd_bytes(B * L, C, F, 2),
                impls={"dz": impl_dz, "eager": impl_eager, "torch-compile": impl_compile},
                check=lambda out: _max_err(expected(), out))


@register("fused_ops")
def cases(ctx):
    if ctx.small:
        C, F, infer, train = C_SMALL, FFN_SMALL, SMALL_ROWS, SMALL_ROWS
    else:
        C, F, infer, train = C_FULL, FFN_FULL, INFER_ROWS, TRAIN_ROWS
    for op in OPS:
        for B, L in infer:
            yield _fwd_case(ctx, op, B, L, C, F)
        if op in ("layernorm_modulate", "layernorm_modulate_fp8"):
            B, L = infer[-1]
            yield _fwd_case(ctx, op, B, L, C, F, tag="per-sample")
    for op, spec in OPS.items():
        if spec[4] is None:
            continue
        for B, L in train:
            if not ctx.small:
                yield _fwd_case(ctx, op, B, L, C, F)
            yield _bwd_case(ctx, op, B, L, C, F)
