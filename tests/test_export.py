"""Export folders (dreamzero.train.export, format dz-export/1): a trained model carries its config and the training
data's statistics, and load_model / dz serve / load_trained_config read it with nothing else; training checkpoints
are refused with the next step."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from dreamzero.checkpoint import CheckpointError, load_model, read_export, save_checkpoint
from dreamzero.config import get_config
from dreamzero.train.data import DataConfig, LeRobotDataset, normalize, unnormalize
from dreamzero.train.export import export_checkpoint, export_trainer, load_trained_config
from dreamzero.train.prepare import encoders_from_module, prepare_dataset
from dreamzero.train.synthetic import make_synthetic_dataset
from dreamzero.train.trainer import TrainConfig, Trainer

PRESET = "tiny-synthetic"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic dataset prepared with the tiny encoders, and a 2-step training run (its checkpoint at step 2)."""
    root = tmp_path_factory.mktemp("export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = get_config(PRESET)
    raw = make_synthetic_dataset(str(root / "raw"), num_episodes=2, length=60, seed=0)
    dcfg = DataConfig.for_model(cfg, num_chunks=2)
    prep = prepare_dataset(raw, cfg, encoders_from_module(cfg, "tiny"), dcfg, out=str(root / "prep"),
                           dtype=torch.float32)
    trainer = Trainer(TrainConfig(data=[prep], out_dir=str(root / "run"), model=PRESET, steps=2, batch_size=1,
                                  lr=5e-3, progress=False, tensorboard=False, gradient_checkpointing=False))
    trainer.train()
    torch.set_num_threads(threads)
    return {"root": root, "raw": raw, "prep": prep, "trainer": trainer, "cfg": cfg, "dcfg": dcfg,
            "out": str(root / "run")}


def test_an_export_carries_its_config_and_statistics(run, tmp_path):
    path = export_checkpoint(run["out"], str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path / "export")) == ["SHA256SUMS", "dz_config.json", "dz_stats.json",
                                                      "model.safetensors"]
    meta = json.load(open(tmp_path / "export" / "dz_config.json"))
    assert meta["format"] == "dz-export/1" and meta["config_name"] == PRESET and meta["layout"] == "dreamzero"
    assert meta["weights"] == "model.safetensors" and meta["dtype"] == "float32" and meta["stats"] == "dz_stats.json"
    assert meta["source"]["step"] == 2 and meta["source"]["checkpoint"].endswith("step_00000002")
    assert meta["model_config"] == json.loads(json.dumps(dataclasses.asdict(run["cfg"])))
    info = read_export(tmp_path / "export")
    assert info.config == run["cfg"] and info.weights == path and info.stats["format"] == "dz-stats/1"
    # the model loads from the folder alone, with the trained weights
    model = load_model(str(tmp_path / "export"))
    live = run["trainer"].full_state_dict()
    assert model.cfg == run["cfg"]
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    assert load_model(path).cfg == run["cfg"]                                    # the weights file of an export
    assert load_model(PRESET, str(tmp_path / "export")).cfg == run["cfg"]       # the same config, given
    for where in (str(tmp_path / "export"), run["out"], os.path.join(run["out"], "checkpoints", "step_00000002")):
        assert load_trained_config(where) == run["cfg"]


def test_the_live_trainer_exports_the_same(run, tmp_path):
    export_trainer(run["trainer"], str(tmp_path / "live"), dtype=torch.bfloat16)
    info = read_export(tmp_path / "live")
    assert info.meta["source"] == {"checkpoint": None, "step": 2} and info.meta["dtype"] == "bfloat16"
    assert info.stats == read_export(export_checkpoint(run["out"], str(tmp_path / "offline"))).stats


