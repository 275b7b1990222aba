"""Shared set-up of the model-level benches: a DreamZero with random weights at the real shapes (CUDA, bf16) or the
tiny config (CPU), its episode inputs, and the switches that put our kernels into the model and take them out."""
from __future__ import annotations

import contextlib

import torch

from dreamzero.backend import Ops
from dreamzero.compiled import compiled_backend, uncompile_blocks
from dreamzero.config import get_config, tiny_config
from dreamzero.dreamzero import DreamZero
from dz_bench.harness import Unavailable

_MODELS: dict = {}


def bench_config(ctx, name: str = "droid-14b"):
    """The preset `name`, or on small runs the tiny variant of its backbone ('tiny' or 'tiny-ti2v')."""
    return tiny_config(name, num_embodiments=1) if ctx.small else get_config(name)


def random_model(ctx, name: str = "droid-14b", num_layers: int | None = None) -> DreamZero:
    """A DreamZero with random weights (Wan's init), bf16 on CUDA, fp32 on CPU; cached per (shape, layers)."""
    cfg = bench_config(ctx, name)
    if num_layers is not None:
        cfg = cfg.replace(num_layers=num_layers)
    key = (cfg, ctx.device)
    if key not in _MODELS:
        _MODELS.clear()
        dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
        with torch.device("meta"):
            m = DreamZero(cfg)
        m = m.to(dtype=dtype).to_empty(device=ctx.device)
        torch.manual_seed(0)
        with torch.no_grad():
            m.init_weights()                      # every parameter (the memory of to_empty is garbage)
            m.head.head.weight.normal_(0, 0.02)   # Wan zeroes the head; a live head keeps the outputs varied
        m.eval().requires_grad_(False)
        _MODELS[key] = m
    return _MODELS[key]


def last_chunk_before_reset(cfg) -> int:
    """The last chunk the release's reset rule lets the cache reach (its start frame is below local_attn_size):
    chunk 4 at the DROID shape (6160 cached keys while denoising), chunk 3 for the tiny config."""
    return (cfg.local_attn_size - 2) // cfg.frames_per_chunk + 1


def episode_inputs(model, batch: int = 1, seed: int = 0) -> dict:
    cfg = model.cfg
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.latent_height, cfg.latent_width

    def r(*shape):
        return torch.randn(*shape, generator=g).to(p.device, p.dtype)

    return dict(text=r(batch, cfg.text_len, cfg.text_dim), clip=r(batch, cfg.clip_tokens, cfg.clip_dim),
                first=r(batch, cfg.latent_channels, 1, H, W),
                obs=[r(batch, cfg.latent_channels, cfg.frames_per_chunk, H, W) for _ in range(cfg.max_chunks)],
                state=r(batch, cfg.states_per_chunk, cfg.state_dim))


def sdpa_backend(ctx, which: str | None):
    """A context manager forcing an SDPA backend ('flash', 'cudnn', 'efficient', 'math') on CUDA; no-op elsewhere."""
    if which is None or ctx.device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[which]])


class ModelState:
    """Puts the model into one configuration and back: backend ops, compiled blocks (replaced by torch.compile
    wrappers, or compiled in place by dreamzero.compiled), quantized linears."""

    def __init__(self, model):
        self.model = model
        self.blocks = list(model.blocks)
        self.undo = []

    def restore(self) -> None:
        m = self.model
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
        compiled = compiled_backend(m) is not None or any(a is not b for a, b in zip(m.blocks, self.blocks))
        uncompile_blocks(m)
        for i, blk in enumerate(self.blocks):
            m.blocks[i] = blk
        m.ops = Ops()
        if compiled:            # the last configuration's graphs (and what their guards hold) go with it
            torch._dynamo.reset()

    def use_kernels(self, attention: bool = True, fused: bool = True, ctx=None) -> None:
        try:
            from dz_kernels import apply_, ApplyConfig
        except ImportError as e:
            raise Unavailable(f"dz_kernels.apply_ is not available: {e}")
        handle = apply_(self.model, ApplyConfig(attention=attention, norms=fused, kv_cache=fused))
        self.undo.append(handle.undo)

    def quantize(self, fmt: str) -> None:
        try:
            from dz_kernels.quant import quantize_, dequantize_, Float8DynamicActivationFloat8Weight
        except ImportError as e:
            raise Unavailable(f"dz_kernels.quant is not available: {e}")
        if fmt != "fp8":
            raise Unavailable(f"{fmt} is not benchmarked on this device")
        quantize_(self.model, Float8DynamicActivationFloat8Weight())
        self.undo.append(lambda: dequantize_(self.model))
