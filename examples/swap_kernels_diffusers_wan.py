"""Swap our kernels into a diffusers Wan model and check its outputs against the unswapped model.

    python examples/swap_kernels_diffusers_wan.py [--i2v] [--layers 2]

A small random `diffusers.WanTransformer3DModel` (text-to-video, or image-to-video with --i2v; the real model comes
from `WanTransformer3DModel.from_pretrained(<Wan2.1 *-Diffusers folder>, subfolder="transformer")`) runs one
denoising forward; `dz_kernels.apply_` swaps in the fused attention processor and block forward (LayerNorm +
modulate, gated residuals, q/k RMSNorm, GELU); the same forward runs again and is compared with the first; `undo()`
restores diffusers' own classes and processors exactly. Float32 on both, so the outputs agree to 1e-4 (in bfloat16
compare each against a float64 run with dz_kernels.testing.assert_within_lowp_bar, as tests/test_apply_diffusers.py
does). On a CPU our Triton kernels run in Triton's interpreter (turned on by `import dz_kernels` when there is no
GPU, which is why it comes before diffusers, which imports triton): correct, not fast.
"""
from __future__ import annotations

import argparse

import dz_kernels  # first: on a machine without CUDA it turns Triton's CPU interpreter on before diffusers imports triton
import torch
from diffusers import WanTransformer3DModel
from dz_kernels.testing import sqnr_db


def small_wan(i2v: bool, layers: int, seed: int = 0) -> WanTransformer3DModel:
    kw = dict(in_channels=36, image_dim=20, added_kv_proj_dim=32) if i2v else dict(in_channels=16)
    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  out_channels=16, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=layers,
                                  rope_max_seq_len=32, **kw)
    with torch.no_grad():              # move every weight off its init (norm weights off 1, biases off 0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(i2v: bool, device, dtype, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_len = 512 if i2v else 7       # diffusers' I2V processor takes the last 512 context tokens as the text

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x = dict(hidden_states=r(1, 36 if i2v else 16, 3, 4, 6), timestep=torch.tensor([500.0], device=device),
             encoder_hidden_states=r(1, text_len, 24))
    if i2v:
        x["encoder_hidden_states_image"] = r(1, 5, 20)
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--i2v", action="store_true", help="the image-to-video variant (image cross-attention)")
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32
    model = small_wan(a.i2v, a.layers).to(device)
    x = inputs(a.i2v, device, dtype)
    with torch.no_grad():
        before = model(**x, return_dict=False)[0]
        handle = dz_kernels.apply_(model, dz_kernels.ApplyConfig(attention=True, norms=True, kv_cache=False))
        swapped = model(**x, return_dict=False)[0]
        handle.undo()
        after = model(**x, return_dict=False)[0]
    err = (swapped.float() - before.float()).abs().max().item()
    db = sqnr_db(before.float(), swapped.float())
    print(f"{'I2V' if a.i2v else 'T2V'} Wan, {a.layers} blocks, {device} {str(dtype).replace('torch.', '')}: output "
          f"{list(before.shape)}, max |swapped - diffusers| {err:.2e}, SQNR {db:.1f} dB")
    torch.testing.assert_close(swapped, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, before), "undo() did not restore diffusers' own forward"
    print("outputs match; undo() restored diffusers' model exactly")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
