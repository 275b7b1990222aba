"""Closed-loop inference: the DreamZero policy, chunk by chunk, with a KV cache and every optimization as a switch.

A control step (docs/reference.md#control-step-and-kv-cache):
  1. ground-truth replacement: the newly observed latent frames run through the DiT at t = 0 and are written into
     the KV cache (the first frame after a reset; afterwards the frames of the chunk just executed);
  2. the next chunk (noisy video, noisy actions, the state token) is denoised against the read-only cache with
     classifier-free guidance on the VIDEO velocity only: actions integrate the conditional branch's velocity;
  3. the action chunk is smoothed and returned.

Switches (PolicyConfig), one per row of the paper's Table 1:
  cfg_mode        'sequential' (two forwards), 'batched' (one forward over both branches), 'parallel' (one branch
                  per rank of a torch.distributed group of 2: NCCL on GPUs, gloo on CPUs)
  dit_cache       'off', 'static' (the release's 8-of-16 step mask), 'dynamic' (cosine similarity of the last two
                  computed guided video velocities: > 0.95 reuses that step and the next 3, > 0.93 that step and
                  the next one; the first 2 steps always run)
  num_steps       16 (the release) or 1 (DreamZero-Flash)
  actions_only    with a single denoising step the unconditional branch cannot change the actions: skip it (and
                  its cache) -- exactly the same actions at half the compute. Not allowed with return_video.
  fused_control   the replacement pass and the first denoising step in one forward (the 'control' layout)
  sampler_device  'model' (the sampler's tensors on the model's device, no host syncs) or 'cpu' (the baseline)
  compile         None or a torch.compile backend/mode applied per DiT block ('inductor', 'aot_eager',
                  'reduce-overhead' = inductor with CUDA graphs)
Our kernels and quantization enter through the model's backend table (dz_kernels.apply_ / quantize_) before the
policy is built; the engine itself is plain PyTorch.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .schedulers import FlowEulerSampler, FlowUniPCMultistepSampler
from .smoothing import smooth_actions

# The release's default DiT step mask: 8 of 16 steps run (NUM_DIT_STEPS=8).
STATIC_MASK_16 = (True, True, True, False, False, False, True, False, False, False, True, False, False, True, True,
                  True)
DYNAMIC_THRESHOLDS = ((0.95, 4), (0.93, 2))


@dataclass(frozen=True)
class PolicyConfig:
    num_steps: int = 16
    shift: float = 5.0
    guidance: float = 5.0
    cfg_mode: str = "sequential"
    dit_cache: str = "off"
    static_mask: tuple | None = None
    actions_only: bool = False
    return_video: bool = False
    fused_control: bool = False
    sampler: str = "unipc"
    sampler_device: str = "model"
    overflow: str = "reset"
    rule: str | None = None
    seed: int = 1140
    smooth: bool = True
    compile: str | None = None

    def __post_init__(self):
        choices = dict(cfg_mode=("sequential", "batched", "parallel"), dit_cache=("off", "static", "dynamic"),
                       sampler=("unipc", "euler"), sampler_device=("model", "cpu"), overflow=("reset", "roll"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.actions_only and self.return_video:
            raise ValueError("actions_only skips the unconditional branch, so it cannot return the guided video")
        mask = self.step_mask()
        if len(mask) != self.num_steps or not mask[0]:
            raise ValueError(f"static_mask must have num_steps entries and run the first step, got {mask}")

    def step_mask(self) -> tuple:
        if self.static_mask is not None:
            return tuple(bool(m) for m in self.static_mask)
        if self.dit_cache == "static" and self.num_steps == 16:
            return STATIC_MASK_16
        if self.dit_cache == "static":
            raise ValueError("the release's static mask is defined for 16 steps: pass static_mask")
        return (True,) * self.num_steps

    @property
    def skips_uncond(self) -> bool:
        return self.actions_only and self.num_steps == 1


@dataclass
class Encoders:
    """The frozen encoders the policy needs for raw inputs (model/dreamzero/encoders.py): umT5 text, CLIP image, Wan VAE."""
    text: object
    image: object
    vae: object


@dataclass
class StepResult:
    actions: np.ndarray                 # [B, A, action_dim], smoothed (or raw when smoothing is off)
    actions_raw: torch.Tensor           # [B, A, action_dim] as denoised
    video: torch.Tensor | None          # [B, 16, frames_per_chunk, H, W] predicted latents when requested
    chunk: int
    dit_steps: int                      # denoising steps whose DiT actually ran
    timings_ms: dict = field(default_factory=dict)


def default_i2v_cond(first_latent: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The I2V conditioning [B, 20, F, H, W] without a VAE: 4 mask channels (1 on the first frame), then the first
    frame's latent on frame 0 and zeros elsewhere. (With the VAE, model/encoders.build_i2v_condition encodes the
    zero frames as the release does; pass that as `cond` to Policy.reset.)"""
    B, C, _, H, W = first_latent.shape
    cond = first_latent.new_zeros(B, 4 + C, num_frames, H, W)
    cond[:, :4, 0] = 1.0
    cond[:, 4:, 0] = first_latent[:, :, 0]
    return cond


