"""Closed-loop inference: the DreamZero policy, chunk by chunk, with a KV cache and every optimization as a switch.

A control step (docs/reference.md#control-step-and-kv-cache):
  1. ground-truth replacement: the newly observed latent frames run through the DiT at t = 0 and are written into
     the KV cache (the first frame after a reset; afterwards the frames of the chunk just executed);
  2. the next chunk (noisy video, noisy actions, the state token) is denoised against the read-only cache with
     classifier-free guidance on the VIDEO velocity only: actions integrate the conditional branch's velocity;
  3. the action chunk is smoothed and returned.

Switches: PolicyConfig (dreamzero.policy_config), one per row of the paper's Table 1; each is documented there.
Compilation and capture are lazy (each layout at its first forward) and cost what `Policy.compile_stats` says.
Our kernels and quantization enter through the model's backend table (dz_kernels.apply_ / quantize_) before the
policy is built; the engine itself is plain PyTorch.

The unconditional branch (PolicyConfig.negative_prompt): by default the release's default English negative prompt
(DEFAULT_NEGATIVE_PROMPT, the one its data transform attaches to every sample); "" is the empty prompt and None zero
text features. A prompt needs the umT5 encoder: `reset_from_images` has it; a feature-level `reset` takes the
features as `negative_text`, or encodes the prompt with the encoders the Policy was given (Policy(encoders=...)).
Without either it falls back to zero features, warns, and says so in `Policy.negative_source`.

The window reset (the release's rule: the cache restarts when the next chunk would start at or beyond
local_attn_size frames). The release then encodes the newest raw frame again: its CLIP features (the cross-attention
context of both branches), its I2V conditioning and its latent, which becomes the new first frame; the frames of
the chunk just executed are not written. So does this policy:
  - fed raw frames (`step_frames`): exactly the release's reset, from the newest frame of the observation;
  - fed latents (`step`): it has no raw frame. Pass `reset_to=` (the new first frame's CLIP features, latent and
    cond, e.g. from `encode_first_frame`) on the step where `will_reset()` is True to get the release's reset;
    without it the newest observed latent frame becomes the first frame, the CLIP context of `reset()` is kept,
    and the I2V cond is rebuilt without a VAE (`default_i2v_cond`) unless reset() was given one, which is kept.
    StepResult.window_reset says which happened ("raw", "latent" or None).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .compiled import GraphedForward, compile_blocks
from .playback import AsyncPolicy, playback_loop
from .policy_config import DEFAULT_NEGATIVE_PROMPT, DYNAMIC_THRESHOLDS, STATIC_MASK_16, PolicyConfig
from .schedulers import FlowEulerSampler, FlowUniPCMultistepSampler
from .smoothing import smooth_actions

__all__ = ["Policy", "PolicyConfig", "Encoders", "StepResult", "FirstFrame", "default_i2v_cond", "AsyncPolicy",
           "playback_loop", "STATIC_MASK_16", "DYNAMIC_THRESHOLDS", "DEFAULT_NEGATIVE_PROMPT"]


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
    video: torch.Tensor | None          # [B, Z, frames_per_chunk, H, W] predicted latents when requested
    chunk: int
    dit_steps: int                      # denoising steps whose DiT actually ran
    timings_ms: dict = field(default_factory=dict)
    window_reset: str | None = None     # this step reset the window: "raw" (re-encoded, as the release), "latent"


@dataclass
class FirstFrame:
    """What the window reset needs of the new first frame (Policy.encode_first_frame): CLIP features
    [B, clip_tokens, clip_dim], its latent [B, Z, 1, H, W] and the I2V cond [B, 20, F, H, W] (None for a model
    without I2V channels, the 5B)."""
    clip: torch.Tensor
    latent: torch.Tensor
    cond: torch.Tensor | None


def default_i2v_cond(first_latent: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The I2V conditioning [B, 4 + Z, F, H, W] without a VAE: 4 mask channels (1 on the first frame), then the first
    frame's latent on frame 0 and zeros elsewhere. (With the VAE, model/encoders.build_i2v_condition encodes the
    zero frames as the release does; pass that as `cond` to Policy.reset.)"""
    B, C, _, H, W = first_latent.shape
    cond = first_latent.new_zeros(B, 4 + C, num_frames, H, W)
    cond[:, :4, 0] = 1.0
    cond[:, 4:, 0] = first_latent[:, :, 0]
    return cond


