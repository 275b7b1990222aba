"""Model configurations: the presets of every model the DreamZero release trains, and tiny test variants.

Every size the model, the layout, the KV cache and the benchmarks need comes from one `DreamZeroConfig`.
Sizes follow docs/reference.md#backbone (Wan2.1-I2V-14B) and docs/reference.md#dreamzero-heads-and-shapes.

The presets follow the release (dreamzero0/dreamzero @ab790c1): its training scripts (scripts/train/*.sh), its data
configs (groot/vla/configs/data/dreamzero/*.yaml) and its model configs
(groot/vla/configs/model/dreamzero/action_head/wan_flow_matching_action_tf{,_wan22}.yaml):

  name        backbone             robot   actions/chunk  views (each)  frames  latent        release scripts
  droid-14b   Wan2.1-I2V-14B-480P  DROID   24 (15 Hz)     3 (176x320)   33      16 x 44 x 80  droid_training_*
  agibot-14b  Wan2.1-I2V-14B-480P  AgiBot  24 (30 Hz)     3 (176x320)   33      16 x 44 x 80  agibot_training (LoRA)
  yam-14b     Wan2.1-I2V-14B-480P  YAM     24 (30 Hz)     3 (176x320)   33      16 x 44 x 80  yam_training (LoRA)
  droid-5b    Wan2.2-TI2V-5B       DROID   24 (15 Hz)     3 (160x320)   33      48 x 10 x 20  droid_training_*wan22

Every script sets num_frames=33, num_frame_per_block=2, num_action_per_block=24 (= action_horizon), one state per
block, max_chunk_size=4 (local_attn_size 9); action/state vectors are padded to 32 / 64 (max_action_dim,
max_state_dim). The views are tiled into one 2x2 frame (DROID: the wrist view stretched across the top row; the
others: [view 0 | view 2] over [view 1 | black]); 14B: 352x640 -> VAE (stride 4x8x8) -> 44x80 -> 880 tokens.
The AgiBot and YAM scripts fine-tune LoRA (rank 4, alpha 4, on q,k,v,o,ffn.0,ffn.2; the action/state modules in
full) on top of the DreamZero-AgiBot checkpoint (`init_from`); DROID has a full fine-tune script and a LoRA one
(from Wan's weights) for each backbone.
Robot vectors before padding: DROID 8 / 8 (7 joints + gripper), AgiBot 22 / 32, YAM 14 / 14 (action / state).

The 5B backbone (model_type 'ti2v'; the release's WAN22_BACKBONE.md guide): dim 3072, 30 layers, 24 heads (head dim
128), FFN 14336; the Wan2.2 VAE (48 latent channels, stride 4x16x16); the 2x2 tile of 160x320 views is resized to
160x320 before the VAE, so latents are 10x20 and a frame is 50 tokens; `concat_first_frame_latent=False`: the patch
embedding takes the 48 latent channels only (cond_channels 0, no I2V mask/first-frame channels); the first image
conditions the model through the clean first frame and the CLIP branch, which the release keeps for 'ti2v' (its
CausalWanModel builds img_emb and the I2V cross-attention for model_type 'i2v' and 'ti2v'; Wan2.2-TI2V-5B itself has
no such weights, so the release trains them from its own initialization).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The release's LoRA (wan_flow_matching_action_tf.yaml): PEFT on every Linear named q, k, v, o (self- and cross-
# attention), ffn.0, ffn.2; scale lora_alpha / rank.
RELEASE_LORA = {"rank": 4, "alpha": 4.0, "targets": ("q", "k", "v", "o", "ffn.0", "ffn.2")}
MODEL_TYPES = ("i2v", "ti2v")


@dataclass(frozen=True)
class DreamZeroConfig:
    # --- Wan DiT backbone ---
    dim: int = 5120
    num_layers: int = 40
    num_heads: int = 40
    ffn_dim: int = 13824
    freq_dim: int = 256              # sinusoidal time-embedding width
    text_dim: int = 4096             # umT5-XXL hidden size
    text_len: int = 512              # text tokens per instruction
    clip_dim: int = 1280             # CLIP ViT-H/14 penultimate features
    clip_tokens: int = 257           # CLIP tokens (cls + 16x16 patches)
    latent_channels: int = 16        # VAE latent channels (noisy input, and the output): 16 Wan2.1, 48 Wan2.2
    cond_channels: int = 20          # I2V conditioning concatenated to the latents (4 mask + 16 first-frame latent);
                                     # 0 = concat_first_frame_latent False (the 5B: latents only)
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    model_type: str = "i2v"          # 'i2v' (Wan2.1-I2V-14B) or 'ti2v' (Wan2.2-TI2V-5B); both have the CLIP branch
    vae_temporal_stride: int = 4     # raw frames per latent frame (after the first)
    vae_spatial_stride: int = 8      # pixels per latent row/column: 8 (Wan2.1 VAE), 16 (Wan2.2 VAE)
    # --- DreamZero sequence ---
    latent_height: int = 44          # 352 / 8
    latent_width: int = 80           # 640 / 8
    frames_per_chunk: int = 2        # latent frames per chunk
    max_chunks: int = 4              # chunks of context in training; sets local_attn_size
    actions_per_chunk: int = 24      # action tokens per chunk (24 in every release script: DROID, AgiBot, YAM, 5B)
    states_per_chunk: int = 1        # state tokens per chunk
    action_dim: int = 32             # padded action vector
    state_dim: int = 64              # padded state vector
    head_hidden: int = 1024          # hidden width of the state encoder and action decoder MLPs
    num_embodiments: int = 1         # category-specific slots of the action/state encoders and decoder
    action_rope_len: int = 10240     # 1D RoPE table length for action tokens
    state_rope_len: int = 1024       # 1D RoPE table length for state tokens
    video_rope_len: int = 1024       # RoPE table length for each of the time/height/width axes
    # --- attention rules (layout.py) ---
    train_rule: str = "release"      # the training frame window: "release" (the release's masks) or "consistent"
    inference_rule: str = "release"  # "release": the state token sees every key at inference; "consistent": itself only
    # --- what the preset describes (the release's scripts and data configs; not used by the math) ---
    name: str = "custom"
    backbone: str = "Wan2.1-I2V-14B-480P"
    robot: str = "droid"
    num_views: int = 3               # camera views tiled into one frame
    view_size: tuple = (176, 320)    # (height, width) of one view before tiling
    action_hz: float = 15.0          # the robot's action rate (the dataset's fps)
    robot_action_dim: int = 8        # unpadded action vector (DROID: 7 joints + gripper)
    robot_state_dim: int = 8         # unpadded state vector
    finetune: str = "full"           # how the release's script trains it: "full" or "lora" (RELEASE_LORA)
    init_from: str = "Wan-AI/Wan2.1-I2V-14B-480P"   # the weights the release's script starts from ("": random)

    def __post_init__(self):
        # tuples also when built from JSON lists (saved configs), so that configs stay hashable
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "view_size", tuple(self.view_size))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} must be even and >= 6 for the 3D RoPE split")
        if self.patch_size[0] != 1:
            raise ValueError("only a temporal patch size of 1 is supported (Wan2.1 uses (1, 2, 2))")
        if self.latent_height % self.patch_size[1] or self.latent_width % self.patch_size[2]:
            raise ValueError("latent height/width must be divisible by the spatial patch size")
        for name in ("train_rule", "inference_rule"):
            if getattr(self, name) not in ("release", "consistent"):
                raise ValueError(f"{name} must be 'release' or 'consistent', got {getattr(self, name)!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.cond_channels < 0 or self.latent_channels < 1:
            raise ValueError("latent_channels must be >= 1 and cond_channels >= 0")
        if self.finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {self.finetune!r}")
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
        """Channels of the patch embedding: 36 for the 14B (16 latent + 20 I2V), 48 for the 5B (latents only)."""
        return self.latent_channels + self.cond_channels

    @property
    def concat_first_frame_latent(self) -> bool:
        """The release's switch: True when the I2V conditioning is concatenated to the latents (the 14B)."""
        return self.cond_channels > 0

    @property
    def frame_size(self) -> tuple:
        """(height, width) in pixels of the frame the VAE encodes: (352, 640) for the 14B, (160, 320) for the 5B."""
        return (self.latent_height * self.vae_spatial_stride, self.latent_width * self.vae_spatial_stride)

    @property
    def raw_frames(self) -> int:
        """Raw video frames of a full training clip: 1 + 4 * max_chunks * frames_per_chunk (33, the release's
        num_frames)."""
        return 1 + self.vae_temporal_stride * self.max_chunks * self.frames_per_chunk

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

    def layout(self, mode: str = "train", **kw):
        """The SequenceLayout of a call of this model (layout.layout_for_config: mode, num_chunks or chunk,
        cached_frames, rule, window). A KV cache builds its passes' layouts through this method, so a cache class
        outside the model (dz_kernels.kv_cache.FusedKVCache) needs nothing of the model but its config."""
        from .layout import layout_for_config

        return layout_for_config(self, mode, **kw)


