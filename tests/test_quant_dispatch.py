"""Shape-dependent paths of the quantized linears: the split-K W4A16 kernel for decode-like M
(triton_nvfp4_splitk.py) and the FP8 linear's dispatch between our GEMM, our quantizer + torch._scaled_mm, and bf16
(dispatch.py), both chosen by the config tables. Runs on the suite's device (tests/conftest.py: the Triton
interpreter here, the GPU where present); outputs NaN-poisoned (conftest)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

from dz_kernels import configs
from dz_kernels.quant import ops as nvfp4
from dz_kernels.quant import reference as F
from dz_kernels.quant.dispatch import fp8_linear_dispatch, fp8_linear_path
from dz_kernels.quant.triton_nvfp4_splitk import splitk_plan
from dz_kernels.testing import on_cpu, sqnr_db

from conftest import DEVICE as DEV

GEMM_F32_DB = 60.0
GEMM_BF16_DB = 40.0


def _weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * torch.logspace(-1, 1, N).unsqueeze(1)).to(DEV, torch.bfloat16)
    return nvfp4.quantize_nvfp4(w)


@pytest.mark.parametrize("M,N,K,split,epilogue", [(1, 45, 96, 0, False), (3, 70, 160, 1, True),
                                                  (16, 33, 208, 2, True), (5, 64, 64, 0, True)])
def test_splitk_w4a16_against_float64(M, N, K, split, epilogue):
    """Odd N (a partial column block), K slices with a ragged end, one slice (epilogue in the main kernel) and
    several (partials + the reduce kernel), float32 output: the products are exact, so >= 60 dB."""
    wq, ws, wg = _weight(N, K)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
    kw = {}
    if epilogue:
        kw = {"bias": torch.randn(N, generator=g).to(DEV, torch.bfloat16), "activation": "gelu_tanh",
              "gate": torch.randn(M, N, generator=g).to(DEV, torch.bfloat16),
              "residual": torch.randn(M, N, generator=g).to(DEV, torch.bfloat16)}
    cfg = dict(configs.table("nvfp4")["defaults"]["splitk"][-1]["config"], SPLIT_K=split)
    with configs.forced("nvfp4", "w4a16_path", {"path": "splitk"}), configs.forced("nvfp4", "splitk", cfg):
        y = nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg, out_dtype=torch.float32, **kw)
    ref = on_cpu(F.nvfp4_gemm_w4a16_reference, x, wq, ws, wg, out_dtype=None, compute_dtype=torch.float64, **kw)
    assert y.shape == (M, N)
    assert sqnr_db(ref, y) >= GEMM_F32_DB


def test_w4a16_path_by_table_and_both_paths_agree():
    assert nvfp4.w4a16_path(1, 5120, 5120, DEV) == "splitk"
    assert nvfp4.w4a16_path(16, 5120, 5120, DEV) == "splitk"
    assert nvfp4.w4a16_path(17, 5120, 5120, DEV) == "dequant"
    wq, ws, wg = _weight(40, 128)
    x = torch.randn(4, 128).to(DEV, torch.bfloat16)
    outs = []
    for path in ("splitk", "tiled", "dequant"):
        with configs.forced("nvfp4", "w4a16_path", {"path": path}):
            assert nvfp4.w4a16_path(4, 40, 128, DEV) == path
            outs.append(nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg))
    ref = on_cpu(F.nvfp4_gemm_w4a16_reference, x, wq, ws, wg, out_dtype=None, compute_dtype=torch.float64)
    for y in outs:
        assert sqnr_db(ref, y) >= GEMM_BF16_DB
    with configs.forced("nvfp4", "w4a16_path", {"path": "gemv"}), pytest.raises(ValueError, match="'gemv'"):
        nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg)


@pytest.mark.parametrize("M,N,K", [(1, 5120, 5120), (16, 13824, 5120), (4, 40, 96), (1, 5120, 13824)])
@pytest.mark.parametrize("split,waves", [(0, 4), (0, 1), (5, 4), (1000, 4)])
def test_splitk_plan_covers_k_without_empty_slices(M, N, K, split, waves):
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split, "waves": waves}
    n, per = splitk_plan(M, N, K, cfg, n_sm=132)
    assert n >= 1 and per % 128 == 0
    assert (n - 1) * per < K <= n * per          # every slice starts inside K, together they cover it
    if split > 0:
        assert n <= split


# --------------------------------------------------------------------------------------------------- FP8 dispatch
@pytest.fixture
def fp8_table(monkeypatch):
    """Puts a table with the given linear_path rows (for this machine's architecture) in the loader's cache. Each
    change, and the end of the test, moves configs.generation() on, so no module keeps a path resolved under it."""
    configs.reload()
    monkeypatch.setattr(configs, "_MEMO", {})       # this test's lookups stay out of the shared memo

    def write(path_rows):
        t = configs.merge_entries(configs.table("fp8"), configs.arch_of(torch.device(DEV)), "linear_path",
                                  [{"match": m, "config": {"path": p}, "source": "test"} for m, p in path_rows])
        monkeypatch.setitem(configs._TABLES, "fp8", configs.validate_table(t, "fp8"))
        configs.invalidate()

    yield write
    configs.invalidate()


def test_fp8_path_rules(fp8_table):
    assert fp8_linear_path(1785, 5120, 5120, DEV) == "triton"                     # the default
    fp8_table([({"m_max": 2048, "n": 128}, "bf16"), ({"n": 128}, "scaled_mm")])
    assert fp8_linear_path(100, 64, 128, DEV, has_bf16_weight=True) == "bf16"
    assert fp8_linear_path(100, 64, 128, DEV) == "triton"                           # no bf16 weight kept
    assert fp8_linear_path(4096, 64, 128, DEV) == "scaled_mm"
    assert fp8_linear_path(4096, 64, 128, DEV, epilogue=True) == "triton"           # cuBLAS fuses no gate
    assert fp8_linear_path(4096, 64, 128, DEV, block_scaled=True) == "triton"
    assert fp8_linear_path(4096, 64, 128, DEV, out_dtype=torch.float32) == "triton"
    assert fp8_linear_path(4096, 72, 128, DEV) == "triton"                          # K not a multiple of 16
    fp8_table([({}, "int4")])
    with pytest.raises(ValueError, match="'int4'"):
        fp8_linear_path(1, 64, 128, DEV)


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no torch._scaled_mm")
def test_fp8_dispatch_paths_compute_the_linear(fp8_table):
    from dz_kernels.quant import quantize_fp8_rowwise

    g = torch.Generator().manual_seed(5)
    M, K, N = 24, 128, 48
    x = torch.randn(2, M // 2, K, generator=g).to(DEV, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEV, torch.bfloat16)
    b = (0.1 * torch.randn(N, generator=g)).to(DEV, torch.bfloat16)
    qw, sw = quantize_fp8_rowwise(w)
    sw = sw.reshape(-1)
    qa, sa = on_cpu(F.quantize_fp8_reference, x.reshape(M, K), "row")
    exact = on_cpu(F.fp8_gemm_reference, qa, sa, qw, sw, bias=b, out_dtype=None, compute_dtype=torch.float64)
    for path in ("triton", "scaled_mm", "bf16"):
        fp8_table([({}, path)])
        assert fp8_linear_path(M, K, N, DEV, has_bf16_weight=True) == path
        y = fp8_linear_dispatch(x, qw, sw, b, bf16_weight=w)
        assert y.shape == (2, M // 2, N) and y.dtype == torch.bfloat16
        if path == "bf16":
            torch.testing.assert_close(y, TF.linear(x, w, b))
        else:                                   # the same FP8 products, bf16 output
            assert sqnr_db(exact, y.reshape(M, N)) >= GEMM_BF16_DB


def test_float8_linear_says_its_path(fp8_table):
    from dz_kernels.quant import Float8Linear

    lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    q = Float8Linear.from_linear(lin)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert q.path_for(x) == "triton"
    fp8_table([({}, "bf16")])
    assert q.path_for(x) == "triton"                 # nothing kept: from_linear alone holds no bf16 weight
    q._original = (lin,)
    assert q.path_for(x) == "bf16"


def test_splitk_kernel_compiles_for_hopper():
    """The split-K kernel's GPU path compiles for sm_90 with Triton's ptxas and reaches the bf16 tensor cores."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}       # compiled kernels (dz_kernels interprets by default here)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "dz_kernels.quant._aot", "nvfp4_w4a16_splitk_sm90"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("bf16" in i for i in found["nvfp4_w4a16_splitk_sm90"]), found
