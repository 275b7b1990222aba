"""Checkpoints: load and save DreamZero weights as safetensors, in three key layouts, without holding a model twice.

- `keys`: the three key layouts ('dreamzero', 'wan', 'diffusers'), their name maps and detection;
- `safetensors_io`: finding a checkpoint's files, reading safetensors headers, writing safetensors files atomically;
- `lora`: PEFT LoRA pairs in a release's files, merged into the base weights on load;
- `load`: `load_checkpoint` (into an existing model) and `load_model` (built on the meta device, then loaded; with
  one argument, an export folder of `dz export`, which carries its own config);
- `exported`: export folders (dz_config.json + dz_stats.json beside the weights, format in dreamzero.train.export)
  and the training checkpoints that inference refuses (run `dz export` on them);
- `save`: `save_checkpoint` (one file, or shards with an index);
- `manifest`: the SHA256SUMS an export carries, verified on load when present.

The layout of a file is detected from its keys when not given. Files are read through safetensors' memory map one
tensor at a time; tensors go straight into the model (assigned into a model built on the meta device, or copied
into existing parameters), so a 14B checkpoint is never held twice. Nothing is unpickled: only safetensors files
are accepted. Writing is atomic and durable (dz_kernels.atomic).
"""
from .keys import (DREAMZERO_FROZEN_PREFIXES, DREAMZERO_PREFIX, HEAD_PREFIXES, LAYOUTS, CheckpointError,
                   backbone_lacks, detect_layout, from_layout_name, to_layout_name)
from .exported import (CONFIG_FILE, EXPORT_FORMAT, STATS_FILE, STATS_FORMAT, ExportInfo, find_export, read_export,
                       refuse_training_checkpoint, training_checkpoint_kind, write_export_metadata)
from .load import LoadReport, load_checkpoint, load_model
from .manifest import MANIFEST_NAME, verify_manifest, write_manifest
from .safetensors_io import read_checkpoint_index, read_header, resolve_checkpoint
from .save import DEFAULT_MAX_SHARD_BYTES, save_checkpoint

__all__ = [
    "CONFIG_FILE", "DEFAULT_MAX_SHARD_BYTES", "DREAMZERO_FROZEN_PREFIXES", "DREAMZERO_PREFIX", "EXPORT_FORMAT",
    "HEAD_PREFIXES", "LAYOUTS", "MANIFEST_NAME", "STATS_FILE", "STATS_FORMAT", "CheckpointError", "ExportInfo",
    "LoadReport", "backbone_lacks", "detect_layout", "find_export", "from_layout_name", "load_checkpoint",
    "load_model", "read_checkpoint_index", "read_export", "read_header", "refuse_training_checkpoint",
    "resolve_checkpoint", "save_checkpoint", "to_layout_name", "training_checkpoint_kind", "verify_manifest",
    "write_export_metadata", "write_manifest",
]
