"""FP8 Triton kernels (the CPU interpreter here, the GPU where present) against the plain-PyTorch references.

Bars:
  quantizers / dequantizer: bit-exact against reference.py (which is ModelOpt's convention; see test_quant_modelopt.py)
  FP8 GEMM vs float64 dequantize-then-matmul of the same FP8 operands (so only the kernel's own error counts):
      float32 output >= 60 dB (float32 accumulation: ~140 dB in the interpreter), bfloat16 output >= 40 dB
      (bf16 rounding alone gives ~50 dB)
  fp8_linear vs the float64 product of the unquantized inputs: >= 25 dB (two E4M3 operands: ~28-29 dB measured)
  rounding: the kernels' E4M3 bytes equal torch's own conversion of the scaled values, ties included
  NaN: a group (row, block) holding a NaN gets a NaN scale and NaN values, as the reference; fp8_linear gives NaN
      output rows for NaN input rows and leaves the others as they are without the NaN
Runs on the suite's device (tests/conftest.py: CUDA, else the Triton interpreter); inputs are drawn on the CPU and
moved there. Outputs are NaN-poisoned (conftest), so unwritten memory fails.
"""
import pytest
import torch

from dz_kernels import _common as common
from dz_kernels.quant import reference as F
from dz_kernels.quant import ops as fp8
from dz_kernels.testing import cpu64, on_cpu, sqnr_db

from conftest import DEVICE as DEV, requires_cuda

GEMM_F32_DB = 60.0
GEMM_BF16_DB = 40.0
LINEAR_DB = 25.0
ROUNDTRIP_DB = 28.0


def _bits(t):
    return t.view(torch.uint8)


# --------------------------------------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("shape,dtype", [((1, 7), torch.float32), ((37, 200), torch.bfloat16),
                                         ((2, 3, 130), torch.float16)])
def test_quantize_rowwise_matches_reference(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype).to(DEV)
    x.view(-1, shape[-1])[0, 0] = -0.0
    q, s = fp8.quantize_fp8_rowwise(x)
    assert q.shape == x.shape and s.shape == (*shape[:-1], 1)
    qr, sr = F.quantize_fp8_reference(x.reshape(-1, shape[-1]), "row")
    assert torch.equal(_bits(q.reshape(-1, shape[-1])), _bits(qr))
    assert torch.equal(s.reshape(-1, 1), sr)
    d = F.dequantize_fp8_reference(q.reshape(-1, shape[-1]), s.reshape(-1, 1), "row", torch.float64)
    assert sqnr_db(x.reshape(-1, shape[-1]), d) >= ROUNDTRIP_DB


def test_quantize_rowwise_zero_row_and_extremes():
    x = torch.randn(5, 64).to(DEV)
    x[1] = 0.0
    x[2, 3] = 1e30
    x[3] *= 1e-20
    q, s = fp8.quantize_fp8_rowwise(x)
    qr, sr = F.quantize_fp8_reference(x, "row")
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)
    assert torch.isfinite(q.float()).all() and q[1].float().abs().sum() == 0


@pytest.mark.parametrize("block,shape", [("1x128", (37, 256)), ("1x128", (2, 5, 128)), ("128x128", (200, 256)),
                                         ("128x128", (3, 128))])
def test_quantize_blockwise_matches_reference(block, shape):
    x = (torch.randn(shape) * torch.logspace(-2, 2, shape[-1])).to(DEV)
    x = x.to(torch.bfloat16)
    q, s = fp8.quantize_fp8_blockwise(x, block)
    granularity = "block" + block
    x2 = x.reshape(-1, shape[-1])
    qr, sr = F.quantize_fp8_reference(x2, granularity)
    assert torch.equal(_bits(q.reshape(x2.shape)), _bits(qr))
    assert torch.equal(s.reshape(sr.shape), sr)
    d = fp8.dequantize_fp8(q.reshape(x2.shape), s.reshape(sr.shape), granularity, torch.float32)
    assert torch.equal(d, F.dequantize_fp8_reference(qr, sr, granularity, torch.float32))
    assert sqnr_db(x2, d) >= ROUNDTRIP_DB


