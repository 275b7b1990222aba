"""kv_cache: the fused projection epilogue (q/k RMSNorm + RoPE + KV-cache write) against the chain it replaces.

Case (full shapes, droid-14b: C = 5120, 40 heads x 128, bf16): the observe pass of chunk 4, i.e. one chunk of 1760
video tokens written into a 9-frame cache that holds 7 frames (rows 6160..7919), q/k/v as column slices of one fused
qkv projection [B, 1760, 3C]; B = 1 and 2 (the CFG branches batched); a bf16 cache and an FP8 (E4M3, one scale per
token and head) cache. Small (CPU) run: the same pass on the tiny config (12 tokens, 4 heads x 16).

Implementations ("dz-*" are ours):
- dz-triton: dz_kernels.kv_cache.qk_norm_rope_kv_write(backend="triton") -- one kernel;
- dz-cuda: the same op through csrc/qk_norm_rope.cu (compiled extension, else cupy/NVRTC); Unavailable without it;
- eager: the plain chain (dreamzero.backend rms_norm + apply_rope, then the cache-row write; FP8: the reference
  per-head quantizer), i.e. dz_kernels.kv_cache.reference.qk_norm_rope_kv_reference;
- torch-compile: the same chain under torch.compile(fullgraph=True);
- eager-ref-cache (bf16 only): what the model runs today: ops.qk_norm_rope then dreamzero.cache.KVCache.extend,
  which also concatenates the whole cached sequence for the attention;
- copy_: Tensor.copy_ of q into the q_rot buffer and of k, v into their cache rows (cast to FP8 for the FP8 case):
  the same bytes as the fused kernel with no math, the bandwidth reference.
bytes = what the fused kernel must move: read q, k, v; write q_rot and the k, v cache rows (and their FP8 scales);
read the two weight vectors and the cos/sin tables. check = max abs error of (q_rot, cached k, cached v; FP8 rows
dequantized) against the eager chain; copy_ computes something else (nan).
Timing: every impl is replayed from a CUDA graph (params["timed"]), as the model's captured inference step runs it:
these calls take 0.1-0.5 ms, where an eager timing also counts Python dispatch (the first H200 run timed dz-cuda
slower at B=1 than at B=2). torch-compile is compiled afresh per case (dz_bench.cases._peers.compile_peer).
On the H200 (evidence 2026-11-29) the whole bench ran in about 27 s.
"""
from __future__ import annotations

import torch

from dz_bench.cases._peers import compile_peer, graphed
from dz_bench.harness import Case, Unavailable, lazy, register

DTYPE = torch.bfloat16
EPS = 1e-6


def _geometry(ctx):
    """(cfg, layout): the observe pass of the last context chunk against a cache holding every earlier frame."""
    from dreamzero.config import get_config
    from dreamzero.layout import layout_for_config

    cfg = get_config("tiny" if ctx.small else "droid-14b")
    cached = tuple(range(1 + (cfg.max_chunks - 1) * cfg.frames_per_chunk))     # droid: frames 0..6, 6160 tokens
    return cfg, layout_for_config(cfg, "observe", chunk=cfg.max_chunks, cached_frames=cached)


def _setup(ctx, cfg, lay, B, fp8, seed=0):
    """Inputs and a one-layer FusedKVCache whose write position is the first row of the new chunk."""
    from dreamzero.rope import rope_tables
    from dz_kernels.kv_cache import FusedKVCache

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(seed)
    C = cfg.dim
    qkv = torch.randn(B, lay.q_len, 3 * C, device=dev, generator=g).to(DTYPE)
    q, k, v = qkv.split(C, dim=-1)
    wq = (1 + 0.1 * torch.randn(C, device=dev, generator=g)).to(DTYPE)
    wk = (1 + 0.1 * torch.randn(C, device=dev, generator=g)).to(DTYPE)
    cos, sin = (t.to(dev) for t in rope_tables(lay, cfg))
    cache = FusedKVCache(cfg, B, DTYPE, device=dev, num_layers=1, fp8=fp8, backend="torch")
    cache.write_pos.fill_(lay.n_cached)
    return dict(q=q, k=k, v=v, wq=wq, wk=wk, cos=cos, sin=sin, cache=cache, a=lay.n_cached,
                b=lay.n_cached + lay.q_len, H=cfg.num_heads, D=cfg.head_dim)


