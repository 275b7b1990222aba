"""The KV-cache kernels (dz_kernels.kv_cache): the fused q/k RMSNorm + RoPE + cache write and the plain cache write,
every backend (Triton on the suite's device: CUDA, else the CPU interpreter; the CUDA extension and cupy/NVRTC where
a GPU is), against float64 and against the plain references, which are themselves held bit-equal to the model's own
chain (dreamzero.backend).

Bars: q_rot and a k cache in the activations' dtype within 2x PyTorch's own low-precision error of float64 (FA's
bar); v exact. FP8 cache (one scale per (token, head), dz_kernels/_common.py): v bit-exact with the reference
quantizer, scales included; k scales within one step of the activation dtype (the row's sum of squares may round
differently), >= 99% of the k bytes identical, and the dequantized k within 2x the reference's own error of the
float64 chain. The plain write: bit-exact, FP8 included. A NaN in a head gives that head a NaN scale and NaN values
(a NaN in a row of k: every head of it, through the RMSNorm). Output buffers and untouched cache rows are
NaN-poisoned. The DROID-size cases run where there is a GPU (the interpreter would take minutes).
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from dreamzero.backend import qk_norm_rope as model_qk_norm_rope
from dz_kernels.kv_cache import (
    dequantize_fp8_per_head,
    kv_cache_write,
    kv_cache_write_reference,
    qk_norm_rope_kv_reference,
    qk_norm_rope_kv_write,
    qk_norm_rope_reference,
    quantize_fp8_per_head,
)
from dz_kernels.kv_cache import cuda as kv_cuda
from dz_kernels.testing import assert_within_lowp_bar, cpu64, max_abs_err, poisoned, sqnr_db

from conftest import DEVICE, requires_cuda

FP8 = torch.float8_e4m3fn
EPS = 1e-6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# E4M3 keeps 3 mantissa bits: per-(token, head) quantization of roughly Gaussian data is ~32 dB below the signal
# (31.8-33.4 dB measured at these shapes); the bar leaves about 3 dB.
FP8_KV_SQNR_DB = 28.0


def _backends():
    """"triton" (the suite's device); "cuda" and "cupy" where they can run, else skipped with the reason."""
    out = ["triton"]
    for name, use_cupy in (("cuda", False), ("cupy", True)):
        ok, reason = kv_cuda.available(use_cupy)
        out.append(pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"backend {name!r}: {reason}")))
    return out


# (B, L, H, D, pos0): odd small shapes for every device; the DROID rows (40 heads x 128, one odd-length chunk plus
# action/state tokens, deep into the cache) on the GPU
SHAPES = [pytest.param((2, 7, 4, 16, 5), id="small-d16"), pytest.param((1, 5, 3, 128, 2), id="small-d128"),
          pytest.param((2, 1785, 40, 128, 6160), id="droid", marks=requires_cuda)]


# ------------------------------------------------------------------------------------------------------- helpers
def _inputs(B, L, H, D, dtype, w_dtype=None, seed=0):
    """q, k, v as column slices of one fused qkv projection [B, L, 3C] (row stride 3C), weights, RoPE tables;
    drawn on the CPU, then moved to the suite's device."""
    g = torch.Generator().manual_seed(seed)
    C = H * D
    qkv = (torch.randn(B, L, 3 * C, generator=g) * 1.5 + 0.2).to(dtype).to(DEVICE)
    q, k, v = qkv.split(C, dim=-1)
    wq = (1 + 0.3 * torch.randn(C, generator=g)).to(w_dtype or dtype).to(DEVICE)
    wk = (1 + 0.3 * torch.randn(C, generator=g)).to(w_dtype or dtype).to(DEVICE)
    ang = torch.rand(L, D // 2, generator=g, dtype=torch.float64) * 40.0
    return q, k, v, wq, wk, ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)


