"""Shared pieces of the layout-attention tests (`from attention_cases import ...`; tests/ is on sys.path as the
rootdir of conftest.py): the small layouts, the tile configs, the inputs, and the forward and backward checks.

Every check runs on the device of tests/conftest.py (CUDA when present, else the CPU under the Triton interpreter),
whose autouse fixture poisons every kernel output with NaN: inputs are drawn on the CPU and moved there; the float64
oracle (dz_kernels.attention.reference) runs on the CPU.

Precision bar (FlashAttention's tests): the kernel's max error against float64 is at most 2x the error of the same
computation done by plain PyTorch in the inputs' dtype, plus an atol of twice the rounding error of values of that
size in that dtype; fp32 inputs get the same bar against PyTorch's fp32 computation."""
import torch
from conftest import DEVICE

from dreamzero.layout import inference_layout, train_layout
from dz_kernels.attention import TileConfig, layout_attention, layout_attention_reference
from dz_kernels.testing import assert_within_lowp_bar

SMALL = TileConfig(fwd=(16, 16), dkv=(16, 32), dq=(32, 16), fwd_warps=4, fwd_stages=1, bwd_warps=4, bwd_stages=1)
WIDE = TileConfig(fwd=(32, 64), dkv=(64, 16), dq=(16, 64), fwd_warps=4, fwd_stages=1, bwd_warps=4, bwd_stages=1)

LAYOUTS = {
    # training: binding window (chunk 3 no longer sees frames 1-2), 3-token action blocks, 1-token states, 82 tokens
    "train-5-w3": lambda: train_layout(5, 2, 3, 1, 3, 3),
    # 24-token action blocks, 7-token frames: 120 tokens
    "train-7-a24": lambda: train_layout(7, 2, 24, 1, 2, -1),
    # inference with a cache whose frames 1-2 fall out of the window (keys nobody sees), consistent rule
    "denoise-w3": lambda: inference_layout(5, 2, 3, 1, "denoise", 3, (0, 1, 2, 3, 4), 3, "consistent"),
    # the control step: observed chunk 2 written + chunk 3 denoised in one call, against the cache
    "control-7": lambda: inference_layout(7, 2, 24, 1, "control", 3, (0, 1, 2), -1, "release"),
    # 13-token frames, one frame per chunk, window 2
    "train-13-w2": lambda: train_layout(13, 1, 3, 1, 3, 2),
}


def make_qkv(layout, B, H, D, dtype, seed=0, requires_grad=False, device=DEVICE):
    """q, k, v drawn on the CPU (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, layout.q_len, H, D, generator=g).to(dtype)
    k = torch.randn(B, layout.k_len, H, D, generator=g).to(dtype)
    v = torch.randn(B, layout.k_len, H, D, generator=g).to(dtype)
    return [t.to(device).requires_grad_(requires_grad) for t in (q, k, v)]


def leaves64(*ts):
    """Detached float64 CPU copies that require grad: the inputs of the float64 oracle."""
    return [t.detach().cpu().double().requires_grad_() for t in ts]


def torch_lowp(q, k, v, mask, scale=None):
    """Plain PyTorch attention in the inputs' own dtype: the error baseline of the precision bar."""
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * s
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def bar_atol(ref64, dtype):
    """FlashAttention's atol: twice the rounding error of values of this size in this dtype,
    2 * max |(ref + 0.3 - 0.3) - ref| (flash-attention's tests), plus 1e-6."""
    r = ref64.detach().to(dtype)
    return 2 * ((r + 0.3 - 0.3) - r).abs().max().item() + 1e-6


def check_forward(layout, B, H, D, dtype, config, scale=None):
    q, k, v = make_qkv(layout, B, H, D, dtype)
    mask = layout.dense_mask()
    out = layout_attention(q, k, v, layout, scale, config=config)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref = layout_attention_reference(*leaves64(q, k, v), layout, scale).detach()
    low = torch_lowp(q, k, v, mask.to(q.device), scale).cpu()
    assert_within_lowp_bar(out.cpu(), ref, low, atol=bar_atol(ref, dtype), name="out")
    return q, k, v, out


def check_backward(layout, B, H, D, dtype, config, deterministic, scale=None):
    q, k, v = make_qkv(layout, B, H, D, dtype, requires_grad=True)
    mask = layout.dense_mask()
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(B, layout.q_len, H, D, generator=g).to(dtype)
    out = layout_attention(q, k, v, layout, scale, deterministic, config=config)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(q.device))
    q64, k64, v64 = leaves64(q, k, v)
    ref = layout_attention_reference(q64, k64, v64, layout, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    low = torch_lowp(q, k, v, mask.to(q.device), scale)
    low_grads = [t.cpu() for t in torch.autograd.grad(low, (q, k, v), dout.to(q.device))]
    assert_within_lowp_bar(out.cpu(), ref, low.cpu(), atol=bar_atol(ref, dtype), name="out")
    for name, got, want, base in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert got.shape == want.shape and got.dtype == dtype and got.device == q.device
        assert_within_lowp_bar(got.cpu(), want, base, atol=bar_atol(want, dtype), name=name)
    return [t.cpu() for t in grads]