def _rows(d):
    """(k rows, v rows) just written, dequantized when FP8."""
    from dz_kernels.kv_cache import dequantize_fp8_per_head

    c, a, b = d["cache"], d["a"], d["b"]
    if c.fp8:
        return (dequantize_fp8_per_head(c.k[0][:, a:b], c.k_scale[0][:, a:b], torch.float32),
                dequantize_fp8_per_head(c.v[0][:, a:b], c.v_scale[0][:, a:b], torch.float32))
    return c.k[0][:, a:b], c.v[0][:, a:b]


def _chain(q, k, v, wq, wk, cos, sin, kc, vc, ks, vs, a: int, b: int, H: int):
    """The unfused chain with host-known rows (what eager PyTorch would write)."""
    from dz_kernels.kv_cache.reference import qk_norm_rope_reference, quantize_fp8_per_head

    q_rot, k_rot = qk_norm_rope_reference(q, k, wq, wk, EPS, cos, sin, H)
    vh = v.unflatten(-1, (H, -1))
    if ks is not None:
        kq, ksc = quantize_fp8_per_head(k_rot)
        vq, vsc = quantize_fp8_per_head(vh)
        kc[:, a:b].copy_(kq)
        vc[:, a:b].copy_(vq)
        ks[:, a:b].copy_(ksc)
        vs[:, a:b].copy_(vsc)
    else:
        kc[:, a:b].copy_(k_rot)
        vc[:, a:b].copy_(vh)
    return q_rot


def _chain_call(d, fn=_chain):
    c = d["cache"]
    ks, vs = (c.k_scale[0], c.v_scale[0]) if c.fp8 else (None, None)
    return lambda: fn(d["q"], d["k"], d["v"], d["wq"], d["wk"], d["cos"], d["sin"], c.k[0], c.v[0], ks, vs, d["a"],
                      d["b"], d["H"])


def _max_err(ref, out) -> float:
    """out: (q_rot, rows) with rows() -> (cached k rows, cached v rows), or None for a different function."""
    if out is None:
        return float("nan")
    q_rot, rows = out
    got = (q_rot, *rows())
    return max((r.float() - t.float()).abs().max().item() for r, t in zip(ref, got))


def _replayed(run, ctx, params, impl):
    """run() -> (q_rot, rows): the call replayed from a CUDA graph; rows is read by the check only."""
    box = {}

    def call():
        q_rot, rows = run()
        box["rows"] = rows
        return q_rot

    replay = graphed(call, ctx, params, impl)
    return lambda: (replay(), box["rows"])