def _chain64(x, w, cos, sin, H):
    """The chain in float64 on the CPU with no intermediate rounding: RMSNorm over C, weight, head split, RoPE."""
    xf = cpu64(x)
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * cpu64(w)).unflatten(-1, (H, -1))
    x0, x1 = n[..., 0::2], n[..., 1::2]
    c, s = cpu64(cos)[None, :, None], cpu64(sin)[None, :, None]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def _cache(shape, dtype):
    """A cache buffer full of NaN (FP8: the NaN byte 0x7F), on the suite's device."""
    return poisoned(shape, dtype, DEVICE)


def _untouched(buf, lo, hi):
    """True when every row of buf [B, T, ...] outside [lo, hi) is still NaN."""
    f = buf.float()
    return bool(torch.isnan(f[:, :lo]).all()) and bool(torch.isnan(f[:, hi:]).all())


def _scale_rtol(dtype):
    """Relative tolerance of a k scale: the head's amax element may differ by a step of the activation dtype (one
    step is 2^-8 .. 2^-7 relative in bfloat16, 2^-11 .. 2^-10 in float16); float32: a few ulps of rstd."""
    return {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}[dtype]


def _assert_fp8_k(kq, ks, ref_q, ref_s, k64, dtype):
    assert torch.isfinite(ks).all() and torch.isfinite(kq.float()).all(), "k: unwritten FP8 values or scales"
    torch.testing.assert_close(ks, ref_s, rtol=_scale_rtol(dtype), atol=0, msg="k scales differ")
    same = (kq.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean().item()
    assert same >= 0.99, f"k: only {same:.4f} of the FP8 bytes equal the reference's"
    got, ref = dequantize_fp8_per_head(kq, ks, torch.float64), dequantize_fp8_per_head(ref_q, ref_s, torch.float64)
    assert_within_lowp_bar(got, k64, ref, atol=0.0, name="dequantized k")


def _assert_fp8_exact(q, s, ref_q, ref_s, name):
    assert torch.equal(s.nan_to_num(7.0), ref_s.nan_to_num(7.0)), f"{name}: scales differ"
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), f"{name}: FP8 bytes differ"


# -------------------------------------------------------------------------------------------- the fused kernel
@pytest.mark.parametrize("fp8", [False, True], ids=["cache-act", "cache-fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", _backends())
def test_fused_kernel_matches_the_chain(backend, shape, dtype, fp8):
    B, L, H, D, pos0 = shape
    T = pos0 + L + 3
    q, k, v, wq, wk, cos, sin = _inputs(B, L, H, D, dtype, seed=D + L)
    cdt = FP8 if fp8 else dtype
    kc, vc = _cache((B, T, H, D), cdt), _cache((B, T, H, D), cdt)
    ks, vs = (_cache((B, T, H), torch.float32), _cache((B, T, H), torch.float32)) if fp8 else (None, None)
    rkc, rvc = kc.clone(), vc.clone()
    rks, rvs = (ks.clone(), vs.clone()) if fp8 else (None, None)
    pos = torch.tensor([pos0], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        q_rot = qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, pos, ks, vs, backend=backend)
        q_ref = qk_norm_rope_kv_reference(q, k, v, wq, wk, EPS, cos, sin, H, rkc, rvc, pos0, rks, rvs)
    assert q_rot.shape == (B, L, H, D) and q_rot.dtype == dtype and q_rot.is_contiguous()
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    assert_within_lowp_bar(q_rot, _chain64(q, wq, cos, sin, H), q_ref, atol=atol, name="q_rot")
    rows = slice(pos0, pos0 + L)
    k64 = _chain64(k, wk, cos, sin, H)
    if fp8:
        _assert_fp8_k(kc[:, rows], ks[:, rows], rkc[:, rows], rks[:, rows], k64, dtype)
        _assert_fp8_exact(vc[:, rows], vs[:, rows], rvc[:, rows], rvs[:, rows], "v")
        assert sqnr_db(k64, dequantize_fp8_per_head(kc[:, rows], ks[:, rows], torch.float64)) > FP8_KV_SQNR_DB
    else:
        assert_within_lowp_bar(kc[:, rows], k64, rkc[:, rows], atol=atol, name="cached k")
        assert torch.equal(vc[:, rows], v.unflatten(-1, (H, D))), "cached v must be the projection, unchanged"
    for buf in (kc, vc) + ((ks, vs) if fp8 else ()):
        assert _untouched(buf, pos0, pos0 + L), "rows outside [pos, pos + L) were written"


@pytest.mark.parametrize("backend", _backends())
def test_fused_kernel_fp32_weights_with_bf16_activations(backend):
    """Weights kept in fp32: the product is not rounded to bf16 (the chain promotes), only the final result is."""
    B, L, H, D = 1, 5, 4, 64
    q, k, v, wq, wk, cos, sin = _inputs(B, L, H, D, torch.bfloat16, w_dtype=torch.float32, seed=3)
    kc, vc = _cache((B, L, H, D), torch.bfloat16), _cache((B, L, H, D), torch.bfloat16)
    with torch.no_grad():
        q_rot = qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc,
                                      torch.zeros(1, dtype=torch.int32, device=DEVICE), backend=backend)
    q_lp, k_lp = qk_norm_rope_reference(q, k, wq, wk, EPS, cos, sin, H)
    assert q_rot.dtype == torch.bfloat16
    assert_within_lowp_bar(q_rot, _chain64(q, wq, cos, sin, H), q_lp, name="q_rot")
    assert_within_lowp_bar(kc, _chain64(k, wk, cos, sin, H), k_lp, name="cached k")


