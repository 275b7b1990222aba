"""Command-line entry points of the trainer: `dz make-synthetic-data`, `dz prepare-data`, `dz train`, `dz export`.

Each is a function taking argv (a list of str) and returning an exit code; `COMMANDS` maps the command names to them.

A complete run on a CPU with the synthetic dataset and the tiny model (a few minutes at most):

    dz make-synthetic-data /tmp/dz-syn
    dz prepare-data /tmp/dz-syn --config tiny-synthetic --num-chunks 2 --encoders tiny
    dz train --data /tmp/dz-syn/dz_prepared/tiny-k2 --out /tmp/dz-run --config tiny-synthetic \\
        --steps 60 --batch-size 2 --lr 5e-3 --noise base
    dz export /tmp/dz-run /tmp/dz-run/export

On GPUs: `torchrun --nproc_per_node 8 -m dreamzero.train.cli train --data ... --config droid-14b --init <ckpt>`
(FSDP2 across the ranks; `--nnodes`/`--rdzv-endpoint` as torchrun takes them for several nodes). The real encoders
come from a local Wan2.1-I2V-14B-480P-Diffusers folder: `dz prepare-data <dataset> --encoders release
--encoder-path <folder> --device cuda`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

from ..cli_support import ArgumentParser, CommandError, command

__all__ = ["COMMANDS", "make_synthetic_data_main", "prepare_data_main", "train_main", "export_main"]


def _size(text: str) -> tuple:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got {text!r}") from None


def _overrides(items) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise CommandError(f"--override takes FIELD=VALUE, got {it!r} (e.g. --override num_layers=2)")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _dtype(name: str):
    import torch
    table = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    if name not in table:
        raise CommandError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ------------------------------------------------------------------------------------------------ make-synthetic-data
@command("dz make-synthetic-data")
def make_synthetic_data_main(argv: list) -> int:
    """Write a small synthetic LeRobot dataset (see dreamzero.train.synthetic)."""
    from .synthetic import make_synthetic_dataset

    p = ArgumentParser(prog="dz make-synthetic-data", description=make_synthetic_data_main.__doc__)
    p.add_argument("out", help="folder to create (absent or empty)")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--length", type=int, default=80, help="steps per episode")
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--view-size", type=_size, default=(16, 24), help="HxW of each camera (default 16x24)")
    p.add_argument("--version", choices=("v2.1", "v3.0"), default="v2.1")
    p.add_argument("--video-only", action="store_true", help="no action column (e.g. human videos)")
    p.add_argument("--embodiment-tag", default="oxe_droid")
    p.add_argument("--no-release-meta", action="store_true", help="skip meta/modality.json and embodiment.json")
    p.add_argument("--idle-steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a LeRobot dataset already in OUT (with its prepared features)")
    a = p.parse_args(argv)
    try:
        root = make_synthetic_dataset(a.out, num_episodes=a.episodes, length=a.length, fps=a.fps,
                                      view_size=a.view_size, version=a.version, with_actions=not a.video_only,
                                      embodiment_tag=a.embodiment_tag, release_meta=not a.no_release_meta,
                                      idle_steps=a.idle_steps, seed=a.seed, overwrite=a.overwrite)
    except (FileExistsError, ValueError) as e:
        raise CommandError(str(e)) from e
    print(f"wrote a synthetic LeRobot {a.version} dataset of {a.episodes} episodes to {root}")
    return 0


# ------------------------------------------------------------------------------------------------ prepare-data
@command("dz prepare-data")
def prepare_data_main(argv: list) -> int:
    """Encode a LeRobot dataset's training clips once with the frozen VAE, CLIP and umT5 (stored beside it)."""
    p = ArgumentParser(prog="dz prepare-data", description=prepare_data_main.__doc__)
    p.add_argument("dataset", help="LeRobot dataset folder (meta/info.json inside)")
    p.add_argument("--config", default="droid-14b", help="model config or trainer preset (e.g. tiny-synthetic)")
    p.add_argument("--override", action="append", help="model config field override FIELD=VALUE (repeatable)")
    p.add_argument("--num-chunks", type=int, default=None, help="chunks per clip (default: the model's max_chunks)")
    p.add_argument("--out", default=None, help="output folder (default <dataset>/dz_prepared/<config>-k<K>)")
    p.add_argument("--encoders", choices=("tiny", "release"), default="release")
    p.add_argument("--encoder-path", default=None, help="local Wan2.1-I2V *-Diffusers folder (--encoders release)")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--anchor-stride", type=int, default=None, help="steps between clip anchors (default: horizon)")
    p.add_argument("--dtype", default="bf16", help="storage dtype of the features: bf16 or fp32")
    p.add_argument("--batch-size", type=int, default=1, help="clips per encoder call")
    p.add_argument("--embodiment-id", type=int, default=0, help="the model's embodiment slot for these clips")
    p.add_argument("--embodiment-tag", default=None, help="override meta/embodiment.json")
    p.add_argument("--video-only", action="store_true", help="no action loss for these clips")
    p.add_argument("--video-fps", type=float, default=None,
                   help="video frame rate fed to the VAE (default: the release's, 8 frames per 24-step action chunk)")
    p.add_argument("--tiling", choices=("auto", "droid", "grid", "single"), default="auto")
    p.add_argument("--relative-keys", nargs="*", default=None,
                   help="action sub-keys made relative to the state (default: the release's for a known embodiment, "
                        "else the joint sub-keys)")
    p.add_argument("--state-keys", nargs="+", default=None,
                   help="state sub-keys of modality.json, in order (default: the release's for a known embodiment)")
    p.add_argument("--action-keys", nargs="+", default=None, help="action sub-keys, in order (same default)")
    p.add_argument("--normalization", choices=("q99", "mean_std", "min_max", "none"), default="q99")
    p.add_argument("--idle-threshold", type=float, default=0.01, help="negative disables the idle-action filter")
    p.add_argument("--episodes", type=int, nargs="*", default=None, help="only these episode indices")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not os.path.isdir(a.dataset):
        raise CommandError(f"{a.dataset} does not exist: give the folder of a LeRobot dataset (meta/info.json "
                           f"inside), e.g. one made by `dz make-synthetic-data {a.dataset}`")
    if not os.path.isfile(os.path.join(a.dataset, "meta", "info.json")):
        raise CommandError(f"{a.dataset} is not a LeRobot dataset (no meta/info.json): give the dataset's root "
                           f"folder")
    if a.encoders == "release" and not a.encoder_path:
        raise CommandError("--encoders release (the default) needs --encoder-path <a local "
                           "Wan2.1-I2V-14B-480P-Diffusers folder>; for a quick run without it, --encoders tiny")
    import torch

    from .data import DataConfig
    from .prepare import encoders_from_module, prepare_dataset
    from .trainer import resolve_model_config

    mcfg = resolve_model_config(a.config, _overrides(a.override))
    kw = dict(video_fps=a.video_fps, tiling=a.tiling, normalization=a.normalization,
              idle_threshold=None if a.idle_threshold < 0 else a.idle_threshold, embodiment_id=a.embodiment_id,
              embodiment_tag=a.embodiment_tag, video_only=a.video_only)
    if a.num_chunks is not None:
        kw["num_chunks"] = a.num_chunks
    if a.relative_keys is not None:
        kw["relative_action_keys"] = tuple(a.relative_keys)
    if a.state_keys is not None:
        kw["state_keys"] = tuple(a.state_keys)
    if a.action_keys is not None:
        kw["action_keys"] = tuple(a.action_keys)
    dcfg = DataConfig.for_model(mcfg, **kw)
    enc = encoders_from_module(mcfg, a.encoders, path=a.encoder_path, tokenizer_path=a.tokenizer_path,
                               device=a.device)
    with torch.inference_mode():
        out = prepare_dataset(a.dataset, mcfg, enc, dcfg, out=a.out, anchor_stride=a.anchor_stride,
                              dtype=_dtype(a.dtype), episodes=a.episodes, batch_size=a.batch_size,
                              progress=not a.no_progress)
    with open(f"{out}/prepared.json") as f:
        n = json.load(f)["num_clips"]
    print(f"prepared {n} clips in {out}")
    return 0