class Policy:
    """DreamZero as a closed-loop policy. `reset` once per instruction/episode, then `step` once per chunk."""

    def __init__(self, model, config: PolicyConfig = PolicyConfig(), group=None):
        self.model = model
        self.cfg = model.cfg
        self.config = config
        self.group = group
        self.rank = 0
        if config.cfg_mode == "parallel":
            import torch.distributed as dist
            if not dist.is_initialized():
                raise RuntimeError("cfg_mode 'parallel' needs an initialized torch.distributed process group")
            if dist.get_world_size(group) != 2:
                raise RuntimeError(f"cfg_mode 'parallel' needs a group of 2 ranks, got {dist.get_world_size(group)}")
            self.rank = dist.get_rank(group)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._blocks_compiled = False
        if config.compile:
            self._compile_blocks(config.compile)
        self.chunk = None

    # ------------------------------------------------------------------ set-up
    def _compile_blocks(self, how: str) -> None:
        kw = {"mode": "reduce-overhead"} if how == "reduce-overhead" else {"backend": how}
        for i, blk in enumerate(self.model.blocks):
            self.model.blocks[i] = torch.compile(blk, fullgraph=False, dynamic=False, **kw)
        self._blocks_compiled = True

    def _branches(self) -> list:
        """Branch ids this process runs: 0 = conditional, 1 = unconditional."""
        if self.config.skips_uncond:
            return [0]
        if self.config.cfg_mode == "parallel":
            return [self.rank]
        return [0, 1]

    def reset(self, text: torch.Tensor, clip: torch.Tensor, first_latent: torch.Tensor, *,
              negative_text: torch.Tensor | None = None, cond: torch.Tensor | None = None,
              embodiment: torch.Tensor | None = None) -> None:
        """A new instruction or episode: text features [B, text_len, text_dim] (the umT5 output), CLIP features
        [B, clip_tokens, clip_dim] of the first image, its latent [B, 16, 1, H, W], optional negative-prompt
        features (zeros by default), optional I2V conditioning [B, 20, F, H, W] (default: default_i2v_cond)."""
        B = text.shape[0]
        if first_latent.dim() != 5 or first_latent.shape[2] != 1:
            raise ValueError(f"first_latent must be [B, 16, 1, H, W], got {list(first_latent.shape)}")
        if first_latent.shape[0] != B or clip.shape[0] != B:
            raise ValueError("text, clip and first_latent must have the same batch")
        neg = torch.zeros_like(text) if negative_text is None else negative_text
        if neg.shape != text.shape:
            raise ValueError(f"negative_text {list(neg.shape)} must match text {list(text.shape)}")
        c = self.cfg
        if cond is not None and (cond.dim() != 5 or tuple(cond.shape[:2]) != (B, c.cond_channels)
                                 or cond.shape[2] < 1 + c.frames_per_chunk or cond.shape[3:] != first_latent.shape[3:]):
            raise ValueError(f"cond must be [{B}, {c.cond_channels}, F >= {1 + c.frames_per_chunk}, "
                             f"{first_latent.shape[3]}, {first_latent.shape[4]}], got {list(cond.shape)}")
        dev, dt = self.device, self.dtype
        self.batch = B
        self.embodiment = None if embodiment is None else torch.as_tensor(embodiment, device=dev)
        with torch.no_grad():
            ctx = {}
            for b in self._branches():
                ctx[b] = self.model.context_kv((text if b == 0 else neg).to(dev, dt), clip.to(dev, dt))
        self.context = ctx
        if self.config.cfg_mode == "batched" and len(ctx) == 2:
            self.context = {"both": [tuple(torch.cat([a, b]) for a, b in zip(c0, c1)) for c0, c1 in
                                     zip(ctx[0], ctx[1])]}
        self._new_caches()
        self.first_latent = first_latent.to(dev, dt)
        self.cond = (default_i2v_cond(self.first_latent, self.cfg.local_attn_size) if cond is None
                     else cond.to(dev, dt))
        self._user_cond = cond is not None
        self.chunk = 0          # the first frame is observed, not yet written
        self._pending_obs = self.first_latent

    @torch.no_grad()
    def reset_from_images(self, encoders: "Encoders", instruction, first_image: torch.Tensor, *,
                          negative_prompt: str = "", embodiment=None) -> None:
        """reset() from raw inputs: the instruction (str or list of B str) and the first image [B, 3, H, W] in
        [-1, 1] run through the frozen encoders once (umT5, CLIP, the VAE incl. the I2V condition)."""
        B = first_image.shape[0]
        texts = [instruction] * B if isinstance(instruction, str) else list(instruction)
        text = encoders.text(texts)
        neg = encoders.text([negative_prompt] * B)
        clip = encoders.image(first_image)
        first_latent = encoders.vae.encode(first_image[:, :, None])
        raw = 1 + encoders.vae.temporal_stride * (self.cfg.local_attn_size - 1)
        cond = encoders.vae.encode_i2v_condition(first_image, raw)
        self.reset(text, clip, first_latent, negative_text=neg, cond=cond, embodiment=embodiment)

    @torch.no_grad()
    def step_frames(self, encoders: "Encoders", frames: torch.Tensor | None, state: torch.Tensor) -> "StepResult":
        """step() from raw frames: the frames recorded during the last chunk [B, 3, stride * frames_per_chunk, H, W]
        in [-1, 1] (None on the first step) are VAE-encoded (after the clip's first frame, as the causal VAE and
        the release do) and their latents replace the prediction in the cache."""
        obs = None
        if frames is not None:
            need = encoders.vae.temporal_stride * self.cfg.frames_per_chunk
            if frames.dim() != 5 or frames.shape[2] != need:
                raise ValueError(f"frames must be [B, 3, {need}, H, W], got {list(frames.shape)}")
            obs = encoders.vae.encode(torch.cat([frames[:, :, :1], frames], dim=2))[:, :, 1:]
        return self.step(obs, state)

    def _new_caches(self) -> None:
        kw = dict(dtype=self.dtype, device=self.device, overflow=self.config.overflow)
        if "both" in self.context:
            self.caches = {"both": self.model.new_cache(2 * self.batch, **kw)}
        else:
            self.caches = {b: self.model.new_cache(self.batch, **kw) for b in self.context}

    def _cond_frames(self, frames: range) -> torch.Tensor:
        F = self.cond.shape[2]
        idx = [f if f < F else F - self.cfg.frames_per_chunk + (f - F) % self.cfg.frames_per_chunk for f in frames]
        return self.cond[:, :, idx]

    # ------------------------------------------------------------------ forwards over the branches
    def _run(self, mode: str, chunk: int, inputs: dict) -> dict:
        """One forward of every branch this process runs; returns {branch: (video, action)} (all branches, after
        the exchange in parallel mode)."""
        out = {}
        rule = self.config.rule
        if "both" in self.caches:
            cache = self.caches["both"]
            both = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            v, a = self.model(cache.layout(mode, chunk, rule=rule), context_kv=self.context["both"], cache=cache,
                              **both)
            B = self.batch
            out[0] = (None if v is None else v[:B], None if a is None else a[:B])
            out[1] = (None if v is None else v[B:], None if a is None else a[B:])
            return out
        for b, cache in self.caches.items():
            out[b] = self.model(cache.layout(mode, chunk, rule=rule), context_kv=self.context[b], cache=cache,
                                **inputs)
        if self.config.cfg_mode == "parallel" and not self.config.skips_uncond:
            out = self._exchange(out)
        return out

    def _exchange(self, out: dict) -> dict:
        import torch.distributed as dist
        v, a = out[self.rank]
        res = {}
        if v is not None:
            vs = [torch.empty_like(v) for _ in range(2)]
            dist.all_gather(vs, v.contiguous(), group=self.group)
        if a is not None:
            as_ = [torch.empty_like(a) for _ in range(2)]
            dist.all_gather(as_, a.contiguous(), group=self.group)
        for b in (0, 1):
            res[b] = (vs[b] if v is not None else None, as_[b] if a is not None else None)
        return res

    # ------------------------------------------------------------------ the control step
    @torch.no_grad()
    def step(self, observation: torch.Tensor | None, state: torch.Tensor) -> StepResult:
        """observation: the latent frames observed since the last step [B, 16, frames_per_chunk, H, W] (None on the
        first step after reset: the first frame came with reset). state [B, states_per_chunk, state_dim].
        Returns the next action chunk."""
        if self.chunk is None:
            raise RuntimeError("call reset(...) before step(...)")
        cfg, pc = self.cfg, self.config
        if state.shape != (self.batch, cfg.states_per_chunk, cfg.state_dim):   # before any cache write
            raise ValueError(f"state must be [{self.batch}, {cfg.states_per_chunk}, {cfg.state_dim}], got "
                             f"{list(state.shape)}")
        timings = {}
        t0 = time.perf_counter()
        if self.chunk == 0:
            if observation is not None:
                raise ValueError("the first step after reset takes no observation (the first frame came with reset)")
            obs, obs_chunk = self._pending_obs, 0
        else:
            want = (self.batch, cfg.latent_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width)
            if observation is None or tuple(observation.shape) != want:
                raise ValueError(f"observation must be {list(want)} latent frames, got "
                                 f"{None if observation is None else list(observation.shape)}")
            obs, obs_chunk = observation.to(self.device, self.dtype), self.chunk
        c = obs_chunk + 1
        if any(cache.needs_reset(c) for cache in self.caches.values()):
            # the release: reset at the window; the newest observed frame becomes the new first frame
            for cache in self.caches.values():
                cache.reset()
            self.first_latent = obs[:, :, -1:]
            if not self._user_cond:
                self.cond = default_i2v_cond(self.first_latent, cfg.local_attn_size)
            obs, obs_chunk, c = self.first_latent, 0, 1
        obs_frames = range(0, 1) if obs_chunk == 0 else range(1 + (obs_chunk - 1) * cfg.frames_per_chunk,
                                                               1 + obs_chunk * cfg.frames_per_chunk)
        obs_inputs = dict(clean=obs, clean_cond=self._cond_frames(obs_frames))
        if not pc.fused_control:
            self._run("first" if obs_chunk == 0 else "observe", obs_chunk, obs_inputs)
        timings["replace_ms"] = (time.perf_counter() - t0) * 1e3

        # denoise the next chunk
        t1 = time.perf_counter()
        frames = range(1 + (c - 1) * cfg.frames_per_chunk, 1 + c * cfg.frames_per_chunk)
        B, H, W = self.batch, cfg.latent_height, cfg.latent_width
        sdev = self.device if pc.sampler_device == "model" else torch.device("cpu")
        gen = torch.Generator().manual_seed(pc.seed)
        x = torch.randn(B, cfg.latent_channels, cfg.frames_per_chunk, H, W, generator=gen).to(sdev, self.dtype)
        xa = torch.randn(B, cfg.actions_per_chunk, cfg.action_dim, generator=gen).to(sdev, self.dtype)
        Sampler = FlowUniPCMultistepSampler if pc.sampler == "unipc" else FlowEulerSampler
        sv = Sampler(pc.num_steps, pc.shift, device=sdev)
        sa = Sampler(pc.num_steps, pc.shift, device=sdev)
        state = state.to(self.device, self.dtype)
        noisy_cond = self._cond_frames(frames)
        mask = pc.step_mask()
        history, countdown, dit_steps = [], 0, 0
        v_guided = a_cond = None
        for i in range(pc.num_steps):
            run = self._should_run(i, mask, history, countdown)
            if isinstance(run, tuple):
                run, countdown = run
            if run:
                dit_steps += 1
                tv = sv.timesteps[i].to(self.device).expand(B, cfg.frames_per_chunk)
                ta = sa.timesteps[i].to(self.device).expand(B, cfg.actions_per_chunk)
                inputs = dict(noisy=x.to(self.device), noisy_cond=noisy_cond, t_video=tv, actions=xa.to(self.device),
                              t_action=ta, state=state, embodiment=self.embodiment)
                if pc.fused_control and i == 0:
                    out = self._run("control", c, {**inputs, **obs_inputs})
                else:
                    out = self._run("denoise", c, inputs)
                v_cond, a_cond = out[0]
                v_guided = v_cond if 1 not in out else out[1][0] + pc.guidance * (v_cond - out[1][0])
                history = (history + [v_guided])[-2:]
            x = sv.step(v_guided.to(sdev), x, i)
            xa = sa.step(a_cond.to(sdev), xa, i)
        if pc.fused_control and any(obs_frames[-1] not in cache.frames for cache in self.caches.values()):
            raise RuntimeError("the fused control step did not write the observed frames into the cache")
        self.chunk = c
        timings["denoise_ms"] = (time.perf_counter() - t1) * 1e3
        raw = xa.to(self.device)
        acts = raw.float().cpu().numpy()
        if pc.smooth:
            acts = smooth_actions(acts)
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return StepResult(actions=acts, actions_raw=raw, video=x.to(self.device) if pc.return_video else None,
                          chunk=c, dit_steps=dit_steps, timings_ms=timings)

    def _should_run(self, i: int, mask: tuple, history: list, countdown: int):
        """DiT caching: whether step i runs the model (static mask or the release's dynamic schedule)."""
        pc = self.config
        if pc.dit_cache != "dynamic":
            return mask[i]
        if len(history) < 2 and countdown == 0:
            return True, 0
        if countdown > 1:
            return False, countdown - 1
        if countdown == 1:
            return True, 0
        a, b = history[-1].flatten(1).float(), history[-2].flatten(1).float()
        sim = float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())
        for threshold, n in DYNAMIC_THRESHOLDS:
            if sim > threshold:
                return False, n
        return True, 0