def test_reference_is_the_models_chain():
    """The kernel library's oracle (its own RoPE, the fused RMSNorm reference) equals the model's chain bit for bit,
    for activation-dtype and fp32 weights."""
    for dtype, w_dtype in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)):
        q, k, _, wq, wk, cos, sin = _inputs(2, 6, 4, 16, dtype, w_dtype=w_dtype, seed=5)
        got = qk_norm_rope_reference(q, k, wq, wk, EPS, cos, sin, 4)
        want = model_qk_norm_rope(q, k, wq, wk, EPS, cos, sin, 4)
        for a, b in zip(got, want):
            assert torch.equal(a, b.to(a.dtype))


# ------------------------------------------------------------------------------------------- the plain write
WRITE_SHAPES = [pytest.param((2, 11, 4, 16, 6, 20), id="small"),
                pytest.param((2, 901, 40, 128, 880, 2000), id="droid", marks=requires_cuda)]


@pytest.mark.parametrize("cache_dtype,act_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.bfloat16, torch.float32), (FP8, torch.bfloat16),
                                                   (FP8, torch.float32), (FP8, torch.float16)])
@pytest.mark.parametrize("shape", WRITE_SHAPES)
@pytest.mark.parametrize("backend", _backends())
def test_cache_write_kernel(backend, shape, cache_dtype, act_dtype):
    """The write alone (the model's reference path hands over rotated keys): strided inputs, an all-zero head,
    bit-exact agreement with the reference (FP8 scales and bytes included)."""
    if backend != "triton" and act_dtype != cache_dtype and cache_dtype != FP8:
        pytest.skip("the CUDA kernels write a cache in the activations' dtype or FP8")
    B, L, H, D, pos0, T = shape
    g = torch.Generator().manual_seed(7)
    k_new = (torch.randn(B, H, L, D, generator=g) * 3).to(act_dtype).to(DEVICE).transpose(1, 2)  # strided
    v_new = (torch.randn(B, H, L, D, generator=g) * 3).to(act_dtype).to(DEVICE).transpose(1, 2)
    k_new[0, 2, 1] = 0.0                                                                      # an all-zero head
    kc, vc = _cache((B, T, H, D), cache_dtype), _cache((B, T, H, D), cache_dtype)
    fp8 = cache_dtype == FP8
    ks, vs = (_cache((B, T, H), torch.float32), _cache((B, T, H), torch.float32)) if fp8 else (None, None)
    rkc, rvc = kc.clone(), vc.clone()
    rks, rvs = (ks.clone(), vs.clone()) if fp8 else (None, None)
    pos = torch.tensor([pos0], dtype=torch.int32, device=DEVICE)
    kv_cache_write(k_new, v_new, kc, vc, pos, ks, vs, backend=backend)
    kv_cache_write_reference(k_new, v_new, rkc, rvc, pos, rks, rvs)
    for got, ref in ((kc, rkc), (vc, rvc)):
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))      # bit for bit, NaN rows included
        assert _untouched(got, pos0, pos0 + L)
    if fp8:
        assert torch.equal(ks.nan_to_num(7), rks.nan_to_num(7)) and torch.equal(vs.nan_to_num(7), rvs.nan_to_num(7))
        assert torch.equal(kc[0, pos0 + 2, 1].float(), torch.zeros(D, device=DEVICE)) and ks[0, pos0 + 2, 1] > 0


