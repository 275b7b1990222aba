"""Precomputed training features: `dz prepare-data` encodes a LeRobot dataset's clips once with the frozen encoders
and stores them beside it; the trainer reads only these.

Per clip (data.LeRobotDataset.clip) the frozen models give:
    latents  [16, F, h, w]        VAE latents of the tiled video (frames scaled to [-1, 1])
    cond     [20, F, h, w]        the I2V conditioning: 4 mask channels (1 on frame 0) + the VAE latents of the first
                                  frame followed by black frames (the release's encode_image)
    clip     [clip_tokens, clip_dim]   CLIP features of the first frame
    text     [text_len, text_dim]      umT5 features of the instruction (stored once per distinct instruction)
and the low-dimensional parts: actions, action_mask, state, has_action, embodiment, episode, anchor.

Layout of a prepared folder (default `<dataset>/dz_prepared/<name>`):
    prepared.json                 format, model shapes, data config, source, per-file clip counts, and the state/
                                  action normalization with its statistics (LeRobotDataset.normalization_info)
    episode_XXXXXX.safetensors    the clips of one episode, stacked on dim 0; text [m, ...] + text_index [n]
Every file is written atomically (dz_kernels.atomic); prepared.json is rewritten after each episode and
marked complete at the end, so an interrupted preparation leaves an index of finished episodes only, a rerun with
the same settings skips them, and the trainer refuses an incomplete folder.

Encoders: anything with the four methods of `FeatureEncoders` (encode_video, i2v_condition, encode_image,
encode_text). `encoders_from_module` adapts model/dreamzero/encoders.py (the Wan VAE, CLIP and umT5 wrappers from a local
Wan2.1-I2V *-Diffusers folder, or their tiny random versions for tests and demos).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from dz_kernels.atomic import atomic_output, atomic_write_json

from .data import DataConfig, DataError, LeRobotDataset
from .step import Batch

__all__ = ["FeatureEncoders", "encoders_from_module", "prepare_dataset", "PreparedDataset",
           "PREPARED_FORMAT"]

PREPARED_FORMAT = "dz-prepared-v1"
_CLIP_KEYS = ("latents", "cond", "clip", "actions", "action_mask", "state", "has_action", "embodiment", "episode",
              "anchor", "text_index")


class FeatureEncoders(Protocol):
    """What preparation needs from the frozen models (batched; video in [-1, 1])."""

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> latents [B, 16, 1 + (T - 1) / 4, H / 8, W / 8]."""

    def i2v_condition(self, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[B, 3, H, W], T -> [B, 20, 1 + (T - 1) / 4, H / 8, W / 8]."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, clip_tokens, clip_dim]."""

    def encode_text(self, texts: list) -> torch.Tensor:
        """list of B strings -> [B, text_len, text_dim]."""


def encoders_from_module(cfg, kind: str = "tiny", path: str | None = None, tokenizer_path: str | None = None,
                         device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> FeatureEncoders:
    """The frozen encoders of model/dreamzero/encoders.py (dreamzero.encoders) as FeatureEncoders.

    kind "tiny": random small versions shaped for `cfg` (the Wan VAE's real strides, CLIP with cfg.clip_tokens
    tokens of cfg.clip_dim, umT5 of cfg.text_dim over cfg.text_len tokens), for tests and demos.
    kind "release": loaded from a local Wan2.1-I2V *-Diffusers folder `path` (vae/, image_encoder/, text_encoder/,
    tokenizer/; or `tokenizer_path`), nothing downloaded; dtype defaults to bf16 for the text/image encoders and
    fp32 for the VAE, as encoders.py does.
    """
    from .. import encoders as enc

    if kind == "tiny":
        vae = enc.VideoVAE.tiny(z_dim=cfg.latent_channels, seed=seed, wan22=cfg.vae_spatial_stride == 16)
        image = enc.ImageEncoder.tiny(clip_dim=cfg.clip_dim, clip_tokens=cfg.clip_tokens, seed=seed)
        text = enc.TextEncoder.tiny(text_dim=cfg.text_dim, text_len=cfg.text_len, seed=seed)
    elif kind == "release":
        if path is None:
            raise ValueError("kind 'release' needs path= (a local Wan2.1-I2V-14B-480P-Diffusers folder)")
        kw = {} if dtype is None else {"dtype": dtype}
        vae = enc.VideoVAE.from_pretrained(path, device=device, **kw)
        image = enc.ImageEncoder.from_pretrained(path, device=device, **kw)
        text = enc.TextEncoder.from_pretrained(path, tokenizer_path=tokenizer_path, text_len=cfg.text_len,
                                               device=device, **kw)
    else:
        raise ValueError(f"encoder kind must be 'tiny' or 'release', got {kind!r}")
    return _ModuleEncoders(vae, image, text, device)


class _ModuleEncoders:
    """FeatureEncoders over encoders.py's VideoVAE, ImageEncoder and TextEncoder (all frozen, eval mode)."""

    def __init__(self, vae, image, text, device):
        self.device = torch.device(device)
        self.vae, self.image, self.text = (m.to(self.device).eval().requires_grad_(False) for m in (vae, image, text))

    @torch.no_grad()
    def encode_video(self, video):
        return self.vae.encode(video.to(self.device))

    @torch.no_grad()
    def i2v_condition(self, first_frame, num_frames):
        return self.vae.encode_i2v_condition(first_frame.to(self.device), num_frames)

    @torch.no_grad()
    def encode_image(self, image):
        return self.image(image.to(self.device))

    @torch.no_grad()
    def encode_text(self, texts):
        return self.text(list(texts))


# ------------------------------------------------------------------------------------------------ preparation
def _atomic_save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1] (the release: x * 2 / 255 - 1)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() * (2.0 / 255.0) - 1.0


@torch.no_grad()
def prepare_dataset(root: str, model_cfg, encoders: FeatureEncoders, data_cfg: DataConfig | None = None,
                    out: str | None = None, anchor_stride: int | None = None, dtype: torch.dtype = torch.bfloat16,
                    episodes: list | None = None, batch_size: int = 1, progress: bool = False) -> str:
    """Encode the clips of the LeRobot dataset at `root` and write a prepared folder; returns its path.

    data_cfg: defaults to DataConfig.for_model(model_cfg). anchor_stride: steps between the anchors taken from each
    episode (default: the action horizon). dtype: storage dtype of latents/cond/clip/text (bf16 as the release feeds
    them). The latent size produced by the encoders must match the model config.
    """
    data_cfg = data_cfg or DataConfig.for_model(model_cfg)
    ds = LeRobotDataset(root, data_cfg)
    out = out or os.path.join(ds.root, "dz_prepared", f"{model_cfg.name}-k{data_cfg.num_chunks}")
    os.makedirs(out, exist_ok=True)
    settings = {"data_config": data_cfg.to_dict(), "anchor_stride": anchor_stride or ds.horizon,
                "dtype": str(dtype).replace("torch.", ""), "model": model_cfg.name}
    index_path = os.path.join(out, "prepared.json")
    old = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            prev = json.load(f)
        if prev.get("settings") == settings:
            old = {e["episode"]: e for e in prev.get("files", [])}
    files = []
    eps = episodes if episodes is not None else ds.episode_indices
    it = eps
    if progress:
        try:
            from tqdm import tqdm
            it = tqdm(eps, desc=f"prepare {os.path.basename(ds.root)}")
        except ImportError:
            pass
    F_lat = model_cfg.num_frames(data_cfg.num_chunks)
    normalization = ds.normalization_info()     # recorded so that an export can un-normalize actions

    def write_index(complete: bool) -> None:
        # rewritten after every episode (atomically), so an interrupted run resumes where it stopped; the trainer
        # reads only a complete index
        atomic_write_json(index_path, {
            "format": PREPARED_FORMAT, "complete": complete, "settings": settings, "source": ds.describe(),
            "shapes": {"latent": [model_cfg.latent_channels, F_lat, model_cfg.latent_height, model_cfg.latent_width],
                       "cond_channels": model_cfg.cond_channels, "text": [model_cfg.text_len, model_cfg.text_dim],
                       "clip": [model_cfg.clip_tokens, model_cfg.clip_dim],
                       "actions": [data_cfg.num_chunks * ds.horizon, data_cfg.action_dim],
                       "state": [data_cfg.num_chunks * data_cfg.states_per_chunk, data_cfg.state_dim]},
            "num_chunks": data_cfg.num_chunks, "embodiment_id": data_cfg.embodiment_id,
            "embodiment_tag": ds.embodiment_tag, "has_action": ds.has_action,
            "num_clips": sum(f["clips"] for f in files), "files": files, "normalization": normalization})

    for e in it:
        fname = f"episode_{e:06d}.safetensors"
        if e in old and os.path.exists(os.path.join(out, fname)):
            files.append(old[e])
            continue
        clips = list(ds.iter_clips(anchor_stride, episodes=[e]))
        if not clips:
            files.append({"episode": e, "file": None, "clips": 0})
            continue
        texts = sorted({c.text for c in clips})
        tindex = {t: i for i, t in enumerate(texts)}
        lat, cond, clipf = [], [], []
        for i in range(0, len(clips), batch_size):
            group = clips[i:i + batch_size]
            video = torch.stack([_to_video(c.frames) for c in group])                   # [b, 3, T, H, W]
            lat.append(encoders.encode_video(video).float().cpu())
            if model_cfg.cond_channels:
                cond.append(encoders.i2v_condition(video[:, :, 0], video.shape[2]).float().cpu())
            else:            # a model without I2V channels (the 5B): an empty cond, as the model takes none
                cond.append(torch.zeros(len(video), 0, *lat[-1].shape[2:]))
            clipf.append(encoders.encode_image(video[:, :, 0]).float().cpu())
        lat, cond, clipf = torch.cat(lat), torch.cat(cond), torch.cat(clipf)
        want = (len(clips), model_cfg.latent_channels, F_lat, model_cfg.latent_height, model_cfg.latent_width)
        if tuple(lat.shape) != want:
            raise ValueError(f"the VAE gave latents {list(lat.shape)} for {ds.root} episode {e}; the model "
                             f"{model_cfg.name} needs {list(want)} (check view_size and num_chunks)")
        if tuple(cond.shape) != (want[0], model_cfg.cond_channels) + want[2:]:
            raise ValueError(f"the I2V condition has shape {list(cond.shape)}, expected "
                             f"{[want[0], model_cfg.cond_channels, *want[2:]]}")
        text = encoders.encode_text(texts).float().cpu()
        tensors = {
            "latents": lat.to(dtype), "cond": cond.to(dtype), "clip": clipf.to(dtype), "text": text.to(dtype),
            "actions": torch.from_numpy(np.stack([c.actions for c in clips])),
            "action_mask": torch.from_numpy(np.stack([c.action_mask for c in clips])).to(torch.uint8),
            "state": torch.from_numpy(np.stack([c.state for c in clips])),
            "has_action": torch.tensor([c.has_action for c in clips], dtype=torch.uint8),
            "embodiment": torch.tensor([c.embodiment for c in clips], dtype=torch.int64),
            "episode": torch.tensor([c.episode for c in clips], dtype=torch.int64),
            "anchor": torch.tensor([c.anchor for c in clips], dtype=torch.int64),
            "text_index": torch.tensor([tindex[c.text] for c in clips], dtype=torch.int64),
        }
        _atomic_save_safetensors(tensors, os.path.join(out, fname), {"texts": json.dumps(texts)})
        files.append({"episode": e, "file": fname, "clips": len(clips)})
        write_index(complete=False)
    if sum(f["clips"] for f in files) == 0:
        raise DataError(f"no episode of {ds.root} is long enough for a clip of {data_cfg.num_chunks} chunks "
                        f"({ds.clip_steps + 1} steps) after filtering")
    write_index(complete=True)
    return out


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class _Item:
    folder: int
    file: str
    row: int


class PreparedDataset:
    """The clips of one or more prepared folders, indexable 0..len-1 (folders in order, files in order)."""

    def __init__(self, folders):
        if isinstance(folders, str):
            folders = [folders]
        self.folders = [os.path.abspath(f) for f in folders]
        self.index = []
        self.items: list = []
        for fi, folder in enumerate(self.folders):
            path = os.path.join(folder, "prepared.json")
            if not os.path.exists(path):
                hint = ""
                if os.path.exists(os.path.join(folder, "meta", "info.json")):
                    hint = " (this is a raw LeRobot dataset: run `dz prepare-data` on it first)"
                raise DataError(f"no prepared.json in {folder}{hint}")
            with open(path) as f:
                try:
                    meta = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"corrupt JSON in {path}: {e}") from None
            if meta.get("format") != PREPARED_FORMAT:
                raise DataError(f"{path} has format {meta.get('format')!r}, expected {PREPARED_FORMAT!r}")
            if not meta.get("complete"):
                raise DataError(f"the preparation of {folder} did not finish ({len(meta.get('files', []))} "
                                f"episodes done): rerun `dz prepare-data` with the same settings to complete it")
            self.index.append(meta)
            for ent in meta["files"]:
                if ent["file"] is None:
                    continue
                fp = os.path.join(folder, ent["file"])
                if not os.path.exists(fp):
                    raise DataError(f"{path} lists {ent['file']}, which is missing from {folder}")
                self.items.extend(_Item(fi, fp, r) for r in range(ent["clips"]))
        if not self.items:
            raise DataError(f"the prepared folders {self.folders} hold no clips")
        shapes = {json.dumps({k: v for k, v in m["shapes"].items()}) for m in self.index}
        if len(shapes) > 1:
            raise DataError(f"the prepared folders {self.folders} have different clip shapes: {sorted(shapes)}")
        self.shapes = self.index[0]["shapes"]
        self.num_chunks = self.index[0]["num_chunks"]
        self._handles: dict = {}
        self._texts: dict = {}

    def __len__(self) -> int:
        return len(self.items)

    def check_model(self, cfg) -> int:
        """Check the clips fit the model config; returns K."""
        lat = self.shapes["latent"]
        want = [cfg.latent_channels, cfg.num_frames(self.num_chunks), cfg.latent_height, cfg.latent_width]
        problems = []
        if lat != want:
            problems.append(f"latents {lat} vs the model's {want}")
        if self.shapes["text"] != [cfg.text_len, cfg.text_dim]:
            problems.append(f"text {self.shapes['text']} vs {[cfg.text_len, cfg.text_dim]}")
        if self.shapes["clip"] != [cfg.clip_tokens, cfg.clip_dim]:
            problems.append(f"clip {self.shapes['clip']} vs {[cfg.clip_tokens, cfg.clip_dim]}")
        if self.shapes["actions"] != [self.num_chunks * cfg.actions_per_chunk, cfg.action_dim]:
            problems.append(f"actions {self.shapes['actions']} vs "
                            f"{[self.num_chunks * cfg.actions_per_chunk, cfg.action_dim]}")
        if self.shapes["state"] != [self.num_chunks * cfg.states_per_chunk, cfg.state_dim]:
            problems.append(f"state {self.shapes['state']} vs "
                            f"{[self.num_chunks * cfg.states_per_chunk, cfg.state_dim]}")
        if problems:
            raise DataError(f"the prepared data in {self.folders} does not fit model {cfg.name}: "
                            + "; ".join(problems))
        return self.num_chunks

    def normalization(self) -> list:
        """Per prepared folder, how its state and action vectors were normalized (the "datasets" entries of an
        export's dz_stats.json, see dreamzero.train.export); None for a folder prepared before this was recorded."""
        out = []
        for folder, m in zip(self.folders, self.index):
            n = m.get("normalization")
            out.append(None if n is None else {**n, "prepared": folder})
        return out

    def check_embodiments(self, num_slots: int) -> None:
        for folder, m in zip(self.folders, self.index):
            if not 0 <= int(m["embodiment_id"]) < num_slots:
                raise DataError(f"{folder} was prepared for embodiment slot {m['embodiment_id']}, the model has "
                                f"{num_slots} slot(s) (add one with add_embodiment)")

    def _handle(self, path: str):
        from safetensors import safe_open

        h = self._handles.get(path)
        if h is None:
            if len(self._handles) > 64:
                self._handles.clear()
            try:
                h = safe_open(path, framework="pt", device="cpu")
                texts = json.loads(h.metadata()["texts"])
            except Exception as e:
                raise DataError(f"cannot read prepared file {path}: {type(e).__name__}: {e}") from None
            self._handles[path] = h
            self._texts[path] = (h.get_tensor("text"), texts)
        return h

    def get(self, i: int) -> dict:
        """Clip i as a dict of tensors (no batch dim)."""
        it = self.items[i]
        h = self._handle(it.file)
        d = {k: h.get_slice(k)[it.row:it.row + 1][0] for k in _CLIP_KEYS}
        d["text"] = self._texts[it.file][0][int(d["text_index"])]
        return d

    def collate(self, indices: list) -> Batch:
        """A Batch of clips (float32; masks bool) in the given order."""
        rows = [self.get(i) for i in indices]

        def st(key, dtype):
            return torch.stack([r[key] for r in rows]).to(dtype)
        return Batch(latents=st("latents", torch.float32), cond=st("cond", torch.float32),
                     text=st("text", torch.float32), clip=st("clip", torch.float32),
                     actions=st("actions", torch.float32), action_mask=st("action_mask", torch.bool),
                     state=st("state", torch.float32), has_action=st("has_action", torch.bool),
                     embodiment=st("embodiment", torch.int64))
