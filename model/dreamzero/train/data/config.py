"""How training clips are cut from a LeRobot dataset (`DataConfig`), and the error every data file problem raises."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The release's training selection of state/action sub-keys per embodiment tag (its data YAMLs, in their order)
RELEASE_KEYS = {
    "oxe_droid": {"state": ("joint_position", "gripper_position"),
                  "action": ("joint_position", "gripper_position")},
    "agibot": {"state": ("left_arm_joint_position", "right_arm_joint_position", "left_effector_position",
                         "right_effector_position", "head_position", "waist_position"),
               "action": ("left_arm_joint_position", "right_arm_joint_position", "left_effector_position",
                          "right_effector_position", "head_position", "waist_position", "robot_velocity")},
}
NORM_MODES = ("q99", "mean_std", "min_max", "none")
VAE_TEMPORAL_STRIDE = 4


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class DataConfig:
    """How clips are cut from a LeRobot dataset.

    num_chunks: K chunks per clip (4 in DROID training).
    action_horizon: H action steps per chunk; None = the model's actions_per_chunk (24 DROID, 48 AgiBot).
    video_fps: frame rate of the video fed to the VAE (5); the dataset fps must be a multiple of it.
    frames_per_chunk: latent frames per chunk (the model's, 2); H / (fps / video_fps) must be 4x this.
    view_size: (height, width) of one view before tiling (176, 320); the tiled frame is twice both.
    tiling: "auto" (DROID layout for the oxe_droid tag or a dataset with a wrist view and 3 cameras, else "grid"),
            "droid", "grid" or "single" (one view resized to the full frame).
    relative_action_keys: action sub-keys made relative to the state of the same sub-key; "auto" = sub-keys in both
            state and action whose name contains "joint" (the release's DROID/AgiBot choice); () for none.
    normalization: "q99" (the release), "mean_std", "min_max" or "none".
    idle_threshold: drop anchors whose first chunk's normalized action changes by less than this (None: off).
    action_dim, state_dim: padded widths (the model's 32 / 64).
    embodiment_id: the model's embodiment slot for this dataset's clips.
    embodiment_tag: override of meta/embodiment.json.
    video_only: treat the dataset as video only (no action loss) even if it has actions.
    prompt_template: "auto" (the release's per-embodiment wording of the instruction for DROID/AgiBot) or "none".
    state_keys, action_keys: the modality.json sub-keys used, in this order (concatenated, then padded); "auto" =
            the release's training selection for a known embodiment tag (RELEASE_KEYS: DROID uses joint_position +
            gripper_position of the 3 state / 6 action sub-keys its converter writes), else every sub-key in
            modality.json order.
    """
    num_chunks: int = 4
    action_horizon: int | None = None
    video_fps: float = 5.0
    frames_per_chunk: int = 2
    view_size: tuple = (176, 320)
    tiling: str = "auto"
    relative_action_keys: Any = "auto"
    normalization: str = "q99"
    idle_threshold: float | None = 0.01
    action_dim: int = 32
    state_dim: int = 64
    states_per_chunk: int = 1
    embodiment_id: int = 0
    embodiment_tag: str | None = None
    video_only: bool = False
    prompt_template: str = "auto"
    state_keys: Any = "auto"
    action_keys: Any = "auto"

    def __post_init__(self):
        if self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {self.num_chunks}")
        if self.tiling not in ("auto", "droid", "grid", "single"):
            raise ValueError(f"tiling must be auto/droid/grid/single, got {self.tiling!r}")
        if self.normalization not in NORM_MODES:
            raise ValueError(f"normalization must be one of {NORM_MODES}, got {self.normalization!r}")
        if len(self.view_size) != 2 or min(self.view_size) < 1:
            raise ValueError(f"view_size must be (height, width), got {self.view_size}")
        for name in ("state_keys", "action_keys"):
            v = getattr(self, name)
            if isinstance(v, str) and v != "auto":
                raise ValueError(f"{name} must be 'auto' or a list of sub-keys, got {v!r}")
            if not isinstance(v, str):
                object.__setattr__(self, name, tuple(v))
        if self.prompt_template not in ("auto", "none"):
            raise ValueError(f"prompt_template must be 'auto' or 'none', got {self.prompt_template!r}")

    @classmethod
    def for_model(cls, model_cfg, **kw) -> "DataConfig":
        """A DataConfig matching a DreamZeroConfig: chunk sizes, padded widths, and a view size such that the tiled
        frame is exactly 8x the latent size (176x320 views -> 352x640 -> 44x80 latents at droid-14b)."""
        base = dict(action_horizon=model_cfg.actions_per_chunk, frames_per_chunk=model_cfg.frames_per_chunk,
                    action_dim=model_cfg.action_dim, state_dim=model_cfg.state_dim,
                    states_per_chunk=model_cfg.states_per_chunk, num_chunks=model_cfg.max_chunks,
                    view_size=(model_cfg.latent_height * 4, model_cfg.latent_width * 4))
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["view_size"] = list(self.view_size)
        for name in ("relative_action_keys", "state_keys", "action_keys"):
            if not isinstance(getattr(self, name), str):
                d[name] = list(getattr(self, name))
        return d

    @property
    def frame_size(self) -> tuple:
        return (2 * self.view_size[0], 2 * self.view_size[1])