# ------------------------------------------------------------------------------------------------ train
def _flag_names(message: str, fields: set) -> str:
    """A TrainConfig message with its field names written as the flags of `dz train` (steps -> --steps)."""
    names = {"out_dir": "--out", "model": "--config", **{f: "--" + f.replace("_", "-") for f in fields}}
    return re.sub(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b",
                  lambda m: names[m.group(1)], message)


def _train_parser():
    from .trainer import TrainConfig

    p = ArgumentParser(prog="dz train", description="Train DreamZero (flow matching with teacher forcing; "
                       "FSDP2 when launched by torchrun with several ranks).")
    p.add_argument("--data", action="append", required=True, help="prepared folder (repeatable: a mixture)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, tensorboard")
    p.add_argument("--config", default="droid-14b", help="model config or trainer preset (e.g. tiny-synthetic)")
    p.add_argument("--override", action="append", help="model config field override FIELD=VALUE (repeatable)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.95, 0.999))
    p.add_argument("--export", default=None, help="write consolidated safetensors here at the end")
    p.add_argument("--export-dtype", default="fp32", help="bf16 or fp32")
    skip = {"data", "out_dir", "model", "model_overrides", "betas"}
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, int):
            p.add_argument(flag, type=int, default=default)
        elif isinstance(default, float):
            p.add_argument(flag, type=float, default=default)
        elif f.name == "peak_tflops":
            p.add_argument(flag, type=float, default=None)
        else:
            p.add_argument(flag, default=default)
    return p


