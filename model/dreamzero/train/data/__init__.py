"""LeRobot datasets for DreamZero training: the reader, the clip sampler, statistics and normalization.

- `config`: `DataConfig` (how clips are cut) and `DataError`;
- `files`: JSON, JSONL and parquet files, video decoding (PyAV);
- `stats`: per-feature statistics and the release's normalization modes;
- `tiling`: camera views resized and tiled into one frame;
- `prompts`: the instruction as the release words it for the text encoder;
- `lerobot`: `LeRobotDataset` (v2.x and v3.x layouts) and the training clip it cuts (the formats and the clip rule
  are described there).
"""
from .config import NORM_MODES, RELEASE_KEYS, RELEASE_RELATIVE_KEYS, VAE_TEMPORAL_STRIDE, DataConfig, DataError
from .files import decode_frames, read_json, read_jsonl, read_parquet
from .lerobot import Clip, Episode, LeRobotDataset, Modality, SubKey
from .prompts import DEFAULT_INSTRUCTION, build_prompt
from .stats import STAT_NAMES, compute_feature_stats, normalize, unnormalize
from .tiling import resize_frames, tile_views

__all__ = [
    "DataError", "DataConfig", "Modality", "Episode", "Clip", "LeRobotDataset", "normalize", "unnormalize",
    "tile_views",
    "decode_frames", "read_parquet", "compute_feature_stats", "build_prompt", "DEFAULT_INSTRUCTION",
]
