"""Fused DiT-block ops (dz_kernels.fused): forward and every input gradient against float64 references.

Runs on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), so shapes are
small: at most 64 rows, odd hidden dims (100, 129) beside a power of two (256).

Precision bars:
- float32: ``torch.testing.assert_close`` against float64 with rtol 1e-5 and atol 1e-5 * max|ref| (reductions of
  a few dozen rows stay far below that).
- bfloat16 / float16: ``assert_within_lowp_bar``: the kernel's max error against float64 is at most 2x the error
  of the plain PyTorch reference run in the same low precision (plus a small atol).
- FP8 E4M3 output: SQNR against the float64 reference >= 28 dB (E4M3 rounds to 3 mantissa bits, a relative step of
  2^-4 at most: uniform rounding noise gives ~31-35 dB on Gaussian rows), the row scale equal to rowmax|y| / 448.

Every buffer the package allocates comes from ``dz_kernels._common.empty``; an autouse fixture makes it return
NaN-poisoned buffers (dz_kernels.testing.poison_outputs), and the out= tests poison the given buffers, so unwritten
memory fails the comparisons. Inputs are drawn on the CPU from the seeded generator and moved to the device: the
same numbers on both devices, and no dependence on the state of the CUDA generator (a CUDA graph capture that
failed in another test of the same process leaves that generator unusable: "Offset increment outside graph
capture", seen on an H200).
"""
from __future__ import annotations

import math

import pytest
import torch

import dz_kernels.fused as fz
from dz_kernels import _common as common
from dz_kernels.fused import _common as cm
from dz_kernels.testing import assert_within_lowp_bar, cpu64, poison_outputs, poisoned, sqnr_db

from conftest import DEVICE, requires_cuda

LOWP = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _poison_allocations():
    with poison_outputs():
        yield


# ------------------------------------------------------------------------------------------------------ helpers
def _randn(*shape):
    """Standard normal float32 drawn on the CPU (the seeded generator), then moved to the device."""
    return torch.randn(*shape, dtype=torch.float32).to(DEVICE)