def test_reference_fp8_quantizer_round_trip():
    x = torch.randn(3, 5, 4, 32, dtype=torch.float64) * torch.logspace(-3, 3, 4, dtype=torch.float64)[:, None]
    q, s = quantize_fp8_per_head(x)
    assert q.dtype == FP8 and s.shape == (3, 5, 4)
    assert q.float().abs().amax(-1).eq(448).all(), "the largest element of each head maps to 448"
    assert sqnr_db(x, dequantize_fp8_per_head(q, s, torch.float64)) > FP8_KV_SQNR_DB


# ------------------------------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("backend", _backends())
def test_nan_in_a_head_gives_a_nan_head_in_the_fp8_cache(backend):
    """A NaN in v (head 1 of token 2) and in k (token 4): the v head, and every head of that k row (the RMSNorm spans
    the row), get NaN scales and NaN values, as the reference; the other heads are unaffected. Before the fix a
    NaN became -448 under a finite scale (tl.maximum and fmaxf drop NaN)."""
    B, L, H, D = 1, 6, 3, 16
    q, k, v, wq, wk, cos, sin = _inputs(B, L, H, D, torch.bfloat16, seed=8)
    v[0, 2, 1 * D + 5] = float("nan")
    k[0, 4, 7] = float("nan")
    outs = {}
    for name in ("kernel", "reference"):
        kc, vc = _cache((B, L, H, D), FP8), _cache((B, L, H, D), FP8)
        ks, vs = _cache((B, L, H), torch.float32), _cache((B, L, H), torch.float32)
        pos = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        with torch.no_grad():
            if name == "kernel":
                qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, pos, ks, vs, backend=backend)
            else:
                qk_norm_rope_kv_reference(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, 0, ks, vs)
        outs[name] = (kc, ks, vc, vs)
    (kc, ks, vc, vs), (rkc, rks, rvc, rvs) = outs["kernel"], outs["reference"]
    nan_v = torch.zeros(B, L, H, dtype=torch.bool, device=DEVICE)
    nan_v[0, 2, 1] = True
    nan_k = torch.zeros_like(nan_v)
    nan_k[0, 4] = True
    assert torch.equal(torch.isnan(vs), nan_v) and torch.equal(torch.isnan(rvs), nan_v)
    assert torch.equal(torch.isnan(vc.float()).all(-1), nan_v), "v: the NaN head's values are all NaN"
    assert torch.equal(torch.isnan(ks), nan_k) and torch.equal(torch.isnan(kc.float()).all(-1), nan_k)
    assert torch.equal(torch.isnan(rks), nan_k) and torch.equal(torch.isnan(rkc.float()).all(-1), nan_k)
    assert not torch.isnan(kc.float())[~nan_k].any() and not torch.isnan(vc.float())[~nan_v].any()
    assert torch.equal(vs[~nan_v], rvs[~nan_v]), "v scales of the other heads"
    assert torch.equal(vc.view(torch.uint8)[~nan_v], rvc.view(torch.uint8)[~nan_v]), "v bytes of the other heads"

    kw = torch.randn(B, L, H, D).to(DEVICE)                                  # the plain write
    kw[0, 3, 2, 0] = float("nan")
    kc, vc = _cache((B, L, H, D), FP8), _cache((B, L, H, D), FP8)
    ks, vs = _cache((B, L, H), torch.float32), _cache((B, L, H), torch.float32)
    kv_cache_write(kw, kw, kc, vc, torch.zeros(1, dtype=torch.int32, device=DEVICE), ks, vs, backend=backend)
    assert torch.isnan(ks[0, 3, 2]) and torch.isnan(kc[0, 3, 2].float()).all()
    assert torch.isfinite(ks[0, 3, :2]).all() and torch.isfinite(kc[0, 3, :2].float()).all()