class AsyncPolicy:
    """Asynchronous execution: the next inference runs on a worker thread while the robot executes the current
    chunk. `submit(observation, state)` returns a Future of the StepResult; calls are processed in order."""

    def __init__(self, policy: Policy):
        self.policy = policy
        # the worker keeps the caller's intra-op thread count, so its results are bit-identical to a direct run
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dz-policy",
                                                           initializer=torch.set_num_threads,
                                                           initargs=(torch.get_num_threads(),))
        self._lock = threading.Lock()

    def submit(self, observation, state) -> concurrent.futures.Future:
        def work():
            with self._lock:
                return self.policy.step(observation, state)
        return self._pool.submit(work)

    def close(self):
        self._pool.shutdown(wait=True)


def playback_loop(policy: Policy, observations: list, states: list, execute=None, asynchronous: bool = True) -> list:
    """A stand-in robot: plays back recorded observations (latent frames per chunk; the first entry None) and
    states, executing each returned chunk with `execute(actions)` (default: nothing) while the next inference runs.
    Returns the list of StepResults."""
    results = []
    if not asynchronous:
        for obs, st in zip(observations, states):
            r = policy.step(obs, st)
            if execute:
                execute(r.actions)
            results.append(r)
        return results
    runner = AsyncPolicy(policy)
    try:
        fut = runner.submit(observations[0], states[0])
        for obs, st in zip(observations[1:], states[1:]):
            r = fut.result()
            fut = runner.submit(obs, st)        # the next inference starts before the robot executes this chunk
            if execute:
                execute(r.actions)
            results.append(r)
        r = fut.result()
        if execute:
            execute(r.actions)
        results.append(r)
    finally:
        runner.close()
    return results