def _e4m3_ties_and_neighbours(n: int) -> torch.Tensor:
    """n values in [-448, 448]: E4M3 grid points, the midpoints between neighbours (ties) and one float32 ulp
    either side, -0 and 0, in random order (seeded)."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, mids.nextafter(grid[1:]), mids.nextafter(grid[:-1]), torch.tensor([-0.0, 0.0])])
    vals = torch.cat([vals, -vals])
    idx = torch.randint(0, vals.numel(), (n,), generator=torch.Generator().manual_seed(3))
    return vals[idx]


@pytest.mark.parametrize("mode", ["row", "1x128", "128x128"])
def test_rounding_matches_torch_conversion_of_the_scaled_values(mode):
    """Groups whose amax is exactly 448 have scale 1, so the kernel converts the values themselves: its E4M3 bytes
    must be torch's (round to nearest even, ties, the sign of zero). And on random data: the bytes are torch's
    conversion of x / scale with the kernel's own scales."""
    R, C = 130, 256
    x = _e4m3_ties_and_neighbours(R * C).view(R, C)
    x[:, ::128] = 448.0                                       # every row and every 1x128 / 128x128 block
    q, s = fp8.quantize_fp8_rowwise(x.to(DEV)) if mode == "row" else fp8.quantize_fp8_blockwise(x.to(DEV), mode)
    assert (s == 1.0).all()
    assert torch.equal(_bits(q).cpu(), _bits(x.to(torch.float8_e4m3fn)))
    y = (torch.randn(R, C) * torch.logspace(-3, 3, C)).to(DEV)
    q, s = fp8.quantize_fp8_rowwise(y) if mode == "row" else fp8.quantize_fp8_blockwise(y, mode)
    g = {"row": "row", "1x128": "block1x128", "128x128": "block128x128"}[mode]
    s_full = F._expand_scale(s, g, R, C)
    assert torch.equal(_bits(q), _bits(common.quantize_e4m3(y, s_full)))


@pytest.mark.parametrize("mode", ["row", "1x128", "128x128"])
def test_nan_input_gives_nan_group(mode):
    """A NaN in row 3 (block 1 of it, for the 1x128 blocks): that group's scale and every value of it are NaN, as in
    the reference; every other group equals the reference, bytes and scales. (Before: -448 under a finite scale.)"""
    R, C = 140, 256
    x = torch.randn(R, C)
    x[3, 200] = float("nan")
    q, s = fp8.quantize_fp8_rowwise(x.to(DEV)) if mode == "row" else fp8.quantize_fp8_blockwise(x.to(DEV), mode)
    g = {"row": "row", "1x128": "block1x128", "128x128": "block128x128"}[mode]
    qr, sr = F.quantize_fp8_reference(x, g)
    nan_s = torch.isnan(sr)
    assert nan_s.sum() == 1 and torch.equal(torch.isnan(s).cpu(), nan_s)
    nan_q = torch.isnan(F._expand_scale(sr, g, R, C).expand(R, C))
    assert torch.equal(torch.isnan(q.float()).cpu(), nan_q), "exactly the NaN group's values are NaN"
    assert torch.equal(_bits(q).cpu()[~nan_q], _bits(qr)[~nan_q]) and torch.equal(s.cpu()[~nan_s], sr[~nan_s])


@pytest.mark.parametrize("block_scaled", [False, True])
def test_fp8_linear_nan_rows(block_scaled):
    """A NaN in one token of x makes that output row NaN (the quantized row carries it into the GEMM); the other
    rows are exactly what they are without the NaN."""
    N, K = 40, 256
    w = torch.randn(N, K).to(DEV)
    qw, sw = fp8.quantize_fp8_blockwise(w, "128x128") if block_scaled else fp8.quantize_fp8_rowwise(w)
    x = torch.randn(6, K).to(DEV, torch.bfloat16)
    clean = fp8.fp8_linear(x, qw, sw, block_scaled=block_scaled, out_dtype=torch.float32)
    x[4, 7] = float("nan")
    y = fp8.fp8_linear(x, qw, sw, block_scaled=block_scaled, out_dtype=torch.float32)
    assert torch.isnan(y[4]).all() and torch.isfinite(clean).all()
    keep = torch.arange(6, device=DEV) != 4
    assert torch.equal(y[keep], clean[keep])


@pytest.mark.parametrize("granularity", F.FP8_GRANULARITIES)
def test_dequantize_matches_reference(granularity):
    x = torch.randn(133, 256).to(DEV)
    q, s = F.quantize_fp8_reference(x, granularity)
    for out_dtype in (torch.float32, torch.bfloat16):
        d = fp8.dequantize_fp8(q, s, granularity, out_dtype)
        assert d.dtype == out_dtype
        assert torch.equal(d, F.dequantize_fp8_reference(q, s, granularity, out_dtype))


