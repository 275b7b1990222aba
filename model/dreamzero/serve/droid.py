"""Raw robot observations in, absolute joint targets out: the DreamZero release's DROID serving rules around a Policy
(docs/reference.md#serving-droid).

Written from the release (dreamzero0/dreamzero: socket_test_optimized_AR.py's ARDroidRoboarenaPolicy, the eval
transforms of groot/vla/data/transform/{video,state_action,concat}.py, DreamTransform._prepare_video, the action
head's lazy_joint_video_action, GrootSimPolicy.unapply):

- frames accumulate per view between calls (`FrameBuffer`): each call appends the frame(s) it carries; the first
  call of an episode uses the newest frame, every later call the newest `frames_per_call` (4), padded at the front
  with the episode's first frame while fewer have arrived;
- each view goes through the checkpoint's transform (`prepare_view`): "release_eval" = the release's eval
  transforms (to [0, 1], center crop to int(h * crop_scale) x int(w * crop_scale), bilinear antialiased resize to
  the view size, back to uint8 by truncation); "dz_train" = our trainer's resize (train.data.tiling);
- the views are tiled as the model was trained (train.data.tiling.tile_views: DROID puts the wrist view, stretched
  2x in width, across the top row and the two exterior views below it) and mapped to [-1, 1];
- first call of an episode, or a new prompt within one: the newest frame is the first frame (CLIP, its latent, the
  I2V condition; Policy.reset_from_images) and the prompt, worded as the release's collator does (build_prompt),
  goes through umT5 once; later calls: the frames are repeated to the chunk's raw frames as the release does
  (4 frames, each twice, make the 8 that the VAE turns into the chunk's 2 latent frames; `chunk_video`) and
  written into the cache (Policy.step_frames, which also applies the release's window reset);
- the state: each key normalized with its statistics, concatenated in the metadata's order, zero-padded to the
  model's state width;
- the actions: the first sum(dims) channels of the model's chunk, split per key, un-normalized with the key's
  statistics (`unnormalize`, the release's inverse), the raw state of the same key added for relative keys (DROID:
  the joints; the gripper is absolute), concatenated: [N, 7 + 1] for DROID.
One model, one episode: an episode is named by the request's session_id, else by the connection; a request from
another episode starts a new one (first call: one frame).
"""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders import clean_prompt
from ..train.data.prompts import build_prompt
from ..train.data.stats import normalize
from ..train.data.tiling import tile_views
from .openpi import Request, RobotSpec
from .protocol import RequestError


class FrameBuffer:
    """One view's frames of an episode, as the release's wrapper keeps them (only what it can still use is kept:
    the first frame, for padding, and the newest `frames_per_call`)."""

    def __init__(self, frames_per_call: int):
        self.n = frames_per_call
        self.first = None
        self.recent: collections.deque = collections.deque(maxlen=frames_per_call)
        self.count = 0

    def add(self, frames: np.ndarray) -> None:
        """frames uint8 [T, H, W, 3] (a single frame is T = 1)."""
        for f in frames:
            if self.first is None:
                self.first = f
            self.recent.append(f)
            self.count += 1

    def take(self, first_call: bool) -> np.ndarray:
        """[1 or frames_per_call, H, W, 3]: the newest frame on the episode's first call, else the newest
        frames_per_call, padded at the front with the first frame while fewer have arrived."""
        if self.count == 0:
            raise RuntimeError("no frame has arrived")
        n = 1 if first_call else self.n
        frames = list(self.recent)[-n:]
        return np.stack([self.first] * (n - len(frames)) + frames)