def _rand(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (_randn(*shape) * scale + offset).to(dtype)


def _assert_close_to_ref(name, test, ref64, lowp_baseline, dtype):
    """fp32: tight element tolerance; bf16/fp16: within 2x PyTorch's own low-precision error."""
    assert test.shape == ref64.shape, f"{name}: shape {tuple(test.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(test.float()).all(), f"{name}: non-finite values (unwritten memory?)"
    if dtype == torch.float32:
        atol = 1e-5 * max(1.0, ref64.abs().max().item())
        torch.testing.assert_close(cpu64(test), ref64, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
    else:
        assert_within_lowp_bar(test, ref64, lowp_baseline, factor=2.0, atol=1e-3, name=name)


def _check_op(fn, ref, inputs, dtype, names, n_outputs=1, grad_names=None):
    """Run fn and ref (float64 and in the inputs' own precision), compare outputs and all input grads.

    inputs: list of tensors (or None); fn(*inputs) and ref(*inputs) return a tensor or a tuple of n_outputs."""
    def leafs(cast):
        out = []
        for t in inputs:
            out.append(None if t is None else cast(t).detach().requires_grad_(True))
        return out

    ins = leafs(lambda t: t.clone())
    ins64 = leafs(cpu64)                                   # the float64 oracle runs on the CPU
    insl = leafs(lambda t: t.clone())
    outs = fn(*ins)
    outs64 = ref(*ins64)
    outsl = ref(*insl)
    if n_outputs == 1:
        outs, outs64, outsl = (outs,), (outs64,), (outsl,)
    for i, (o, o64, ol) in enumerate(zip(outs, outs64, outsl)):
        assert o.dtype == ol.dtype, f"output {i}: dtype {o.dtype} != reference {ol.dtype}"
        _assert_close_to_ref(f"output {i}", o, o64, ol, dtype)
    grads = [_randn(*o.shape).to(o.dtype) for o in outs]
    wrt = [(n, a, b, c) for n, a, b, c in zip(names, ins, ins64, insl) if a is not None]
    g = torch.autograd.grad(outs, [w[1] for w in wrt], grads)
    g64 = torch.autograd.grad(outs64, [w[2] for w in wrt], [cpu64(x) for x in grads])
    gl = torch.autograd.grad(outsl, [w[3] for w in wrt], grads)
    for (n, a, _, _), t, r, b in zip(wrt, g, g64, gl):
        assert t.shape == a.shape and t.dtype == a.dtype, f"grad {n}: {t.shape}/{t.dtype} vs input {a.shape}/{a.dtype}"
        _assert_close_to_ref(f"grad {n}", t, r, b, dtype)


def _modulation(form, B, L, C, dtype, n=2):
    """n modulation tensors in one of the forms a model passes."""
    if form == "token":      # per token [B, L, C] (DreamZero)
        return [_rand(B, L, C, dtype=dtype, scale=0.5) for _ in range(n)]
    if form == "sample":     # per sample [B, 1, C] (Wan2.1)
        return [_rand(B, 1, C, dtype=dtype, scale=0.5) for _ in range(n)]
    if form == "expanded":   # a stride-0 view of a per-sample tensor
        return [_rand(B, 1, C, dtype=dtype, scale=0.5).expand(B, L, C) for _ in range(n)]
    if form == "chunked":    # views of one [B, L, 6, C] tensor, like e.chunk(6, dim=2) (row stride 6C)
        e = _rand(B, L, 6, C, dtype=dtype, scale=0.5)
        return [e[:, :, i] for i in range(n)]
    raise ValueError(form)


# --------------------------------------------------------------------------------------------- layernorm_modulate
@pytest.mark.parametrize("dtype,mod_dtype,C,form,affine", [
    (torch.float32, torch.float32, 100, "token", False),
    (torch.float32, torch.float32, 129, "sample", True),
    (torch.bfloat16, torch.bfloat16, 256, "token", False),
    (torch.bfloat16, torch.float32, 129, "chunked", False),
    (torch.bfloat16, torch.bfloat16, 100, "expanded", True),
    (torch.float16, torch.float16, 129, "sample", False),
])
def test_layernorm_modulate(dtype, mod_dtype, C, form, affine):
    B, L = 2, 7
    x = _rand(B, L, C, dtype=dtype, scale=2.0, offset=0.5)
    shift, scale = _modulation(form, B, L, C, mod_dtype)
    w = _rand(C, dtype=dtype, scale=0.3, offset=1.0) if affine else None
    b = _rand(C, dtype=dtype, scale=0.3) if affine else None
    _check_op(lambda x_, sh, sc, w_, b_: fz.layernorm_modulate(x_, sh, sc, 1e-6, w_, b_),
              lambda x_, sh, sc, w_, b_: fz.layernorm_modulate_reference(x_, sh, sc, 1e-6, w_, b_),
              [x, shift, scale, w, b], dtype, ["x", "shift", "scale", "weight", "bias"])


def test_layernorm_affine_only_and_2d():
    """norm3: LayerNorm with affine and no modulation, on a [N, C] input; and a 64-row multi-program reduction."""
    x = _rand(64, 100, scale=3.0, offset=-1.0)
    w, b = _rand(100, offset=1.0), _rand(100)
    _check_op(lambda x_, w_, b_: fz.layernorm_modulate(x_, None, None, 1e-6, w_, b_),
              lambda x_, w_, b_: fz.layernorm_modulate_reference(x_, None, None, 1e-6, w_, b_),
              [x, w, b], torch.float32, ["x", "weight", "bias"])


def test_layernorm_modulate_strided_rows():
    """x may be a view with a row stride larger than C (only the last dim has to be contiguous)."""
    base = _rand(2, 5, 160)
    x = base[:, :, 10:110]
    shift, scale = _modulation("token", 2, 5, 100, torch.float32)
    _check_op(fz.layernorm_modulate, fz.layernorm_modulate_reference, [x, shift, scale], torch.float32,
              ["x", "shift", "scale"])


@pytest.mark.parametrize("dtype,C,form", [(torch.bfloat16, 256, "token"), (torch.float32, 129, "sample")])
def test_layernorm_modulate_fp8(dtype, C, form):
    B, L = 2, 8
    x = _rand(B, L, C, dtype=dtype, scale=2.0)
    shift, scale = _modulation(form, B, L, C, dtype)
    x[0, 3] = 0.0  # a constant row: LN gives 0, so y = shift
    with torch.no_grad():
        q, s = fz.layernorm_modulate(x, shift, scale, fp8=True)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (B, L, 1)
    y64 = fz.layernorm_modulate_reference(cpu64(x), cpu64(shift), cpu64(scale))
    expected_scale = common.fp8_scale(y64.abs().amax(-1, keepdim=True)).double()
    torch.testing.assert_close(cpu64(s), expected_scale, rtol=1e-5, atol=0)
    deq = cpu64(q) * cpu64(s)
    db = sqnr_db(y64, deq)
    assert db >= 28.0, f"FP8 output SQNR {db:.1f} dB < 28 dB"
    # against the plain-PyTorch FP8 reference (float32 inputs): same codes but for rare rounding-boundary ties
    q_ref, s_ref = fz.layernorm_modulate_reference(x.float(), shift.float(), scale.float(), fp8=True)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item() > 0.99
    # the largest element of every row lands on +-448 (the scale uses the full E4M3 range)
    assert torch.allclose(q.float().abs().amax(-1), torch.full((B, L), 448.0, device=DEVICE))
    # the same with preallocated, poisoned outputs
    q2, s2 = poisoned(x.shape, torch.float8_e4m3fn, DEVICE), poisoned((B, L, 1), torch.float32, DEVICE)
    with torch.no_grad():
        r = fz.layernorm_modulate(x, shift, scale, fp8=True, out=q2, out_scale=s2)
    assert r[0] is q2 and r[1] is s2
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)


def test_fp8_is_forward_only():
    x = _rand(2, 4, 100).requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        fz.layernorm_modulate(x, fp8=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_modulate_out(dtype):
    B, L, C = 2, 5, 129
    x = _rand(B, L, C, dtype=dtype)
    shift, scale = _modulation("sample", B, L, C, dtype)
    out = poisoned((B, L, C), dtype, DEVICE)
    r = fz.layernorm_modulate(x, shift, scale, out=out)
    assert r is out
    ref64 = fz.layernorm_modulate_reference(cpu64(x), cpu64(shift), cpu64(scale))
    _assert_close_to_ref("out", out, ref64, fz.layernorm_modulate_reference(x, shift, scale), dtype)


# ------------------------------------------------------------------------------ gated_residual_layernorm_modulate
@pytest.mark.parametrize("dtype,mod_dtype,C,form,gated,modulated,affine", [
    (torch.float32, torch.float32, 100, "token", True, True, False),     # norm2 position, per token
    (torch.float32, torch.float32, 129, "sample", True, False, True),    # gate then norm3 (affine)
    (torch.bfloat16, torch.bfloat16, 256, "token", True, True, False),
    (torch.bfloat16, torch.float32, 129, "chunked", False, True, False),  # x + cross(h) then norm2
    (torch.float16, torch.float16, 100, "expanded", True, True, True),
])
def test_gated_residual_layernorm_modulate(dtype, mod_dtype, C, form, gated, modulated, affine):
    B, L = 2, 6
    x = _rand(B, L, C, dtype=dtype, scale=2.0, offset=0.3)
    y = _rand(B, L, C, dtype=dtype)
    gate, shift, scale = _modulation(form, B, L, C, mod_dtype, n=3)
    gate = gate if gated else None
    shift, scale = (shift, scale) if modulated else (None, None)
    w = _rand(C, dtype=dtype, scale=0.3, offset=1.0) if affine else None
    b = _rand(C, dtype=dtype, scale=0.3) if affine else None
    _check_op(
        lambda *a: fz.gated_residual_layernorm_modulate(*a[:5], 1e-6, *a[5:]),
        lambda *a: fz.gated_residual_layernorm_modulate_reference(*a[:5], 1e-6, *a[5:]),
        [x, y, gate, shift, scale, w, b], dtype, ["x", "y", "gate", "shift", "scale", "weight", "bias"],
        n_outputs=2)


def test_gated_residual_layernorm_modulate_only_out_used():
    """Gradient through the normalized output alone (x_new unused downstream) and through x_new alone."""
    B, L, C = 2, 4, 100
    x, y = _rand(B, L, C), _rand(B, L, C)
    gate, shift, scale = _modulation("token", B, L, C, torch.float32, n=3)
    for pick in (0, 1):
        ins = [t.clone().requires_grad_(True) for t in (x, y, gate, shift, scale)]
        ins64 = [cpu64(t).requires_grad_(True) for t in (x, y, gate, shift, scale)]
        o = fz.gated_residual_layernorm_modulate(*ins)[pick]
        o64 = fz.gated_residual_layernorm_modulate_reference(*ins64)[pick]
        g = _randn(*o.shape).to(o.dtype)
        grads = torch.autograd.grad(o, ins, g, allow_unused=True)
        grads64 = torch.autograd.grad(o64, ins64, cpu64(g), allow_unused=True)
        for name, t, r in zip(["x", "y", "gate", "shift", "scale"], grads, grads64):
            if r is None:
                assert t is None or not t.abs().any(), f"grad {name} should be zero/None"
                continue
            torch.testing.assert_close(cpu64(t), r, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fp8", [False, True])
def test_gated_residual_layernorm_modulate_out(fp8):
    B, L, C = 2, 5, 129
    x, y = _rand(B, L, C, dtype=torch.bfloat16), _rand(B, L, C, dtype=torch.bfloat16)
    gate, shift, scale = _modulation("sample", B, L, C, torch.bfloat16, n=3)
    x_out = poisoned((B, L, C), torch.bfloat16, DEVICE)
    x_new_ref, out_ref = fz.gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale)
    x64, out64 = fz.gated_residual_layernorm_modulate_reference(cpu64(x), cpu64(y), cpu64(gate), cpu64(shift),
                                                                cpu64(scale))
    if fp8:
        out, out_scale = poisoned((B, L, C), torch.float8_e4m3fn, DEVICE), poisoned((B, L, 1), torch.float32, DEVICE)
        xn, (q, s) = fz.gated_residual_layernorm_modulate(x, y, gate, shift, scale, fp8=True, x_out=x_out, out=out,
                                                          out_scale=out_scale)
        assert q is out and s is out_scale
        assert sqnr_db(out64, cpu64(q) * cpu64(s)) >= 28.0
    else:
        out = poisoned((B, L, C), torch.bfloat16, DEVICE)
        xn, o = fz.gated_residual_layernorm_modulate(x, y, gate, shift, scale, x_out=x_out, out=out)
        assert o is out
        _assert_close_to_ref("out", out, out64, out_ref, torch.bfloat16)
    assert xn is x_out
    assert torch.equal(x_out, x_new_ref), "x_new must equal the chain's rounded residual exactly"


# ---------------------------------------------------------------------------------------------- gated_residual
@pytest.mark.parametrize("dtype,gate_dtype,C,form", [
    (torch.float32, torch.float32, 100, "token"),
    (torch.bfloat16, torch.bfloat16, 1500, "sample"),   # more than one column block per row
    (torch.bfloat16, torch.float32, 129, "chunked"),
    (torch.float16, torch.float16, 256, "expanded"),
])
def test_gated_residual(dtype, gate_dtype, C, form):
    B, L = 2, 5
    x, y = _rand(B, L, C, dtype=dtype, scale=2.0), _rand(B, L, C, dtype=dtype)
    (gate,) = _modulation(form, B, L, C, gate_dtype, n=1)
    _check_op(fz.gated_residual, fz.gated_residual_reference, [x, y, gate], dtype, ["x", "y", "gate"])


def test_gated_residual_out_and_2d():
    x, y, gate = _rand(33, 100), _rand(33, 100), _rand(100)
    out = poisoned((33, 100), torch.float32, DEVICE)
    assert fz.gated_residual(x, y, gate, out=out) is out
    torch.testing.assert_close(out, fz.gated_residual_reference(x, y, gate), rtol=1e-6, atol=1e-6)
    _check_op(fz.gated_residual, fz.gated_residual_reference, [x, y, gate], torch.float32, ["x", "y", "gate"])


# ---------------------------------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("dtype,C,rows", [
    (torch.float32, 100, (2, 7)), (torch.bfloat16, 256, (2, 9)), (torch.float16, 129, (13,)),
])
def test_rms_norm(dtype, C, rows):
    x = _rand(*rows, C, dtype=dtype, scale=2.0, offset=0.2)
    w = _rand(C, dtype=dtype, scale=0.3, offset=1.0)
    _check_op(lambda a, b: fz.rms_norm(a, b, 1e-6), lambda a, b: fz.rms_norm_reference(a, b, 1e-6), [x, w], dtype,
              ["x", "weight"])


