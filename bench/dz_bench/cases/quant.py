"""quant: FP8 and NVFP4 linears (dz_kernels.quant) on the Wan2.1 linear shapes against bf16 cuBLAS and FP8 peers.

Shapes (K, N) = (5120, 5120) (q/k/v/o), (5120, 13824) (FFN up), (13824, 5120) (FFN down) at M = 1, 4, 16
(decode-like: a few tokens, where 4-bit weights pay), 1785 (one denoising pass, one CFG branch) and 3570 (both
branches batched). Every case name carries its shape: "<kind>/M<M>-K<K>-N<N>". Small (CPU) run: (K, N) = (128, 128),
(128, 256), (256, 128) at M = 1 and 16 for FP8, the first of them for NVFP4 (our kernels run in the Triton
interpreter there). bf16 activations [M, K], bf16 bias [N], bf16 output.

Cases:
  fp8-linear/...   the whole FP8 linear, activation quantization included (input is the bf16 activation):
    "dz"                  what Float8Linear runs: dz_kernels.quant.dispatch.fp8_linear_dispatch with the bf16 weight
                          kept (quantize_'s default), i.e. the path the config table picks for this shape: our FP8
                          GEMM, our quantizer + torch._scaled_mm, or bf16 where FP8 cannot win; params["path"] says
                          which ran
    "dz-triton"           our path always: Triton per-token quantization + Triton FP8 GEMM (per-channel weight
                          scales, bias fused)
    "dz-block"            the same with 1x128 activation / 128x128 weight block scales
    "bf16-cublas"         F.linear in bf16
    "scaled_mm-rowwise"   per-token quantization in plain torch ops, then torch._scaled_mm (rowwise scales)
    "scaled_mm-blockwise" 1x128 quantization in plain torch ops, then torch._scaled_mm with 1x128 / 128x128 block
                          scales, where this torch / cuBLAS supports it (else Unavailable with torch's message)
    "te-linear"           transformer_engine te.Linear under fp8_autocast with Float8CurrentScaling, and
    "te-linear-block"     with Float8BlockScaling, where TransformerEngine is installed (else Unavailable, saying
                          it is not installed; it is not on the H200 machine of 2026-11-29)
  nvfp4-w4a16/...  weight-only NVFP4 linear (the Hopper path): "dz" (nvfp4_linear, act_quant=False; params["path"]:
                   the split-K kernel at decode-like M, the weight dequantized once + the dense GEMM at larger M,
                   or the tiled GEMM, as the config table picks) and "bf16-cublas"; params carry the weight bytes
                   of both (NVFP4: 0.5 + 1/16 byte a weight, plus 4; bf16: 2).
  nvfp4-w4a4/...   NVFP4 activations and weights with tl.dot_scaled on sm_100 (Blackwell), against "bf16-cublas".
  nvfp4-w4a4-emulation/...  the same elsewhere (Hopper, the interpreter): register dequantization, a correctness
                   path with no speed claim (no FP4 tensor cores there): "dz" alone, no peer, so no ratio.
  fp8-qkv-producer/M<M>-K<C>-N<C>   the self-attention input of a DiT block (issue 14): LayerNorm + per-token
                   modulate of x [1, M, C] (bf16 shift/scale [1, M, C]) followed by the q, k and v projections
                   (three [C, C] linears with bias), output the three [M, C] bf16 projections:
    "dz"                  what the FP8 model runs (dreamzero DiTBlock with per-token Float8Linears from quantize_,
                          bf16 originals kept): where all three accept FP8 rows, the fused norm with its FP8
                          epilogue once, then the three FP8 GEMMs on the same rows; else the plain path below.
                          params["path"] says which, with the linears' dispatch path
    "dz-fp8-separate"     the fused norm in bf16, then three Float8Linear(h), each quantizing h itself (the model
                          before the producer path)
    "bf16-cublas"         the fused norm in bf16, then three F.linear in bf16
    "bf16-compile"        torch.compile(fullgraph) of the plain chain (reference norm + three F.linear), one shape
  Full: C = 5120, M = 1785 and 3570; small: C = 128, M = 16. check = max abs error of the three outputs against the float32 chain of the unquantized operands.
  bytes: x, shift and scale read once, the three FP8 weights with their scales and biases, the three outputs.
Timing: every case is a forward at an inference shape, and every impl is replayed from a CUDA graph on the GPU
(params["timed"]; eager elsewhere), as the model's captured step runs it: at M <= 16 a linear takes 10-30 us, where
an eager timing measures the host (Python, argument checks, launches) more than the kernels; an impl that cannot be
captured is timed eagerly and named in params["eager_timed"]. The host time of our ops is its own figure:
python -m dz_bench.host.
flops = 2 M N K. bytes = the bf16 activation read, the quantized (or bf16) weight and its scales read, the bf16
output written. check = max abs error against the float32 product of the unquantized operands (so it shows each
format's quantization error; bf16-cublas shows bf16's own).
Time on the H200 (evidence 2026-11-29): about 145 s for 9 FP8 + 9 W4A16 + 2 W4A4 cases with the exact-M autotuner
(a few seconds per new M); with tuned tables (no autotuning) and these 15 + 15 + 2 cases, expect 2-3 minutes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dz_bench.cases._peers import compile_peer, graphed
from dz_bench.harness import Case, Unavailable, lazy, register

FULL_SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]
FULL_M = [1, 4, 16, 1785, 3570]
SMALL_SHAPES = [(128, 128), (128, 256), (256, 128)]
SMALL_M = [1, 16]
DTYPE = torch.bfloat16
FP8_MAX = 448.0


def _q():
    import dz_kernels.quant as q

    return q


def _need_kernels(ctx):
    from dz_kernels import env

    if ctx.device != "cuda" and not env.triton_interpret():
        raise Unavailable("the Triton kernels need CUDA (or TRITON_INTERPRET=1 set before triton is imported)")


def _inputs(M, K, N, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, DTYPE)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, DTYPE)
    b = (0.1 * torch.randn(N, generator=g)).to(device, DTYPE)
    return x, w, b


def _max_err(expected, out):
    return (out.float() - expected).abs().max().item()


# ------------------------------------------------------------------------------------------------ peer quantizers
def _torch_quant_rows(x):
    """Per-token FP8 quantization in plain torch ops (what a user writes without a fused kernel)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _torch_quant_1x128(x):
    M, K = x.shape
    xb = x.float().view(M, K // 128, 128)
    scale = xb.abs().amax(dim=2).clamp(min=1e-12) / FP8_MAX
    q = (xb / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(M, K)
    return q, scale


def _try_first_call(fn):
    try:
        fn()
    except Unavailable:
        raise
    except Exception as e:  # an unsupported recipe / device: the peer is reported, not failed
        raise Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return fn


# ------------------------------------------------------------------------------------------------------ factories
def _fp8_case(ctx, M, K, N):
    data = lazy(lambda: _inputs(M, K, N, ctx.device))
    expected = lazy(lambda: data()[0].float() @ data()[1].float().t() + data()[2].float())

    params = {"M": M, "K": K, "N": N, "dtype": "bfloat16", **_timed_by(ctx)}

    def dz(block=False):
        def factory():
            _need_kernels(ctx)
            q = _q()
            x, w, b = data()
            if block:
                qw, sw = q.quantize_fp8_blockwise(w, "128x128")
            else:
                qw, sw = q.quantize_fp8_rowwise(w)
            return graphed(lambda: q.fp8_linear(x, qw, sw, b, block_scaled=block), ctx, params,
                           "dz-block" if block else "dz-triton")
        return factory

    def dz_auto():
        _need_kernels(ctx)
        from dz_kernels.quant.dispatch import fp8_linear_dispatch, fp8_linear_path

        q = _q()
        x, w, b = data()
        qw, sw = q.quantize_fp8_rowwise(w)
        sw = sw.reshape(-1)
        params["path"] = fp8_linear_path(M, K, N, x.device, has_bf16_weight=True)
        return graphed(lambda: fp8_linear_dispatch(x, qw, sw, b, bf16_weight=w), ctx, params, "dz")

    def bf16():
        x, w, b = data()
        return graphed(lambda: F.linear(x, w, b), ctx, params, "bf16-cublas")

    def scaled_mm_rowwise():
        if not hasattr(torch, "_scaled_mm"):
            raise Unavailable("torch._scaled_mm is not in this torch")
        x, w, b = data()
        qw, sw = _torch_quant_rows(w)
        wt, sw_t = qw.t(), sw.t().contiguous()  # column-major B [K, N], scale_b [1, N]

        def run():
            qa, sa = _torch_quant_rows(x)
            return torch._scaled_mm(qa, wt, scale_a=sa, scale_b=sw_t, bias=b, out_dtype=DTYPE)
        return graphed(_try_first_call(run), ctx, params, "scaled_mm-rowwise")

    def scaled_mm_blockwise():
        if not hasattr(torch, "_scaled_mm"):
            raise Unavailable("torch._scaled_mm is not in this torch")
        if K % 128 or N % 128:
            raise Unavailable("block scaling needs K and N to be multiples of 128")
        x, w, b = data()
        qw, sw = _q().reference.quantize_fp8_reference(w, "block128x128") if ctx.device == "cpu" else \
            _q().quantize_fp8_blockwise(w, "128x128")
        wt = qw.t()
        sw_t = sw.t().contiguous()  # [K/128, N/128]

        def run():
            qa, sa = _torch_quant_1x128(x)
            sa_outer = sa.t().contiguous().t()  # [M, K/128], M-major, as cuBLAS's 1x128 scales expect
            y = torch._scaled_mm(qa, wt, scale_a=sa_outer, scale_b=sw_t, out_dtype=DTYPE)
            return y + b
        return graphed(_try_first_call(run), ctx, params, "scaled_mm-blockwise")

    def te(recipe_name):
        def factory():
            if ctx.device != "cuda":
                raise Unavailable("TransformerEngine needs CUDA")
            try:
                import transformer_engine.common.recipe as te_recipe
                import transformer_engine.pytorch as te
            except ModuleNotFoundError as e:
                raise Unavailable(f"Transformer Engine is not installed here ({e})") from e
            except Exception as e:
                raise Unavailable(f"transformer_engine is not importable: {type(e).__name__}: {e}") from e
            if not hasattr(te_recipe, recipe_name):
                raise Unavailable(f"this TransformerEngine has no {recipe_name} recipe")
            recipe = getattr(te_recipe, recipe_name)()
            x, w, b = data()
            lin = te.Linear(K, N, bias=True, params_dtype=DTYPE, device="cuda")
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)

            def run():
                with torch.no_grad(), te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                    return lin(x)
            return graphed(_try_first_call(run), ctx, params, f"te {recipe_name}")
        return factory

    return Case(case=f"fp8-linear/{_shape(M, K, N)}", params=params,
                flops=2.0 * M * N * K, bytes=2.0 * M * K + 1.0 * N * K + 4.0 * N + 2.0 * M * N,
                impls={"dz": dz_auto, "dz-triton": dz(False), "dz-block": dz(True), "bf16-cublas": bf16,
                       "scaled_mm-rowwise": scaled_mm_rowwise, "scaled_mm-blockwise": scaled_mm_blockwise,
                       "te-linear": te("Float8CurrentScaling"), "te-linear-block": te("Float8BlockScaling")},
                check=lambda out: _max_err(expected(), out))


def _timed_by(ctx) -> dict:
    return {"timed": "CUDA graph replay" if ctx.device == "cuda" else "eager"}


def _shape(M, K, N) -> str:
    return f"M{M}-K{K}-N{N}"


def _nvfp4_case(ctx, M, K, N, act_quant):
    data = lazy(lambda: _inputs(M, K, N, ctx.device))
    expected = lazy(lambda: data()[0].float() @ data()[1].float().t() + data()[2].float())
    nvfp4_weight_bytes = N * K // 2 + N * K // 16 + 4
    emulation = False
    if act_quant:
        native = ctx.device == "cuda" and _q().dot_scaled_available("cuda")
        emulation = not native
        path = "tl.dot_scaled" if native else \
            "register dequantization: an emulation (no FP4 tensor cores here), a correctness path, no speed claim"
    else:
        from dz_kernels.quant.ops import w4a16_path

        kernel = {"splitk": "split-K kernel", "tiled": "tiled kernel",
                  "dequant": "the weight dequantized once, then the dense GEMM"}[w4a16_path(M, N, K, ctx.device)]
        path = f"bf16 weight-only dequantization, {kernel}"

    params = {"M": M, "K": K, "N": N, "dtype": "bfloat16", "path": path, "weight_bytes_nvfp4": nvfp4_weight_bytes,
              "weight_bytes_bf16": 2 * N * K, **_timed_by(ctx)}

    def dz():
        _need_kernels(ctx)
        q = _q()
        x, w, b = data()
        qw, sw, gw = q.quantize_nvfp4(w)
        return graphed(lambda: q.nvfp4_linear(x, qw, sw, gw, b, act_quant=act_quant), ctx, params, "dz")

    def bf16():
        x, w, b = data()
        return graphed(lambda: F.linear(x, w, b), ctx, params, "bf16-cublas")

    name = ("nvfp4-w4a4-emulation" if emulation else "nvfp4-w4a4") if act_quant else "nvfp4-w4a16"
    impls = {"dz": dz} if emulation else {"dz": dz, "bf16-cublas": bf16}
    return Case(case=f"{name}/{_shape(M, K, N)}", params=params,
                flops=2.0 * M * N * K, bytes=2.0 * M * K + nvfp4_weight_bytes + 2.0 * M * N,
                impls=impls, check=lambda out: _max_err(expected(), out))


QKV_FULL = [(1785, 5120), (3570, 5120)]
QKV_SMALL = [(16, 128)]
EPS = 1e-6


def _linear_path(mod, x) -> str:
    """The path a Float8Linear runs for x (a tensor or Float8Rows): its dispatch path on CUDA; the CPU runs the
    reference GEMM whatever the table says."""
    t = x if isinstance(x, torch.Tensor) else x.data
    return mod.path_for(x) if t.is_cuda else "CPU reference GEMM"


def _qkv_case(ctx, M, C):
    """The norm + q/k/v projections of a DiT block, with and without the FP8 producer path (module doc)."""
    def make():
        g = torch.Generator(device="cpu").manual_seed(7)
        r = lambda *s, k=1.0: (k * torch.randn(*s, generator=g)).to(ctx.device, DTYPE)  # noqa: E731
        x, shift, scale = r(1, M, C), r(1, M, C, k=0.3), r(1, M, C, k=0.3)
        lins = torch.nn.ModuleList(torch.nn.Linear(C, C) for _ in range(3)).to(ctx.device, DTYPE)
        with torch.no_grad():
            for lin in lins:
                lin.weight.copy_(r(C, C, k=C ** -0.5))
                lin.bias.copy_(r(C, k=0.1))
        return x, shift, scale, lins
    data = lazy(make)

    def expected():
        x, shift, scale, lins = data()
        h = F.layer_norm(x.float(), (C,), eps=EPS) * (1 + scale.float()) + shift.float()
        return [h @ lin.weight.float().t() + lin.bias.float() for lin in lins]
    expected = lazy(expected)
    params = {"M": M, "K": C, "N": C, "dtype": "bfloat16", "linears": 3, **_timed_by(ctx)}

    def quantized():
        import copy

        q = _q()
        mods = copy.deepcopy(data()[3])     # quantize_ keeps the bf16 originals (reversible), as in the model
        q.quantize_(mods, q.Float8DynamicActivationFloat8Weight(), filter_fn=lambda m, n: True)
        return list(mods)

    def dz():
        _need_kernels(ctx)
        import dz_kernels.fused as fz

        q, (x, shift, scale, _) = _q(), data()
        mods = quantized()
        with torch.no_grad():
            if all(m.accepts_fp8_rows(x) for m in mods):
                rows = q.Float8Rows(*fz.layernorm_modulate(x, shift, scale, EPS, fp8=True), x.dtype)
                params["path"] = f"producer: fused norm FP8 epilogue + {_linear_path(mods[0], rows)} x3"

                def run():
                    r = q.Float8Rows(*fz.layernorm_modulate(x, shift, scale, EPS, fp8=True), x.dtype)
                    return tuple(m(r) for m in mods)
            else:
                params["path"] = f"plain: fused norm bf16 + Float8Linear {_linear_path(mods[0], x)} x3"

                def run():
                    h = fz.layernorm_modulate(x, shift, scale, EPS)
                    return tuple(m(h) for m in mods)
        return graphed(torch.no_grad()(run), ctx, params, "dz")

    def fp8_separate():
        _need_kernels(ctx)
        import dz_kernels.fused as fz

        x, shift, scale, _ = data()
        mods = quantized()
        params["path_separate"] = f"Float8Linear {_linear_path(mods[0], x)} x3"

        @torch.no_grad()
        def run():
            h = fz.layernorm_modulate(x, shift, scale, EPS)
            return tuple(m(h) for m in mods)
        return graphed(run, ctx, params, "dz-fp8-separate")

    def bf16():
        _need_kernels(ctx)
        import dz_kernels.fused as fz

        x, shift, scale, lins = data()

        @torch.no_grad()
        def run():
            h = fz.layernorm_modulate(x, shift, scale, EPS)
            return tuple(F.linear(h, lin.weight, lin.bias) for lin in lins)
        return graphed(run, ctx, params, "bf16-cublas")

    def bf16_compile():
        x, shift, scale, lins = data()
        ws = [(lin.weight.detach(), lin.bias.detach()) for lin in lins]

        def chain(x, shift, scale):
            h = F.layer_norm(x.float(), (C,), eps=EPS).to(x.dtype) * (1 + scale) + shift
            return tuple(F.linear(h, w, b) for w, b in ws)
        with torch.no_grad():
            cf, _ = compile_peer(chain, x, shift, scale)
        return graphed(torch.no_grad()(lambda: cf(x, shift, scale)), ctx, params, "bf16-compile")

    return Case(case=f"fp8-qkv-producer/{_shape(M, C, C)}", params=params,
                flops=3 * 2.0 * M * C * C, bytes=3 * 2.0 * M * C + 3 * (1.0 * C * C + 4.0 * C + 2.0 * M * C),
                impls={"dz": dz, "dz-fp8-separate": fp8_separate, "bf16-cublas": bf16, "bf16-compile": bf16_compile},
                check=lambda out: max(_max_err(e, o) for e, o in zip(expected(), out)))


@register("quant")
def cases(ctx):
    shapes = SMALL_SHAPES if ctx.small else FULL_SHAPES
    ms = SMALL_M if ctx.small else FULL_M
    for K, N in shapes:
        for M in ms:
            yield _fp8_case(ctx, M, K, N)
    nv_shapes = shapes[:1] if ctx.small else shapes
    for K, N in nv_shapes:
        for M in ms:
            yield _nvfp4_case(ctx, M, K, N, act_quant=False)
    for K, N in nv_shapes:
        yield _nvfp4_case(ctx, 1785 if not ctx.small else ms[-1], K, N, act_quant=True)
    for M, C in (QKV_SMALL if ctx.small else QKV_FULL):
        yield _qkv_case(ctx, M, C)
