"""attention: layout attention (dz_kernels.attention) on DreamZero's masks against FlexAttention, SDPA and the
release-style per-block loop.

Cases (full shapes, droid-14b: 40 heads x 128, bf16, tensors [B, L, H, D]):
- train/fwd, train/fwd+bwd: the teacher-forcing mask at 4 chunks (15,940 tokens, about 30% visible), B=1;
  train/fwd+bwd/deterministic: the same with the no-atomics backward.
- infer/B1, infer/B2: one denoising pass of chunk 5 (1785 queries) against a full cache (9 frames, 7920 keys) plus
  itself. Dense under the release rule, so "dz" dispatches to SDPA (cuDNN first); infer/B*/kernel forces the
  Triton kernel on the same shape, to keep that dispatch decision measured.
- control/B1, control/B2: the one-call control step (observed chunk 4 written to the cache + chunk 5 denoised,
  7 cached frames) against "two-calls-*", the observe pass and the denoise pass it replaces (each one call: our
  op, which dispatches both to SDPA since both are dense, or SDPA cuDNN / flash directly), and the other peers on
  the control mask; control/B*/sdpa-blocks times the op's optional two-dense-blocks dispatch (sdpa_blocks=2).
- schedule/train: host time to build the tile schedules and token tables of the training layout from scratch
  (peer: FlexAttention's create_block_mask for the same mask on the device).
FLOPs are the useful ones, layout.attention_flops (4 * visible pairs * D per head); forward plus backward counts
3.5x the forward (backward = 2.5x, FlashAttention's convention), so the dense peers, which do about 3x the work on
the training mask, are charged only for the useful part.

Peers: "flex" (torch.compile'd flex_attention with a block mask from a mask_mod over per-token segment ids),
"sdpa-cudnn" and "sdpa-flash" (dense, unmasked: a different function on masked layouts, timed as the speed of
light of dense attention; their max_err is nan there), "release-loop" (dreamzero.attention.attention_blockwise:
one SDPA call per group of query segments over the torch.cat of its keys). check = max abs error against the
release loop's result (outputs, and dq, dk, dv for the backward cases).

Timing: the inference and control cases replay every impl from a CUDA graph (params["timed"]), as the model's
captured control step runs them (at 0.7-2 ms an eager timing also counts the host: Python dispatch, and the
release loop's per-block calls); an impl that cannot be captured is timed eagerly and listed in
params["eager_timed"]. The training cases are timed eagerly.
Dispatch record: for every case the "dz" impl fills params["dispatch"] (what layout_attention's rule picks for the
layout: "SDPA (dense layout)", "SDPA per dense block", or "dz Triton kernel") and, on CUDA, params["kernels"]: the
kernels one call launched, read off torch.profiler (e.g. cuDNN's or our _fwd_kernel), and params["config"]: where
the kernel's tiles came from (the config table's default or a tuned entry).
On the H200 (evidence 2026-11-29) the whole bench ran in about 55 s (the dz backward rows take 5-10 s each).

Small (CPU) run: tiny layouts (6-token frames, 2 heads x 16); "dz" runs in the Triton interpreter when
TRITON_INTERPRET=1 was set before import (else Unavailable), the CUDA-only peers are Unavailable.
"""
from __future__ import annotations

import torch

from dz_bench.cases._peers import graphed
from dz_bench.harness import Case, Unavailable, lazy, register

from ._flex import flex_attention_for, flex_block_mask

DTYPE = torch.bfloat16
FWD_BWD_FLOP_FACTOR = 3.5


def _attn():
    import dz_kernels.attention as attn

    return attn


def _dz_available(ctx):
    if ctx.device != "cuda":
        from dz_kernels._common import kernels_interpreted

        if not kernels_interpreted():
            raise Unavailable("the Triton kernels need CUDA (or TRITON_INTERPRET=1 set before import, for the CPU "
                              "interpreter)")


def _cuda_only(ctx, what):
    if ctx.device != "cuda":
        raise Unavailable(f"{what} is timed on CUDA only")


