"""Export folders (written by `dz export` / dreamzero.train.export, format documented there) and training checkpoints
told apart: what `load_model(<folder>)`, `dz serve <folder>` and `load_trained_config` read.

- `read_export(path)`: the ExportInfo of an export folder (or of a weights file inside one): model config, config
  name, weights path, key layout, the training data's statistics;
- `find_export(path)`: the export folder a path belongs to, or None;
- `write_export_metadata(...)`: dz_config.json and dz_stats.json beside the weights (used by dreamzero.train.export);
- `training_checkpoint_kind(path)` / `refuse_training_checkpoint(path)`: a torch.distributed.checkpoint folder or a
  run folder of `dz train`, which inference does not read (its .metadata is a pickle): it says to run `dz export`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from dz_kernels.atomic import atomic_write_json

from .keys import CheckpointError

__all__ = ["EXPORT_FORMAT", "STATS_FORMAT", "CONFIG_FILE", "STATS_FILE", "ExportInfo", "find_export", "read_export",
           "write_export_metadata", "training_checkpoint_kind", "refuse_training_checkpoint"]

EXPORT_FORMAT = "dz-export/1"
STATS_FORMAT = "dz-stats/1"
CONFIG_FILE = "dz_config.json"
STATS_FILE = "dz_stats.json"


@dataclass(frozen=True)
class ExportInfo:
    """An export folder, as read from its dz_config.json (and dz_stats.json)."""
    folder: str                  # absolute path of the export folder
    config: object               # dreamzero.config.DreamZeroConfig
    config_name: str             # the config or preset name training was given (display)
    weights: str                 # absolute path to load (file or .safetensors.index.json; the folder when unknown)
    layout: str | None           # key layout of the weights, None when not recorded (detected on load)
    stats: dict | None           # the dz_stats.json document, or None
    meta: dict                   # dz_config.json as written


def find_export(path) -> str | None:
    """The export folder `path` is (a folder with dz_config.json) or lies in (a weights file beside one), or None."""
    path = os.path.abspath(os.fspath(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return folder if os.path.isfile(os.path.join(folder, CONFIG_FILE)) else None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def read_export(path) -> ExportInfo:
    """Read the export folder `path` (or the one holding the weights file `path`). Raises CheckpointError when it is
    not one, or when its files are unreadable."""
    from ..config import config_from_dict

    folder = find_export(path)
    if folder is None:
        refuse_training_checkpoint(path)
        raise CheckpointError(f"{path} is not an export folder (no {CONFIG_FILE}): make one with "
                              f"`dz export <run folder> <out>`, or pass the model config with the weights")
    meta = _read_json(os.path.join(folder, CONFIG_FILE))
    if "format" not in meta:                  # an older export: the DreamZeroConfig fields alone
        meta = {"format": None, "model_config": meta, "config_name": meta.get("name"), "weights": None,
                "layout": None, "stats": None}
    elif meta["format"] != EXPORT_FORMAT:
        raise CheckpointError(f"{os.path.join(folder, CONFIG_FILE)}: format {meta['format']!r}, this version reads "
                              f"{EXPORT_FORMAT!r}")
    try:
        cfg = config_from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(folder, CONFIG_FILE)}: bad model_config ({e})") from None
    weights = folder
    if meta.get("weights"):
        weights = os.path.join(folder, meta["weights"])
        if not os.path.exists(weights):
            raise CheckpointError(f"{os.path.join(folder, CONFIG_FILE)} names weights {meta['weights']!r}, which are "
                                  f"missing from {folder}")
    if os.path.isfile(os.path.abspath(os.fspath(path))):
        weights = os.path.abspath(os.fspath(path))      # a weights file given explicitly
    stats = None
    if meta.get("stats"):
        stats = _read_json(os.path.join(folder, meta["stats"]))
        if stats.get("format") != STATS_FORMAT:
            raise CheckpointError(f"{os.path.join(folder, meta['stats'])}: format {stats.get('format')!r}, this "
                                  f"version reads {STATS_FORMAT!r}")
    return ExportInfo(folder=folder, config=cfg, config_name=meta.get("config_name") or cfg.name, weights=weights,
                      layout=meta.get("layout"), stats=stats, meta=meta)


def write_export_metadata(folder: str, config, *, weights: str, layout: str, dtype: str, config_name: str | None,
                          source: dict | None, datasets: list | None) -> str:
    """Write <folder>/dz_config.json and, when `datasets` (the per-dataset normalization entries) is a list without
    None in it, <folder>/dz_stats.json. Returns the dz_config.json path."""
    stats_name = None
    if datasets and all(d is not None for d in datasets):
        atomic_write_json(os.path.join(folder, STATS_FILE), {"format": STATS_FORMAT, "datasets": datasets})
        stats_name = STATS_FILE
    else:
        try:
            os.unlink(os.path.join(folder, STATS_FILE))     # a stale file of an earlier export into this folder
        except FileNotFoundError:
            pass
    doc = {"format": EXPORT_FORMAT, "config_name": config_name or config.name,
           "model_config": dataclasses.asdict(config),
           "weights": os.path.relpath(os.path.abspath(weights), os.path.abspath(folder)), "layout": layout,
           "dtype": dtype, "source": source or {}, "stats": stats_name}
    path = os.path.join(folder, CONFIG_FILE)
    atomic_write_json(path, doc)
    return path


def training_checkpoint_kind(path) -> str | None:
    """"checkpoint" for a checkpoint folder of the trainer (trainer_state.json, or a torch.distributed.checkpoint
    .metadata), "run" for a run folder (checkpoints/latest), else None."""
    path = os.fspath(path)
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        return None
    if os.path.exists(os.path.join(path, "trainer_state.json")) or os.path.exists(os.path.join(path, ".metadata")):
        return "checkpoint"
    if os.path.exists(os.path.join(path, "checkpoints", "latest")):
        return "run"
    return None


def refuse_training_checkpoint(path) -> None:
    """Raise CheckpointError when `path` is a training checkpoint or run folder: inference reads exports only."""
    kind = training_checkpoint_kind(path)
    if kind is not None:
        what = "a training checkpoint" if kind == "checkpoint" else "a training run folder"
        raise CheckpointError(f"{os.fspath(path)} is {what} (torch.distributed.checkpoint), not inference weights: "
                              f"run `dz export {os.fspath(path)} <out>` and load <out>")
