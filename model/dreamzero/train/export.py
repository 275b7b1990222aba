"""Export trained weights to consolidated safetensors that the inference engine loads (dreamzero.checkpoint).

Two sources:
- `export_checkpoint(ckpt_dir, out)`: a sharded training checkpoint (torch.distributed.checkpoint, written by
  Trainer.save) read in a single process, on the CPU, without any process group: the model is built on the meta
  device, materialized empty, and filled by DCP (the optimizer state is not read), then written with
  checkpoint.save_checkpoint;
- `export_trainer(trainer, out)`: a live Trainer (any world size): the full state dict is gathered to rank 0
  (CPU offload) and written there.
The files use the "dreamzero" key layout by default (the release's `action_head.model.` names), so
`checkpoint.load_model(config, out)` and the inference engine read them back; the model config is written beside
them as `dz_config.json` (including added embodiment slots), and last a SHA256SUMS over every file written
(checkpoint.manifest), which `load_model` verifies.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..atomic import atomic_write_json
from ..checkpoint import resolve_checkpoint, save_checkpoint, write_manifest
from ..dreamzero import DreamZero
from .trainer import model_config_from_dict

__all__ = ["export_checkpoint", "export_trainer", "load_trained_config"]


def load_trained_config(ckpt_dir: str):
    """The DreamZeroConfig a training checkpoint was written with (from its trainer_state.json)."""
    path = os.path.join(ckpt_dir, "trainer_state.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a training checkpoint folder (no trainer_state.json)")
    with open(path) as f:
        return model_config_from_dict(json.load(f)["model_config"])


def _write(model: torch.nn.Module, out: str, layout: str, dtype: torch.dtype | None) -> str:
    path = save_checkpoint(model, out, layout=layout, dtype=dtype)
    folder = out if not out.endswith(".safetensors") else os.path.dirname(os.path.abspath(out))
    atomic_write_json(os.path.join(folder, "dz_config.json"), dataclasses.asdict(model.cfg))
    _write_checksums(folder, path, ["dz_config.json"])
    return path


def _write_checksums(folder: str, path: str, extra: list) -> None:
    """SHA256SUMS over the weight files of `path` (its shards and index) and the other files written (`extra`)."""
    shards, _ = resolve_checkpoint(path)
    names = [os.path.basename(f) for f in shards] + list(extra)
    if path.endswith(".json"):
        names.append(os.path.basename(path))
    write_manifest(folder, names)


def export_checkpoint(ckpt_dir: str, out: str, layout: str = "dreamzero", dtype: torch.dtype | None = None) -> str:
    """Consolidate the training checkpoint folder `ckpt_dir` (a step_XXXXXXXX folder, or a run's out_dir whose
    checkpoints/latest names one) into safetensors at `out` (folder or .safetensors file). Returns the written path.

    dtype: convert floating weights (e.g. torch.bfloat16 for inference); None keeps fp32.
    """
    import torch.distributed.checkpoint as dcp

    from .trainer import checkpoint_problem, latest_checkpoint
    if not os.path.exists(os.path.join(ckpt_dir, "trainer_state.json")):
        latest = latest_checkpoint(ckpt_dir)
        if latest is None:
            raise FileNotFoundError(f"{ckpt_dir}: neither a checkpoint folder nor a run folder with a complete "
                                    f"checkpoint under checkpoints/")
        ckpt_dir = latest
    problem = checkpoint_problem(ckpt_dir)
    if problem is not None:
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint: {problem}")
    cfg = load_trained_config(ckpt_dir)
    with torch.device("meta"):
        model = DreamZero(cfg)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    from .trainer import _quiet_single_process
    with _quiet_single_process():
        dcp.load({"model": sd}, checkpoint_id=ckpt_dir, no_dist=True)
    model.load_state_dict(sd)
    return _write(model, out, layout, dtype)


def export_trainer(trainer, out: str, layout: str = "dreamzero", dtype: torch.dtype | None = None) -> str | None:
    """Write the live trainer's model to `out` (called on every rank; rank 0 writes). Returns the path on rank 0."""
    sd = trainer.full_state_dict()
    path = None
    if trainer.rank == 0:
        with torch.device("meta"):
            model = DreamZero(trainer.model_cfg)
        model.load_state_dict(sd, assign=True)
        path = _write(model, out, layout, dtype)
    trainer._barrier()
    return path