def test_quantize_errors():
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8.quantize_fp8_blockwise(torch.randn(4, 100).to(DEV), "1x128")
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_fp8_blockwise(torch.randn(2, 4, 128).to(DEV), "128x128")
    with pytest.raises(ValueError, match="block="):
        fp8.quantize_fp8_blockwise(torch.randn(4, 128).to(DEV), "1x64")
    with pytest.raises(TypeError, match="dtype"):
        fp8.quantize_fp8_rowwise(torch.ones(4, 8, dtype=torch.int32, device=DEV))
    q, s = F.quantize_fp8_reference(torch.randn(4, 128), "row")
    with pytest.raises(ValueError, match="scale has shape"):
        fp8.dequantize_fp8(q.to(DEV), s[:2].to(DEV), "row")


# --------------------------------------------------------------------------------------------------------------- GEMM
def _operands(M, N, K, block_scaled, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(DEV)
    w = (torch.randn(N, K, generator=g) * torch.logspace(-1, 1, N).unsqueeze(1)).to(DEV)
    if block_scaled:
        qa, sa = fp8.quantize_fp8_blockwise(a, "1x128")
        qw, sw = fp8.quantize_fp8_blockwise(w, "128x128")
    else:
        qa, sa = fp8.quantize_fp8_rowwise(a)
        qw, sw = fp8.quantize_fp8_rowwise(w)
        sw = sw.reshape(N)
    return a, w, qa, sa, qw, sw


EPILOGUES = {
    "plain": {},
    "bias": {"bias": True},
    "gelu": {"bias": True, "activation": "gelu_tanh"},
    "gate_residual": {"bias": True, "gate": "full", "residual": True},
}


def _epilogue_args(spec, M, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if spec.get("bias"):
        kw["bias"] = torch.randn(N, generator=g).to(DEV, torch.bfloat16)
    if "activation" in spec:
        kw["activation"] = spec["activation"]
    if spec.get("gate") == "full":
        kw["gate"] = torch.randn(M, N, generator=g).to(DEV, torch.bfloat16)
    elif spec.get("gate") == "row":
        kw["gate"] = torch.randn(N, generator=g).to(DEV, torch.bfloat16)
    if spec.get("residual"):
        kw["residual"] = torch.randn(M, N, generator=g).to(DEV, torch.bfloat16)
    return kw


@pytest.mark.parametrize("M,N,K,epi", [(1, 45, 176, "plain"), (3, 200, 176, "bias"), (37, 45, 160, "gelu"),
                                       (37, 200, 96, "gate_residual")])
def test_fp8_gemm_rowwise(M, N, K, epi):
    _, _, qa, sa, qw, sw = _operands(M, N, K, False)
    kw = _epilogue_args(EPILOGUES[epi], M, N)
    y = fp8.fp8_gemm(qa, sa, qw, sw, out_dtype=torch.float32, **kw)
    ref = on_cpu(F.fp8_gemm_reference, qa, sa, qw, sw, out_dtype=None, compute_dtype=torch.float64, **kw)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert sqnr_db(ref, y) >= GEMM_F32_DB


@pytest.mark.parametrize("M,N", [(1, 200), (37, 130)])
def test_fp8_gemm_block_scaled(M, N):
    K = 256
    a, w, qa, sa, qw, sw = _operands(M, N, K, True)
    kw = _epilogue_args(EPILOGUES["gate_residual"], M, N)
    y = fp8.fp8_gemm(qa, sa, qw, sw, block_scaled=True, **kw)
    assert y.dtype == torch.bfloat16
    ref = on_cpu(F.fp8_gemm_reference, qa, sa, qw, sw, block_scaled=True,
                 out_dtype=None, compute_dtype=torch.float64, **kw)
    assert sqnr_db(ref, y) >= GEMM_BF16_DB


def test_fp8_gemm_per_tensor_scales_and_row_gate():
    M, N, K = 5, 40, 64
    a, w = torch.randn(M, K).to(DEV), torch.randn(N, K).to(DEV)
    qa, sa = F.quantize_fp8_reference(a, "tensor")
    qw, sw = F.quantize_fp8_reference(w, "tensor")
    kw = _epilogue_args({"gate": "row", "residual": True}, M, N)
    y = fp8.fp8_gemm(qa, sa, qw, sw, out_dtype=torch.float32, **kw)
    ref = on_cpu(F.fp8_gemm_reference, qa, sa, qw, sw, out_dtype=None, compute_dtype=torch.float64, **kw)
    assert sqnr_db(ref, y) >= GEMM_F32_DB


@pytest.mark.parametrize("block_scaled", [False, True])
def test_fp8_linear_vs_unquantized(block_scaled):
    N, K = 72, 256
    x = torch.randn(2, 19, K).to(DEV, torch.bfloat16)
    w = torch.randn(N, K).to(DEV)
    if block_scaled:
        qw, sw = fp8.quantize_fp8_blockwise(w, "128x128")
    else:
        qw, sw = fp8.quantize_fp8_rowwise(w)
    gate = torch.randn(2, 1, N).to(DEV, torch.bfloat16)  # per sample, broadcast over tokens
    res = torch.randn(2, 19, N).to(DEV, torch.bfloat16)
    y = fp8.fp8_linear(x, qw, sw, block_scaled=block_scaled, gate=gate, residual=res)
    assert y.shape == (2, 19, N) and y.dtype == torch.bfloat16
    true = cpu64(res) + cpu64(gate) * (cpu64(x) @ cpu64(w).t())
    assert sqnr_db(true, y) >= LINEAR_DB


def test_fp8_gemm_errors():
    M, N, K = 4, 8, 128
    _, _, qa, sa, qw, sw = _operands(M, N, K, False)
    with pytest.raises(ValueError, match="K differs"):
        fp8.fp8_gemm(qa, sa, qw[:, :64].contiguous(), sw)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8.fp8_gemm(qa.float(), sa, qw, sw)
    with pytest.raises(TypeError, match="float32"):
        fp8.fp8_gemm(qa, sa.double(), qw, sw)
    with pytest.raises(ValueError, match="not contiguous"):
        wide = torch.cat([qw.view(torch.uint8), qw.view(torch.uint8)], dim=1).view(torch.float8_e4m3fn)
        fp8.fp8_gemm(qa, sa, wide[:, :K], sw)
    with pytest.raises(ValueError, match="per-channel"):
        fp8.fp8_gemm(qa, sa, qw, sw[:3])
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8.fp8_gemm(qa[:, :96].contiguous(), sa, qw[:, :96].contiguous(), sw, block_scaled=True)
    _, _, qa2, sa2, qw2, sw2 = _operands(M, N, 256, False)
    with pytest.raises(ValueError, match="1x128"):
        fp8.fp8_gemm(qa2, sa2, qw2, sw2, block_scaled=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        fp8.fp8_gemm(qa, sa, qw, sw, gate=torch.randn(M, N + 1).to(DEV))
    with pytest.raises(ValueError, match="activation"):
        fp8.fp8_gemm(qa, sa, qw, sw, activation="relu")
    with pytest.raises(ValueError, match="bias has shape"):
        fp8.fp8_gemm(qa, sa, qw, sw, bias=torch.randn(N + 1).to(DEV))
    with pytest.raises(ValueError, match="last dim of x must be K"):
        fp8.fp8_linear(torch.randn(3, K + 1).to(DEV), qw, sw)


def test_custom_ops_fake_and_schema():
    M, N, K = 3, 16, 128
    a, w, qa, sa, qw, sw = _operands(M, N, K, False)
    # test_schema is left out for ops with float8 inputs: its checker multiplies inputs, which float8 cannot do
    tests = ("test_faketensor",)
    full = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.dz.fp8_quantize_rowwise.default, (a,), test_utils=full)
    torch.library.opcheck(torch.ops.dz.fp8_quantize_blockwise.default, (a, True), test_utils=full)
    torch.library.opcheck(torch.ops.dz.fp8_dequantize.default, (qa, sa, "row", torch.bfloat16), test_utils=tests)
    args = (qa, sa, qw, sw, False, None, "gelu_tanh", None, None, torch.bfloat16)
    torch.library.opcheck(torch.ops.dz.fp8_gemm.default, args, test_utils=tests)


def test_fp8_linear_traces_with_torch_compile_fullgraph():
    torch._dynamo.reset()
    N, K = 16, 128
    w = torch.randn(N, K).to(DEV)
    qw, sw = fp8.quantize_fp8_rowwise(w)
    x = torch.randn(5, K).to(DEV, torch.bfloat16)
    fn = torch.compile(lambda t: fp8.fp8_linear(t, qw, sw, activation="gelu_tanh"), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(x), fp8.fp8_linear(x, qw, sw, activation="gelu_tanh"))


# ---------------------------------------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("M", [1, 37, 1785, 3570])
@pytest.mark.parametrize("block_scaled", [False, True])
def test_fp8_gemm_gpu_large(M, block_scaled):
    N, K = 1280, 5120
    _, _, qa, sa, qw, sw = _operands(M, N, K, block_scaled)
    kw = _epilogue_args(EPILOGUES["gate_residual"], M, N)
    y = fp8.fp8_gemm(qa, sa, qw, sw, block_scaled=block_scaled, **kw)
    ref = on_cpu(F.fp8_gemm_reference, qa, sa, qw, sw, block_scaled=block_scaled, out_dtype=None,
                               compute_dtype=torch.float64, **kw)
    assert sqnr_db(ref, y) >= GEMM_BF16_DB
