"""quantize_ on the DreamZero model itself, with every config: the DiT linears are replaced (the release's bf16
modules are not), the teacher-forcing outputs stay within each format's documented SQNR bound, and dequantize_
restores the exact outputs. A tiny model at width 128 (so K is a multiple of the 128-wide FP8 blocks)."""
import pytest
import torch

from dreamzero.config import get_config
from dreamzero.dreamzero import DreamZero
from dz_kernels.quant import (NVFP4, Float8BlockScaled, Float8DynamicActivationFloat8Weight, NVFP4WeightOnly,
                              dequantize_, quantize_)
from dz_kernels.quant.api import QUANT_LINEAR_TYPES
from dz_kernels.testing import sqnr_db

# (config, minimum SQNR in dB of the model's video and action outputs against the unquantized model). Measured on
# this model: FP8 per-token 47/48, FP8 block 46/44, NVFP4 W4A16 36/35, NVFP4 W4A4 33/33; the bounds leave ~10 dB.
CONFIGS = [(Float8DynamicActivationFloat8Weight(), 35.0), (Float8BlockScaled(), 33.0), (NVFP4WeightOnly(), 25.0),
           (NVFP4(), 22.0)]


def model_and_inputs():
    cfg = get_config("tiny", dim=128, num_heads=8, ffn_dim=256, num_embodiments=1)
    torch.manual_seed(0)
    m = DreamZero(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    K, B = 2, 1
    F, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(clean=r(B, 16, F, H, W), clean_cond=r(B, 20, F, H, W), noisy=r(B, 16, F, H, W),
             noisy_cond=r(B, 20, F, H, W), t_video=torch.rand(B, F, generator=g) * 1000,
             actions=r(B, K * cfg.actions_per_chunk, cfg.action_dim),
             t_action=torch.rand(B, K * cfg.actions_per_chunk, generator=g) * 1000,
             state=r(B, K, cfg.state_dim), text=r(B, cfg.text_len, cfg.text_dim), clip=r(B, cfg.clip_tokens, cfg.clip_dim))
    return m, m.layout("train", num_chunks=K), x


@pytest.mark.parametrize("config,min_db", CONFIGS, ids=lambda c: type(c).__name__ if not isinstance(c, float) else "")
def test_quantize_dreamzero_with_every_config(config, min_db):
    m, lay, x = model_and_inputs()
    with torch.no_grad():
        v0, a0 = m(lay, **x)
        quantize_(m, config)
        quantized = {n for n, mod in m.named_modules() if isinstance(mod, QUANT_LINEAR_TYPES)}
        assert any(".self_attn.q" in n for n in quantized) and any(".ffn.2" in n for n in quantized)
        assert not any(n.startswith(("patch_embedding", "head", "text_embedding", "img_emb", "time_")) for n in quantized)
        v1, a1 = m(lay, **x)
        dequantize_(m)
        v2, a2 = m(lay, **x)
    assert sqnr_db(v0, v1) > min_db and sqnr_db(a0, a1) > min_db
    assert torch.equal(v2, v0) and torch.equal(a2, a0)