@command("dz train")
def train_main(argv: list) -> int:
    """Train (one process, or each rank of a torchrun launch)."""
    from .trainer import TrainConfig, Trainer, resolve_model_config

    a = _train_parser().parse_args(argv)
    try:                                                        # a bad name is said before the data is read
        resolve_model_config(a.config, _overrides(a.override))
    except (TypeError, ValueError) as e:
        raise CommandError(f"--override does not fit config {a.config!r}: {e}") from e
    for d in a.data:
        if not os.path.isdir(d):
            raise CommandError(f"--data {d} does not exist: prepare a dataset first (`dz prepare-data <LeRobot "
                               f"dataset> --config {a.config} ...`) and pass the folder it prints")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in fields and k not in ("data", "betas")}
    try:
        cfg = TrainConfig(data=a.data, out_dir=a.out, model=a.config, model_overrides=_overrides(a.override),
                          betas=tuple(a.betas), **kw)
    except ValueError as e:
        raise CommandError(_flag_names(str(e), fields) + " (`dz train --help` lists the options)") from e
    trainer = Trainer(cfg)
    ms = trainer.train()
    if a.export:
        from .export import export_trainer
        path = export_trainer(trainer, a.export, dtype=_dtype(a.export_dtype))
        if path:
            print(f"exported {path}")
    if trainer.rank == 0 and ms:
        last = ms[-1]
        mfu = f", MFU {100 * last['mfu']:.1f}%" if last["mfu"] is not None else ""
        print(f"step {last['step']}: loss {last['loss']:.4f} (video {last['video_loss']:.4f}, action "
              f"{last['action_loss']:.4f}), {last['tokens_per_s']:.0f} tokens/s{mfu}")
    trainer.close()
    return 0


# ------------------------------------------------------------------------------------------------ export
@command("dz export")
def export_main(argv: list) -> int:
    """Consolidate a sharded training checkpoint into an export folder for inference: safetensors weights with the
    model config (dz_config.json) and the training data's statistics (dz_stats.json); `dz serve <out>` serves it."""
    from .export import export_checkpoint, resolve_training_checkpoint

    p = ArgumentParser(prog="dz export", description=export_main.__doc__)
    p.add_argument("checkpoint", help="a checkpoints/step_XXXXXXXX folder, or a run folder (its latest)")
    p.add_argument("out", help="output folder or .safetensors file")
    p.add_argument("--dtype", default="fp32", help="bf16 or fp32")
    p.add_argument("--layout", choices=("dreamzero", "wan", "diffusers"), default="dreamzero")
    a = p.parse_args(argv)
    try:
        ckpt = resolve_training_checkpoint(a.checkpoint)
        path = export_checkpoint(ckpt, a.out, layout=a.layout, dtype=_dtype(a.dtype))
    except FileNotFoundError as e:                 # no such folder, not a run, an incomplete checkpoint
        raise CommandError(str(e)) from e
    print(f"exported {path}; serve it with `dz serve {os.path.dirname(path)}`")
    return 0


COMMANDS = {
    "train": train_main,
    "prepare-data": prepare_data_main,
    "make-synthetic-data": make_synthetic_data_main,
    "export": export_main,
}


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m dreamzero.train.cli {{{','.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