def test_rms_norm_matches_wan_formula_and_out():
    """The exact Wan2.1 expression, rounding included; out= writes a poisoned buffer fully."""
    x = _rand(2, 6, 129, dtype=torch.bfloat16, scale=2.0)
    w = _rand(129, dtype=torch.bfloat16, offset=1.0)
    wan = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w
    got = fz.rms_norm(x, w)
    # the kernel and torch may differ in the last bit of rsqrt: allow one bf16 step of the normalized value
    assert (got.float() - wan.float()).abs().max().item() <= (wan.float().abs().max().item() * 2 ** -7)
    assert (got == wan).float().mean().item() > 0.9
    out = poisoned(x.shape, torch.bfloat16, DEVICE)
    assert fz.rms_norm(x, w, out=out) is out
    assert torch.equal(out, got)


def test_rms_norm_dweight_deterministic():
    x = _rand(64, 100).requires_grad_(True)
    w = _rand(100, offset=1.0).requires_grad_(True)
    g = _randn(64, 100)
    dw1 = torch.autograd.grad(fz.rms_norm(x, w), w, g)[0]
    dw2 = torch.autograd.grad(fz.rms_norm(x, w), w, g)[0]
    assert torch.equal(dw1, dw2)


# ------------------------------------------------------------------------------------------------------- gelu
@pytest.mark.parametrize("dtype,shape", [
    (torch.float32, (3, 5, 129)), (torch.bfloat16, (2, 700)), (torch.float16, (1, 3, 100)),
])
def test_gelu_tanh(dtype, shape):
    x = _rand(*shape, dtype=dtype, scale=3.0)
    _check_op(fz.gelu_tanh, fz.gelu_tanh_reference, [x], dtype, ["x"])


