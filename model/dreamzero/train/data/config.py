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
    "yam": {"state": ("left_joint_pos", "left_gripper_pos", "right_joint_pos", "right_gripper_pos"),
            "action": ("left_joint_pos", "left_gripper_pos", "right_joint_pos", "right_gripper_pos")},
}
# The release's relative_action_keys per embodiment tag (droid_relative / agibot_relative / yam_relative.yaml)
RELEASE_RELATIVE_KEYS = {
    "oxe_droid": ("joint_position",),
    "agibot": ("left_arm_joint_position", "right_arm_joint_position", "left_effector_position",
               "right_effector_position", "head_position", "waist_position"),
    "yam": ("left_joint_pos", "left_gripper_pos", "right_joint_pos", "right_gripper_pos"),
}
NORM_MODES = ("q99", "mean_std", "min_max", "none")
VAE_TEMPORAL_STRIDE = 4


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class DataConfig:
    """How clips are cut from a LeRobot dataset.

    num_chunks: K chunks per clip (4 in DROID training).
    action_horizon: H action steps per chunk; None = the model's actions_per_chunk (24 in every release script).
    video_fps: frame rate of the video fed to the VAE; None = the release's sampling, one video frame every
            H / (4 * frames_per_chunk) action steps (3 for 24 actions: 5 FPS at DROID's 15 Hz, 10 FPS at AgiBot's and
            YAM's 30 Hz). Given, the dataset fps must be a multiple of it and H / (fps / video_fps) = 4 * fpc.
    frames_per_chunk: latent frames per chunk (the model's, 2).
    view_size: (height, width) of one view before tiling (176, 320); the tiled frame is twice both.
    frame_resize: (height, width) the tiled frame is resized to before the VAE (bilinear, as the release's
            target_video_height/width: 160x320 for the 5B, whose 160x320 views tile to 320x640); None keeps it.
    tiling: "auto" (DROID layout for the oxe_droid tag or a dataset with a wrist view and 3 cameras, else "grid"),
            "droid", "grid" or "single" (one view resized to the full frame).
    relative_action_keys: action sub-keys made relative to the state of the same sub-key; "auto" = the release's
            for a known embodiment tag (RELEASE_RELATIVE_KEYS: DROID joint_position; AgiBot its 6 state sub-keys; YAM
            joints and grippers), else the sub-keys in both state and action whose name contains "joint"; () none.
    normalization: "q99" (the release), "mean_std", "min_max" or "none".
    idle_threshold: drop anchors whose first chunk's normalized action changes by less than this (None: off).
    action_dim, state_dim: padded widths (the model's 32 / 64).
    embodiment_id: the model's embodiment slot for this dataset's clips.
    embodiment_tag: override of meta/embodiment.json.
    video_only: treat the dataset as video only (no action loss) even if it has actions.
    prompt_template: "auto" (the release's per-embodiment wording of the instruction: DROID, AgiBot, YAM) or "none".
    state_keys, action_keys: the modality.json sub-keys used, in this order (concatenated, then padded); "auto" =
            the release's training selection for a known embodiment tag (RELEASE_KEYS: DROID uses joint_position +
            gripper_position of the 3 state / 6 action sub-keys its converter writes), else every sub-key in
            modality.json order.
    """
    num_chunks: int = 4
    action_horizon: int | None = None
    video_fps: float | None = None
    frames_per_chunk: int = 2
    view_size: tuple = (176, 320)
    frame_resize: tuple | None = None
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
        object.__setattr__(self, "view_size", tuple(self.view_size))
        if self.frame_resize is not None:
            if len(self.frame_resize) != 2 or min(self.frame_resize) < 1:
                raise ValueError(f"frame_resize must be (height, width) or None, got {self.frame_resize}")
            object.__setattr__(self, "frame_resize", tuple(self.frame_resize))
        if self.video_fps is not None and self.video_fps <= 0:
            raise ValueError(f"video_fps must be positive or None, got {self.video_fps}")
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
        """A DataConfig matching a DreamZeroConfig: chunk sizes, padded widths, and views whose tile is the frame the
        VAE takes (176x320 views -> 352x640 -> 44x80 latents at the 14B). The 5B as the release: 160x320 views, the
        320x640 tile resized to 160x320 (-> 10x20 latents through the 16x VAE)."""
        fh, fw = model_cfg.frame_size
        view, resize = (fh // 2, fw // 2), None
        if model_cfg.model_type == "ti2v" and tuple(model_cfg.view_size) == (fh, fw):
            view, resize = (fh, fw), (fh, fw)
        base = dict(action_horizon=model_cfg.actions_per_chunk, frames_per_chunk=model_cfg.frames_per_chunk,
                    action_dim=model_cfg.action_dim, state_dim=model_cfg.state_dim,
                    states_per_chunk=model_cfg.states_per_chunk, num_chunks=model_cfg.max_chunks,
                    view_size=view, frame_resize=resize)
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["view_size"] = list(self.view_size)
        d["frame_resize"] = None if self.frame_resize is None else list(self.frame_resize)
        for name in ("relative_action_keys", "state_keys", "action_keys"):
            if not isinstance(getattr(self, name), str):
                d[name] = list(getattr(self, name))
        return d

    @property
    def frame_size(self) -> tuple:
        """(height, width) of the frame the VAE encodes: frame_resize, else the 2x2 tile of the views."""
        return self.frame_resize or (2 * self.view_size[0], 2 * self.view_size[1])