@register("kv_cache")
def cases(ctx):
    cfg, lay = _geometry(ctx)
    H, D, C, L = cfg.num_heads, cfg.head_dim, cfg.dim, lay.q_len
    for fp8 in (False, True):
        for B in (1, 2):
            params = {"config": cfg.name, "B": B, "L": L, "H": H, "D": D, "cached_tokens": lay.n_cached,
                      "cache": "float8_e4m3fn" if fp8 else "bfloat16", "dtype": "bfloat16",
                      "qkv": "column slices of one [B, L, 3C] projection",
                      "timed": "CUDA graph replay" if ctx.device == "cuda" else "eager"}
            data = lazy(lambda B=B, fp8=fp8: _setup(ctx, cfg, lay, B, fp8))

            def expected(data=data):
                d = data()
                with torch.no_grad():
                    q_rot = _chain_call(d)()
                return (q_rot.clone(), *(t.clone() for t in _rows(d)))

            expected = lazy(expected)

            def fused(backend, data=data, expected=expected):
                def make():
                    from dz_kernels.kv_cache import cuda as kv_cuda
                    from dz_kernels.kv_cache import qk_norm_rope_kv_write

                    if backend == "triton" and ctx.device != "cuda":
                        from dz_kernels import env

                        if not env.triton_interpret():
                            raise Unavailable("Triton needs CUDA here (or TRITON_INTERPRET=1 set before import)")
                    if backend == "cuda":
                        ok, reason = kv_cuda.available()
                        if not ok:
                            raise Unavailable(reason)
                    expected()
                    d = data()
                    c = d["cache"]
                    ks, vs = (c.k_scale[0], c.v_scale[0]) if c.fp8 else (None, None)
                    rows = lambda: _rows(d)  # noqa: E731  (read by the check only, not timed)

                    def run():
                        with torch.no_grad():
                            q_rot = qk_norm_rope_kv_write(d["q"], d["k"], d["v"], d["wq"], d["wk"], EPS, d["cos"],
                                                          d["sin"], H, c.k[0], c.v[0], c.write_pos, ks, vs,
                                                          backend=backend, check=False)
                        return q_rot, rows

                    return _replayed(run, ctx, params, f"dz-{backend}")
                return make

            def eager(data=data, expected=expected):
                expected()
                d = data()
                call = _chain_call(d)

                def run():
                    with torch.no_grad():
                        return call(), lambda: _rows(d)
                return _replayed(run, ctx, params, "eager")

            def compiled(data=data, expected=expected):
                if ctx.device != "cuda":
                    raise Unavailable("torch.compile is timed on CUDA only")
                expected()
                d = data()
                c = d["cache"]
                ks, vs = (c.k_scale[0], c.v_scale[0]) if c.fp8 else (None, None)
                args = (d["q"], d["k"], d["v"], d["wq"], d["wk"], d["cos"], d["sin"], c.k[0], c.v[0], ks, vs,
                        d["a"], d["b"], d["H"])
                with torch.no_grad():
                    chain, _ = compile_peer(_chain, *args)

                def run():
                    with torch.no_grad():
                        return chain(*args), lambda: _rows(d)
                return _replayed(run, ctx, params, "torch-compile")

            def ref_cache(data=data, expected=expected, B=B):
                from dreamzero.backend import qk_norm_rope
                from dreamzero.cache import KVCache

                expected()
                d = data()
                kv = KVCache(cfg, B, DTYPE, device=ctx.device, num_layers=1)
                kv.frames = tuple(s.frame for s in lay.k if s.cached)

                def run():
                    with torch.no_grad():
                        q_rot, k_rot = qk_norm_rope(d["q"], d["k"], d["wq"], d["wk"], EPS, d["cos"], d["sin"], H)
                        kv.extend(0, k_rot, d["v"].unflatten(-1, (H, -1)), lay)
                    return q_rot, lambda: (kv.k[0][:, d["a"]:d["b"]], kv.v[0][:, d["a"]:d["b"]])
                return run     # eager, as the model's reference path runs it

            def copy_(data=data, B=B):
                d = data()
                c = d["cache"]
                q_out = torch.empty(B, L, H, D, dtype=DTYPE, device=ctx.device)
                kh, vh = d["k"].unflatten(-1, (H, D)), d["v"].unflatten(-1, (H, D))
                kdst, vdst = c.k[0][:, d["a"]:d["b"]], c.v[0][:, d["a"]:d["b"]]

                def run():
                    q_out.copy_(d["q"].unflatten(-1, (H, D)))
                    kdst.copy_(kh)
                    vdst.copy_(vh)
                    return None
                return graphed(run, ctx, params, "copy_")

            impls = {"dz-triton": fused("triton"), "dz-cuda": fused("cuda"), "eager": eager,
                     "torch-compile": compiled}
            if not fp8:
                impls["eager-ref-cache"] = ref_cache
            impls["copy_"] = copy_
            cache_elem = 1 if fp8 else 2
            act = B * L * C * 2
            nbytes = 4 * act + 2 * B * L * C * cache_elem + (2 * B * L * H * 4 if fp8 else 0) + 2 * C * 2 \
                + 2 * L * (D // 2) * 4
            yield Case(case=f"observe-{'fp8' if fp8 else 'bf16'}/B{B}", params=params,
                       flops=None, bytes=nbytes, impls=impls,
                       check=lambda out, expected=expected: _max_err(expected(), out))