def test_gelu_tanh_extremes_and_out():
    x = torch.tensor([-1e20, -60.0, -10.0, -3.0, -1e-4, 0.0, 1e-4, 3.0, 10.0, 60.0, 1e20], device=DEVICE)
    out = poisoned(x.shape, torch.float32, DEVICE)
    assert fz.gelu_tanh(x, out=out) is out
    torch.testing.assert_close(cpu64(out), fz.gelu_tanh_reference(cpu64(x)), rtol=1e-6, atol=1e-7)


def test_gelu_tanh_keeps_relative_accuracy_for_negative_inputs():
    """Where 0.5 x (1 + tanh(z)) cancels (x < 0: gelu(-5) = -2.3e-7) the kernel keeps its relative accuracy, forward
    and backward. The oracle is the same function written x * sigmoid(2z) in float64 (torch's float64 gelu cancels
    too, from x = -6 on). The bar: exp(-2z) in float32 carries a relative error of about |2z| float32 ulps from its
    argument (|2z| <= 80 up to x = -9.5), so rtol 4e-5; the cancelling form is off by 30% at x = -5 in float32 even
    with an exact tanh."""
    x = -torch.linspace(3.0, 9.5, 301, dtype=torch.float64).float().to(DEVICE)
    x64 = cpu64(x).requires_grad_()
    want = x64 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3))
    xr = x.clone().requires_grad_()
    got = fz.gelu_tanh(xr)
    torch.testing.assert_close(cpu64(got), want.detach(), rtol=4e-5, atol=1e-37)
    dx = torch.autograd.grad(got.sum(), xr)[0]
    torch.testing.assert_close(cpu64(dx), torch.autograd.grad(want.sum(), x64)[0], rtol=4e-5, atol=1e-37)


