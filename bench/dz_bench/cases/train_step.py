"""train_step: one DreamZero training step (forward + backward of the flow-matching loss) of a 2-layer model at
droid-14b width over the full teacher-forcing sequence (K = 4 chunks: 15,940 tokens), batch 1, bf16 autocast with
fp32 weights, activation checkpointing per block (as the release trains).

The implementations differ only in the self-attention over the layout (model.ops.attention):
  "dz"            dz_kernels.attention.layout_attention (the fused block-sparse Triton kernel, forward + backward);
                  Unavailable when it does not import or the device is not CUDA (the CPU interpreter is for tests)
  "release-loop"  the release's loop: one SDPA call per group of query segments over a torch.cat of its keys
                  (dreamzero.attention.attention_blockwise, the model's reference)
  "flex"          torch's FlexAttention (compiled) with a BlockMask built from the layout's segment mask (CUDA only:
                  torch has no FlexAttention backward on the CPU)
flops = the model FLOPs of the step (3x the forward's matmul FLOPs, visible attention only; step.training_flops),
so TFLOP/s over the device's dense bf16 peak is the MFU; params carry the tokens per step (tokens/s =
tokens / median time) and that peak. `check` = |loss - the release-loop loss| on the same inputs and noise.
CPU (small): the tiny config, fp32, no checkpointing.
"""
from __future__ import annotations

import torch

from dz_bench.harness import Case, Unavailable, lazy, register
from dz_bench.peaks import dense_peak_flops

from ._flex import flex_attention_for


def _peak(ctx) -> float | None:
    """The device's dense bf16 peak in TFLOP/s (dz_bench.peaks), for the MFU parameter; None on a CPU."""
    if ctx.device != "cuda":
        return None
    flops = dense_peak_flops(torch.cuda.get_device_name(), "bf16")
    return None if flops is None else flops / 1e12


def _setup(ctx):
    from dreamzero.config import get_config
    from dreamzero.dreamzero import DreamZero
    from dreamzero.schedulers import FlowMatchTrainingSchedule
    from dreamzero.train.step import Batch, NoiseConfig, draw_noise, sample_seed

    if ctx.small:
        cfg, K, B, dtype, ckpt = get_config("tiny"), get_config("tiny").max_chunks, 1, None, False
    else:
        cfg, K, B, dtype, ckpt = get_config("droid-14b", num_layers=2), 4, 1, torch.bfloat16, True
    dev = torch.device(ctx.device)
    torch.manual_seed(0)
    with dev:                                  # initialize in place (a 1.1B-parameter model at droid width)
        model = DreamZero(cfg)
    model.train()
    model.gradient_checkpointing = ckpt
    Fr = cfg.num_frames(K)
    A, S = K * cfg.actions_per_chunk, K * cfg.states_per_chunk
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    batch = Batch(latents=r(B, cfg.latent_channels, Fr, cfg.latent_height, cfg.latent_width),
                  cond=r(B, cfg.cond_channels, Fr, cfg.latent_height, cfg.latent_width),
                  text=r(B, cfg.text_len, cfg.text_dim), clip=r(B, cfg.clip_tokens, cfg.clip_dim),
                  actions=r(B, A, cfg.action_dim).clamp(-1, 1),
                  action_mask=torch.ones(B, A, cfg.action_dim, dtype=torch.bool, device=dev),
                  state=r(B, S, cfg.state_dim), has_action=torch.ones(B, dtype=torch.bool, device=dev),
                  embodiment=torch.zeros(B, dtype=torch.long, device=dev))
    schedule = FlowMatchTrainingSchedule()
    noise = draw_noise(schedule, batch, cfg, NoiseConfig("flash"), [sample_seed(0, 0, i) for i in range(B)])
    layout = model.layout("train", num_chunks=K)
    return {"cfg": cfg, "K": K, "B": B, "dtype": dtype, "model": model, "base_ops": model.ops, "batch": batch,
            "schedule": schedule, "noise": noise, "layout": layout}


@register("train_step")
def cases(ctx):
    from dreamzero.attention import attention_blockwise
    from dreamzero.config import get_config
    from dreamzero.train.step import flow_matching_loss, tokens_per_clip, training_flops

    cfg = get_config("tiny") if ctx.small else get_config("droid-14b", num_layers=2)
    K = cfg.max_chunks if ctx.small else 4
    state = lazy(lambda: _setup(ctx))

    def step_fn(attention):
        s = state()
        model = s["model"]
        ops = s["base_ops"].replace(attention=attention)

        def run():
            model.ops = ops                      # the impls share one model; each call runs with its own attention
            model.zero_grad(set_to_none=True)
            out = flow_matching_loss(model, s["batch"], s["schedule"], s["noise"], s["layout"], s["dtype"])
            out.loss.backward()
            return out.loss.detach()
        return run

    ref_loss = lazy(lambda: float(step_fn(attention_blockwise)()))

    def dz():
        if ctx.device != "cuda":
            raise Unavailable("the fused layout attention runs on CUDA (the Triton interpreter is for tests)")
        try:
            from dz_kernels.attention import layout_attention
        except Exception as e:  # not built / not importable here
            raise Unavailable(f"dz_kernels.attention: {type(e).__name__}: {e}") from None
        return step_fn(layout_attention)

    def release_loop():
        return step_fn(attention_blockwise)

    def flex():
        if ctx.device != "cuda":
            raise Unavailable("FlexAttention has no backward on the CPU (torch raises NotImplementedError)")
        try:
            fn = flex_attention_for(state()["layout"], torch.device(ctx.device))
        except Exception as e:
            raise Unavailable(f"FlexAttention: {type(e).__name__}: {e}") from None
        return step_fn(fn)

    tokens = tokens_per_clip(cfg, K)
    yield Case(case=f"{cfg.name}-{cfg.num_layers}layers-k{K}",
               params={"config": cfg.name, "layers": cfg.num_layers, "dim": cfg.dim, "chunks": K, "batch": 1,
                       "tokens": tokens, "precision": "fp32" if ctx.small else "bf16-autocast",
                       "gradient_checkpointing": not ctx.small, "peak_tflops": _peak(ctx)},
               flops=training_flops(cfg, K, 1), bytes=None,
               impls={"dz": dz, "release-loop": release_loop, "flex": flex},
               check=lambda out: abs(float(out) - ref_loss()))
