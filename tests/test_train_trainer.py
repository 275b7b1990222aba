"""The trainer end to end on a CPU: the synthetic LeRobot dataset prepared with the tiny frozen encoders, the tiny
model's loss falling, exact resume from an atomic checkpoint, two-rank FSDP2 on gloo equal to one rank, export to
consolidated safetensors, a video-only mixture, a new embodiment slot, and the command line."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dreamzero.train.data import DataConfig, DataError
from dreamzero.train.prepare import PreparedDataset, encoders_from_module, prepare_dataset
from dreamzero.train.synthetic import make_synthetic_dataset
from dreamzero.train.checkpoint_dir import FAULT_EXIT_CODE, checkpoint_problem, latest_checkpoint
from dreamzero.train.trainer import TrainConfig, Trainer, lr_at, resolve_model_config

PRESET = "tiny-synthetic"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic robot dataset (4 episodes -> 8 clips of 2 chunks) and a video-only one (embodiment slot 1), both
    encoded by the tiny random VAE / CLIP / umT5 of model/dreamzero/encoders.py."""
    root = tmp_path_factory.mktemp("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = resolve_model_config(PRESET)
    enc = encoders_from_module(cfg, "tiny")
    robot = make_synthetic_dataset(str(root / "robot"), num_episodes=4, length=80, seed=0)
    human = make_synthetic_dataset(str(root / "human"), num_episodes=1, length=60, with_actions=False, seed=1)
    out_r = prepare_dataset(robot, cfg, enc, DataConfig.for_model(cfg, num_chunks=2), out=str(root / "prep_robot"),
                            dtype=torch.float32)
    out_h = prepare_dataset(human, cfg, enc, DataConfig.for_model(cfg, num_chunks=2, embodiment_id=1),
                            out=str(root / "prep_human"), dtype=torch.float32)
    torch.set_num_threads(threads)
    return {"root": root, "robot": out_r, "human": out_h, "cfg": cfg, "raw": robot, "enc": enc}


def make_cfg(prepared, out, **kw):
    base = dict(data=[prepared["robot"]], out_dir=str(out), model=PRESET, steps=6, batch_size=2, lr=5e-3,
                save_every=1000, progress=False, tensorboard=False, gradient_checkpointing=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_prepared_clips(prepared):
    ds = PreparedDataset([prepared["robot"], prepared["human"]])
    assert len(ds) == 8 + 1
    b = ds.collate([0, 8])
    cfg = prepared["cfg"]
    assert b.validate(cfg) == 2
    assert b.has_action.tolist() == [True, False] and b.embodiment.tolist() == [0, 1]
    assert b.action_mask[0, :, :8].all() and not b.action_mask[0, :, 8:].any() and not b.action_mask[1].any()
    # frame 0 of the I2V condition is the mask (1) in its 4 first channels
    assert (b.cond[:, :4, 0] == 1).all() and (b.cond[:, :4, 1:] == 0).all()
    meta = json.load(open(os.path.join(prepared["robot"], "prepared.json")))
    assert meta["source"]["tiling"] == "droid" and meta["num_clips"] == 8
    with pytest.raises(DataError, match="dz prepare-data"):
        PreparedDataset(prepared["raw"])


def test_interrupted_preparation_resumes(prepared, tmp_path):
    cfg, enc = prepared["cfg"], prepared["enc"]
    calls = {"n": 0}

    class Flaky:
        """The tiny encoders, failing on the third clip batch (a crash in the middle of episode 1)."""

        def __getattr__(self, name):
            return getattr(enc, name)

        def encode_video(self, video):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")
            return enc.encode_video(video)

    dc = DataConfig.for_model(cfg, num_chunks=2)
    out = str(tmp_path / "prep")
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(prepared["raw"], cfg, Flaky(), dc, out=out, dtype=torch.float32)
    with pytest.raises(DataError, match="did not finish"):
        PreparedDataset(out)
    assert json.load(open(os.path.join(out, "prepared.json")))["num_clips"] == 2       # episode 0 is done
    calls["n"] = 10
    prepare_dataset(prepared["raw"], cfg, Flaky(), dc, out=out, dtype=torch.float32)
    assert calls["n"] == 10 + 6                          # episodes 1..3 encoded (2 clips each), episode 0 skipped
    ds, ref = PreparedDataset(out), PreparedDataset(prepared["robot"])
    assert len(ds) == len(ref) == 8
    assert torch.equal(ds.collate([0, 7]).latents, ref.collate([0, 7]).latents)


def test_loss_falls(prepared, tmp_path):
    tr = Trainer(make_cfg(prepared, tmp_path, steps=60, noise="base", warmup_ratio=0.0))
    items = list(range(8))
    before = tr.eval_loss(items)
    tr.train()
    after = tr.eval_loss(items)
    assert after["loss"] < 0.85 * before["loss"]
    assert after["video_loss"] < 0.85 * before["video_loss"]
    assert after["action_loss"] < before["action_loss"]
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(1, 61))
    assert all(x["tokens_per_s"] > 0 and x["mfu"] is None for x in lines)      # no peak known on a CPU


def test_resume_gives_the_same_next_losses(prepared, tmp_path):
    a = Trainer(make_cfg(prepared, tmp_path / "a", save_every=3))
    full = [m["loss"] for m in a.train()]
    assert len(full) == 6
    ck = tmp_path / "a" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["latest", "step_00000003", "step_00000006"]
    # a second run starting from the step-3 checkpoint; a half-written save (a killed run) lies beside it
    b_ck = tmp_path / "b" / "checkpoints"
    b_ck.mkdir(parents=True)
    shutil.copytree(ck / "step_00000003", b_ck / "step_00000003")
    (b_ck / "latest").write_text("step_00000003\n")
    (b_ck / "step_00000006.tmp").mkdir()
    (b_ck / "step_00000006.tmp" / "__0_0.distcp").write_bytes(b"partial")
    b = Trainer(make_cfg(prepared, tmp_path / "b", save_every=3))
    assert b.step == 3
    rest = [m["loss"] for m in b.train()]
    assert rest == full[3:]                                    # bitwise: same weights, optimizer, data, noise
    assert latest_checkpoint(str(tmp_path / "b")).endswith("step_00000006")
    assert not (b_ck / "step_00000006.tmp").exists()
    sa = a.full_state_dict()
    sb = b.full_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


_KILLED_RUN = r"""
import json, sys
import torch
torch.set_num_threads(1)
from dreamzero.train.trainer import TrainConfig, Trainer
Trainer(TrainConfig(**json.loads(sys.argv[1]))).train()
raise SystemExit("the fault point was never reached")
"""


def _killed_run(cfg: TrainConfig, point: str) -> subprocess.CompletedProcess:
    """Run `cfg` in a subprocess that ends itself (os._exit, as a kill) at the save's fault point `point`."""
    env = dict(os.environ, DZ_FAULT_AT=point, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(cfg.to_dict())], env=env,
                          capture_output=True, text=True, timeout=300)


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    """`latest` when it names a complete checkpoint (every file its trainer_state.json lists, with its size), else
    the newest complete folder; never a half-deleted or half-written one."""
    ck = tmp_path / "checkpoints"

    def folder(step, files, listed=None, state=True):
        d = ck / f"step_{step:08d}"
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        if state:
            listing = {n: len(b) for n, b in files.items()} if listed is None else listed
            (d / "trainer_state.json").write_text(json.dumps({"step": step, "files": listing}))
        return str(d)

    assert latest_checkpoint(str(tmp_path)) is None
    one = folder(1, {"__0_0.distcp": b"abc", ".metadata": b"m"})
    folder(2, {".metadata": b"m"}, listed={"__0_0.distcp": 3, ".metadata": 1})          # shard gone (pruning)
    folder(3, {"__0_0.distcp": b"ab", ".metadata": b"m"}, listed={"__0_0.distcp": 3, ".metadata": 1})
    folder(4, {"__0_0.distcp": b"abc"}, state=False)                                     # save not finished
    assert latest_checkpoint(str(tmp_path)) == one                  # no `latest` (killed before its first write)
    (ck / "latest").write_text("step_00000002\n")
    assert latest_checkpoint(str(tmp_path)) == one                  # `latest` names an incomplete one
    assert checkpoint_problem(str(ck / "step_00000002")) == "__0_0.distcp is missing"
    assert checkpoint_problem(str(ck / "step_00000003")) == "__0_0.distcp holds 2 bytes, the checkpoint lists 3"
    assert "no trainer_state.json" in checkpoint_problem(str(ck / "step_00000004"))
    five = folder(5, {"__0_0.distcp": b"abc", ".metadata": b"m"})
    assert latest_checkpoint(str(tmp_path)) == five
    (ck / "latest").write_text("step_00000001\n")
    assert latest_checkpoint(str(tmp_path)) == one                  # a complete `latest` wins
    with pytest.raises(FileNotFoundError, match="step_00000002 is not a complete checkpoint: __0_0.distcp is missing"):
        Trainer.load(Trainer.__new__(Trainer), str(ck / "step_00000002"))