def _shapes(ctx):
    """(config name, heads, head dim, per-layout builders)."""
    from dreamzero.config import get_config
    from dreamzero.layout import inference_layout, layout_for_config

    if ctx.small:
        ft, fpc, A, S = 6, 2, 3, 1
        return {
            "heads": 2, "head_dim": 16,
            "train": lambda: layout_for_config(get_config("tiny"), "train", num_chunks=2),
            "denoise": lambda: inference_layout(ft, fpc, A, S, "denoise", 3, (0, 1, 2, 3, 4)),
            "control": lambda: inference_layout(ft, fpc, A, S, "control", 3, (0, 1, 2)),
            "observe": lambda: inference_layout(ft, fpc, A, S, "observe", 2, (0, 1, 2)),
        }
    cfg = get_config("droid-14b")
    return {
        "heads": cfg.num_heads, "head_dim": cfg.head_dim,
        "train": lambda: layout_for_config(cfg, "train"),
        "denoise": lambda: layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9))),
        "control": lambda: layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7))),
        "observe": lambda: layout_for_config(cfg, "observe", chunk=4, cached_frames=tuple(range(7))),
    }


def _inputs(ctx, lay, B, H, D, grad=False, seed=0):
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    q = torch.randn(B, lay.q_len, H, D, device=ctx.device, generator=g).to(DTYPE)
    k = torch.randn(B, lay.k_len, H, D, device=ctx.device, generator=g).to(DTYPE)
    v = torch.randn(B, lay.k_len, H, D, device=ctx.device, generator=g).to(DTYPE)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _max_err(ref, got) -> float:
    if got is None:            # a peer that computes a different function (dense on a masked layout)
        return float("nan")
    err = 0.0
    for r, t in zip(ref, got):
        err = max(err, (r.float() - t.float()).abs().max().item())   # nan when memory was left unwritten
    return err


# ------------------------------------------------------------------------------------------------ attention fns
def _fn_dz(lay, **kw):
    attn = _attn()
    return lambda q, k, v: attn.layout_attention(q, k, v, lay, **kw)


def _fn_release(lay):
    from dreamzero.attention import attention_blockwise

    return lambda q, k, v: attention_blockwise(q, k, v, lay)


def _fn_sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel([be]):
            o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                 v.transpose(1, 2))
        return o.transpose(1, 2)

    return run


def _warm(run):
    """Call once (compiles Triton kernels or a torch.compile peer); a compile failure becomes Unavailable."""
    try:
        run()
    except Unavailable:
        raise
    except Exception as e:
        raise Unavailable(f"could not run: {type(e).__name__}: {e}") from e
    return run


# ------------------------------------------------------------------------------------------------ dispatch record
_KERNEL_KINDS = (("cudnn", "cuDNN"), ("flash", "flash"), ("fmha", "mem-efficient"), ("_fwd_kernel", "dz Triton"),
                 ("_bwd_", "dz Triton"))


def _record_dispatch(ctx, params: dict, lay, run, **kw) -> None:
    """params["dispatch"]: the op's rule for this layout and call; params["kernels"] (CUDA): what one call of run
    launched, from torch.profiler; params["config"]: the tile config's source."""
    attn = _attn()
    dense_sdpa = kw.get("dense_sdpa")
    cfg, source = attn.config_choice(torch.device(ctx.device), DTYPE, params["D"], attn.config_mode(lay)) \
        if ctx.device == "cuda" else (attn.default_config(torch.device(ctx.device), DTYPE, params["D"]), "interpreter")
    sdpa_on = dense_sdpa if dense_sdpa is not None else (ctx.device == "cuda" and not kw.get("deterministic"))
    blocks = attn.dense_blocks(lay)
    n_blocks = kw.get("sdpa_blocks") or cfg.sdpa_blocks
    if sdpa_on and attn.layout_is_dense(lay):
        params["dispatch"] = "SDPA (dense layout; cuDNN first)"
    elif sdpa_on and blocks is not None and len(blocks) <= n_blocks and n_blocks > 1:
        params["dispatch"] = f"SDPA per dense block ({len(blocks)} calls; cuDNN first)"
    else:
        params["dispatch"] = "dz Triton kernel"
        params["config"] = source
    if ctx.device != "cuda":
        return
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        names = sorted({e.name for e in prof.events() if e.device_type == DeviceType.CUDA})
        kinds = sorted({label for n in names for key, label in _KERNEL_KINDS if key in n.lower() or key in n})
        params["kernels"] = (", ".join(kinds) or "other") + ": " + "; ".join(n[:80] for n in names[:4])
    except Exception as e:   # the profiler is a record, not the measurement
        params["kernels"] = f"unknown (profiler: {type(e).__name__}: {str(e)[:100]})"


