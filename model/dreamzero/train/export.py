"""Export trained weights as a self-describing folder that the inference engine, `dz serve` and other servers load.

Two sources:
- `export_checkpoint(ckpt_dir, out)`: a sharded training checkpoint (torch.distributed.checkpoint, written by
  Trainer.save) read in a single process, on the CPU, without any process group: the model is built on the meta
  device, materialized empty, and filled by DCP (the optimizer state is not read);
- `export_trainer(trainer, out)`: a live Trainer (any world size): the full state dict is gathered to rank 0
  (CPU offload) and written there.

The export folder (format "dz-export/1"; `dreamzero.checkpoint.read_export` reads it):

    <out>/model.safetensors        the weights (or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                   when large), "dreamzero" key layout by default (the release's `action_head.model.`
                                   names; --layout wan|diffusers writes diffusion_pytorch_model*.safetensors)
    <out>/dz_config.json           what the model is (below)
    <out>/dz_stats.json            the training data's state/action statistics (below), when the data had them
    <out>/SHA256SUMS               written last: the SHA256 of every file above (checkpoint.manifest), which
                                   `load_model` verifies

`load_model(<out>)`, `dz serve <out>` and `load_trained_config(<out>)` need nothing else. Every JSON file is written
atomically (dz_kernels.atomic). A server that is not ours reads the two JSON files as documented here.

dz_config.json:
    {"format": "dz-export/1",
     "config_name": "tiny-synthetic",      # the config or preset name training was given (display; see model_config)
     "model_config": {...},                # every field of dreamzero.config.DreamZeroConfig: the authority on shapes
                                           # (dim, num_layers, ..., actions_per_chunk, action_dim, state_dim,
                                           # num_embodiments incl. slots added in training, name)
     "weights": "model.safetensors",       # file (or .safetensors.index.json) to load, relative to the folder
     "layout": "dreamzero",                # key layout of the weights: dreamzero | wan | diffusers
     "dtype": "float32",                   # dtype the floating weights were written in
     "source": {"checkpoint": "/abs/run/checkpoints/step_00000060", "step": 60},  # checkpoint null for a live export
     "stats": "dz_stats.json"}             # or null: the training data carried no statistics (see below)
  (An older export wrote the DreamZeroConfig fields alone, at the top level; readers accept that too.)

dz_stats.json: how the training data normalized the model's state inputs and action outputs, per prepared dataset
(one entry per `dz train --data` folder; `embodiment_id` is the model slot its clips trained):
    {"format": "dz-stats/1",
     "datasets": [
       {"embodiment_id": 0, "embodiment_tag": "oxe_droid",
        "normalization": "q99",            # q99 | mean_std | min_max | none (dreamzero.train.data.stats)
        "action_horizon": 24,              # dataset steps per action chunk
        "state_dim": 64, "action_dim": 32, # padded widths of the model's state and action vectors
        "state": [{"key": "joint_position", "source_key": "observation.state", "source_dims": [0, 7],
                   "dims": [0, 7], "mean": [...], "std": [...], "min": [...], "max": [...], "q01": [...],
                   "q99": [...]}, ...],
        "action": [{"key": "joint_position", "source_key": "action", "source_dims": [0, 7], "dims": [0, 7],
                    "relative": true, "mean": [...], ... "q99": [...]}, ...],
        "dataset": "/abs/path/of/the/LeRobot/dataset", "prepared": "/abs/path/of/the/prepared/folder"}]}
  Each entry of "state" / "action" is one sub-key of the dataset (meta/modality.json), in the order the model's
  vector holds them: model dims [dims[0], dims[1]) hold that sub-key, which is columns [source_dims[0],
  source_dims[1]) of the dataset's `source_key` column; the dims after the last sub-key are padding (zeros in,
  ignore out). Each statistic is a list of dims[1] - dims[0] floats.
  Normalizing a state you send (x raw -> y model input; the same for actions in training), per dim:
      q99:      y = clip(2 (x - q01) / (q99 - q01) - 1, -1, 1)    where q99 != q01, else y = x
      min_max:  y = clip(2 (x - min) / (max - min) - 1, -1, 1)    where max != min, else y = x
      mean_std: y = (x - mean) / std                              where std != 0,   else y = x
      none:     y = x
  Un-normalizing the actions the model returns (y -> x) inverts that (dreamzero.train.data.stats.unnormalize):
      q99:      x = (y + 1) / 2 (q99 - q01) + q01                 where q99 != q01, else x = y   (min_max alike)
      mean_std: x = y std + mean                                  where std != 0,   else x = y
  "relative": true marks an action sub-key trained relative to the state: x is then the action minus the raw
  (un-normalized) state of the state sub-key with the same "key" at the first step of the chunk; add that state
  back to get the absolute action. Datasets without actions (videos) have "action": [].
  "stats" is null in dz_config.json when the training data was prepared before statistics were recorded (rerun
  `dz prepare-data` and train again, or normalize by the dataset's own meta/stats.json).
"""
from __future__ import annotations