class Policy:
    """DreamZero as a closed-loop policy. `reset` once per instruction/episode, then `step` once per chunk."""

    def __init__(self, model, config: PolicyConfig = PolicyConfig(), group=None, encoders: "Encoders | None" = None):
        """encoders: optional frozen encoders; with them a feature-level `reset` encodes the negative prompt itself
        (reset_from_images / step_frames take theirs as an argument)."""
        self.model = model
        self.cfg = model.cfg
        self.config = config
        self.group = group
        self.encoders = encoders
        self.negative_source = None
        self._neg_cache: dict = {}
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
        if config.compile_backend is not None:
            compile_blocks(model, config.compile_backend)   # in place; dreamzero.compiled.uncompile_blocks undoes it
        self._graphed = GraphedForward(model) if config.use_graphs else None
        self._graphed_for = None
        self.chunk = None

    @property
    def compile_stats(self) -> dict:
        """One-time costs of compile/graphs (dreamzero.compiled.GraphedForward.stats): compile_s, capture_s,
        graphs, replays, capture_errors. Empty without graphs."""
        return dict(self._graphed.stats) if self._graphed is not None else {}

    def _forward(self, layout, cache, context_kv, inputs: dict, once: bool = False):
        if once:
            with torch.compiler.set_stance("force_eager"):
                return self.model(layout, context_kv=context_kv, cache=cache, **inputs)
        if self._graphed is None:
            return self.model(layout, context_kv=context_kv, cache=cache, **inputs)
        seen = self._graphed_for
        if seen is None or seen[0] is not self.context or seen[1] is not self.caches:
            self._graphed.clear()                   # a new instruction, first frame or caches: new graphs
            self._graphed_for = (self.context, self.caches)
        return self._graphed(layout, cache=cache, context_kv=context_kv, **inputs)

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
        [B, clip_tokens, clip_dim] of the first image, its latent [B, Z, 1, H, W], optional negative-prompt features
        (default: PolicyConfig.negative_prompt, see the module doc), optional I2V conditioning [B, 20, F, H, W]
        (default: default_i2v_cond; a model without I2V channels, the 5B, takes none), and the embodiment ids int64
        [B] (required when the model has several embodiment slots: 'tiny' has 2). `model.example_inputs(B)` makes
        random inputs of these shapes; the README lists them per config."""
        B = text.shape[0]
        c = self.cfg
        if first_latent.dim() != 5 or first_latent.shape[1:3] != (c.latent_channels, 1):
            raise ValueError(f"first_latent must be [B, {c.latent_channels}, 1, H, W], got {list(first_latent.shape)}")
        if first_latent.shape[0] != B or clip.shape[0] != B:
            raise ValueError("text, clip and first_latent must have the same batch")
        if negative_text is not None and negative_text.shape != text.shape:
            raise ValueError(f"negative_text {list(negative_text.shape)} must match text {list(text.shape)}")
        self._check_cond(cond, B, first_latent)
        if embodiment is None and c.num_embodiments > 1:
            raise ValueError(f"the model has {c.num_embodiments} embodiment slots: pass embodiment= ids [{B}] to reset "
                             f"(int64 in [0, {c.num_embodiments}), e.g. torch.zeros({B}, dtype=torch.long))")
        dev, dt = self.device, self.dtype
        self.batch = B
        self.embodiment = None if embodiment is None else torch.as_tensor(embodiment, device=dev)
        self._text = text.to(dev, dt)
        self._neg = None if 1 not in self._branches() else self._negative_features(negative_text, text).to(dev, dt)
        self._set_context(clip)
        self._new_caches()
        self._set_first_frame(first_latent, cond)
        self.chunk = 0          # the first frame is observed, not yet written
        self._pending_obs = self.first_latent

    def _check_cond(self, cond, B: int, first_latent: torch.Tensor) -> None:
        c = self.cfg
        if cond is not None and not c.cond_channels:
            raise ValueError(f"this model ({c.name}) takes no I2V conditioning (concat_first_frame_latent False): "
                             f"pass cond=None")
        if cond is not None and (cond.dim() != 5 or tuple(cond.shape[:2]) != (B, c.cond_channels)
                                 or cond.shape[2] < 1 + c.frames_per_chunk or cond.shape[3:] != first_latent.shape[3:]):
            raise ValueError(f"cond must be [{B}, {c.cond_channels}, F >= {1 + c.frames_per_chunk}, "
                             f"{first_latent.shape[3]}, {first_latent.shape[4]}], got {list(cond.shape)}")

    def _negative_features(self, negative_text, text: torch.Tensor) -> torch.Tensor:
        """The unconditional branch's text features (module doc); records where they came from."""
        prompt = self.config.negative_prompt
        if negative_text is not None:
            self.negative_source = "given"
            return negative_text
        if prompt is None:
            self.negative_source = "zeros"
            return torch.zeros_like(text)
        if self.encoders is not None and getattr(self.encoders, "text", None) is not None:
            key = (prompt, text.shape[0])
            if key not in self._neg_cache:
                self._neg_cache = {key: self.encoders.text([prompt] * text.shape[0])}
            self.negative_source = "prompt"
            return self._neg_cache[key]
        self.negative_source = "zeros (no text encoder for the negative prompt)"
        warnings.warn("Policy.reset: no negative_text and no text encoder, so the unconditional branch runs on zero "
                      "text features instead of PolicyConfig.negative_prompt (by default the release's negative "
                      "prompt); pass negative_text=, give Policy(encoders=...), or set PolicyConfig(negative_prompt="
                      "None) to choose zero features", stacklevel=3)
        return torch.zeros_like(text)

    def _set_context(self, clip: torch.Tensor) -> None:
        """Cross-attention k/v of every branch this process runs, from the stored text features and `clip`."""
        dev, dt = self.device, self.dtype
        if clip.shape[0] != self.batch:
            raise ValueError(f"clip has batch {clip.shape[0]}, the episode {self.batch}")
        with torch.no_grad():
            ctx = {b: self.model.context_kv(self._text if b == 0 else self._neg, clip.to(dev, dt))
                   for b in self._branches()}
        self.context = ctx
        if self.config.cfg_mode == "batched" and len(ctx) == 2:
            self.context = {"both": [tuple(torch.cat([a, b]) for a, b in zip(c0, c1)) for c0, c1 in
                                     zip(ctx[0], ctx[1])]}

    def _set_first_frame(self, first_latent: torch.Tensor, cond: torch.Tensor | None) -> None:
        dev, dt = self.device, self.dtype
        self.first_latent = first_latent.to(dev, dt)
        self._user_cond = cond is not None
        if not self.cfg.cond_channels:
            self.cond = None
        else:
            self.cond = default_i2v_cond(self.first_latent, self.cfg.local_attn_size) if cond is None else \
                cond.to(dev, dt)

    @torch.no_grad()
    def encode_first_frame(self, encoders: "Encoders", image: torch.Tensor) -> FirstFrame:
        """The release's encoding of a first frame [B, 3, H, W] in [-1, 1]: CLIP features, its VAE latent (the frame
        alone, as the causal VAE encodes frame 0 of any clip) and the I2V cond over local_attn_size latent frames
        (None for a model without I2V channels)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"the first frame must be [B, 3, H, W], got {list(image.shape)}")
        clip = encoders.image(image)
        latent = encoders.vae.encode(image[:, :, None])
        cond = None
        if self.cfg.cond_channels:
            raw = 1 + encoders.vae.temporal_stride * (self.cfg.local_attn_size - 1)
            cond = encoders.vae.encode_i2v_condition(image, raw)
        return FirstFrame(clip=clip, latent=latent, cond=cond)

    @torch.no_grad()
    def reset_from_images(self, encoders: "Encoders", instruction, first_image: torch.Tensor, *,
                          negative_prompt: str | None = None, embodiment=None) -> None:
        """reset() from raw inputs: the instruction (str or list of B str) and the first image [B, 3, H, W] in
        [-1, 1] run through the frozen encoders once (umT5, CLIP, the VAE incl. the I2V condition). negative_prompt:
        the unconditional branch's text (default PolicyConfig.negative_prompt: the release's default negative
        prompt; "" the empty prompt); PolicyConfig(negative_prompt=None) with no argument gives zero features."""
        B = first_image.shape[0]
        texts = [instruction] * B if isinstance(instruction, str) else list(instruction)
        text = encoders.text(texts)
        prompt = self.config.negative_prompt if negative_prompt is None else negative_prompt
        neg = torch.zeros_like(text) if prompt is None else encoders.text([prompt] * B)
        first = self.encode_first_frame(encoders, first_image)
        self.reset(text, first.clip, first.latent, negative_text=neg, cond=first.cond, embodiment=embodiment)
        self.negative_source = "zeros" if prompt is None else "prompt"

    @torch.no_grad()
    def step_frames(self, encoders: "Encoders", frames: torch.Tensor | None, state: torch.Tensor) -> "StepResult":
        """step() from raw frames: the frames recorded during the last chunk [B, 3, stride * frames_per_chunk, H, W]
        in [-1, 1] (None on the first step) are VAE-encoded (after the clip's first frame, as the causal VAE and
        the release do) and their latents replace the prediction in the cache. When this step resets the window,
        the newest frame is encoded as the new first frame instead (CLIP, latent, I2V cond), as the release does."""
        obs = reset_to = None
        if frames is not None:
            need = encoders.vae.temporal_stride * self.cfg.frames_per_chunk
            if frames.dim() != 5 or frames.shape[2] != need:
                raise ValueError(f"frames must be [B, 3, {need}, H, W], got {list(frames.shape)}")
            if self.will_reset():                      # the newest frame becomes the first frame; none is written
                reset_to = self.encode_first_frame(encoders, frames[:, :, -1])
            else:
                obs = encoders.vae.encode(torch.cat([frames[:, :, :1], frames], dim=2))[:, :, 1:]
        return self.step(obs, state, reset_to=reset_to)

    def will_reset(self) -> bool:
        """Whether the next step() resets the window (the release's rule, overflow 'reset')."""
        if self.chunk is None or self.chunk == 0:
            return False
        return any(cache.needs_reset(self.chunk + 1) for cache in self.caches.values())

    def _new_caches(self) -> None:
        kw = dict(dtype=self.dtype, device=self.device, overflow=self.config.overflow)
        if "both" in self.context:
            self.caches = {"both": self.model.new_cache(2 * self.batch, **kw)}
        else:
            self.caches = {b: self.model.new_cache(self.batch, **kw) for b in self.context}

    def _cond_frames(self, frames: range) -> torch.Tensor | None:
        if self.cond is None:
            return None
        F = self.cond.shape[2]
        idx = [f if f < F else F - self.cfg.frames_per_chunk + (f - F) % self.cfg.frames_per_chunk for f in frames]
        return self.cond[:, :, idx]

    # ------------------------------------------------------------------ forwards over the branches
    def _run(self, mode: str, chunk: int, inputs: dict, once: bool = False) -> dict:
        """One forward of every branch this process runs; returns {branch: (video, action)} (all branches, after
        the exchange in parallel mode). once: a one-time pass (prefill), run eagerly: not worth a compilation or a
        graph."""
        out = {}
        rule = self.config.rule
        if "both" in self.caches:
            cache = self.caches["both"]
            both = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            v, a = self._forward(cache.layout(mode, chunk, rule=rule), cache, self.context["both"], both, once)
            B = self.batch
            out[0] = (None if v is None else v[:B], None if a is None else a[:B])
            out[1] = (None if v is None else v[B:], None if a is None else a[B:])
            return out
        for b, cache in self.caches.items():
            out[b] = self._forward(cache.layout(mode, chunk, rule=rule), cache, self.context[b], inputs, once)
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

    @torch.no_grad()
    def prefill(self, observations: list) -> None:
        """Right after reset(): fill the caches as the ground-truth replacement passes of the first len(observations)
        chunks would, without denoising anything: the first frame, then each observation [B, Z, frames_per_chunk,
        H, W] as the observed frames of chunks 1, 2, ... Afterwards the policy stands where len(observations) + 1
        step() calls would leave it (the cache holds only observed frames, so its content is the same): the next
        step(observation, state) takes the observation of chunk len(observations) + 1 and denoises the chunk after
        it. For a warm start of an episode, or to replay one control step."""
        if self.chunk != 0:
            raise RuntimeError("prefill() comes right after reset(), before any step()")
        cfg = self.cfg
        want = (self.batch, cfg.latent_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width)
        for i, o in enumerate(observations):
            if not isinstance(o, torch.Tensor) or tuple(o.shape) != want:
                raise ValueError(f"observation {i} must be {list(want)} latent frames, got "
                                 f"{getattr(o, 'shape', type(o).__name__)}")
        if observations and any(cache.needs_reset(len(observations)) for cache in self.caches.values()):
            raise ValueError(f"{len(observations)} observations reach past the cache window "
                             f"(local_attn_size {cfg.local_attn_size}): the next chunk would reset it")
        self._run("first", 0, dict(clean=self._pending_obs, clean_cond=self._cond_frames(range(0, 1))), once=True)
        for c, o in enumerate(observations, start=1):
            frames = range(1 + (c - 1) * cfg.frames_per_chunk, 1 + c * cfg.frames_per_chunk)
            self._run("observe", c, dict(clean=o.to(self.device, self.dtype), clean_cond=self._cond_frames(frames)),
                      once=True)
        self.chunk = len(observations) + 1

    def initial_noise(self) -> tuple:
        """The noise every control step starts from: (video [B, Z, frames_per_chunk, H, W], actions [B, A,
        action_dim]) in the model's dtype on the model's device, drawn from a generator seeded with
        PolicyConfig.seed at each step (so every step of every configuration with that seed starts from the same
        noise: their results compare element by element)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(self.config.seed)
        x = torch.randn(self.batch, cfg.latent_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width,
                        generator=gen)
        xa = torch.randn(self.batch, cfg.actions_per_chunk, cfg.action_dim, generator=gen)
        return x.to(self.device, self.dtype), xa.to(self.device, self.dtype)

    # ------------------------------------------------------------------ the control step
    @torch.no_grad()
    def step(self, observation: torch.Tensor | None, state: torch.Tensor, *,
             reset_to: FirstFrame | None = None) -> StepResult:
        """observation: the latent frames observed since the last step [B, Z, frames_per_chunk, H, W] (None on the
        first step after reset: the first frame came with reset). state [B, states_per_chunk, state_dim].
        reset_to: the new first frame (encode_first_frame of the newest raw frame) for a step that resets the window
        (will_reset()); used only then (module doc: without it the newest observed latent becomes the first frame).
        Returns the next action chunk."""
        if self.chunk is None:
            raise RuntimeError("call reset(...) before step(...)")
        cfg, pc = self.cfg, self.config
        if state.shape != (self.batch, cfg.states_per_chunk, cfg.state_dim):   # before any cache write
            raise ValueError(f"state must be [{self.batch}, {cfg.states_per_chunk}, {cfg.state_dim}], got "
                             f"{list(state.shape)}")
        timings = {}
        t0 = time.perf_counter()
        resetting = self.will_reset()
        if resetting and reset_to is not None:                                  # checked before any cache write
            want = (self.batch, cfg.latent_channels, 1, cfg.latent_height, cfg.latent_width)
            if not isinstance(reset_to, FirstFrame) or tuple(reset_to.latent.shape) != want:
                raise ValueError(f"reset_to must be a FirstFrame whose latent is {list(want)}")
            self._check_cond(reset_to.cond, self.batch, reset_to.latent)
        if self.chunk == 0:
            if observation is not None:
                raise ValueError("the first step after reset takes no observation (the first frame came with reset)")
            obs, obs_chunk = self._pending_obs, 0
        elif observation is None and resetting and reset_to is not None:
            obs, obs_chunk = None, self.chunk          # the window resets from reset_to: no observation is written
        else:
            want = (self.batch, cfg.latent_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width)
            if observation is None or tuple(observation.shape) != want:
                raise ValueError(f"observation must be {list(want)} latent frames, got "
                                 f"{None if observation is None else list(observation.shape)}")
            obs, obs_chunk = observation.to(self.device, self.dtype), self.chunk
        c = obs_chunk + 1
        window_reset = None
        if resetting:
            # the release: reset at the window; the newest frame becomes the new first frame (module doc)
            for cache in self.caches.values():
                cache.reset()
            if reset_to is not None:
                self._set_context(reset_to.clip)
                self._set_first_frame(reset_to.latent, reset_to.cond)
                window_reset = "raw"
            else:
                self.first_latent = obs[:, :, -1:]
                if cfg.cond_channels and not self._user_cond:
                    self.cond = default_i2v_cond(self.first_latent, cfg.local_attn_size)
                window_reset = "latent"
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
        B = self.batch
        sdev = self.device if pc.sampler_device == "model" else torch.device("cpu")
        x, xa = (t.to(sdev) for t in self.initial_noise())
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
                          chunk=c, dit_steps=dit_steps, timings_ms=timings, window_reset=window_reset)

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