# ------------------------------------------------------------------------------------------------ case builders
def _fwd_case(ctx, name, lay, B, H, D, impls: dict, dense_peers: bool, params: dict, graph: bool = False,
              dz_kw: dict | None = None):
    """impls: {impl name: (builder of fn(q, k, v) -> out, requirement check or None)}. graph: time every impl
    from a CUDA graph. dz_kw: the "dz" impl's keyword arguments (for its dispatch record)."""
    data = lazy(lambda: _inputs(ctx, lay, B, H, D))
    expected = lazy(lambda: [_fn_release(lay)(*data())])
    params = dict(params, B=B, H=H, D=D, Lq=lay.q_len, Lk=lay.k_len, dtype="bfloat16",
                  visible=round(lay.visible_pairs() / (lay.q_len * lay.k_len), 4),
                  timed="CUDA graph replay" if graph and ctx.device == "cuda" else "eager")

    def factory(impl, build, require, masked_semantics):
        def make():
            if require is not None:
                require()
            fn = build()
            args = data()
            if masked_semantics:
                run = lambda: [fn(*args)]  # noqa: E731
            else:
                def run():
                    fn(*args)
                    return None
            if impl == "dz":
                _record_dispatch(ctx, params, lay, run, **(dz_kw or {}))
            return graphed(run, ctx, params, impl) if graph else run
        return make

    table = {}
    for impl, (build, require) in impls.items():
        dense = impl.startswith("sdpa-") and dense_peers
        table[impl] = factory(impl, build, require, not dense)
    return Case(case=name, params=params, flops=lay.attention_flops(B, H, D), impls=table,
                check=lambda out: _max_err(expected(), out))


def _fwd_bwd_case(ctx, name, lay, B, H, D, impls: dict, params: dict):
    data = lazy(lambda: _inputs(ctx, lay, B, H, D, grad=True))
    dout = lazy(lambda: torch.randn(B, lay.q_len, H, D, device=ctx.device,
                                    generator=torch.Generator(device=ctx.device).manual_seed(7)).to(DTYPE))

    def fwd_bwd(fn):
        args, g = data(), dout()

        def run():
            out = fn(*args)
            return [out.detach(), *torch.autograd.grad(out, args, g)]
        return run

    expected = lazy(lambda: fwd_bwd(_fn_release(lay))())
    params = dict(params, B=B, H=H, D=D, Lq=lay.q_len, Lk=lay.k_len, dtype="bfloat16",
                  visible=round(lay.visible_pairs() / (lay.q_len * lay.k_len), 4), timed="eager")

    def factory(impl, build, require, masked_semantics):
        def make():
            if require is not None:
                require()
            run = fwd_bwd(build())
            if impl == "dz":
                attn = _attn()
                cfg = attn.default_config(torch.device(ctx.device), DTYPE, D, attn.config_mode(lay))
                params["config"] = attn.config_choice(torch.device(ctx.device), DTYPE, D, attn.config_mode(lay))[1] \
                    if ctx.device == "cuda" else "interpreter"
                params["dq_pass"] = "separate dq kernel" if params.get("deterministic") or not cfg.atomic_dq else \
                    "atomics in the dk/dv kernel"
            if masked_semantics:
                return run

            def run_dense():
                run()
                return None
            return run_dense
        return make

    table = {impl: factory(impl, b, r, not impl.startswith("sdpa-")) for impl, (b, r) in impls.items()}
    return Case(case=name, params=params, flops=FWD_BWD_FLOP_FACTOR * lay.attention_flops(B, H, D), impls=table,
                check=lambda out: _max_err(expected(), out))


