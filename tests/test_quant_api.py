"""quantize_ / dequantize_ / calibrate_ and the ModelOpt checkpoint layout (modelopt_io), end to end on a tiny model.

End-to-end bars: output SQNR of the quantized tiny model against its bf16 output (three Linears, Gaussian data):
    FP8 row / block                >= 20 dB   (about 25 dB measured)
    NVFP4 weight-only (W4A16)      >= 12 dB   (about 16 dB)
    NVFP4 W4A4                     >= 10 dB   (about 13-14 dB)
dequantize_ must then give back bit-identical outputs. The tiny model runs on the suite's device (tests/conftest.py):
on CUDA the quantized modules run the Triton kernels, on a CPU the plain-PyTorch references (the kernels themselves
run in the interpreter in test_quant_fp8.py / test_quant_nvfp4.py); the GPU-only test at the end holds the CUDA
forward against the CPU references.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

from dz_kernels.quant import (
    Float8BlockScaled, Float8DynamicActivationFloat8Weight, Float8Linear, NVFP4, NVFP4Linear, NVFP4WeightOnly,
    calibrate_, default_filter, dequantize_, quantize_,
)
from dz_kernels.quant import reference as F
from dz_kernels.quant import modelopt_io as mio
from dz_kernels.testing import sqnr_db

from conftest import DEVICE, requires_cuda

E2E_DB = {"Float8DynamicActivationFloat8Weight": 20.0, "Float8BlockScaled": 20.0, "NVFP4WeightOnly": 12.0,
          "NVFP4": 10.0}
CONFIGS = [Float8DynamicActivationFloat8Weight(), Float8BlockScaled(), NVFP4WeightOnly(), NVFP4()]


class TinyNet(nn.Module):
    """Named like the DreamZero DiT: patch_embedding and head (kept bf16 by default), quantizable blocks."""

    def __init__(self, d_in=48, d=256, ffn=384, d_out=64):
        super().__init__()
        self.patch_embedding = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([
            nn.ModuleDict({"attn_o": nn.Linear(d, d), "ffn": nn.Sequential(nn.Linear(d, ffn), nn.GELU("tanh"),
                                                                           nn.Linear(ffn, d))})
            for _ in range(2)])
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.patch_embedding(x)
        for blk in self.blocks:
            h = h + blk["attn_o"](h)
            h = h + blk["ffn"](h)
        return self.head(h)


def _model_and_input(seed=0, device=DEVICE):
    torch.manual_seed(seed)
    m = TinyNet().to(torch.bfloat16).eval()
    x = torch.randn(2, 37, 48, dtype=torch.bfloat16)
    return m.to(device), x.to(device)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_quantize_end_to_end_and_undo(config):
    m, x = _model_and_input()
    with torch.no_grad():
        ref = m(x)
        quantize_(m, config)
        kinds = {n: type(mod).__name__ for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, Float8Linear,
                                                                                          NVFP4Linear))}
        assert kinds["patch_embedding"] == "Linear" and kinds["head"] == "Linear"
        quant_type = "Float8Linear" if "Float8" in type(config).__name__ else "NVFP4Linear"
        assert kinds["blocks.0.attn_o"] == quant_type and kinds["blocks.1.ffn.2"] == quant_type
        y = m(x)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert sqnr_db(ref, y) >= E2E_DB[type(config).__name__]
        assert not torch.equal(y, ref)
        dequantize_(m)
        assert all(type(mod) is nn.Linear for n, mod in m.named_modules() if n.endswith(("attn_o", "ffn.0", "ffn.2")))
        assert torch.equal(m(x), ref)


def test_irreversible_quantize_dequantizes_weights():
    m, x = _model_and_input()
    with torch.no_grad():
        w0 = m.blocks[0]["attn_o"].weight.clone()
        quantize_(m, Float8DynamicActivationFloat8Weight(), reversible=False)
        assert m.blocks[0]["attn_o"]._original is None
        y = m(x)
        dequantize_(m)
        lin = m.blocks[0]["attn_o"]
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.bfloat16
        assert sqnr_db(w0, lin.weight) >= 28.0
        assert sqnr_db(y, m(x)) >= 30.0  # same weights as the quantized model, only activation quantization left


def test_filter_and_default_filter():
    m, x = _model_and_input()
    quantize_(m, NVFP4WeightOnly(), filter_fn=lambda mod, name: name.endswith("attn_o"))
    assert isinstance(m.blocks[0]["attn_o"], NVFP4Linear) and type(m.blocks[0]["ffn"][0]) is nn.Linear
    lin = nn.Linear(16, 16)
    assert default_filter(lin, "blocks.3.ffn.0")
    for name in ("patch_embedding", "head", "action_encoder.W1", "state_encoder.0", "action_decoder.1",
                 "text_embedding.0", "img_emb.proj.1", "time_embedding.2", "time_projection.1", "model.head.head"):
        assert not default_filter(lin, name), name
    assert not default_filter(nn.Conv1d(4, 4, 1), "blocks.0.conv")


def test_quantize_errors_leave_model_unchanged():
    m = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 100))  # K = 64: not a multiple of 128
    with pytest.raises(ValueError, match=r"module '1'.*multiple of 128"):
        quantize_(m, Float8BlockScaled())
    assert type(m[0]) is nn.Linear  # checked before anything was replaced
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_(nn.Sequential(nn.Linear(40, 8)), NVFP4())
    with pytest.raises(TypeError, match="config must be"):
        quantize_(m, "fp8")
    with pytest.raises(ValueError, match="wrap"):
        quantize_(nn.Linear(16, 16), NVFP4())
    q = quantize_(nn.Sequential(nn.Linear(32, 16)), NVFP4WeightOnly())[0]
    with pytest.raises(ValueError, match="in_features=32"):
        q(torch.randn(3, 48))
    with pytest.raises(TypeError, match="dtype"):
        q(torch.ones(3, 32, dtype=torch.int32))


def test_quantized_module_buffers_and_state_dict_layout():
    m = nn.Sequential(nn.Linear(256, 200)).to(torch.bfloat16)
    quantize_(m, Float8BlockScaled())
    sd = m.state_dict()
    assert sd["0.weight"].dtype == torch.float8_e4m3fn and sd["0.weight"].shape == (200, 256)
    assert sd["0.weight_scale"].shape == (2, 2) and sd["0.bias"].dtype == torch.bfloat16
    m2 = nn.Sequential(nn.Linear(256, 200)).to(torch.bfloat16)
    quantize_(m2, NVFP4())
    sd2 = m2.state_dict()
    assert sd2["0.weight"].dtype == torch.uint8 and sd2["0.weight"].shape == (200, 128)
    assert sd2["0.weight_scale"].dtype == torch.float8_e4m3fn and sd2["0.weight_scale"].shape == (200, 16)
    assert sd2["0.weight_scale_2"].shape == () and "0.input_scale" not in sd2


@pytest.mark.parametrize("config", [Float8BlockScaled(), NVFP4()], ids=lambda c: type(c).__name__)
def test_dtype_casts_keep_quantized_storage(config):
    m, x = _model_and_input()
    with torch.no_grad():
        ref = m(x)
        quantize_(m, config)
        m.half()
        mod = m.blocks[0]["attn_o"]
        assert mod.weight.dtype in (torch.float8_e4m3fn, torch.uint8)
        assert mod.weight_scale.dtype in (torch.float32, torch.float8_e4m3fn)
        assert mod.bias.dtype == torch.float16
        y16 = m(x.half())
    assert y16.dtype == torch.float16 and sqnr_db(ref, y16) >= E2E_DB[type(config).__name__]


def test_calibrate_sets_static_input_scales():
    m, x = _model_and_input()
    with torch.no_grad():
        quantize_(m, NVFP4())
        amax = calibrate_(m, lambda mod: mod(x))
        # the first quantized layer sees the patch embedding's output: its amax, in unquantized numerics
        h = m.patch_embedding(x)
        assert amax["blocks.0.attn_o"] == h.abs().max().float().item()
        mod = m.blocks[0]["attn_o"]
        assert mod.input_scale.item() == pytest.approx(amax["blocks.0.attn_o"] / 2688.0, rel=1e-7)
        y = m(x)
        ref = _model_and_input()[0](x)
    assert sqnr_db(ref, y) >= E2E_DB["NVFP4"]


# ------------------------------------------------------------------------------------------------------- modelopt_io
# (file I/O and tensor layouts: on the CPU on every machine)
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def test_load_hand_made_nvfp4_checkpoint():
    torch.manual_seed(3)
    N, K = 24, 64
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # ModelOpt packing: even element in the low nibble
    scale = (torch.rand(N, K // 16) * 4 + 0.25).to(torch.float8_e4m3fn)
    tensors = {"blocks.0.attn_o.weight": packed, "blocks.0.attn_o.weight_scale": scale,
               "blocks.0.attn_o.weight_scale_2": torch.tensor(0.01), "blocks.0.attn_o.input_scale": torch.tensor(0.002),
               "blocks.0.attn_o.bias": torch.randn(N, dtype=torch.bfloat16)}
    mod = mio.linear_from_modelopt(tensors, "blocks.0.attn_o")
    assert isinstance(mod, NVFP4Linear) and mod.act_quant and mod.in_features == K and mod.out_features == N
    expect = _E2M1[codes.long()] * (scale.float().repeat_interleave(16, dim=1) * 0.01)
    assert torch.equal(mod.dequantized_weight(torch.float32), expect)
    x = torch.randn(5, K, dtype=torch.bfloat16)
    a, sa, ga = F.quantize_nvfp4_reference(x, torch.tensor(0.002))
    manual = (F.dequantize_nvfp4_reference(a, sa, ga) @ expect.t() + tensors["blocks.0.attn_o.bias"].float())
    assert torch.equal(mod(x), manual.to(torch.bfloat16))
    out = mio.linear_to_modelopt(mod, "blocks.0.attn_o")
    assert set(out) == set(tensors)
    for k in tensors:
        assert torch.equal(out[k].view(torch.uint8) if out[k].dtype == torch.float8_e4m3fn else out[k],
                           tensors[k].view(torch.uint8) if tensors[k].dtype == torch.float8_e4m3fn else tensors[k])


def test_load_hand_made_fp8_checkpoints():
    torch.manual_seed(4)
    N, K = 200, 256
    wq = (torch.randn(N, K) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    # per tensor (ModelOpt "FP8"): one weight scale, a static input scale
    mod = mio.linear_from_modelopt({"weight": wq, "weight_scale": torch.tensor([0.02]),
                                    "input_scale": torch.tensor(0.1)}, "")
    assert isinstance(mod, Float8Linear) and not mod.block_scaled and mod.bias is None
    assert torch.equal(mod.dequantized_weight(torch.float32), wq.float() * 0.02)
    assert mod.static_input_scale.item() == pytest.approx(0.1)
    # per channel ("FP8_PER_CHANNEL_PER_TOKEN")
    s = torch.rand(N) * 0.01 + 1e-3
    mod = mio.linear_from_modelopt({"weight": wq, "weight_scale": s}, "")
    assert torch.equal(mod.dequantized_weight(torch.float32), wq.float() * s[:, None])
    # 128x128 blocks ("fp8_pb_wo")
    sb = torch.rand(2, 2) * 0.01 + 1e-3
    mod = mio.linear_from_modelopt({"weight": wq, "weight_scale": sb}, "")
    assert mod.block_scaled
    assert torch.equal(mod.dequantized_weight(torch.float32),
                       wq.float() * sb.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1))
    x = torch.randn(3, K, dtype=torch.bfloat16)
    qa, sa = F.quantize_fp8_reference(x, "block1x128")
    assert torch.equal(mod(x), F.fp8_gemm_reference(qa, sa, wq, sb, block_scaled=True, out_dtype=torch.bfloat16))


def test_modelopt_checkpoint_errors():
    wq = torch.zeros(8, 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight_scale has shape"):
        mio.linear_from_modelopt({"weight": wq, "weight_scale": torch.ones(3)}, "")
    with pytest.raises(KeyError, match="weight_scale"):
        mio.linear_from_modelopt({"weight": wq}, "")
    with pytest.raises(ValueError, match=r"float8_e4m3fn \[N, K/16\]"):
        mio.linear_from_modelopt({"weight": torch.zeros(8, 16, dtype=torch.uint8), "weight_scale": torch.ones(8, 1),
                                  "weight_scale_2": torch.tensor(1.0)}, "")
    with pytest.raises(TypeError, match="not a ModelOpt"):
        mio.linear_from_modelopt({"weight": torch.zeros(8, 32), "weight_scale": torch.ones(8)}, "")
    with pytest.raises(ValueError, match="in_features"):
        mio.linear_from_modelopt({"weight": wq, "weight_scale": torch.ones(8)}, "", in_features=64)


@pytest.mark.parametrize("config", [Float8DynamicActivationFloat8Weight(), Float8BlockScaled(), NVFP4()],
                         ids=lambda c: type(c).__name__)
def test_save_and_load_round_trip(tmp_path, config):
    m, x = _model_and_input(device="cpu")
    with torch.no_grad():
        quantize_(m, config)
        if isinstance(config, NVFP4):
            calibrate_(m, lambda mod: mod(x))
        y = m(x)
        mio.save_modelopt(m, str(tmp_path))
        cfg = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
        expect_algo = {"Float8DynamicActivationFloat8Weight": "FP8_PER_CHANNEL_PER_TOKEN",
                       "Float8BlockScaled": "fp8_pb_wo", "NVFP4": "NVFP4"}[type(config).__name__]
        assert cfg["quant_algo"] == expect_algo
        assert cfg["exclude_modules"] == ["head", "patch_embedding"]
        tensors, qcfg = mio.read_modelopt(str(tmp_path))
        assert qcfg["quantization"]["quant_algo"] == expect_algo
        # different weights everywhere: everything must come from the file
        fresh, _ = _model_and_input(seed=1, device="cpu")
        replaced = mio.load_modelopt_(fresh, tensors)
        assert sorted(replaced) == sorted(n for n, mod in m.named_modules()
                                          if isinstance(mod, (Float8Linear, NVFP4Linear)))
        assert torch.equal(fresh(x), y)


def test_save_modelopt_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous files whole and nothing else (dz_kernels.atomic)."""
    import safetensors.torch as st

    m, _ = _model_and_input(device="cpu")
    with torch.no_grad():
        quantize_(m, Float8DynamicActivationFloat8Weight())
    mio.save_modelopt(m, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_write(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"\0" * 7)
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        mio.save_modelopt(m, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # and no temporary file left behind
    mio.read_modelopt(str(tmp_path))


def test_load_modelopt_strict_reports_missing_keys():
    m, _ = _model_and_input(device="cpu")
    quantize_(m, NVFP4WeightOnly())
    state, _ = mio.export_modelopt(m)
    state.pop("head.weight")
    with pytest.raises(KeyError, match="head.weight"):
        mio.load_modelopt_(_model_and_input(seed=2, device="cpu")[0], state)


# ---------------------------------------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_quantized_modules_on_cuda_match_cpu_references(config):
    m, x = _model_and_input(device="cpu")
    with torch.no_grad():
        ref = m(x)
        quantize_(m, config)
        y_cpu = m(x)
        mc = copy.deepcopy(m).cuda()
        y_gpu = mc(x.cuda()).cpu()
    assert sqnr_db(y_cpu, y_gpu) >= 30.0
    assert sqnr_db(ref, y_gpu) >= E2E_DB[type(config).__name__]
