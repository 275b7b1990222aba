"""FP8 / NVFP4 formats: bit layout against hand-made cases, and the plain-PyTorch references.

SQNR thresholds (dB, signal = the float64 input, noise = its quantize -> dequantize error), on Gaussian data
(with a spread of magnitudes across channels where stated); the measured values sit about 3 dB above them:
    FP8 E4M3, any granularity      >= 28   (3 mantissa bits: about 31-32 dB measured)
    NVFP4 (E2M1 / E4M3 per 16)     >= 18   (about 20 dB measured)
"""
import math

import pytest
import torch

from dz_kernels.quant import reference as F
from dz_kernels.testing import sqnr_db

FP8_ROUNDTRIP_DB = 28.0
NVFP4_ROUNDTRIP_DB = 18.0


# ------------------------------------------------------------------------------------------------- E2M1 bit layout
@pytest.mark.parametrize("value,code", [
    (0.0, 0b0000), (0.5, 0b0001), (1.0, 0b0010), (1.5, 0b0011), (2.0, 0b0100), (3.0, 0b0101), (4.0, 0b0110),
    (6.0, 0b0111), (-0.5, 0b1001), (-1.0, 0b1010), (-1.5, 0b1011), (-2.0, 0b1100), (-3.0, 0b1101),
    (-4.0, 0b1110), (-6.0, 0b1111),
])
def test_e2m1_codes_hand_made(value, code):
    assert F.e2m1_encode(torch.tensor([value])).item() == code
    assert F.e2m1_decode(torch.tensor([code], dtype=torch.uint8)).item() == value


def test_e2m1_rounding_ties_to_even_and_saturation():
    v = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 100.0, -0.1, -0.0, -5.0])
    expect = [0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -0.0, 0.0, -4.0]
    codes = F.e2m1_encode(v)
    assert F.e2m1_decode(codes).tolist() == expect
    assert codes[-3].item() == 0b1000  # a small negative value rounds to -0 (sign bit kept), as ModelOpt
    assert codes[-2].item() == 0b0000  # -0.0 is not < 0: +0


def test_pack_nibble_order_hand_made():
    # element 2j -> low nibble of byte j, element 2j+1 -> high nibble
    codes = torch.tensor([[0b0011, 0b1111, 0b0001, 0b0000]], dtype=torch.uint8)  # 1.5, -6, 0.5, 0
    packed = F.pack_e2m1(codes)
    assert packed.tolist() == [[0xF3, 0x01]]
    assert torch.equal(F.unpack_e2m1(packed), codes)
    values = torch.tensor([[1.5, -6.0, 0.5, 0.0]])
    assert F.pack_e2m1(F.e2m1_encode(values)).tolist() == [[0xF3, 0x01]]


def test_pack_unpack_all_bytes():
    allb = torch.arange(256, dtype=torch.uint8).view(4, 64)
    assert torch.equal(F.pack_e2m1(F.unpack_e2m1(allb)), allb)


def test_nvfp4_hand_made_block():
    # one block of 16 with amax 6 and global scale 1/448: block scale 6 / (6 * g) = 448 -> e4m3 448 exactly
    x = torch.tensor([[6.0, -6.0, 3.0, 1.5, 0.5, 0.0, -1.0, 2.0, 4.0, -0.5, 1.0, -3.0, -4.0, -2.0, -1.5, 0.0]])
    g = torch.tensor(1.0 / 448.0)
    packed, scale, gs = F.quantize_nvfp4_reference(x, g)
    assert scale.float().item() == 448.0
    assert packed[0, 0].item() == (0b1111 << 4) | 0b0111      # 6 low, -6 high
    assert packed[0, 1].item() == (0b0011 << 4) | 0b0101      # 3 low, 1.5 high
    assert torch.equal(F.dequantize_nvfp4_reference(packed, scale, gs), x)


def test_nvfp4_global_scale_convention():
    x = torch.randn(8, 32)
    g = F.nvfp4_global_scale(x)
    assert g.dtype == torch.float32 and g.dim() == 0
    assert g.item() == pytest.approx(x.abs().max().item() / (448 * 6), rel=1e-6)
    assert F.nvfp4_global_scale(torch.zeros(4, 16)).item() == 1.0