def test_empty_rows():
    """B*L = 0: empty outputs, and weight gradients that are zeros (not uninitialized memory)."""
    x = _rand(2, 0, 100).requires_grad_(True)
    w, b = _rand(100).requires_grad_(True), _rand(100).requires_grad_(True)
    out = fz.layernorm_modulate(x, None, None, 1e-6, w, b)
    assert out.shape == (2, 0, 100)
    dx, dw, db = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))
    wr = w.detach().requires_grad_(True)
    o = fz.rms_norm(x, wr)
    (dwr,) = torch.autograd.grad(o, wr, torch.ones_like(o))
    assert torch.equal(dwr, torch.zeros_like(dwr))


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    x = _rand(2, 4, 100)
    s = _rand(2, 4, 100)
    with pytest.raises(ValueError, match="does not broadcast"):
        fz.layernorm_modulate(x, _rand(2, 3, 100), s)
    with pytest.raises(ValueError, match="hidden dim"):
        fz.layernorm_modulate(x, _rand(2, 4, 1), s)
    with pytest.raises(TypeError, match="float64"):
        fz.layernorm_modulate(x.double(), s, s)
    with pytest.raises(TypeError, match="mixed low-precision"):
        fz.layernorm_modulate(x.bfloat16(), s.half(), s.half())
    with pytest.raises(ValueError, match="device"):
        fz.layernorm_modulate(x, s.to("meta"), s)
    with pytest.raises(ValueError, match="last dim"):
        fz.layernorm_modulate(_rand(2, 100, 4).transpose(1, 2), None, None)
    with pytest.raises(ValueError, match=r"\[B, L, C\] or \[N, C\]"):
        fz.layernorm_modulate(_rand(2, 2, 4, 100))
    with pytest.raises(ValueError, match="C=20000"):
        fz.layernorm_modulate(_rand(1, 20000))
    with pytest.raises(ValueError, match="weight must have shape"):
        fz.layernorm_modulate(x, weight=_rand(99))
    with pytest.raises(ValueError, match="eps"):
        fz.layernorm_modulate(x, eps=-1.0)
    with pytest.raises(ValueError, match="y has shape"):
        fz.gated_residual_layernorm_modulate(x, _rand(2, 4, 99), s)
    with pytest.raises(ValueError, match="y has shape"):
        fz.gated_residual(x, _rand(2, 5, 100), s)
    with pytest.raises(TypeError, match="weight has dtype"):
        fz.rms_norm(x, _rand(100, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        fz.gelu_tanh(_rand(8, 6).t())
    with pytest.raises(TypeError, match="int64"):
        fz.gelu_tanh(torch.ones(4, dtype=torch.int64, device=DEVICE))
    # out= buffers: wrong shape, wrong dtype, and no autograd through them
    with pytest.raises(ValueError, match="out has shape"):
        fz.gated_residual(x, s, s, out=_rand(2, 4, 99))
    with pytest.raises(TypeError, match="out has dtype"):
        fz.layernorm_modulate(x, s, s, fp8=True, out=_rand(2, 4, 100))
    with pytest.raises(ValueError, match="no backward"):
        fz.rms_norm(x.requires_grad_(True), _rand(100), out=_rand(2, 4, 100))


def test_cpu_tensors_refused_without_interpreter(monkeypatch):
    monkeypatch.setattr(cm, "kernels_interpreted", lambda: False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fz.gelu_tanh(torch.randn(4))


# ------------------------------------------------------------------------------ registration: fake + compile
def _opcheck_cases():
    B, L, C = 2, 3, 100
    x, y = _rand(B, L, C), _rand(B, L, C)
    g, sh, sc = _rand(B, 1, C), _rand(B, L, C), _rand(B, L, C)
    w, b = _rand(C), _rand(C)
    mean, rstd = _randn(B * L), torch.rand(B * L).to(DEVICE) + 0.5
    needs = [True, True, True, True, True]
    return [
        ("fused_layernorm", (x, None, None, sh, sc, w, b, 1e-6, False)),
        ("fused_layernorm", (x, y, g, sh, sc, None, None, 1e-6, False)),
        ("fused_layernorm", (x, y, g, sh, sc, None, None, 1e-6, True)),
        ("fused_layernorm_out", (x, y, g, sh, sc, w, b, 1e-6, torch.empty_like(x), torch.empty_like(x), None)),
        ("fused_layernorm_backward", (y, x, x, y, g, sc, w, b, mean, rstd, needs)),
        ("gated_residual", (x, y, g)),
        ("gated_residual_out", (x, y, g, torch.empty_like(x))),
        ("gated_residual_backward", (x, y, g, True, True)),
        ("rms_norm", (x, w, 1e-6)),
        ("rms_norm_out", (x, w, 1e-6, torch.empty_like(x))),
        ("rms_norm_backward", (y, x, w, rstd, True)),
        ("gelu_tanh", (x,)),
        ("gelu_tanh_out", (x, torch.empty_like(x))),
        ("gelu_tanh_backward", (y, x)),
    ]


_OPCHECK_IDS = ["layernorm_modulate", "gated_residual_layernorm_modulate", "layernorm_fp8", "layernorm_out",
                "layernorm_backward", "gated_residual", "gated_residual_out", "gated_residual_backward", "rms_norm",
                "rms_norm_out", "rms_norm_backward", "gelu_tanh", "gelu_tanh_out", "gelu_tanh_backward"]


@pytest.mark.parametrize("case", range(len(_OPCHECK_IDS)), ids=_OPCHECK_IDS)
def test_opcheck(case):
    """torch.library.opcheck: schema, fake (meta) implementation vs the real one, autograd registration, and AOT
    dispatch with dynamic shapes."""
    name, args = _opcheck_cases()[case]
    op = getattr(torch.ops.dz, name).default
    # fp8 output has no backward, so the autograd-through-AOT check does not apply to it
    fp8 = name == "fused_layernorm" and args[-1] is True
    args = tuple(a.requires_grad_(True) if (isinstance(a, torch.Tensor) and not fp8 and a.dtype.is_floating_point
                                           and name in ("fused_layernorm", "gated_residual", "rms_norm",
                                                        "gelu_tanh"))
                 else a for a in args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_block_chain():
    """A small block-shaped chain compiled with fullgraph=True (aot_eager: real tracing through the fake
    implementations and the autograd formulas, no C++ toolchain needed); forward and grads equal eager."""
    B, L, C = 2, 4, 100

    def block(x, shift, scale, gate, w_attn, qk_w):
        h = fz.layernorm_modulate(x, shift, scale)
        a = fz.rms_norm(h @ w_attn, qk_w)
        x_new, h2 = fz.gated_residual_layernorm_modulate(x, a, gate, shift, scale)
        return fz.gated_residual(x_new, fz.gelu_tanh(h2), gate)

    args = [_rand(B, L, C), _rand(B, L, C), _rand(B, L, C), _rand(B, 1, C), _rand(C, C) * 0.1, _rand(C)]
    eager_in = [a.clone().requires_grad_(True) for a in args]
    comp_in = [a.clone().requires_grad_(True) for a in args]
    out_e = block(*eager_in)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out_c = compiled(*comp_in)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    g = _randn(*out_e.shape)
    ge = torch.autograd.grad(out_e, eager_in, g)
    gc = torch.autograd.grad(out_c, comp_in, g)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fake_tensor_shapes():
    """The fake implementations give the real ops' shapes and dtypes for the broadcast forms."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 5, 100, dtype=torch.bfloat16)
        s = torch.empty(2, 1, 100, dtype=torch.float32)
        x_new, o, o_scale, mean, rstd = torch.ops.dz.fused_layernorm(x, x, s, s, s, None, None, 1e-6, True)
        assert x_new.shape == x.shape and x_new.dtype == torch.bfloat16
        assert o.dtype == torch.float8_e4m3fn and o_scale.shape == (2, 5, 1) and mean.shape == (10,)
        dx, dy, dg, dsc, dw, db = torch.ops.dz.fused_layernorm_backward(
            x, x, x, x, s, s, None, None, mean, rstd, [True, True, True, False, False])
        assert dx.dtype == torch.bfloat16 and dy.shape == x.shape and dg.dtype == torch.float32
        assert dg.shape == x.shape and dsc.shape == (2, 5, 100) and dw.numel() == 0


@requires_cuda
def test_cuda_large_hidden_dim():
    """C = 5120 (the 14B width) and C = 16384 (the supported maximum) on the GPU, bf16, forward and backward."""
    for C in (5120, 16384):
        x = _rand(3, 17, C, dtype=torch.bfloat16)
        shift, scale = _modulation("token", 3, 17, C, torch.bfloat16)
        _check_op(fz.layernorm_modulate, fz.layernorm_modulate_reference, [x, shift, scale], torch.bfloat16,
                  ["x", "shift", "scale"])
        w = _rand(C, dtype=torch.bfloat16, offset=1.0)
        _check_op(fz.rms_norm, fz.rms_norm_reference, [x, w], torch.bfloat16, ["x", "weight"])
