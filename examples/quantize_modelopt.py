"""Quantize a DreamZero model to FP8 and to NVFP4 and save it in NVIDIA ModelOpt's checkpoint format.

    python examples/quantize_modelopt.py [--out DIR]

For each format: `dz_kernels.quant.quantize_` replaces the DiT's linears in place (the release keeps the patch
embedding, the head, the embeddings and the action/state modules in 16 bits, and so does the default filter);
NVFP4 (weights and activations) is calibrated with `calibrate_` ("max" calibration of the activations' global
scales, as the release's ModelOpt flow) on a sample forward; the model's outputs are compared with the unquantized
model's (SQNR, the measure for low-bit formats); `save_modelopt`
writes `model.safetensors` + `hf_quant_config.json` in ModelOpt's names and layouts (FP8: an E4M3 weight and a
per-channel scale; NVFP4: packed E2M1 pairs, an E4M3 scale per 16 values and a global FP32 scale); a fresh model
loads that folder with `load_modelopt_` and must give the same outputs bit for bit. On a GPU the quantized linears
run our Triton kernels; on a CPU their plain-PyTorch references (the same quantizer bits, the GEMM in float32). Real
checkpoints: the same calls on `dreamzero.checkpoint.load_model(<export folder>)`.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from dreamzero.config import get_config
from dreamzero.dreamzero import DreamZero
from dz_kernels.quant import (NVFP4, Float8DynamicActivationFloat8Weight, calibrate_, load_modelopt_, quantize_,
                              read_modelopt, save_modelopt)
from dz_kernels.testing import sqnr_db

FORMATS = {"fp8": Float8DynamicActivationFloat8Weight(), "nvfp4": NVFP4()}


def small_model(seed: int = 0) -> DreamZero:
    """The tiny config at width 128 (K a multiple of the 128-wide FP8 blocks and of NVFP4's 16), random weights."""
    torch.manual_seed(seed)
    model = DreamZero(get_config("tiny", dim=128, num_heads=8, ffn_dim=256, num_embodiments=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def teacher_forcing_inputs(model: DreamZero, seed: int = 1) -> tuple:
    """One training-layout forward's inputs (2 chunks): every part of the model runs."""
    cfg, K = model.cfg, 2
    g = torch.Generator().manual_seed(seed)
    F, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x = dict(clean=r(1, 16, F, H, W), clean_cond=r(1, 20, F, H, W), noisy=r(1, 16, F, H, W),
             noisy_cond=r(1, 20, F, H, W), t_video=torch.rand(1, F, generator=g) * 1000,
             actions=r(1, K * cfg.actions_per_chunk, cfg.action_dim),
             t_action=torch.rand(1, K * cfg.actions_per_chunk, generator=g) * 1000,
             state=r(1, K, cfg.state_dim), text=r(1, cfg.text_len, cfg.text_dim),
             clip=r(1, cfg.clip_tokens, cfg.clip_dim))
    return model.layout("train", num_chunks=K), x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for the checkpoints (default: a new temporary one)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = a.out or tempfile.mkdtemp(prefix="dz-quant-")
    model = small_model()
    layout, x = teacher_forcing_inputs(model)
    with torch.no_grad():
        video, action = model(layout, **x)
    for name, config in FORMATS.items():
        q = small_model()
        quantize_(q, config)
        if isinstance(config, NVFP4):
            with torch.no_grad():
                calibrate_(q, lambda m: m(layout, **x))        # static activation scales, saved as input_scale
        with torch.no_grad():
            qv, qa = q(layout, **x)
        folder = os.path.join(out, name)
        save_modelopt(q, folder)
        tensors, qcfg = read_modelopt(folder)
        fresh = small_model(seed=1)                      # other weights: everything must come from the folder
        replaced = load_modelopt_(fresh, tensors)
        with torch.no_grad():
            lv, la = fresh(layout, **x)
        assert torch.equal(lv, qv) and torch.equal(la, qa), f"{name}: the reloaded model differs"
        w = tensors["blocks.0.self_attn.q.weight"]
        print(f"{name}: {len(replaced)} linears quantized ({qcfg['quantization']['quant_algo']}); video SQNR "
              f"{sqnr_db(video, qv):.1f} dB, action SQNR {sqnr_db(action, qa):.1f} dB; saved {sorted(os.listdir(folder))}"
              f" (blocks.0.self_attn.q.weight {str(w.dtype).replace('torch.', '')} {list(w.shape)}); reloaded: "
              f"identical outputs")
        with open(os.path.join(folder, "hf_quant_config.json")) as f:
            assert json.load(f) == qcfg
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
