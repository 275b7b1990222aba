"""Model configurations: the tiny test model and the real DreamZero shapes.

Every size the model, the layout, the KV cache and the benchmarks need comes from one `DreamZeroConfig`.
Sizes follow docs/reference.md#backbone (Wan2.1-I2V-14B) and docs/reference.md#dreamzero-heads-and-shapes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DreamZeroConfig:
    # --- Wan2.1 DiT backbone ---
    dim: int = 5120
    num_layers: int = 40
    num_heads: int = 40
    ffn_dim: int = 13824
    freq_dim: int = 256              # sinusoidal time-embedding width
    text_dim: int = 4096             # umT5-XXL hidden size
    text_len: int = 512              # text tokens per instruction
    clip_dim: int = 1280             # CLIP ViT-H/14 penultimate features
    clip_tokens: int = 257           # CLIP tokens (cls + 16x16 patches)
    latent_channels: int = 16        # VAE latent channels (noisy input, and the output)
    cond_channels: int = 20          # I2V conditioning: 4 mask channels + 16 first-frame latent channels
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # --- DreamZero sequence ---
    latent_height: int = 44          # 352 / 8
    latent_width: int = 80           # 640 / 8
    frames_per_chunk: int = 2        # latent frames per chunk
    max_chunks: int = 4              # chunks of context in training; sets local_attn_size
    actions_per_chunk: int = 24      # action tokens per chunk (DROID 24 at 15 Hz; AgiBot 48 at 30 Hz)
    states_per_chunk: int = 1        # state tokens per chunk
    action_dim: int = 32             # padded action vector
    state_dim: int = 64              # padded state vector
    head_hidden: int = 1024          # hidden width of the state encoder and action decoder MLPs
    num_embodiments: int = 1         # category-specific slots of the action/state encoders and decoder
    action_rope_len: int = 10240     # 1D RoPE table length for action tokens
    state_rope_len: int = 1024       # 1D RoPE table length for state tokens
    video_rope_len: int = 1024       # RoPE table length for each of the time/height/width axes
    # --- inference ---
    inference_rule: str = "release"  # "release": the state token sees every key at inference; "consistent": itself only
    name: str = "custom"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} must be even and >= 6 for the 3D RoPE split")
        if self.patch_size[0] != 1:
            raise ValueError("only a temporal patch size of 1 is supported (Wan2.1 uses (1, 2, 2))")
        if self.latent_height % self.patch_size[1] or self.latent_width % self.patch_size[2]:
            raise ValueError("latent height/width must be divisible by the spatial patch size")
        if self.inference_rule not in ("release", "consistent"):
            raise ValueError(f"inference_rule must be 'release' or 'consistent', got {self.inference_rule!r}")
        if min(self.frames_per_chunk, self.max_chunks, self.actions_per_chunk, self.states_per_chunk) < 1:
            raise ValueError("frames_per_chunk, max_chunks, actions_per_chunk and states_per_chunk must be >= 1")

    # derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid_h(self) -> int:
        return self.latent_height // self.patch_size[1]

    @property
    def grid_w(self) -> int:
        return self.latent_width // self.patch_size[2]

    @property
    def frame_tokens(self) -> int:
        """Tokens per latent frame (880 at the DROID shape)."""
        return self.grid_h * self.grid_w

    @property
    def local_attn_size(self) -> int:
        """Attention window in latent frames, the first frame included: max_chunks * frames_per_chunk + 1 (9)."""
        return self.max_chunks * self.frames_per_chunk + 1

    @property
    def in_channels(self) -> int:
        return self.latent_channels + self.cond_channels

    @property
    def rope_split(self) -> tuple:
        """Real dims of the head given to time/height/width RoPE: (44, 42, 42) at head dim 128."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    def num_frames(self, num_chunks: int) -> int:
        """Latent frames of a sequence with `num_chunks` chunks, the first frame included."""
        return 1 + num_chunks * self.frames_per_chunk

    def replace(self, **kw) -> "DreamZeroConfig":
        return dataclasses.replace(self, **kw)


_CONFIGS = {
    "droid-14b": DreamZeroConfig(name="droid-14b"),
    "agibot-14b": DreamZeroConfig(name="agibot-14b", actions_per_chunk=48),
    # A few layers and small dims: runs in well under a second on a CPU. Head dim 16 -> RoPE split (8, 4, 4).
    "tiny": DreamZeroConfig(
        name="tiny", dim=64, num_layers=2, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=24, text_len=7,
        clip_dim=20, clip_tokens=5, latent_height=4, latent_width=6, frames_per_chunk=2, max_chunks=3,
        actions_per_chunk=3, states_per_chunk=1, action_dim=6, state_dim=5, head_hidden=16, num_embodiments=2,
        action_rope_len=256, state_rope_len=64, video_rope_len=64,
    ),
}


def get_config(name: str, **overrides) -> DreamZeroConfig:
    """A named configuration ('tiny', 'droid-14b', 'agibot-14b'), with optional field overrides."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(_CONFIGS)}")
    cfg = _CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg


def config_names() -> list:
    return sorted(_CONFIGS)