def test_nvfp4_zero_and_tiny_blocks():
    x = torch.zeros(2, 32)
    x[1, 16:] = 1e-6  # a block far below the global amax: its scale clamps at the E4M3 floor 2^-9
    x[0, 0] = 100.0
    q, s, g = F.quantize_nvfp4_reference(x)
    assert torch.isfinite(s.float()).all()
    assert s.float()[1, 0].item() == 1.0  # all-zero block: scale 1 (ModelOpt)
    assert s.float()[1, 1].item() == 2.0 ** -9
    d = F.dequantize_nvfp4_reference(q, s, g)
    # the global amax is held exactly: code 6.0 (0b0111) times the block scale 448 times g = amax / (448 * 6)
    assert (q[0, 0].item() & 0xF) == 0b0111 and s.float()[0, 0].item() == 448.0
    assert d[0, 0].item() == 100.0 and not d[0, 1:].any()
    assert not d[1].any()       # 1e-6 is 0.014 in E2M1 units there (x / (2^-9 g)), under half the least code: 0
    assert torch.equal(F.quantize_nvfp4_reference(torch.zeros(3, 16))[0], torch.zeros(3, 8, dtype=torch.uint8))


# -------------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("granularity", F.FP8_GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_reference_roundtrip(granularity, dtype):
    R, C = 200, 384
    x = (torch.randn(R, C, dtype=torch.float64) * torch.logspace(-1, 1, C, dtype=torch.float64)).to(dtype)
    q, s = F.quantize_fp8_reference(x, granularity)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == F.fp8_scale_shape(granularity, R, C)
    d = F.dequantize_fp8_reference(q, s, granularity, torch.float64)
    assert sqnr_db(x.double(), d) >= FP8_ROUNDTRIP_DB
    assert q.float().abs().max().item() == 448.0  # each group's max maps to the top of the range


def test_fp8_scale_shapes_and_errors():
    assert F.fp8_scale_shape("block128x128", 130, 256) == (2, 2)
    with pytest.raises(ValueError, match="multiple of 128"):
        F.quantize_fp8_reference(torch.randn(4, 100), "block1x128")
    with pytest.raises(ValueError, match="unknown FP8 granularity"):
        F.quantize_fp8_reference(torch.randn(4, 128), "col")
    with pytest.raises(TypeError):
        F.quantize_fp8_reference(torch.randint(0, 3, (4, 128)), "row")
    q, s = F.quantize_fp8_reference(torch.zeros(3, 128), "row")  # all-zero rows: finite scale, zero codes
    assert torch.isfinite(s).all() and q.float().abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_reference_roundtrip(dtype):
    x = (torch.randn(96, 256, dtype=torch.float64) * torch.logspace(-1, 1, 256, dtype=torch.float64)).to(dtype)
    q, s, g = F.quantize_nvfp4_reference(x)
    assert q.shape == (96, 128) and q.dtype == torch.uint8
    assert s.shape == (96, 16) and s.dtype == torch.float8_e4m3fn
    d = F.dequantize_nvfp4_reference(q, s, g, torch.float64)
    assert sqnr_db(x.double(), d) >= NVFP4_ROUNDTRIP_DB
    # every element lies within half a quantum of its block's grid: |x - d| <= 1 * float(s8) * g (the E2M1 step
    # is at most 2 between 4 and 6), or x is beyond the block's saturation point 6 * float(s8) * g
    bs = (s.double() * g.double()).repeat_interleave(16, dim=1)
    err = (x.double() - d).abs()
    assert bool(((err <= bs * 1.0 + 1e-30) | (x.double().abs() > 6 * bs)).all())


def test_nvfp4_reference_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        F.quantize_nvfp4_reference(torch.randn(4, 40))
    with pytest.raises(TypeError, match="global_scale"):
        F.quantize_nvfp4_reference(torch.randn(4, 32), torch.tensor(1.0, dtype=torch.float64))
    q, s, g = F.quantize_nvfp4_reference(torch.randn(4, 32))
    with pytest.raises(ValueError, match="scale has shape"):
        F.dequantize_nvfp4_reference(q, s[:, :1], g)


def test_gemm_references_agree_with_float64_matmul():
    torch.manual_seed(1)
    a, w = torch.randn(9, 128), torch.randn(20, 128)
    qa, sa = F.quantize_fp8_reference(a, "row")
    qw, sw = F.quantize_fp8_reference(w, "row")
    y = F.fp8_gemm_reference(qa, sa, qw, sw, out_dtype=None, compute_dtype=torch.float64)
    assert sqnr_db(a.double() @ w.double().t(), y) >= 25.0
    gate, res = torch.randn(9, 20), torch.randn(9, 20)
    y2 = F.fp8_gemm_reference(qa, sa, qw, sw, activation="gelu_tanh", gate=gate, residual=res, out_dtype=None,
                              compute_dtype=torch.float64)
    expect = res.double() + gate.double() * torch.nn.functional.gelu(y, approximate="tanh")
    assert torch.allclose(y2, expect, atol=1e-12)
    assert math.isfinite(sqnr_db(y, y2))