def test_the_statistics_un_normalize_the_training_actions(run, tmp_path):
    """The documented rule applied to a clip's normalized actions gives back the dataset's raw actions."""
    export_checkpoint(run["out"], str(tmp_path / "export"))
    (entry,) = read_export(tmp_path / "export").stats["datasets"]
    assert entry["normalization"] == "q99" and entry["embodiment_id"] == 0 and entry["action_horizon"] == 24
    assert [(e["key"], e["dims"]) for e in entry["action"]] == [("joint_position", [0, 7]),
                                                                 ("gripper_position", [7, 8])]
    assert [e["relative"] for e in entry["action"]] == [True, False]
    assert [(e["key"], e["dims"]) for e in entry["state"]] == [("joint_position", [0, 7]),
                                                                ("gripper_position", [7, 8])]
    ds = LeRobotDataset(run["raw"], run["dcfg"])
    ep = ds.load_episode(ds.episode_indices[0])
    anchor = int(ds.anchors(ep)[0])
    clip = ds.clip(ep, anchor)
    H = entry["action_horizon"]
    steps = anchor + np.arange(clip.actions.shape[0])
    chunk_start = anchor + H * (np.arange(clip.actions.shape[0]) // H)
    states = {s.name: s for s in ds.modality.state}
    checked = 0
    for sub, e in zip(ds.modality.action, entry["action"]):
        lo, hi = e["dims"]
        y = clip.actions[:, lo:hi]
        x = unnormalize(y, e, entry["normalization"])
        if e["relative"]:
            x = x + ds._sub(ep, states[e["key"]])[chunk_start]
        want = ds._sub(ep, sub)[steps]
        inside = np.abs(y) < 1 - 1e-6                  # q99 clips to [-1, 1]: only unclipped values invert
        np.testing.assert_allclose(x[inside], want[inside], rtol=1e-5, atol=1e-5)
        checked += int(inside.sum())
    assert checked > 0.5 * clip.actions[:, :8].size
    assert not clip.actions[:, 8:].any()                # padding: the dims after the last sub-key


@pytest.mark.parametrize("mode", ["q99", "min_max", "mean_std", "none"])
def test_unnormalize_inverts_normalize(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)) * [1.0, 2.0, 0.0, 3.0] + [0.0, 1.0, 5.0, -2.0]   # dim 2 constant
    stats = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
             "q01": np.quantile(x, 0.01, axis=0), "q99": np.quantile(x, 0.99, axis=0)}
    y = normalize(x, stats, mode)
    inside = np.abs(y) < 1 - 1e-6 if mode in ("q99", "min_max") else np.ones_like(y, bool)
    np.testing.assert_allclose(unnormalize(y, stats, mode)[inside], x[inside], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown normalization"):
        unnormalize(y, stats, "z-score")


def test_training_checkpoints_are_refused_with_the_next_step(run):
    ckpt = os.path.join(run["out"], "checkpoints", "step_00000002")
    for path, what in ((ckpt, "is a training checkpoint"), (run["out"], "is a training run folder"),
                       (os.path.join(ckpt, "rng_rank00000.safetensors"), "is a training checkpoint")):
        with pytest.raises(CheckpointError, match=what) as e:
            load_model(path)
        assert "run `dz export" in str(e.value)
        with pytest.raises(CheckpointError, match=what):
            load_model(PRESET, path)


def test_load_model_arguments(run, tmp_path):
    export_checkpoint(run["out"], str(tmp_path / "export"))
    with pytest.raises(CheckpointError, match=r"exported from config 'tiny-synthetic'.*actions_per_chunk 3 "
                                              r"\(export: 24\).*load_model\("):
        load_model("tiny", str(tmp_path / "export"))
    with pytest.raises(TypeError, match=r"load_model\('tiny'\) needs the checkpoint too"):
        load_model("tiny")
    with pytest.raises(TypeError, match="needs the checkpoint path"):
        load_model(get_config("tiny"))
    with pytest.raises(CheckpointError, match="no such export folder"):
        load_model(str(tmp_path / "absent"))
    # plain safetensors without dz_config.json need their config
    plain = save_checkpoint(load_model(str(tmp_path / "export")), tmp_path / "plain")
    with pytest.raises(CheckpointError, match="carries no dz_config.json.*pass the model config"):
        load_model(plain)
    assert load_model(PRESET, plain).cfg == run["cfg"]


def test_an_older_export_with_the_config_alone_loads(run, tmp_path):
    export_checkpoint(run["out"], str(tmp_path / "old"))
    with open(tmp_path / "old" / "dz_config.json", "w") as f:
        json.dump(dataclasses.asdict(run["cfg"]), f)            # what exports wrote before dz-export/1
    os.unlink(tmp_path / "old" / "dz_stats.json")
    os.unlink(tmp_path / "old" / "SHA256SUMS")                  # (nor did they carry checksums)
    info = read_export(tmp_path / "old")
    assert info.config == run["cfg"] and info.stats is None
    assert load_model(str(tmp_path / "old")).cfg == run["cfg"]


def test_dz_serve_takes_an_export_folder(run, tmp_path):
    from dreamzero.serve import build_policy, serve_parser

    export_checkpoint(run["out"], str(tmp_path / "export"))
    policy, name = build_policy(serve_parser().parse_args([str(tmp_path / "export"), "--device", "cpu",
                                                           "--steps", "1"]))
    assert name == PRESET and policy.cfg == run["cfg"]
    policy, name = build_policy(serve_parser().parse_args(["--checkpoint", str(tmp_path / "export"), "--config",
                                                           PRESET, "--device", "cpu", "--steps", "1"]))
    assert policy.cfg == run["cfg"]