def test_a_run_killed_at_the_dangerous_points_of_a_save_resumes_exactly(prepared, tmp_path):
    """Kill tests (DZ_FAULT_AT): a run killed after its first checkpoint got its final name but before `latest`
    named it, then a run killed while pruning an old checkpoint. Every folder under a final name stays complete, the
    next run finds the newest complete checkpoint by itself, removes what the kills left, and its losses equal
    those of an uninterrupted run, bit for bit."""
    kw = dict(steps=3, save_every=1, keep_checkpoints=1, batch_size=1)
    ref = [m["loss"] for m in Trainer(make_cfg(prepared, tmp_path / "ref", **dict(kw, save_every=1000))).train()]
    run = tmp_path / "run"
    ck = run / "checkpoints"
    r = _killed_run(make_cfg(prepared, run, **kw), "save:after-rename")
    assert r.returncode == FAULT_EXIT_CODE, r.stderr[-3000:]
    assert sorted(os.listdir(ck)) == ["step_00000001"]                              # and no `latest`
    r = _killed_run(make_cfg(prepared, run, **kw), "prune:mid-delete")
    assert r.returncode == FAULT_EXIT_CODE, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 1" in r.stdout
    names = sorted(os.listdir(ck))
    assert len(names) == 3 and names[0] == "latest" and names[2] == "step_00000002"
    assert checkpoint_problem(str(ck / "step_00000002")) is None
    assert re.fullmatch(r"step_00000001\.deleting-\d+", names[1])                   # moved aside, then killed
    assert not any(f.endswith(".distcp") for f in os.listdir(ck / names[1]))
    (ck / ".latest.abc123.tmp").write_text("step_0000")                              # an interrupted `latest` write
    (ck / "latest.tmp-4242").write_text("step_0000")
    (ck / "step_00000003.tmp").mkdir()
    tr = Trainer(make_cfg(prepared, run, **kw))
    assert tr.step == 2
    assert sorted(os.listdir(ck)) == ["latest", "step_00000002"]                     # the leftovers are gone
    losses = [json.loads(x)["loss"] for x in open(run / "metrics.jsonl")] + [m["loss"] for m in tr.train()]
    assert losses == ref
    assert sorted(os.listdir(ck)) == ["latest", "step_00000003"]


