"""Train on a LeRobot dataset, export, serve, and drive an episode from a client: the whole journey of a trained
policy, at the tiny size on a CPU (well under a minute).

    python examples/train_export_serve.py [--out DIR] [--steps 20]

1. a LeRobot dataset: here a synthetic one (7 joints + a gripper, three cameras; `dz make-synthetic-data`);
2. its clips encoded once by the frozen VAE / CLIP / umT5 (the tiny random ones here; `dz prepare-data`);
3. training (`dz train`), then 4. an export folder: weights + dz_config.json + dz_stats.json (`dz export`);
5. a policy server on the export (`dz serve <export>`; here on a thread, on a free port);
6. a client that drives one recorded episode through it: it resets with the instruction's and first image's
   features, then each chunk sends the robot's state (normalized with the export's statistics) and the frames
   observed meanwhile, and turns the actions it gets back into joint targets (un-normalized with the statistics,
   the relative joints added to the state). It prints them beside the actions recorded in the dataset.
The same with the command line: the README's "Training" block, then `dz serve <export>` and `dz client`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from dreamzero.checkpoint import load_model, read_export
from dreamzero.config import get_config
from dreamzero.engine import Policy, PolicyConfig
from dreamzero.serve import PolicyClient, PolicyServer
from dreamzero.train.data import DataConfig, LeRobotDataset, normalize, unnormalize
from dreamzero.train.export import export_checkpoint
from dreamzero.train.prepare import PreparedDataset, encoders_from_module, prepare_dataset
from dreamzero.train.synthetic import make_synthetic_dataset
from dreamzero.train.trainer import TrainConfig, Trainer

PRESET = "tiny-synthetic"          # the tiny model shaped for the synthetic robot (24 actions per chunk, 10 dims)


def train_and_export(out: str, steps: int) -> str:
    """Steps 1-4; returns the export folder."""
    cfg = get_config(PRESET)
    raw = make_synthetic_dataset(os.path.join(out, "dataset"), num_episodes=2, length=60, seed=0)
    prepared = prepare_dataset(raw, cfg, encoders_from_module(cfg, "tiny"), DataConfig.for_model(cfg, num_chunks=2),
                               out=os.path.join(out, "prepared"), dtype=torch.float32)
    trainer = Trainer(TrainConfig(data=[prepared], out_dir=os.path.join(out, "run"), model=PRESET, steps=steps,
                                  batch_size=2, lr=5e-3, noise="base", progress=False, tensorboard=False,
                                  gradient_checkpointing=False))
    metrics = trainer.train()
    trainer.close()
    print(f"trained {steps} steps: loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}")
    export = os.path.join(out, "export")
    export_checkpoint(os.path.join(out, "run"), export)
    print(f"exported {export}: {sorted(os.listdir(export))}")
    return export


class Robot:
    """One recorded episode of the dataset played back as a robot: its raw state at any step, the features of its
    instruction and first image, and the latents of the frames it observes (from the prepared clip)."""

    def __init__(self, export: str):
        info = read_export(export)
        self.stats = info.stats["datasets"][0]          # how training normalized states and actions
        self.clip = PreparedDataset(self.stats["prepared"]).get(0)
        ds = LeRobotDataset(self.stats["dataset"], DataConfig.for_model(info.config, num_chunks=2))
        self.columns = ds.load_episode(int(self.clip["episode"])).columns
        self.anchor = int(self.clip["anchor"])
        self.horizon = self.stats["action_horizon"]
        self.frames_per_chunk = info.config.frames_per_chunk

    def raw(self, entry: dict, steps) -> np.ndarray:
        lo, hi = entry["source_dims"]
        return np.asarray(self.columns[entry["source_key"]], np.float64)[steps, lo:hi]

    def state(self, chunk: int) -> np.ndarray:
        """The model's state input at the first step of `chunk` (1-based): each sub-key normalized, padded."""
        step = self.anchor + (chunk - 1) * self.horizon
        x = np.zeros((1, 1, self.stats["state_dim"]), np.float32)
        for e in self.stats["state"]:
            lo, hi = e["dims"]
            x[0, 0, lo:hi] = normalize(self.raw(e, [step]), e, self.stats["normalization"])
        return x

    def joint_targets(self, actions: np.ndarray, chunk: int) -> dict:
        """The model's actions [A, action_dim] of `chunk` as raw targets per sub-key (the statistics inverted;
        relative sub-keys plus the raw state of the same key at the chunk's first step)."""
        step = self.anchor + (chunk - 1) * self.horizon
        states = {e["key"]: e for e in self.stats["state"]}
        out = {}
        for e in self.stats["action"]:
            lo, hi = e["dims"]
            x = unnormalize(actions[:, lo:hi], e, self.stats["normalization"])
            if e["relative"]:
                x = x + self.raw(states[e["key"]], [step])
            out[e["key"]] = x
        return out

    def recorded(self, chunk: int) -> dict:
        steps = self.anchor + (chunk - 1) * self.horizon + np.arange(self.horizon)
        return {e["key"]: self.raw(e, steps) for e in self.stats["action"]}

    def observation(self, chunk: int) -> np.ndarray:
        """The latents of the frames recorded during `chunk` (1-based)."""
        f = 1 + (chunk - 1) * self.frames_per_chunk
        return self.clip["latents"][None, :, f:f + self.frames_per_chunk].numpy()


def drive_an_episode(export: str, chunks: int = 2) -> list:
    """Steps 5-6: serve the export, drive the recorded episode; returns the joint targets of every chunk."""
    info = read_export(export)
    policy = Policy(load_model(export), PolicyConfig(num_steps=4, sampler="euler", cfg_mode="batched"))
    robot = Robot(export)
    targets = []
    with PolicyServer(policy, port=0, model_name=info.config_name) as server, \
            PolicyClient(server.url, timeout=120) as client:
        meta = client.metadata()
        print(f"serving {meta['model']} on {server.url}; actions {meta['shapes']['actions']}")
        c = robot.clip
        client.reset(c["text"][None].numpy(), c["clip"][None].numpy(), c["latents"][None, :, :1].numpy(),
                     embodiment=np.zeros(1, np.int64))
        for chunk in range(1, chunks + 1):
            obs = None if chunk == 1 else robot.observation(chunk - 1)
            t0 = time.perf_counter()
            reply = client.step(obs, robot.state(chunk))
            ms = (time.perf_counter() - t0) * 1e3
            joints = robot.joint_targets(reply["actions"][0], chunk)
            recorded = robot.recorded(chunk)
            err = {k: float(np.abs(joints[k] - recorded[k]).mean()) for k in joints}
            print(f"chunk {chunk}: {reply['actions'].shape[1]} actions in {ms:.0f} ms; first joint targets "
                  f"{np.round(joints['joint_position'][0], 3).tolist()}; mean |target - recorded| "
                  + ", ".join(f"{k} {v:.3f}" for k, v in err.items()))
            targets.append(joints)
    return targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    a = p.parse_args(argv)
    torch.set_num_threads(1)              # the tiny model is faster on one thread
    out = a.out or tempfile.mkdtemp(prefix="dz-journey-")
    export = train_and_export(out, a.steps)
    targets = drive_an_episode(export)
    assert all(np.isfinite(v).all() for t in targets for v in t.values())
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