import json
import os

import torch

from ..checkpoint import resolve_checkpoint, save_checkpoint, write_manifest
from ..checkpoint.exported import STATS_FILE, find_export, read_export, write_export_metadata
from ..dreamzero import DreamZero
from .checkpoint_dir import latest_checkpoint
from .trainer import model_config_from_dict

__all__ = ["export_checkpoint", "export_trainer", "load_trained_config", "resolve_training_checkpoint"]


def resolve_training_checkpoint(path: str) -> str:
    """The checkpoint folder `path` names: itself (a step_XXXXXXXX folder with trainer_state.json) or, for a run
    folder, the one its checkpoints/latest names. FileNotFoundError (saying what to pass) otherwise."""
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist: pass the --out folder of `dz train` (or one of its "
                                f"checkpoints/step_XXXXXXXX folders)")
    latest = latest_checkpoint(path)
    if latest is None:
        hint = (" (it is an export already: load it with load_model or `dz serve`)" if find_export(path) else
                ": pass the --out folder of `dz train` (or one of its checkpoints/step_XXXXXXXX folders)")
        raise FileNotFoundError(f"{path} is neither a training checkpoint (no trainer_state.json) nor a run folder "
                                f"(no checkpoints/latest){hint}")
    return latest


def _trainer_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
        return json.load(f)


def load_trained_config(path: str):
    """The DreamZeroConfig a model was trained with: from a training checkpoint folder (its trainer_state.json), a
    run folder (its latest checkpoint) or an export folder (its dz_config.json)."""
    if find_export(path) is not None and not os.path.exists(os.path.join(path, "trainer_state.json")):
        return read_export(path).config
    return model_config_from_dict(_trainer_state(resolve_training_checkpoint(path))["model_config"])


def _write(model: torch.nn.Module, out: str, layout: str, dtype: torch.dtype | None, *, config_name: str | None,
           source: dict, datasets: list | None) -> str:
    path = save_checkpoint(model, out, layout=layout, dtype=dtype)
    folder = out if not out.endswith(".safetensors") else os.path.dirname(os.path.abspath(out))
    written = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    write_export_metadata(folder, model.cfg, weights=path, layout=layout, dtype=str(written).replace("torch.", ""),
                          config_name=config_name, source=source, datasets=datasets)
    extra = ["dz_config.json"] + ([STATS_FILE] if os.path.exists(os.path.join(folder, STATS_FILE)) else [])
    _write_checksums(folder, path, extra)
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
    checkpoints/latest names one) into an export folder `out` (or a .safetensors file name, whose folder receives
    the JSON files). Returns the written weights path.

    dtype: convert floating weights (e.g. torch.bfloat16 for inference); None keeps fp32.
    """
    import torch.distributed.checkpoint as dcp

    from .checkpoint_dir import checkpoint_problem

    ckpt_dir = resolve_training_checkpoint(ckpt_dir)
    problem = checkpoint_problem(ckpt_dir)
    if problem is not None:
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint: {problem}")
    state = _trainer_state(ckpt_dir)
    cfg = model_config_from_dict(state["model_config"])
    with torch.device("meta"):
        model = DreamZero(cfg)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    from .checkpoint_dir import quiet_single_process
    with quiet_single_process():
        dcp.load({"model": sd}, checkpoint_id=ckpt_dir, no_dist=True)
    model.load_state_dict(sd)
    return _write(model, out, layout, dtype, config_name=state.get("train_config", {}).get("model"),
                  source={"checkpoint": os.path.abspath(ckpt_dir), "step": state.get("step")},
                  datasets=state.get("data_stats"))


def export_trainer(trainer, out: str, layout: str = "dreamzero", dtype: torch.dtype | None = None) -> str | None:
    """Write the live trainer's model to `out` (called on every rank; rank 0 writes). Returns the path on rank 0."""
    sd = trainer.full_state_dict()
    path = None
    if trainer.rank == 0:
        with torch.device("meta"):
            model = DreamZero(trainer.model_cfg)
        model.load_state_dict(sd, assign=True)
        path = _write(model, out, layout, dtype, config_name=trainer.cfg.model,
                      source={"checkpoint": None, "step": trainer.step}, datasets=trainer.data.normalization())
    trainer._barrier()
    return path