def test_export_loads_in_the_inference_path(prepared, tmp_path):
    from dreamzero.checkpoint import CheckpointError, load_model
    from dreamzero.train.export import export_checkpoint, export_trainer, load_trained_config

    tr = Trainer(make_cfg(prepared, tmp_path / "run", steps=2, save_every=2))
    tr.train()
    p1 = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "exp1"))
    p2 = export_trainer(tr, str(tmp_path / "exp2"), dtype=torch.bfloat16)
    cfg = load_trained_config(latest_checkpoint(str(tmp_path / "run")))
    m1 = load_model(cfg, p1)
    m2 = load_model(cfg, p2)
    live = tr.full_state_dict()
    for k, v in m1.state_dict().items():
        assert torch.equal(v, live[k]), k
        assert m2.state_dict()[k].dtype == torch.bfloat16
    assert json.load(open(tmp_path / "exp1" / "dz_config.json"))["model_config"]["action_dim"] == cfg.action_dim
    # each export carries SHA256SUMS (sha256sum's format) over what it wrote; a flipped bit fails the load
    sums = dict(reversed(line.split("  ")) for line in (tmp_path / "exp1" / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == ["dz_config.json", "dz_stats.json", "model.safetensors"]
    assert sums["model.safetensors"] == hashlib.sha256(open(p1, "rb").read()).hexdigest()
    raw = bytearray(open(p1, "rb").read())
    raw[-5] ^= 0x10                                     # one bit of the last weight
    open(p1, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(p1) + r": sha256 [0-9a-f]{64} does not match"):
        load_model(cfg, p1)


def _torchrun(args, env_extra=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreamzero.train.cli", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_rank_fsdp2_on_gloo_matches_one_rank(prepared, tmp_path):
    """torchrun --nproc_per_node 2: FSDP2 (fully_shard per block, gloo) with 1 clip per rank gives the losses and
    gradient norms of one process with 2 clips per step; its sharded checkpoints export to the same weights, and one
    process resumes from them (DCP reshards 2 -> 1) with the same next losses."""
    from dreamzero.checkpoint import load_model
    from dreamzero.train.export import export_checkpoint

    one = Trainer(make_cfg(prepared, tmp_path / "one", steps=4, save_every=4, noise="flash"))
    ref = one.train()
    args = ["--data", prepared["robot"], "--out", str(tmp_path / "two"), "--config", PRESET, "--steps", "4",
            "--batch-size", "1", "--lr", "5e-3", "--save-every", "2", "--noise", "flash", "--no-progress",
            "--no-tensorboard", "--no-gradient-checkpointing", "--seed", "0", "--export", str(tmp_path / "gathered")]
    r = _torchrun(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    got = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(got) == 4

    def close(a, b):
        return abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(a["loss"])) and \
            abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, a["grad_norm"])

    assert all(close(a, b) for a, b in zip(ref, got)), (ref, got)
    ck = latest_checkpoint(str(tmp_path / "two"))
    assert sorted(f for f in os.listdir(ck) if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # the sharded checkpoint consolidated offline, and the weights gathered from the live ranks at the end (--export)
    m = load_model(resolve_model_config(PRESET), export_checkpoint(ck, str(tmp_path / "two_export")))
    g = load_model(resolve_model_config(PRESET), str(tmp_path / "gathered"))
    live = one.full_state_dict()
    # gradients agree to float rounding (reduce-scatter vs a local sum); Adam divides by sqrt(v), which turns a
    # rounding difference in a near-zero gradient into up to ~1e-3 of one lr = 5e-3 step
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, live[k], rtol=1e-3, atol=2e-5)
        assert torch.equal(v, g.state_dict()[k]), k
    # one process picks up the 2-rank run at step 2 (2 clips per step: the same global batch)
    resumed = Trainer(make_cfg(prepared, tmp_path / "one_more", steps=4, save_every=4, noise="flash",
                               resume=str(tmp_path / "two" / "checkpoints" / "step_00000002")))
    assert resumed.step == 2
    rest = resumed.train()
    assert all(close(a, b) for a, b in zip(got[2:], rest)), (got[2:], rest)


def test_video_only_mixture_and_new_embodiment(prepared, tmp_path):
    # the tiny model has 2 slots: the robot data on slot 0, the human videos (no action loss) on slot 1
    tr = Trainer(make_cfg(prepared, tmp_path / "mix", data=[prepared["robot"], prepared["human"]], steps=3,
                      batch_size=3))
    ms = tr.train()
    assert len(ms) == 3 and all(m["loss"] > 0 for m in ms)
    # a new robot: a third slot copied from slot 0; the other slots are untouched
    tr2 = Trainer(make_cfg(prepared, tmp_path / "new", add_embodiment="0", steps=1))
    assert tr2.model_cfg.num_embodiments == 3
    W = tr2.model.action_decoder.layer1.W
    assert torch.equal(W[2], W[0])
    with pytest.raises(DataError, match="slot"):
        Trainer(make_cfg(prepared, tmp_path / "bad", data=[prepared["human"]],
                         model_overrides={"num_embodiments": 1}))


def test_lr_schedule():
    assert lr_at(0, 100, 1e-5, 0.05) == pytest.approx(0.2e-5)
    assert lr_at(4, 100, 1e-5, 0.05) == pytest.approx(1e-5)
    assert lr_at(5, 100, 1e-5, 0.05) == pytest.approx(1e-5)
    # warmup over ceil(0.05 * 100) = 5 steps, then cosine over the other 95
    assert lr_at(52, 100, 1e-5, 0.05) == pytest.approx(0.5e-5 * (1 + math.cos(math.pi * 47 / 95)), rel=1e-12)
    assert lr_at(99, 100, 1e-5, 0.05) < 1e-8
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(data=["x"], out_dir="y", warmup_ratio=1.5)


def test_command_line(prepared, tmp_path):
    from dreamzero.train.cli import COMMANDS

    assert set(COMMANDS) >= {"train", "prepare-data", "make-synthetic-data"}
    assert COMMANDS["make-synthetic-data"]([str(tmp_path / "syn"), "--episodes", "1", "--length", "50"]) == 0
    assert COMMANDS["prepare-data"]([str(tmp_path / "syn"), "--config", PRESET, "--num-chunks", "2", "--encoders",
                                     "tiny", "--dtype", "fp32", "--no-progress"]) == 0
    prep = tmp_path / "syn" / "dz_prepared" / "tiny-k2"
    assert json.load(open(prep / "prepared.json"))["num_clips"] == 1
    assert COMMANDS["train"](["--data", str(prep), "--out", str(tmp_path / "run"), "--config", PRESET, "--steps",
                              "2", "--batch-size", "1", "--no-progress", "--no-gradient-checkpointing",
                              "--export", str(tmp_path / "run" / "export")]) == 0
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    assert (tmp_path / "run" / "tensorboard").is_dir()
    assert COMMANDS["export"]([str(tmp_path / "run"), str(tmp_path / "exp.safetensors"), "--dtype", "bf16"]) == 0
    assert (tmp_path / "exp.safetensors").exists()


def test_fast_ops_come_through_the_backend_switch():
    """ops="dz" is installed by dreamzero.backend.install_ops from the "dreamzero.ops" entry point (dz_kernels.apply_):
    the trainer imports no kernel module (dz_kernels.env, the environment reader, and dz_kernels.atomic, the durable
    file write, are not ones)."""
    import ast
    import inspect

    from dreamzero.backend import REFERENCE_OPS, available_ops, install_ops
    from dreamzero.dreamzero import DreamZero
    from dreamzero.train import trainer

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(trainer))):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    kernel_imports = [m for m in imported if m.startswith("dz_kernels")
                      and m != "dz_kernels.env" and not m.startswith("dz_kernels.atomic.")]
    assert kernel_imports == [] and "dz_kernels.env" in imported

    assert "dz" in available_ops()
    model = DreamZero("tiny")
    handle = install_ops(model, "dz")
    assert model.ops.attention.__module__.startswith("dz_kernels.")
    handle.undo()
    assert model.ops == REFERENCE_OPS
    with pytest.raises(ValueError, match="no installed package provides the op set 'fast'"):
        install_ops(model, "fast")
