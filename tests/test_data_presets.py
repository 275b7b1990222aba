"""The training data of each preset against the release's data configs and sampler: views and frame size (the 5B's
resized tile), the video sampling of 24-step chunks at 15 and 30 Hz, the relative action keys and the prompts of
DROID, AgiBot and YAM."""
import json
import os

import numpy as np
import pytest

from dreamzero.config import PRESETS, get_config, tiny_config
from dreamzero.train.data import DataConfig, LeRobotDataset, build_prompt, resize_frames
from dreamzero.train.synthetic import make_synthetic_dataset


@pytest.mark.parametrize("preset", PRESETS)
def test_data_config_for_each_preset(preset):
    mcfg = get_config(preset)
    d = DataConfig.for_model(mcfg)
    assert (d.action_horizon, d.num_chunks, d.frames_per_chunk, d.action_dim, d.state_dim) == (24, 4, 2, 32, 64)
    assert d.video_fps is None                                  # the release's sampling (8 frames per chunk)
    assert d.view_size == mcfg.view_size                        # the release's image_resolution per view
    assert d.frame_size == mcfg.frame_size                      # what the VAE takes: latents * stride
    if preset == "droid-5b":          # 160x320 views tile to 320x640, resized to 160x320 (target_video_height/width)
        assert d.frame_resize == (160, 320) and d.frame_size == (160, 320)
    else:
        assert d.frame_resize is None and d.frame_size == (352, 640)


def _rewrite_modality(root, tag, state_keys, action_keys):
    """Give the synthetic dataset (8-dim state and action) the sub-keys of another embodiment."""
    with open(os.path.join(root, "meta", "modality.json")) as f:
        modality = json.load(f)
    for section, keys in (("state", state_keys), ("action", action_keys)):
        col = "observation.state" if section == "state" else "action"
        modality[section] = {k: {"original_key": col, "start": a, "end": b} for k, (a, b) in keys.items()}
    with open(os.path.join(root, "meta", "modality.json"), "w") as f:
        json.dump(modality, f)
    with open(os.path.join(root, "meta", "embodiment.json"), "w") as f:
        json.dump({"embodiment_tag": tag}, f)


@pytest.mark.parametrize("fps", [15.0, 30.0])
def test_video_sampling_is_every_third_step_of_a_24_step_chunk(tmp_path, fps):
    """The release's sampler takes offsets 0, 3, ..., 21 of each 24-step chunk (and one more frame at the end),
    whatever the dataset's rate: 5 FPS video for DROID at 15 Hz, 10 FPS for AgiBot and YAM at 30 Hz."""
    root = make_synthetic_dataset(str(tmp_path / "d"), num_episodes=1, length=60, fps=fps)
    cfg = DataConfig.for_model(tiny_config("droid-14b", actions_per_chunk=24), num_chunks=2, idle_threshold=None)
    ds = LeRobotDataset(root, cfg)
    assert ds.video_stride == 3
    assert ds.frame_steps(5).tolist() == [5 + 3 * i for i in range(17)]
    if fps == 30.0:           # the old fixed 5 FPS video cannot cut 24 steps at 30 Hz into 8 frames
        with pytest.raises(ValueError, match="set action_horizon to 48"):
            LeRobotDataset(root, DataConfig.for_model(tiny_config("droid-14b", actions_per_chunk=24), num_chunks=2,
                                                      video_fps=5.0))


def test_release_relative_action_keys_per_embodiment(tmp_path):
    yam = {"left_joint_pos": (0, 3), "left_gripper_pos": (3, 4), "right_joint_pos": (4, 7),
           "right_gripper_pos": (7, 8)}
    agibot_state = {"left_arm_joint_position": (0, 2), "right_arm_joint_position": (2, 4),
                    "left_effector_position": (4, 5), "right_effector_position": (5, 6), "head_position": (6, 7),
                    "waist_position": (7, 8)}
    agibot_action = {**agibot_state, "robot_velocity": (0, 2)}     # (the 8 synthetic columns, read twice)
    cases = (("yam", yam, yam, tuple(yam)),
             ("agibot", agibot_state, agibot_action, tuple(agibot_state)),
             ("other", yam, yam, ("left_joint_pos", "right_joint_pos")))       # unknown tag: the joint sub-keys
    for tag, st, ac, expect in cases:
        root = make_synthetic_dataset(str(tmp_path / tag), num_episodes=1, length=60)
        _rewrite_modality(root, tag, st, ac)
        ds = LeRobotDataset(root, DataConfig(num_chunks=1, action_horizon=24, view_size=(16, 24), action_dim=10,
                                             state_dim=10, idle_threshold=None))
        assert ds.relative_keys == expect, tag
    assert build_prompt("Fold the towel.", "yam").startswith(
        "A multi-view video shows that a robot fold the towel. The video is split into four views: The top-left view "
        "shows the top camera, the top-right view shows the right camera, the bottom-left view shows the left camera")
    assert build_prompt("Fold the towel.", "yam").endswith("black screen. The robot fold the towel.")


def test_5b_clips_are_resized_tiles(tmp_path):
    root = make_synthetic_dataset(str(tmp_path / "d"), num_episodes=1, length=60, view_size=(16, 24))
    mcfg = tiny_config("droid-5b", actions_per_chunk=24, action_dim=10, state_dim=10)
    cfg = DataConfig.for_model(mcfg, num_chunks=2, idle_threshold=None)
    assert cfg.view_size == mcfg.frame_size == cfg.frame_resize == (64, 96)
    ds = LeRobotDataset(root, cfg)
    clip = ds.clip(ds.load_episode(ds.episode_indices[0]), 0)
    assert clip.frames.shape == (1 + 8 * 2, 64, 96, 3) and clip.frames.dtype == np.uint8
    # the resize: bilinear without antialiasing; a 2x downsample averages pixel pairs
    x = np.zeros((1, 4, 4, 3), np.uint8)
    x[:, :, ::2] = 200
    assert (resize_frames(x, (2, 2)) == 100).all()


def test_5b_trains_end_to_end_on_the_tiny_backbone(tmp_path):
    """The 5B's pipeline on its tiny variant: synthetic DROID data tiled and resized, the Wan2.2-style VAE (stride 16,
    48 channels), no I2V cond, a few optimizer steps whose loss is finite."""
    import torch

    from dreamzero.train.prepare import PreparedDataset, encoders_from_module, prepare_dataset
    from dreamzero.train.trainer import TrainConfig, Trainer

    over = {"actions_per_chunk": 24, "action_dim": 10, "state_dim": 10}
    mcfg = tiny_config("droid-5b", **over)
    enc = encoders_from_module(mcfg, "tiny")
    assert enc.vae.spatial_stride == 16 and enc.vae.latent_channels == 48
    raw = make_synthetic_dataset(str(tmp_path / "raw"), num_episodes=1, length=60)
    out = prepare_dataset(raw, mcfg, enc, DataConfig.for_model(mcfg, num_chunks=2), out=str(tmp_path / "prep"),
                          dtype=torch.float32)
    b = PreparedDataset([out]).collate([0])
    assert b.latents.shape[1:] == (48, 5, 4, 6) and b.cond.shape[1] == 0 and b.validate(mcfg) == 2
    tr = Trainer(TrainConfig(data=[out], out_dir=str(tmp_path / "run"), model="tiny-ti2v", model_overrides=over,
                             steps=2, batch_size=1, lr=1e-3, save_every=1000, progress=False, tensorboard=False,
                             gradient_checkpointing=False, seed=0))
    logs = tr.train()
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) for r in logs)