def prepare_view(frames: np.ndarray, transform: str, crop_scale: float, view_size: tuple) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3] for "release_eval" (the release's VideoToTensor, VideoCrop (center),
    VideoResize, VideoToNumpy); "dz_train" returns the frames as they are (tile_views resizes them as training did)."""
    if transform == "dz_train":
        return frames
    if transform != "release_eval":
        raise ValueError(f"unknown video transform {transform!r}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32).div(255.0).permute(0, 3, 1, 2)
    H, W = x.shape[-2:]
    ch, cw = int(H * crop_scale), int(W * crop_scale)
    top, left = int(round((H - ch) / 2.0)), int(round((W - cw) / 2.0))     # torchvision's center_crop
    x = x[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != tuple(view_size):
        x = F.interpolate(x, size=tuple(view_size), mode="bilinear", align_corners=False, antialias=True)
    return (x.permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()


def chunk_video(frames: torch.Tensor, frames_per_chunk: int, temporal_stride: int) -> torch.Tensor:
    """The release's frames of one chunk [B, 3, T, H, W] -> the stride * frames_per_chunk raw frames that, after the
    first frame, the causal VAE turns into the chunk's latent frames: T // stride latent frames' worth of frames,
    each frame repeated frames_per_chunk / (T // stride) times (the action head's repeat_interleave)."""
    T = frames.shape[2]
    need = temporal_stride * frames_per_chunk
    per = T // temporal_stride
    if per < 1 or frames_per_chunk % per or T * (frames_per_chunk // per) != need:
        raise ValueError(f"{T} frames per call cannot make {frames_per_chunk} latent frames (stride "
                         f"{temporal_stride}): the release's rule needs T a multiple of {temporal_stride} that "
                         f"divides {need}")
    return frames if per == frames_per_chunk else torch.repeat_interleave(frames, frames_per_chunk // per, dim=2)


def unnormalize(x: np.ndarray, stats: dict, mode: str) -> np.ndarray:
    """The release's inverse of the normalization (state_action.py, Normalizer.inverse), in float64:
    q99: (x + 1) / 2 (q99 - q01) + q01; min_max: (x + 1) / 2 (max - min) + min; mean_std: x std + mean; none: x.
    (Where q01 == q99 this gives q01, the constant value of such a dim.)"""
    x = np.asarray(x, dtype=np.float64)
    if mode == "none":
        return x
    if mode in ("q99", "min_max"):
        lo, hi = (np.asarray(stats[n], np.float64) for n in (("q01", "q99") if mode == "q99" else ("min", "max")))
        return (x + 1.0) / 2.0 * (hi - lo) + lo
    if mode == "mean_std":
        return x * np.asarray(stats["std"], np.float64) + np.asarray(stats["mean"], np.float64)
    raise ValueError(f"unknown normalization mode {mode!r}")


def to_model_video(tiled: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [1, 3, T, H, W] in [-1, 1] (x * 2 / 255 - 1, as the release and prepare.py)."""
    return torch.from_numpy(np.ascontiguousarray(tiled)).permute(3, 0, 1, 2)[None].float() * (2.0 / 255.0) - 1.0


def resolve_embodiment(meta_id: int, num_embodiments: int) -> int:
    """The model slot of the metadata's embodiment id: the id itself when the model has that slot; a model with a
    single slot (a checkpoint loaded as one embodiment) runs it whatever the id; else an error."""
    if 0 <= meta_id < num_embodiments:
        return meta_id
    if num_embodiments == 1:
        return 0
    raise ValueError(f"the policy metadata names embodiment slot {meta_id}, but the model has {num_embodiments}")


@dataclasses.dataclass
class _Episode:
    key: str
    buffers: dict
    prompt: str = ""
    calls: int = 0


class RobotPolicy:
    """A Policy served to robot clients: `infer(request, connection_key)` takes a checked openpi Request (raw frames,
    raw state, prompt) and returns the absolute action chunk; `end_episode()` is RoboArena's reset.

    policy: a dreamzero.engine.Policy; encoders: dreamzero.engine.Encoders (umT5, CLIP, the Wan VAE);
    meta: dreamzero.serve.policy_meta.PolicyMetadata (statistics and transforms of the checkpoint).
    """

    def __init__(self, policy, encoders, meta):
        cfg = policy.cfg
        self.policy, self.encoders, self.meta = policy, encoders, meta
        self.spec = RobotSpec.from_metadata(meta)
        if meta.state_dim > cfg.state_dim or meta.action_dim > cfg.action_dim:
            raise ValueError(f"the policy metadata has {meta.state_dim} state and {meta.action_dim} action dims; the "
                             f"model takes {cfg.state_dim} and {cfg.action_dim}")
        if cfg.states_per_chunk != 1:
            raise ValueError(f"a robot client sends one state per call; the model takes {cfg.states_per_chunk}")
        if meta.action_horizon != cfg.actions_per_chunk:
            raise ValueError(f"the policy metadata's action horizon {meta.action_horizon} is not the model's "
                             f"{cfg.actions_per_chunk} actions per chunk")
        vae = encoders.vae
        frame = (2 * meta.view_size[0], 2 * meta.view_size[1])                 # every tiling fills 2h x 2w
        latent = (frame[0] // vae.spatial_stride, frame[1] // vae.spatial_stride)
        if latent != (cfg.latent_height, cfg.latent_width) or frame[0] % vae.spatial_stride:
            raise ValueError(f"views of {meta.view_size[0]}x{meta.view_size[1]} tile into {frame[0]}x{frame[1]} "
                             f"frames, which the VAE turns into {latent[0]}x{latent[1]} latents; the model takes "
                             f"{cfg.latent_height}x{cfg.latent_width}")
        chunk_video(torch.zeros(1, 1, meta.frames_per_call, 1, 1), cfg.frames_per_chunk, vae.temporal_stride)
        self.embodiment = resolve_embodiment(meta.embodiment_id, cfg.num_embodiments)
        self.episode: _Episode | None = None

    # ------------------------------------------------------------------ pieces (also used by the tests)
    def tile(self, frames: dict) -> np.ndarray:
        """{view: uint8 [T, H, W, 3]} -> the tiled uint8 [T, 2h, 2w, 3] frames the model sees."""
        m = self.meta
        views = [prepare_view(frames[v], m.video_transform, m.crop_scale, m.view_size) for v in m.video_keys]
        return tile_views(views, m.tiling, m.view_size, m.wrist_index)

    def state_vector(self, state: dict) -> torch.Tensor:
        """{key: raw [dim]} -> the normalized, concatenated, zero-padded state [1, 1, state_dim]."""
        out = np.zeros((1, 1, self.policy.cfg.state_dim), np.float32)
        col = 0
        for s in self.meta.state:
            out[0, 0, col:col + s.dim] = normalize(state[s.key][None], s.stats, s.normalization)[0]
            col += s.dim
        return torch.from_numpy(out)

    def absolute_actions(self, actions: np.ndarray, state: dict) -> np.ndarray:
        """The model's normalized (relative) chunk [N, action_dim] -> absolute actions float32 [N, sum(dims)]."""
        parts, col = [], 0
        for a in self.meta.action:
            x = unnormalize(actions[:, col:col + a.dim], a.stats, a.normalization)
            if a.relative:
                x = x + state[a.key][None]
            parts.append(x)
            col += a.dim
        return np.concatenate(parts, axis=1).astype(np.float32)

    # ------------------------------------------------------------------ the episode
    def end_episode(self) -> None:
        self.episode = None

    def infer(self, req: Request, connection_key: str) -> dict:
        """One call: returns {"actions": float32 [N, D], "chunk", "timings_ms", "episode": {...}}."""
        if req.endpoint != "infer":
            raise RequestError(f"infer got a {req.endpoint!r} request")
        key = f"session:{req.session_id}" if req.session_id is not None else f"connection:{connection_key}"
        new = self.episode is None or self.episode.key != key
        if new:
            self.episode = _Episode(key, {v: FrameBuffer(self.meta.frames_per_call) for v in self.meta.video_keys})
        ep = self.episode
        try:
            return self._infer(ep, req, new)
        except Exception:
            self.episode = None        # a failure mid-call leaves no half-written episode: the next call starts anew
            raise

    def _infer(self, ep: _Episode, req: Request, new: bool) -> dict:
        t0 = time.perf_counter()
        for v in self.meta.video_keys:
            ep.buffers[v].add(req.images[v])
        first_call = ep.calls == 0
        tiled = self.tile({v: ep.buffers[v].take(first_call) for v in self.meta.video_keys})
        video = to_model_video(tiled)
        state = self.state_vector(req.state)
        prompt = build_prompt(req.prompt, self.meta.embodiment_tag, self.meta.prompt_template)
        prompt_changed = not first_call and clean_prompt(prompt) != clean_prompt(ep.prompt)
        t1 = time.perf_counter()
        pol, enc = self.policy, self.encoders
        if first_call or prompt_changed:
            # the release resets on an episode's first frame or a new instruction: the newest frame is the first
            pol.reset_from_images(enc, prompt, video[:, :, -1], embodiment=torch.tensor([self.embodiment]))
            res = pol.step_frames(enc, None, state)
        else:
            res = pol.step_frames(enc, chunk_video(video, pol.cfg.frames_per_chunk, enc.vae.temporal_stride), state)
        ep.prompt, ep.calls = prompt, ep.calls + 1
        actions = self.absolute_actions(np.asarray(res.actions)[0, :, :self.meta.action_dim], req.state)
        timings = {"preprocess_ms": (t1 - t0) * 1e3, **{k: float(v) for k, v in res.timings_ms.items()}}
        return {"actions": actions, "chunk": int(res.chunk), "timings_ms": timings,
                "episode": {"call": ep.calls, "new": new, "reset": bool(first_call or prompt_changed),
                            "window_reset": getattr(res, "window_reset", None)}}
