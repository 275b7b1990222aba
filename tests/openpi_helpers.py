"""Shared by the openpi server tests: a tiny DROID-shaped model, policy metadata in our schema and in the DreamZero
release's experiment_cfg layout, and raw DROID observations.

The tiny model takes 4 x 6 latents, so the tiled frame is 32 x 48 and one view 16 x 24; the client sends views of
RES = 20 x 30 (h x w), which the release's eval transforms crop (0.95) and resize to 16 x 24. 3 actions per chunk,
2 latent frames per chunk, a window of 3 chunks; action and state vectors padded to 10 (DROID uses 7 + 1).
"""
import json
import os

import numpy as np

VIEWS = ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left")
RES = (20, 30)
VIEW_SIZE = (16, 24)
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def tiny_cfg():
    from dreamzero.config import get_config

    return get_config("tiny", action_dim=10, state_dim=10)


def tiny_droid_model(cfg=None):
    """The tiny DROID-shaped model from the suite's builder (every weight random, the output heads too)."""
    from tiny import tiny_model

    return tiny_model(cfg or tiny_cfg()).eval()


def _stats(rng, dim: int, center: float, spread: float) -> dict:
    lo = center - spread * (0.5 + rng.random(dim))
    hi = center + spread * (0.5 + rng.random(dim))
    return {"mean": ((lo + hi) / 2).tolist(), "std": ((hi - lo) / 4).tolist(), "min": (lo - 0.1).tolist(),
            "max": (hi + 0.1).tolist(), "q01": lo.tolist(), "q99": hi.tolist()}


def droid_stats(seed: int = 0) -> dict:
    """Plausible DROID statistics: absolute joints and gripper for the state, relative joints and an absolute
    gripper for the actions (as the release's metadata.json holds them)."""
    rng = np.random.default_rng(seed)
    return {"state": {"joint_position": _stats(rng, 7, 0.3, 1.5), "gripper_position": _stats(rng, 1, 0.5, 0.5)},
            "action": {"joint_position": _stats(rng, 7, 0.0, 0.2), "gripper_position": _stats(rng, 1, 0.5, 0.5)}}


def our_metadata(transform: str = "release_eval", seed: int = 0, horizon: int = 3) -> dict:
    s = droid_stats(seed)
    return {"format": "dz-policy", "version": 1, "embodiment_tag": "oxe_droid", "embodiment_id": 1,
            "video": {"keys": list(VIEWS), "resolution": list(RES), "view_size": list(VIEW_SIZE),
                      "transform": transform, "crop_scale": 0.95 if transform == "release_eval" else 1.0,
                      "tiling": "droid", "wrist_index": 2},
            "state": [{"key": k, "dim": d, "normalization": "q99", "stats": s["state"][k]}
                      for k, d in (("joint_position", 7), ("gripper_position", 1))],
            "action": [{"key": k, "dim": d, "normalization": "q99", "relative": k == "joint_position",
                        "stats": s["action"][k]} for k, d in (("joint_position", 7), ("gripper_position", 1))],
            "action_horizon": horizon, "frames_per_call": 4, "prompt_template": "auto"}


