"""NVFP4 Triton kernels (the CPU interpreter here, the GPU where present) against the plain-PyTorch references.

Bars:
  quantize / dequantize: bit-exact against reference.py (itself bit-exact with ModelOpt: test_quant_modelopt.py)
  GEMMs vs float64 dequantize-then-matmul of the same NVFP4 operands: float32 output >= 60 dB (the dequantized
      products are exact, float32 accumulation), bfloat16 output >= 40 dB
  nvfp4_linear vs the float64 product of the unquantized inputs: W4A16 >= 17 dB, W4A4 >= 14 dB (one / two NVFP4
      operands: about 20 / 17 dB measured on Gaussian data)
The sm_100 `tl.dot_scaled` path is compiled for sm_100 here (PTX checked for the NVFP4 block-scaled MMA); its
numbers are checked only on a Blackwell GPU (test skipped elsewhere, with that reason).
NaN: a block holding a NaN gets a NaN block scale (E4M3 NaN), so it dequantizes to NaN; the others are unaffected.
Runs on the suite's device (tests/conftest.py); inputs drawn on the CPU; outputs NaN-poisoned (conftest).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from dz_kernels.quant import reference as F
from dz_kernels.quant import ops as nvfp4
from dz_kernels.testing import cpu64, on_cpu, sqnr_db

from conftest import DEVICE as DEV, requires_cuda

requires_sm100 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 10),
    reason="tl.dot_scaled with NVFP4 scales runs only on compute capability 10.x (Blackwell); not this machine")
GEMM_F32_DB = 60.0
GEMM_BF16_DB = 40.0
W4A16_DB = 17.0
W4A4_DB = 14.0
ROUNDTRIP_DB = 18.0


def _u8(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("shape,dtype", [((1, 16), torch.float32), ((37, 96), torch.bfloat16),
                                         ((2, 5, 64), torch.float16)])
def test_quantize_matches_reference(shape, dtype):
    x = (torch.randn(shape) * torch.logspace(-2, 2, shape[-1])).to(dtype).to(DEV)
    x.view(-1, shape[-1])[0, :16] = 0.0  # an all-zero block
    q, s, g = nvfp4.quantize_nvfp4(x)
    K = shape[-1]
    assert q.shape == (*shape[:-1], K // 2) and s.shape == (*shape[:-1], K // 16) and g.shape == ()
    qr, sr, gr = F.quantize_nvfp4_reference(x.reshape(-1, K))
    assert torch.equal(q.reshape(qr.shape), qr)
    assert torch.equal(_u8(s.reshape(sr.shape)), _u8(sr))
    assert torch.equal(g, gr)
    d = nvfp4.dequantize_nvfp4(q, s, g, torch.float32)
    assert torch.equal(d.reshape(-1, K), F.dequantize_nvfp4_reference(qr, sr, gr, torch.float32))
    assert sqnr_db(x.reshape(-1, K), d.reshape(-1, K)) >= ROUNDTRIP_DB


def test_quantize_static_global_scale_and_bf16_dequant():
    x = torch.randn(20, 64).to(DEV)
    g = torch.tensor(0.5 * x.abs().max().item() / 2688.0, device=DEV)  # calibrated below the amax: saturates
    q, s, g2 = nvfp4.quantize_nvfp4(x, g)
    qr, sr, _ = F.quantize_nvfp4_reference(x.cpu(), g.cpu())
    assert torch.equal(q.cpu(), qr) and torch.equal(_u8(s.cpu()), _u8(sr)) and torch.equal(g2, g)
    d = nvfp4.dequantize_nvfp4(q, s, g, torch.bfloat16)
    assert torch.equal(d.cpu(), F.dequantize_nvfp4_reference(qr, sr, g.cpu(), torch.bfloat16))


def test_nan_block_dequantizes_to_nan():
    """A NaN in block 2 of row 1: that block's E4M3 scale is NaN (so are its dequantized values), everything else as
    the reference (the global scale ignores the NaN: amax NaN -> 1.0, as nvfp4_global_scale documents)."""
    x = torch.randn(3, 64)
    x[1, 40] = float("nan")
    g = torch.tensor(x.nan_to_num(0.0).abs().max().item() / 2688.0)
    for global_scale in (g, None):
        q, s, g2 = nvfp4.quantize_nvfp4(x.to(DEV), None if global_scale is None else global_scale.to(DEV))
        qr, sr, gr = F.quantize_nvfp4_reference(x, global_scale)
        assert torch.equal(g2.cpu(), gr)
        nan_s = torch.zeros(3, 4, dtype=torch.bool)
        nan_s[1, 2] = True
        assert torch.equal(torch.isnan(s.float()).cpu(), nan_s) and torch.equal(torch.isnan(sr.float()), nan_s)
        assert torch.equal(q.cpu(), qr) and torch.equal(_u8(s.cpu())[~nan_s], _u8(sr)[~nan_s])
        d = nvfp4.dequantize_nvfp4(q, s, g2, torch.float32).cpu()
        assert torch.isnan(d[1, 32:48]).all() and torch.isfinite(d[:, :32]).all() and torch.isfinite(d[0]).all()


def test_hand_made_packed_bits():
    x = torch.zeros(1, 16, device=DEV)
    x[0, 0], x[0, 1] = 1.5, -6.0   # block amax 6; global 1/448 -> block scale 448 / 448... = exactly 1/g * 6/6
    q, s, g = nvfp4.quantize_nvfp4(x, torch.tensor(1.0 / 448.0, device=DEV))
    assert s.float().item() == 448.0
    assert q[0, 0].item() == (0b1111 << 4) | 0b0011   # 1.5 -> 0b0011 (low), -6 -> 0b1111 (high)
    assert q[0, 1:].eq(0).all()


def test_quantize_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize_nvfp4(torch.randn(4, 40).to(DEV))
    with pytest.raises(TypeError, match="global_scale"):
        nvfp4.quantize_nvfp4(torch.randn(4, 32).to(DEV), torch.tensor([1.0, 2.0], device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        nvfp4.quantize_nvfp4(torch.ones(4, 32, dtype=torch.int64, device=DEV))
    q, s, g = nvfp4.quantize_nvfp4(torch.randn(4, 32).to(DEV))
    with pytest.raises(ValueError, match="do not describe"):
        nvfp4.dequantize_nvfp4(q, s[:, :1], g)
    with pytest.raises(TypeError, match="uint8"):
        nvfp4.dequantize_nvfp4(q.to(torch.int16), s, g)


# -------------------------------------------------------------------------------------------------------------- GEMMs
def _weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * torch.logspace(-1, 1, N).unsqueeze(1)).to(DEV, torch.bfloat16)
    return (w, *nvfp4.quantize_nvfp4(w))


def _epilogue(M, N, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "plain":
        return {}
    kw = {"bias": torch.randn(N, generator=g).to(DEV, torch.bfloat16)}
    if kind == "gelu":
        kw["activation"] = "gelu_tanh"
    if kind == "gate_residual":
        kw["gate"] = torch.randn(M, N, generator=g).to(DEV, torch.bfloat16)
        kw["residual"] = torch.randn(M, N, generator=g).to(DEV, torch.bfloat16)
    return kw


@pytest.mark.parametrize("M,N,K,kind", [(1, 45, 96, "plain"), (3, 130, 160, "gelu"), (37, 70, 64, "gate_residual")])
def test_w4a16_gemm(M, N, K, kind):
    _, wq, ws, wg = _weight(N, K)
    x = torch.randn(M, K).to(DEV, torch.bfloat16)
    kw = _epilogue(M, N, kind)
    y = nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg, out_dtype=torch.float32, **kw)
    ref = on_cpu(F.nvfp4_gemm_w4a16_reference, x, wq, ws, wg, out_dtype=None, compute_dtype=torch.float64, **kw)
    assert y.shape == (M, N)
    assert sqnr_db(ref, y) >= GEMM_F32_DB


@pytest.mark.parametrize("M,N,K,kind", [(1, 130, 160, "bias"), (37, 45, 96, "gate_residual")])
def test_w4a4_gemm_emulated(M, N, K, kind):
    _, wq, ws, wg = _weight(N, K)
    x = torch.randn(M, K).to(DEV, torch.bfloat16)
    aq, as_, ag = nvfp4.quantize_nvfp4(x)
    kw = _epilogue(M, N, kind)
    y = nvfp4.nvfp4_gemm_w4a4(aq, as_, ag, wq, ws, wg, use_dot_scaled=False, **kw)
    assert y.dtype == torch.bfloat16
    ref = on_cpu(F.nvfp4_gemm_w4a4_reference, aq, as_, ag, wq, ws, wg,
                 out_dtype=None, compute_dtype=torch.float64, **kw)
    assert sqnr_db(ref, y) >= GEMM_BF16_DB


@pytest.mark.parametrize("act_quant", [False, True])
def test_nvfp4_linear_vs_unquantized(act_quant):
    N, K = 64, 128
    w, wq, ws, wg = _weight(N, K)
    x = torch.randn(2, 9, K).to(DEV, torch.bfloat16)
    res = torch.randn(2, 9, N).to(DEV, torch.bfloat16)
    y = nvfp4.nvfp4_linear(x, wq, ws, wg, act_quant=act_quant, residual=res)
    assert y.shape == (2, 9, N) and y.dtype == torch.bfloat16
    true = cpu64(x) @ cpu64(w).t()
    assert sqnr_db(true, cpu64(y) - cpu64(res)) >= (W4A4_DB if act_quant else W4A16_DB)


def test_gemm_errors():
    N, K = 32, 64
    _, wq, ws, wg = _weight(N, K)
    x = torch.randn(3, K).to(DEV, torch.bfloat16)
    with pytest.raises(ValueError, match="holds K"):
        nvfp4.nvfp4_gemm_w4a16(torch.randn(3, K + 16).to(DEV, torch.bfloat16), wq, ws, wg)
    with pytest.raises(TypeError, match="uint8"):
        nvfp4.nvfp4_gemm_w4a16(x, wq.to(torch.int8), ws, wg)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        nvfp4.nvfp4_gemm_w4a16(x, wq, ws.float(), wg)
    with pytest.raises(ValueError, match="not contiguous"):
        nvfp4.nvfp4_gemm_w4a16(x, torch.cat([wq, wq], dim=1)[:, : K // 2], ws, wg)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.nvfp4_gemm_w4a16(torch.randn(3, 40).to(DEV, torch.bfloat16),
                               torch.zeros(N, 20, dtype=torch.uint8, device=DEV), ws, wg)
    with pytest.raises(TypeError, match="w_global"):
        nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg.double())
    with pytest.raises(ValueError, match="w_scale has shape"):
        nvfp4.nvfp4_gemm_w4a16(x, wq, ws[:, :2].contiguous(), wg)
    aq, as_, ag = nvfp4.quantize_nvfp4(x)
    if not nvfp4.dot_scaled_available(DEV):
        with pytest.raises(ValueError, match="compute capability 10"):
            nvfp4.nvfp4_gemm_w4a4(aq, as_, ag, wq, ws, wg, use_dot_scaled=True)
    with pytest.raises(ValueError, match="a_scale has shape"):
        nvfp4.nvfp4_gemm_w4a4(aq, as_[:2], ag, wq, ws, wg)


def test_custom_ops_fake():
    N, K = 16, 32
    _, wq, ws, wg = _weight(N, K)
    x = torch.randn(3, K).to(DEV, torch.bfloat16)
    aq, as_, ag = nvfp4.quantize_nvfp4(x)
    t = ("test_faketensor",)
    torch.library.opcheck(torch.ops.dz.nvfp4_quantize.default, (x, ag), test_utils=("test_schema",) + t)
    torch.library.opcheck(torch.ops.dz.nvfp4_dequantize.default, (aq, as_, ag, torch.bfloat16), test_utils=t)
    torch.library.opcheck(torch.ops.dz.nvfp4_gemm_w4a16.default,
                          (x, wq, ws, wg, None, "none", None, None, torch.bfloat16), test_utils=t)
    torch.library.opcheck(torch.ops.dz.nvfp4_gemm_w4a4.default,
                          (aq, as_, ag, wq, ws, wg, None, "gelu_tanh", None, None, torch.bfloat16, False), test_utils=t)


def test_gpu_kernels_compile_to_the_intended_mma():
    """Compile the W4A4 kernel's tl.dot_scaled path for sm_100 and the Hopper GEMMs for sm_90 with Triton's
    compiler (no GPU needed) and check the tensor-core instructions in the PTX."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    names = ["nvfp4_w4a4_dot_scaled_sm100", "nvfp4_w4a16_sm90", "fp8_gemm_block_sm90"]
    proc = subprocess.run([sys.executable, "-m", "dz_kernels.quant._aot", *names], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    # NVFP4 is the block-scaled MMA with one scale per 16 elements along K. PTX spells the block size two ways:
    # ".block16" (newer PTX; triton 3.9 emits it) or ".scale_vec::4X" (four scales per K = 64 step; triton 3.6 on
    # the H200 emitted that). ".block32" / ".scale_vec::2X" would be MXFP4 (E8M0 scales per 32): wrong. The scale
    # type (E4M3) is a field of the instruction descriptor, not of the mnemonic.
    mma = [i for i in found["nvfp4_w4a4_dot_scaled_sm100"] if "kind::mxf4nvf4" in i and "block_scale" in i]
    assert mma and all(i.endswith((".block16", ".scale_vec::4X")) for i in mma), found
    assert any(i.startswith("wgmma") and "bf16" in i for i in found["nvfp4_w4a16_sm90"]), found
    assert any(i.startswith("wgmma") and "e4m3.e4m3" in i for i in found["fp8_gemm_block_sm90"]), found


# ---------------------------------------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("M", [1, 37, 1785, 3570])
def test_nvfp4_gemms_gpu_large(M):
    N, K = 1280, 5120
    _, wq, ws, wg = _weight(N, K)
    x = torch.randn(M, K).to(DEV, torch.bfloat16)
    kw = _epilogue(M, N, "gate_residual")
    y = nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg, **kw)
    ref = on_cpu(F.nvfp4_gemm_w4a16_reference, x, wq, ws, wg, out_dtype=None, compute_dtype=torch.float64, **kw)
    assert sqnr_db(ref, y) >= GEMM_BF16_DB
    aq, as_, ag = nvfp4.quantize_nvfp4(x)
    y4 = nvfp4.nvfp4_gemm_w4a4(aq, as_, ag, wq, ws, wg, **kw)
    ref4 = on_cpu(F.nvfp4_gemm_w4a4_reference, aq, as_, ag, wq, ws, wg,
                  out_dtype=None, compute_dtype=torch.float64, **kw)
    assert sqnr_db(ref4, y4) >= GEMM_BF16_DB


@requires_sm100
@pytest.mark.parametrize("M", [1, 37, 1785])
def test_w4a4_dot_scaled_matches_emulation_on_blackwell(M):
    N, K = 640, 5120
    _, wq, ws, wg = _weight(N, K)
    aq, as_, ag = nvfp4.quantize_nvfp4(torch.randn(M, K).to(DEV, torch.bfloat16))
    y = nvfp4.nvfp4_gemm_w4a4(aq, as_, ag, wq, ws, wg, use_dot_scaled=True, out_dtype=torch.float32)
    ref = on_cpu(F.nvfp4_gemm_w4a4_reference, aq, as_, ag, wq, ws, wg, out_dtype=None, compute_dtype=torch.float64)
    assert sqnr_db(ref, y) >= GEMM_F32_DB