# ------------------------------------------------------------------------------------------ positions, errors
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_of_range_position(backend):
    """check=True raises; check=False (graph capture) writes no cache row and still returns q_rot."""
    B, L, H, D, T = 1, 5, 4, 16, 8
    q, k, v, wq, wk, cos, sin = _inputs(B, L, H, D, torch.float32)
    kc, vc = _cache((B, T, H, D), torch.float32), _cache((B, T, H, D), torch.float32)
    with torch.no_grad():
        for p in (T - L + 1, -1):
            pos = torch.tensor([p], dtype=torch.int32, device=DEVICE)
            with pytest.raises(ValueError, match="outside"):
                qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, pos, backend=backend)
            q_rot = qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, pos, backend=backend,
                                          check=False)
            assert torch.isnan(kc).all() and torch.isnan(vc).all()
            q_ref = qk_norm_rope_reference(q, k, wq, wk, EPS, cos, sin, H)[0]
            assert max_abs_err(q_ref, q_rot) <= 1e-5
            with pytest.raises(ValueError, match="outside"):
                kv_cache_write(q.unflatten(-1, (H, D)), v.unflatten(-1, (H, D)), kc, vc, pos, backend=backend)
            kv_cache_write(q.unflatten(-1, (H, D)), v.unflatten(-1, (H, D)), kc, vc, pos, backend=backend,
                           check=False)
            assert torch.isnan(kc).all()


def test_bad_inputs_raise_clear_errors():
    """Argument checks run before any launch (CPU tensors on every machine; "cuda" names what it needs)."""
    B, L, H, D = 1, 3, 4, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, H * D, generator=g) for _ in range(3))
    wq, wk = torch.ones(H * D), torch.ones(H * D)
    cos, sin = torch.ones(L, D // 2), torch.zeros(L, D // 2)
    kc, vc = torch.zeros(B, 8, H, D), torch.zeros(B, 8, H, D)
    pos = torch.zeros(1, dtype=torch.int32)

    def call(**over):
        a = dict(q=q, k=k, v=v, wq=wq, wk=wk, eps=EPS, cos=cos, sin=sin, num_heads=H, k_cache=kc, v_cache=vc,
                 pos=pos)
        a.update(over)
        with torch.no_grad():
            return qk_norm_rope_kv_write(**a)

    with pytest.raises(ValueError, match="contiguous in its last dim"):
        call(q=torch.randn(B, L, H * D * 2)[..., ::2])
    with pytest.raises(ValueError, match="dividing"):
        call(num_heads=5)
    with pytest.raises(ValueError, match="even"):
        call(q=torch.randn(B, L, 12), k=torch.randn(B, L, 12), v=torch.randn(B, L, 12), wq=torch.ones(12),
             wk=torch.ones(12), num_heads=4)
    with pytest.raises(ValueError, match=r"cos must be \[L, D/2\]"):
        call(cos=cos[:, :4])
    with pytest.raises(TypeError, match="cos must be float32"):
        call(cos=cos.double())
    with pytest.raises(TypeError, match="share one dtype"):
        call(k=k.bfloat16())
    with pytest.raises(TypeError, match="wq has dtype"):
        call(wq=wq.half())
    with pytest.raises(ValueError, match=r"k_cache must be \[B, T, H, D\]"):
        call(k_cache=torch.zeros(B, 8, H, D * 2))
    with pytest.raises(ValueError, match="same shape, dtype and strides"):
        call(v_cache=vc.bfloat16())
    with pytest.raises(ValueError, match="FP8 cache needs k_scale"):
        call(k_cache=kc.to(FP8), v_cache=vc.to(FP8))
    with pytest.raises(ValueError, match="only used with a float8"):
        call(k_scale=torch.zeros(B, 8, H), v_scale=torch.zeros(B, 8, H))
    with pytest.raises(TypeError, match="one-element int32"):
        call(pos=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not fit"):
        call(k_cache=torch.zeros(B, 2, H, D), v_cache=torch.zeros(B, 2, H, D))
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="nope")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="inference-only"):
        qk_norm_rope_kv_write(q, k, v, wq.clone().requires_grad_(), wk, EPS, cos, sin, H, kc, vc, pos)
    with pytest.raises(ValueError, match=r"k_new must be \[B, L, H, D\]"):
        kv_cache_write(k, v, kc, vc, pos)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        kv_cache_write(k.unflatten(-1, (D, H)).transpose(2, 3), v.unflatten(-1, (H, D)), kc, vc, pos)