def _peers(ctx, lay, with_flex=True, with_dense=True, with_release=True):
    dev = ctx.device
    out = {}
    if with_flex:
        out["flex"] = (lambda: flex_attention_for(lay, dev), lambda: _cuda_only(ctx, "FlexAttention (compiled)"))
    if with_dense:
        out["sdpa-cudnn"] = (lambda: _fn_sdpa("cudnn"), lambda: _cuda_only(ctx, "SDPA cuDNN"))
        out["sdpa-flash"] = (lambda: _fn_sdpa("flash"), lambda: _cuda_only(ctx, "SDPA flash"))
    if with_release:
        out["release-loop"] = (lambda: _fn_release(lay), None)
    return out


@register("attention")
def cases(ctx):
    sh = _shapes(ctx)
    H, D = sh["heads"], sh["head_dim"]
    dz_req = lambda: _dz_available(ctx)  # noqa: E731

    # training mask, forward and forward + backward
    train = sh["train"]()
    yield _fwd_case(ctx, "train/fwd", train, 1, H, D,
                    {"dz": (lambda: _fn_dz(train), dz_req), **_peers(ctx, train)}, True,
                    {"layout": "train", "pass": "fwd"}, dz_kw={})
    yield _fwd_bwd_case(ctx, "train/fwd+bwd", train, 1, H, D,
                        {"dz": (lambda: _fn_dz(train), dz_req), **_peers(ctx, train)},
                        {"layout": "train", "pass": "fwd+bwd", "deterministic": False})
    yield _fwd_bwd_case(ctx, "train/fwd+bwd/deterministic", train, 1, H, D,
                        {"dz": (lambda: _fn_dz(train, deterministic=True), dz_req),
                         **_peers(ctx, train, with_dense=False, with_release=False)},
                        {"layout": "train", "pass": "fwd+bwd", "deterministic": True})

    # inference chunk against the full cache (dense under the release rule)
    den = sh["denoise"]()
    for B in (1, 2):
        yield _fwd_case(ctx, f"infer/B{B}", den, B, H, D,
                        {"dz": (lambda: _fn_dz(den), dz_req), **_peers(ctx, den)}, False,
                        {"layout": "denoise", "pass": "fwd", "dispatch_arg": "default"}, graph=True, dz_kw={})
        yield _fwd_case(ctx, f"infer/B{B}/kernel", den, B, H, D,
                        {"dz": (lambda: _fn_dz(den, dense_sdpa=False), dz_req),
                         **_peers(ctx, den, with_flex=False, with_release=False)}, False,
                        {"layout": "denoise", "pass": "fwd", "dispatch_arg": "dense_sdpa=False (kernel forced)"},
                        graph=True, dz_kw={"dense_sdpa": False})

    # the control step: one call vs the observe + denoise calls it replaces
    ctl, obs = sh["control"](), sh["observe"]()
    for B in (1, 2):
        yield _control_case(ctx, ctl, obs, den, B, H, D, dz_req)
        yield _control_case(ctx, ctl, obs, den, B, H, D, dz_req, sdpa_blocks=True)

    yield _schedule_case(ctx, sh)


