"""The training step of DreamZero: flow matching with teacher forcing (docs/reference.md#training).

One step, for a batch of clips of K chunks (F = 1 + K*n latent frames, n = frames per chunk, A action tokens and S
state tokens per chunk):

1. noise levels, from the scheduler's 1000-entry noise-first table (model/dreamzero/schedulers.py):
   - video: one table index per latent frame block; the first frame draws its own index, and every frame of chunk k
     takes the index of the chunk's first frame (the release draws [B, F] and copies within each block);
   - ``mode="base"``: video indices uniform; the actions of chunk k take chunk k's video index (coupled);
   - ``mode="flash"`` (DreamZero-Flash): video index = (1 - r) * 1000 with r ~ Beta(a, b) (7, 1 by default), so
     sigma is mostly > 0.9 (mostly very noisy video); action indices uniform and independent of the video.
2. the teacher-forcing sequence: the clean latents (t = 0) as the clean half, ``x_t = (1 - sigma) x0 + sigma noise``
   (every noisy frame, the first included) as the noisy half, noisy actions and the (clean) state, one layout
   ``model.layout("train", num_chunks=K)``; both halves carry the same I2V conditioning (mask + first-frame latent).
3. targets ``noise - x0``; loss = mean over (B, F) of the per-frame video MSE (mean over C, H, W) times the table's
   training weight of its index, plus the mean over (B, K*A) of the per-token action MSE (mean over the padded action
   dims, the padding masked to 0) times its weight, with the action term of clips without actions
   (``has_action`` False: human videos, another robot's videos) masked to 0. This is the release's loss exactly.

Randomness: the noise levels and noises of clip i are drawn from generators seeded by ``sample_seed(seed, step, i)``
where i is the clip's position in the global batch, so a step draws the same numbers on one rank or on many, and a
resumed run draws the same numbers as an uninterrupted one (no RNG state is needed for that).
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..config import DreamZeroConfig
from ..layout import SequenceLayout
from ..schedulers import FlowMatchTrainingSchedule, TrainingDraw

__all__ = [
    "NoiseConfig", "Batch", "StepNoise", "LossOutput", "sample_seed", "sample_timesteps", "draw_noise",
    "flow_matching_loss", "forward_flops", "training_flops", "tokens_per_clip",
]

NOISE_MODES = ("flash", "base")


@dataclass(frozen=True)
class NoiseConfig:
    """How the noise levels of a step are drawn.

    mode: "flash" (DreamZero-Flash: video index (1 - r) * T, r ~ Beta(beta_a, beta_b); actions uniform, independent)
          or "base" (video uniform; each action chunk takes its video block's index).
    beta_a, beta_b: the Beta of the Flash video noise ratio (7, 1: mean 0.875; the release's switch uses 3, 1).
    """
    mode: str = "flash"
    beta_a: float = 7.0
    beta_b: float = 1.0

    def __post_init__(self):
        if self.mode not in NOISE_MODES:
            raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {self.mode!r}")
        for name in ("beta_a", "beta_b"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")


@dataclass
class Batch:
    """A batch of training clips (B clips of K chunks, F = 1 + K*n latent frames of h x w).

    latents      [B, 16, F, h, w]          clean VAE latents of the clip (frame 0 = the first image)
    cond         [B, 20, F, h, w]          I2V conditioning: 4 mask channels (1 on frame 0) + first-frame latent
    text         [B, text_len, text_dim]   umT5 features of the instruction
    clip         [B, clip_tokens, clip_dim] CLIP features of the first frame
    actions      [B, K*A, action_dim]      normalized actions in [-1, 1], zero-padded to action_dim
    action_mask  [B, K*A, action_dim]      bool, True on the real action dims
    state        [B, K*S, state_dim]       normalized state, zero-padded
    has_action   [B] bool                  False for video-only clips (their action loss is masked out)
    embodiment   [B] int64                 the embodiment slot of each clip
    """
    latents: torch.Tensor
    cond: torch.Tensor
    text: torch.Tensor
    clip: torch.Tensor
    actions: torch.Tensor
    action_mask: torch.Tensor
    state: torch.Tensor
    has_action: torch.Tensor
    embodiment: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_frames(self) -> int:
        return self.latents.shape[2]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in dataclasses.fields(self)})

    def validate(self, cfg: DreamZeroConfig) -> int:
        """Check shapes and dtypes against the model config; returns K (chunks per clip)."""
        B = self.batch_size
        lat = self.latents
        if lat.dim() != 5 or lat.shape[1] != cfg.latent_channels or tuple(lat.shape[3:]) != (cfg.latent_height,
                                                                                          cfg.latent_width):
            raise ValueError(f"latents have shape {list(lat.shape)}, expected [B, {cfg.latent_channels}, F, "
                             f"{cfg.latent_height}, {cfg.latent_width}]")
        Fr = lat.shape[2]
        if (Fr - 1) % cfg.frames_per_chunk or Fr < 1 + cfg.frames_per_chunk:
            raise ValueError(f"latents have {Fr} frames; a clip has 1 + K*{cfg.frames_per_chunk} (K >= 1)")
        K = (Fr - 1) // cfg.frames_per_chunk
        A, S = K * cfg.actions_per_chunk, K * cfg.states_per_chunk
        want = {
            "cond": (B, cfg.cond_channels, Fr, cfg.latent_height, cfg.latent_width),
            "text": (B, cfg.text_len, cfg.text_dim),
            "clip": (B, cfg.clip_tokens, cfg.clip_dim),
            "actions": (B, A, cfg.action_dim),
            "action_mask": (B, A, cfg.action_dim),
            "state": (B, S, cfg.state_dim),
            "has_action": (B,),
            "embodiment": (B,),
        }
        for name, shape in want.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"batch.{name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"batch.{name} has shape {list(t.shape)}, expected {list(shape)}")
        for name in ("latents", "cond", "text", "clip", "actions", "state"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"batch.{name} must be floating point, got {getattr(self, name).dtype}")
        if self.action_mask.dtype != torch.bool or self.has_action.dtype != torch.bool:
            raise TypeError("batch.action_mask and batch.has_action must be bool tensors")
        if self.embodiment.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"batch.embodiment must be an integer tensor, got {self.embodiment.dtype}")
        return K


class StepNoise(NamedTuple):
    """Everything random in one step: video draw [B, F], action draw [B, K*A], and the two noises."""
    video: TrainingDraw
    action: TrainingDraw
    video_noise: torch.Tensor     # [B, 16, F, h, w]
    action_noise: torch.Tensor    # [B, K*A, action_dim]


class LossOutput(NamedTuple):
    loss: torch.Tensor            # scalar, video + action
    video_loss: torch.Tensor      # scalar, weighted
    action_loss: torch.Tensor     # scalar, weighted and masked


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for clip `index` of the global batch of optimizer step `step` (stable across ranks/resumes)."""
    h = hashlib.blake2b(struct.pack("<qqq", int(seed), int(step), int(index)), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def sample_timesteps(schedule: FlowMatchTrainingSchedule, batch: int, num_chunks: int, frames_per_chunk: int,
                     actions_per_chunk: int, noise: NoiseConfig, generator: torch.Generator | None = None
                     ) -> tuple[TrainingDraw, TrainingDraw]:
    """Draw the table indices of a step (on the CPU): video [batch, 1 + K*n], action [batch, K*A].

    Video: one index per frame drawn (uniform, or Flash's Beta), then every frame of chunk k takes the index of the
    chunk's first frame; frame 0 keeps its own. Actions: base mode copies chunk k's video index to its A actions;
    Flash draws them uniformly and independently.
    """
    F_ = 1 + num_chunks * frames_per_chunk
    shape = (batch, F_)
    if noise.mode == "flash":
        v = schedule.sample_flash(shape, a=noise.beta_a, b=noise.beta_b, generator=generator)
    else:
        v = schedule.sample_uniform(shape, generator=generator)
    idx = v.index.clone()
    blocks = idx[:, 1:].view(batch, num_chunks, frames_per_chunk)
    blocks[:, :, 1:] = blocks[:, :, :1]
    video = schedule.draw(idx)
    if noise.mode == "flash":
        action = schedule.sample_uniform((batch, num_chunks * actions_per_chunk), generator=generator)
    else:
        per_chunk = blocks[:, :, 0]                                           # [B, K]
        action = schedule.draw(per_chunk.repeat_interleave(actions_per_chunk, dim=1))
    return video, action


def draw_noise(schedule: FlowMatchTrainingSchedule, batch: Batch, cfg: DreamZeroConfig, noise: NoiseConfig,
               seeds: Sequence[int]) -> StepNoise:
    """Noise levels and noises of a step, clip by clip from `seeds` (one per clip, see `sample_seed`).

    Indices are drawn on the CPU (a generator per clip), the noises on the batch's device (a second generator per
    clip, on that device), so a clip gets the same numbers wherever it lands.
    """
    B, K = batch.batch_size, batch.validate(cfg)
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {B}")
    dev = batch.latents.device
    vids, acts, vnoise, anoise = [], [], [], []
    lat_shape = (1,) + tuple(batch.latents.shape[1:])
    act_shape = (1,) + tuple(batch.actions.shape[1:])
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        v, a = sample_timesteps(schedule, 1, K, cfg.frames_per_chunk, cfg.actions_per_chunk, noise, g)
        vids.append(v)
        acts.append(a)
        gd = torch.Generator(device=dev).manual_seed(int(s) ^ 0x5DEECE66D)
        vnoise.append(torch.randn(lat_shape, generator=gd, device=dev, dtype=torch.float32))
        anoise.append(torch.randn(act_shape, generator=gd, device=dev, dtype=torch.float32))
    cat = lambda draws: TrainingDraw(*(torch.cat([getattr(d, f) for d in draws]).to(dev)  # noqa: E731
                                       for f in TrainingDraw._fields))
    return StepNoise(cat(vids), cat(acts), torch.cat(vnoise).to(batch.latents.dtype),
                     torch.cat(anoise).to(batch.actions.dtype))


def flow_matching_loss(model, batch: Batch, schedule: FlowMatchTrainingSchedule, noise: StepNoise,
                       layout: SequenceLayout | None = None,
                       autocast_dtype: torch.dtype | None = None) -> LossOutput:
    """The training loss of one batch (see the module doc). `model` is a DreamZero (or its FSDP-wrapped self).

    autocast_dtype: run the model under torch.autocast with this dtype (bf16 on GPU); the loss is computed in fp32.
    """
    cfg = model.cfg
    K = batch.validate(cfg)
    if layout is None:
        layout = model.layout("train", num_chunks=K)
    x0 = batch.latents
    # the table's sigma per (clip, frame), broadcast over channels and space: x_t = (1 - sigma) x0 + sigma noise
    noisy = schedule.add_noise(x0.transpose(1, 2), noise.video_noise.transpose(1, 2), noise.video.sigma.to(x0.dtype)
                               ).transpose(1, 2)
    target_v = schedule.velocity_target(x0, noise.video_noise)
    a0 = batch.actions
    noisy_a = schedule.add_noise(a0, noise.action_noise, noise.action.sigma.to(a0.dtype))
    target_a = schedule.velocity_target(a0, noise.action_noise)

    ctx = (torch.autocast(device_type=x0.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else _nullcontext())
    with ctx:
        pred_v, pred_a = model(layout, clean=x0, clean_cond=batch.cond, noisy=noisy, noisy_cond=batch.cond,
                               t_video=noise.video.timestep, actions=noisy_a, t_action=noise.action.timestep,
                               state=batch.state, embodiment=batch.embodiment, text=batch.text, clip=batch.clip)
    if pred_v.shape != target_v.shape:
        raise RuntimeError(f"the model's video velocity {list(pred_v.shape)} does not match the target "
                           f"{list(target_v.shape)}")
    w_v = schedule.weight(noise.video.index)                                              # [B, F]
    per_frame = F.mse_loss(pred_v.float(), target_v.float(), reduction="none").mean(dim=(1, 3, 4))
    video_loss = (per_frame * w_v).mean()
    w_a = schedule.weight(noise.action.index)                                             # [B, K*A]
    mask = batch.action_mask & batch.has_action[:, None, None]
    per_tok = (F.mse_loss(pred_a.float(), target_a.float(), reduction="none") * mask).mean(dim=2)
    action_loss = (per_tok * w_a).mean()
    return LossOutput(video_loss + action_loss, video_loss, action_loss)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ FLOPs
def tokens_per_clip(cfg: DreamZeroConfig, num_chunks: int) -> int:
    """Query tokens of one teacher-forcing sequence (15,940 at droid-14b, K = 4)."""
    return model_layout(cfg, num_chunks).q_len


def model_layout(cfg: DreamZeroConfig, num_chunks: int) -> SequenceLayout:
    from ..layout import layout_for_config
    return layout_for_config(cfg, "train", num_chunks=num_chunks)


def forward_flops(cfg: DreamZeroConfig, num_chunks: int, batch: int = 1) -> int:
    """Matmul FLOPs of one training forward (2 per multiply-add), the visible part of the attention only.

    Counts, per clip: the per-token time embedding and projection (every token has its own timestep), the patch
    embedding, text/image context embeddings and their cross-attention k/v, every block's q/k/v/o, cross q/o, FFN,
    the masked self-attention (the layout's visible pairs), the cross-attention, the head and the action/state
    modules. Element-wise work (norms, RoPE, modulation) is left out, as MFU conventions do.
    """
    lay = model_layout(cfg, num_chunks)
    C, Fd, L = cfg.dim, cfg.ffn_dim, lay.q_len
    ctx = cfg.text_len + cfg.clip_tokens
    nv = lay.part("noisy_video").length
    video_tokens = nv + lay.part("clean_video").length
    n_act = lay.part("action").length
    n_state = lay.part("state").length
    f = 0
    f += 2 * L * (cfg.freq_dim * C + C * C + C * 6 * C)                       # time embedding + projection
    f += 2 * video_tokens * cfg.in_channels * 4 * C                           # patch embedding (1x2x2)
    f += 2 * cfg.text_len * (cfg.text_dim * C + C * C)                        # text embedding MLP
    f += 2 * cfg.clip_tokens * (cfg.clip_dim * cfg.clip_dim + cfg.clip_dim * C)  # MLPProj (2 linears)
    per_block = 0
    per_block += 2 * L * C * C * 4                                            # self q, k, v, o
    per_block += 2 * L * C * C * 2                                            # cross q, o
    per_block += 2 * ctx * C * C * 2                                          # cross k, v (text) + k_img, v_img
    per_block += 2 * L * C * Fd * 2                                           # FFN
    per_block += lay.attention_flops(1, cfg.num_heads, cfg.head_dim)          # masked self-attention
    per_block += 4 * L * ctx * C                                              # cross-attention (text + image)
    f += cfg.num_layers * per_block
    f += 2 * nv * C * cfg.latent_channels * 4                                 # head
    f += 2 * n_act * (cfg.action_dim * C + 2 * C * C + C * C)                 # action encoder W1, W2, W3
    f += 2 * n_state * (cfg.state_dim * cfg.head_hidden + cfg.head_hidden * C)  # state encoder
    f += 2 * n_act * (C * cfg.head_hidden + cfg.head_hidden * cfg.action_dim)  # action decoder
    return int(f * batch)


def training_flops(cfg: DreamZeroConfig, num_chunks: int, batch: int = 1) -> int:
    """Model FLOPs of one training step: forward + backward = 3x the forward (activation recomputation of
    gradient checkpointing is not counted, as MFU conventions do)."""
    return 3 * forward_flops(cfg, num_chunks, batch)