def test_the_keys_and_values_need_their_own_memory():
    """One tensor passed as both caches (or two views of the same elements) would hold the values in the key rows
    without a word: both ops refuse it, naming the arguments, and leave the cache untouched (CPU tensors, the
    checks run before any launch)."""
    B, L, H, D = 1, 3, 4, 16
    q, k, v, wq, wk, cos, sin = (t.cpu() for t in _inputs(B, L, H, D, torch.float32))
    kv = torch.zeros(B, 8, H, D)
    pos = torch.zeros(1, dtype=torch.int32)
    k4, v4 = k.unflatten(-1, (H, D)), v.unflatten(-1, (H, D))
    with torch.no_grad():
        with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
            kv_cache_write(k4, v4, kv, kv, pos, backend="torch")
        with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
            kv_cache_write(k4, v4, kv, kv.view(B, 8, H, D), pos, backend="torch")
        with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
            qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kv, kv, pos, backend="torch")
        fp8 = torch.zeros(B, 8, H, D).to(FP8)
        scale = torch.zeros(B, 8, H)
        with pytest.raises(ValueError, match="k_scale and v_scale are the same memory"):
            kv_cache_write(k4, v4, fp8, fp8.clone(), pos, scale, scale, backend="torch")
    assert not kv.any()
    both = torch.zeros(2, B, 8, H, D)                   # two halves of one buffer are two caches: fine
    with torch.no_grad():
        kv_cache_write(k4, v4, both[0], both[1], pos, backend="torch")
    assert torch.equal(both[0, :, :L], k4) and torch.equal(both[1, :, :L], v4)


def test_custom_ops_pass_opcheck():
    """Schema (mutated caches declared), fake tensors and the dispatcher path of both custom ops."""
    B, L, H, D = 1, 3, 2, 8
    q, k, v, wq, wk, cos, sin = _inputs(B, L, H, D, torch.float32)
    for cache_dtype in (torch.float32, FP8):
        kc = torch.zeros(B, 6, H, D, device=DEVICE).to(cache_dtype)
        vc = torch.zeros(B, 6, H, D, device=DEVICE).to(cache_dtype)
        ks, vs = ((torch.zeros(B, 6, H, device=DEVICE), torch.zeros(B, 6, H, device=DEVICE)) if cache_dtype == FP8
                  else (None, None))
        pos = torch.tensor([2], dtype=torch.int32, device=DEVICE)
        # opcheck's schema test multiplies the mutated tensors, which has no float8 kernel: fake tensors only
        utils = ("test_schema", "test_faketensor") if cache_dtype != FP8 else ("test_faketensor",)
        torch.library.opcheck(torch.ops.dz.qk_norm_rope_kv_write,
                              (q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, ks, vs, pos, "auto"), test_utils=utils)
        torch.library.opcheck(torch.ops.dz.kv_cache_write,
                              (q.unflatten(-1, (H, D)), v.unflatten(-1, (H, D)), kc, vc, ks, vs, pos, "auto"),
                              test_utils=utils)