_WAN22_5B = dict(backbone="Wan2.2-TI2V-5B", model_type="ti2v", dim=3072, num_layers=30, num_heads=24, ffn_dim=14336,
                 latent_channels=48, cond_channels=0, vae_spatial_stride=16, latent_height=10, latent_width=20,
                 view_size=(160, 320), init_from="Wan-AI/Wan2.2-TI2V-5B")
_LORA_FROM_AGIBOT = dict(finetune="lora", init_from="GEAR-Dreams/DreamZero-AgiBot", action_hz=30.0)

_CONFIGS = {
    "droid-14b": DreamZeroConfig(name="droid-14b"),
    "agibot-14b": DreamZeroConfig(name="agibot-14b", robot="agibot", robot_action_dim=22, robot_state_dim=32,
                                  **_LORA_FROM_AGIBOT),
    "yam-14b": DreamZeroConfig(name="yam-14b", robot="yam", robot_action_dim=14, robot_state_dim=14,
                               **_LORA_FROM_AGIBOT),
    "droid-5b": DreamZeroConfig(name="droid-5b", **_WAN22_5B),
    # A few layers and small dims: runs in well under a second on a CPU. Head dim 16 -> RoPE split (8, 4, 4).
    "tiny": DreamZeroConfig(
        name="tiny", dim=64, num_layers=2, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=24, text_len=7,
        clip_dim=20, clip_tokens=5, latent_height=4, latent_width=6, frames_per_chunk=2, max_chunks=3,
        actions_per_chunk=3, states_per_chunk=1, action_dim=6, state_dim=5, head_hidden=16, num_embodiments=2,
        action_rope_len=256, state_rope_len=64, video_rope_len=64, backbone="tiny Wan2.1-I2V", init_from="",
    ),
    # The tiny variant of the 5B backbone: model type 'ti2v', 48 latent channels, no I2V channels, the CLIP branch.
    "tiny-ti2v": DreamZeroConfig(
        name="tiny-ti2v", dim=48, num_layers=2, num_heads=3, ffn_dim=96, freq_dim=32, text_dim=24, text_len=7,
        clip_dim=20, clip_tokens=5, latent_channels=48, cond_channels=0, model_type="ti2v", vae_spatial_stride=16,
        latent_height=4, latent_width=6, frames_per_chunk=2, max_chunks=3, actions_per_chunk=3, states_per_chunk=1,
        action_dim=6, state_dim=5, head_hidden=16, num_embodiments=1, action_rope_len=256, state_rope_len=64,
        video_rope_len=64, backbone="tiny Wan2.2-TI2V", view_size=(64, 96), init_from="",
    ),
}
PRESETS = ("droid-14b", "agibot-14b", "yam-14b", "droid-5b")   # the release's models (README's table)
TINY_OF = {"i2v": "tiny", "ti2v": "tiny-ti2v"}                   # the tiny test variant of each backbone