def _control_case(ctx, ctl, obs, den, B, H, D, dz_req, sdpa_blocks=False):
    """The control layout's queries are [observed frames | noisy frames, actions, state] and its keys
    [cache | the same]; the two-call peer runs the observe layout on the first part and the denoise layout (whose
    cache then holds the observed frames too) on the second, on the same tensors. With sdpa_blocks, "dz" takes
    the op's two-dense-blocks dispatch (one SDPA call per block) instead of the kernel."""
    data = lazy(lambda: _inputs(ctx, ctl, B, H, D))
    expected = lazy(lambda: [_fn_release(ctl)(*data())])
    n_obs, n_cached = obs.q_len, ctl.n_cached
    assert obs.k_len == n_cached + n_obs and den.k_len == ctl.k_len and den.q_len == ctl.q_len - n_obs
    params = {"layout": "control", "pass": "fwd", "B": B, "H": H, "D": D, "Lq": ctl.q_len, "Lk": ctl.k_len,
              "dtype": "bfloat16", "observed_tokens": n_obs,
              "timed": "CUDA graph replay" if ctx.device == "cuda" else "eager"}
    dz_kw = {"dense_sdpa": True, "sdpa_blocks": 2} if sdpa_blocks else {}

    def two_calls(impl, build_obs, build_den):
        def make():
            f_obs, f_den = build_obs(), build_den()
            q, k, v = data()
            q_obs, k_obs, v_obs = q[:, :n_obs], k[:, :n_cached + n_obs], v[:, :n_cached + n_obs]
            q_den = q[:, n_obs:]

            def run():
                return [torch.cat([f_obs(q_obs, k_obs, v_obs), f_den(q_den, k, v)], dim=1)]
            return graphed(run, ctx, params, impl)
        return make

    def one(impl, build, require=None):
        def make():
            if require is not None:
                require()
            fn, args = build(), data()
            run = lambda: [fn(*args)]  # noqa: E731
            if impl == "dz":
                _record_dispatch(ctx, params, ctl, run, **dz_kw)
            return graphed(run, ctx, params, impl)
        return make

    def cuda_two_calls(backend):
        def make():
            _cuda_only(ctx, f"SDPA {backend}")
            return two_calls(f"two-calls-sdpa-{backend}", lambda: _fn_sdpa(backend), lambda: _fn_sdpa(backend))()
        return make

    def dz_two_calls():
        dz_req()
        return two_calls("two-calls-dz", lambda: _fn_dz(obs), lambda: _fn_dz(den))()

    if sdpa_blocks:
        impls = {"dz": one("dz", lambda: _fn_dz(ctl, **dz_kw), lambda: _cuda_only(ctx, "the SDPA dispatch")),
                 "two-calls-sdpa-cudnn": cuda_two_calls("cudnn"), "two-calls-sdpa-flash": cuda_two_calls("flash")}
        params["dispatch_arg"] = "dense_sdpa=True, sdpa_blocks=2"
        return Case(case=f"control/B{B}/sdpa-blocks", params=params,
                    flops=ctl.attention_flops(B, H, D), impls=impls, check=lambda out: _max_err(expected(), out))
    impls = {
        "dz": one("dz", lambda: _fn_dz(ctl), dz_req),
        "two-calls-dz": dz_two_calls,
        "two-calls-sdpa-cudnn": cuda_two_calls("cudnn"),
        "two-calls-sdpa-flash": cuda_two_calls("flash"),
        "flex": one("flex", lambda: flex_attention_for(ctl, ctx.device),
                    lambda: _cuda_only(ctx, "FlexAttention (compiled)")),
        "release-loop": one("release-loop", lambda: _fn_release(ctl)),
    }
    params["dispatch_arg"] = "default"
    return Case(case=f"control/B{B}", params=params, flops=ctl.attention_flops(B, H, D), impls=impls,
                check=lambda out: _max_err(expected(), out))


def _schedule_case(ctx, sh):
    """Host time of the schedules and token tables the op needs for the training layout, from scratch."""

    def impl_dz():
        attn = _attn()
        cfg = attn.default_config(torch.device(ctx.device), DTYPE, sh["head_dim"])
        pattern = sh["train"]().attention_pattern()

        def run():
            attn.build_token_tables(pattern)          # the uncached builders (the op memoizes them per pattern)
            for bm, bn in (cfg.fwd, cfg.dkv, cfg.dq):
                attn.build_schedule(pattern, bm, bn)
            return None
        return run

    def impl_flex():
        _cuda_only(ctx, "create_block_mask at the full shape")
        return lambda: flex_block_mask(sh["train"](), ctx.device)

    lay = sh["train"]()
    return Case(case="schedule/train", params={"layout": "train", "Lq": lay.q_len, "Lk": lay.k_len,
                                               "what": "tile schedules + token tables, host, uncached"},
                impls={"dz": impl_dz, "flex-create_block_mask": impl_flex})