# ---------------------------------------------------------------------------------------------- the CUDA source
def test_cuda_source_kernel_names_and_launch_rule():
    """Every kernel name cuda.py launches exists with C linkage in csrc/qk_norm_rope.cu, and the Python copy of the
    threads-per-block rule (the cupy path's) is the host's (NVRTC safety and nvcc compilation: test_build.py)."""
    src = open(os.path.join(REPO, "csrc", "qk_norm_rope.cu")).read()
    head, host = re.split(r"^#ifndef __CUDACC_RTC__$", src, maxsplit=1, flags=re.M)
    defined = set(re.findall(r"^DZ_(?:QK_NORM_ROPE_KV|KV_WRITE)_KERNEL\((\w+),", head, re.M))
    for act in ("f32", "bf16", "f16"):
        for cache in (act, "fp8"):
            assert f"dz_qk_norm_rope_kv_{act}_{cache}" in defined
            assert f"dz_kv_write_{act}_{cache}" in defined
    assert kv_cuda.threads_per_block(40) == 256 and kv_cuda.threads_per_block(4) == 128
    assert "int qk_norm_rope_threads(int H) { return 32 * (H < 8 ? (H < 1 ? 1 : H) : 8); }" in host


def test_cuda_backend_unavailable_reason_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the backend-parametrized tests run the CUDA path")
    ok, reason = kv_cuda.available()
    assert not ok and "CUDA" in reason


# ------------------------------------------------------------------------------------------------------ GPU only
@requires_cuda
@pytest.mark.parametrize("backend", _backends())
def test_gpu_cuda_graph_replays_with_advancing_write_position(backend):
    """Capture one fused call; advancing the device-side write position and replaying writes the next rows."""
    B, L, H, D, T = 1, 37, 8, 64, 200
    q, k, v, wq, wk, cos, sin = _inputs(B, L, H, D, torch.bfloat16)
    kc = torch.zeros(B, T, H, D, dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    pos = torch.zeros(1, dtype=torch.int32, device="cuda")
    with torch.no_grad():
        qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, pos, backend=backend, check=False)  # warm
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            q_rot = qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc, pos, backend=backend,
                                          check=False)
    kc.zero_()
    for p in (0, 50, 100):
        pos.fill_(p)
        graph.replay()
    torch.cuda.synchronize()
    q_ref, k_ref = qk_norm_rope_reference(q, k, wq, wk, EPS, cos, sin, H)
    for p in (0, 50, 100):
        assert_within_lowp_bar(kc[:, p:p + L], _chain64(k, wk, cos, sin, H), k_ref, name=f"k at {p}")
    assert kc[:, L:50].abs().sum() == 0 and kc[:, 100 + L:].abs().sum() == 0
    assert_within_lowp_bar(q_rot, _chain64(q, wq, cos, sin, H), q_ref, name="q_rot")


@requires_cuda
def test_gpu_triton_and_cuda_agree():
    """Triton and CUDA on the same DROID rows: v bit-exact (bytes and scales); k and q_rot as each is to the chain
    (their sums of squares may round differently)."""
    ok, reason = kv_cuda.available()
    if not ok:
        pytest.skip(f"the CUDA path is unavailable: {reason}")
    B, L, H, D = 2, 333, 40, 128
    q, k, v, wq, wk, cos, sin = _inputs(B, L, H, D, torch.bfloat16, seed=9)
    out = {}
    for backend in ("triton", "cuda"):
        kc, vc = _cache((B, L, H, D), FP8), _cache((B, L, H, D), FP8)
        ks, vs = _cache((B, L, H), torch.float32), _cache((B, L, H), torch.float32)
        with torch.no_grad():
            q_rot = qk_norm_rope_kv_write(q, k, v, wq, wk, EPS, cos, sin, H, kc, vc,
                                          torch.zeros(1, dtype=torch.int32, device="cuda"), ks, vs, backend=backend)
        out[backend] = (q_rot, kc, ks, vc, vs)
    (qt, kt, kst, vt, vst), (qc, kc_, ksc, vc_, vsc) = out["triton"], out["cuda"]
    step = 2.0 ** (torch.floor(torch.log2(qc.float().abs().clamp(min=1e-30))) - 7)
    assert ((qt.float() - qc.float()).abs() <= step).all(), "q_rot: more than one bf16 step apart"
    _assert_fp8_k(kt, kst, kc_, ksc, _chain64(k, wk, cos, sin, H), torch.bfloat16)
    _assert_fp8_exact(vt, vst, vc_, vsc, "v")