# Variants: a config of _CONFIGS with fields changed, under their own name (the trainer's presets). "tiny-synthetic"
# is the tiny model shaped for the synthetic dataset of dreamzero.train.synthetic (7 joints + gripper, DROID timing of
# 24 actions per chunk at 15 Hz). A variant's config keeps its base's `name` (a trainer checkpoint compares equal to
# the one it resumes); an export records the variant's name beside it (dreamzero.train.export).
VARIANTS = {"tiny-synthetic": ("tiny", {"actions_per_chunk": 24, "action_dim": 10, "state_dim": 10})}


class ConfigNameError(KeyError):
    """An unknown config name; the message lists every known name (configs and variants)."""

    def __str__(self) -> str:           # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def get_config(name: str, **overrides) -> DreamZeroConfig:
    """A named configuration (PRESETS, 'tiny', 'tiny-ti2v') or variant ('tiny-synthetic'), with optional field
    overrides. Raises ConfigNameError (a KeyError) naming every known config for an unknown name."""
    if name in VARIANTS:
        base, fields = VARIANTS[name]
        overrides = {**fields, **overrides}
        name = base
    if name not in _CONFIGS:
        raise ConfigNameError(f"unknown config {name!r}; known: {', '.join(config_names())}")
    cfg = _CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg


def config_names() -> list:
    """Every name get_config takes: the configs and the variants, sorted."""
    return sorted([*_CONFIGS, *VARIANTS])


def config_from_dict(d: dict) -> DreamZeroConfig:
    """A DreamZeroConfig from its dataclasses.asdict() form (as JSON gives it back). Unknown fields raise ValueError
    naming them (a file written by a newer version)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(DreamZeroConfig)})
    if unknown:
        raise ValueError(f"unknown DreamZeroConfig fields {unknown} (written by a newer dz_kernels?)")
    return DreamZeroConfig(**d)


def tiny_config(name: str, **overrides) -> DreamZeroConfig:
    """The tiny variant of a config's backbone ('tiny' for the 14B, 'tiny-ti2v' for the 5B), for CPU runs."""
    return get_config(TINY_OF[get_config(name).model_type], **overrides)