def write_release_experiment_cfg(folder: str, res=RES, view_size=VIEW_SIZE, horizon: int = 3, seed: int = 0,
                                 **conf_overrides) -> str:
    """A checkpoint folder's experiment_cfg/ as the release writes it (metadata.json from the dataset's
    DatasetMetadata, conf.yaml the resolved hydra config of droid_relative + dreamzero_cotrain), with only the parts
    a policy reads and made-up statistics. Returns the experiment_cfg folder."""
    import yaml

    s = droid_stats(seed)
    cart = _stats(np.random.default_rng(seed + 1), 6, 0.0, 1.0)
    state_mods = {"joint_position": 7, "gripper_position": 1, "cartesian_position": 6}
    meta = {"oxe_droid": {
        "statistics": {"state": {**s["state"], "cartesian_position": cart},
                       "action": {**s["action"], "cartesian_position": cart}},
        "modalities": {
            "video": {v: {"resolution": [res[1], res[0]], "channels": 3, "fps": 15.0} for v in VIEWS},
            "state": {k: {"absolute": True, "rotation_type": None, "shape": [d], "continuous": True}
                      for k, d in state_mods.items()},
            "action": {k: {"absolute": True, "rotation_type": None, "shape": [d], "continuous": True}
                       for k, d in state_mods.items()}},
        "embodiment_tag": "oxe_droid"}}
    video_keys = [f"video.{v}" for v in VIEWS]
    state_keys = ["state.joint_position", "state.gripper_position"]
    action_keys = ["action.joint_position", "action.gripper_position"]
    T = "groot.vla.data.transform."
    transforms = [
        {"_target_": T + "VideoToTensor", "apply_to": video_keys},
        {"_target_": T + "VideoCrop", "apply_to": video_keys, "scale": 0.95, "mode": "random"},
        {"_target_": T + "VideoResize", "apply_to": video_keys, "height": view_size[0], "width": view_size[1],
         "interpolation": "linear"},
        {"_target_": T + "VideoColorJitter", "apply_to": video_keys, "brightness": 0.3, "contrast": 0.4,
         "saturation": 0.5, "hue": 0.08},
        {"_target_": T + "VideoToNumpy", "apply_to": video_keys},
        {"_target_": T + "StateActionToTensor", "apply_to": state_keys},
        {"_target_": T + "StateActionTransform", "apply_to": state_keys,
         "normalization_modes": {k: "q99" for k in state_keys}},
        {"_target_": T + "StateActionToTensor", "apply_to": action_keys},
        {"_target_": T + "StateActionTransform", "apply_to": action_keys,
         "normalization_modes": {k: "q99" for k in action_keys}},
        {"_target_": T + "ConcatTransform", "video_concat_order": video_keys, "state_concat_order": state_keys,
         "action_concat_order": action_keys},
        {"_target_": "groot.vla.model.dreamzero.transform.dreamzero_cotrain.DreamTransform",
         "default_instruction": "Perform the default behavior.", "max_state_dim": 64, "max_action_dim": 32,
         "state_horizon": 1, "action_horizon": horizon, "embodiment_tag_mapping": {"oxe_droid": 17, "agibot": 26}},
    ]
    conf = {"relative_action": True, "relative_action_per_horizon": False, "relative_action_keys": ["joint_position"],
            "action_horizon": horizon, "num_frames": 33, "max_chunk_size": 4,
            "embodiment_tag_to_projector_index": {"oxe_droid": 17, "agibot": 26},
            "transforms": {"oxe_droid": {"_target_": T + "ComposedModalityTransform", "transforms": transforms}}}
    conf.update(conf_overrides)
    exp = os.path.join(folder, "experiment_cfg")
    os.makedirs(exp, exist_ok=True)
    with open(os.path.join(exp, "metadata.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(exp, "conf.yaml"), "w") as f:
        yaml.safe_dump(conf, f)
    return exp


def observation(rng, res=RES, naming: str = "dataset", frames: int | None = None, session=None,
                prompt: str = "put the cube in the bowl") -> dict:
    """One raw DROID request: three uint8 views (one frame, or [frames, H, W, 3]), joints, gripper, cartesian."""
    shape = (res[0], res[1], 3) if frames is None else (frames, res[0], res[1], 3)
    names = VIEWS if naming == "dataset" else ("exterior_image_0_left", "exterior_image_1_left", "wrist_image_left")
    obs = {f"observation/{n}": rng.integers(0, 256, shape, dtype=np.uint8) for n in names}
    obs["observation/joint_position"] = rng.uniform(-1, 1, 7)
    obs["observation/gripper_position"] = rng.uniform(0, 1, 1)
    obs["observation/cartesian_position"] = np.zeros(6)
    obs["prompt"] = prompt
    if session is not None:
        obs["session_id"] = session
    return obs
