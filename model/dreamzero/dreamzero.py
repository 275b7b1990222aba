"""DreamZero: the Wan DiT (Wan2.1-I2V-14B or Wan2.2-TI2V-5B) with action and state heads, in plain PyTorch.

One forward serves training (teacher forcing) and inference (a chunk against the KV cache): the token sequence is
assembled part by part in the order of a `SequenceLayout` (layout.py), every token gets its own timestep, RoPE
position and attention rule from that layout, and the outputs are split back by part.

Inputs (B = batch, F = latent frames of a part, H x W = latent size, K = chunks of a part, Z = latent channels:
16 for the 14B, 48 for the 5B):
    video latents   [B, Z, F, H, W]       clean/observed ('clean_video' part) or noisy ('noisy_video' part)
    cond            [B, 20, F, H, W]      I2V conditioning of those frames (4 mask + 16 first-frame latent channels),
                                          concatenated to the latents (the 14B); None for a model without it
                                          (cond_channels 0: the 5B, `concat_first_frame_latent=False`)
    t_video         [B, F]                timestep (0..1000) of each noisy frame
    actions         [B, K*A, action_dim]  noisy action chunk(s); t_action [B, K*A]
    state           [B, K*S, state_dim]
    text            [B, text_len, text_dim] umT5 features; clip [B, clip_tokens, clip_dim] CLIP features
    embodiment      [B] int64, the slot of the category-specific action/state modules
Outputs: the video velocity of the noisy frames [B, Z, F, H, W] and the action velocity [B, K*A, action_dim].

Both backbones build the CLIP image branch (img_emb and the I2V cross-attention's k_img/v_img), as the release's
CausalWanModel does for model types 'i2v' and 'ti2v'. Precision: in a float64 model every step the release runs in
float64 stays float64 (LayerNorm, RoPE angles and rotation, the time embedding); the q/k RMSNorm normalizes in
float32 as Wan's WanRMSNorm does (x.float()), and the action time encoding is float32 as the release's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .backend import Ops
from .config import DreamZeroConfig, get_config
from .layout import SequenceLayout, layout_for_config
from .modules import (ActionEncoder, CategorySpecificMLP, DiTBlock, Head, MLPProj, sinusoidal_embedding)
from .rope import rope_tables


class DreamZero(nn.Module):
    def __init__(self, cfg: DreamZeroConfig | str):
        super().__init__()
        cfg = get_config(cfg) if isinstance(cfg, str) else cfg
        self.cfg = cfg
        C = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, C), nn.SiLU(), nn.Linear(C, C))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.img_emb = MLPProj(cfg.clip_dim, C)
        self.blocks = nn.ModuleList([DiTBlock(C, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers)])
        self.head = Head(C, cfg.latent_channels, cfg.patch_size, cfg.eps)
        self.action_encoder = ActionEncoder(cfg.num_embodiments, cfg.action_dim, C)
        self.state_encoder = CategorySpecificMLP(cfg.num_embodiments, cfg.state_dim, cfg.head_hidden, C)
        self.action_decoder = CategorySpecificMLP(cfg.num_embodiments, C, cfg.head_hidden, cfg.action_dim)
        self.ops = Ops()
        self.gradient_checkpointing = False
        self._rope_dev: dict = {}
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ set-up
    def init_weights(self) -> None:
        """Initialize every parameter (also after `to_empty` from the meta device): Wan's scheme -- Xavier-uniform
        linears with zero bias, normal(0.02) text/time embeddings, a zero head -- plus unit norms, the modulation
        tables as at construction, and the category-specific matrices as the release (0.02 normal, zero bias)."""
        C = self.cfg.dim
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("modulation"):
                    p.normal_(0.0, C ** -0.5)
                elif name.endswith(".W"):
                    p.normal_(0.0, 0.02)
                elif name.endswith(".b"):
                    p.zero_()
                elif p.dim() == 1 and ("norm" in name or name.startswith("img_emb.proj.")) and name.endswith("weight"):
                    p.fill_(1.0)
                elif p.dim() == 1:
                    p.zero_()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def example_inputs(self, batch: int = 1, *, seed: int = 0, dtype=None, device=None) -> dict:
        """Random inputs of the shapes this model takes, for a first run of the policy (README "Using it"):

            text          [B, text_len, text_dim]          umT5 features of the instruction
            clip          [B, clip_tokens, clip_dim]       CLIP features of the first image
            first_latent  [B, 16, 1, H, W]                 VAE latent of the first frame (H, W = latent size)
            observation   [B, 16, frames_per_chunk, H, W]  VAE latents of the frames observed during a chunk
            state         [B, states_per_chunk, state_dim] robot state (normalized as in training)
            embodiment    int64 [B], zeros                 the embodiment slot (required with several slots)

        Seeded normal values in the model's dtype and on its device (or `dtype` / `device`); on the meta device
        (a model not materialized) tensors of the right shapes without values."""
        cfg = self.cfg
        p = self.patch_embedding.weight
        dtype, device = dtype or p.dtype, device or p.device
        g = torch.Generator().manual_seed(seed)
        H, W = cfg.latent_height, cfg.latent_width

        def r(*shape):
            if torch.device(device).type == "meta":
                return torch.empty(shape, dtype=dtype, device="meta")
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        return {"text": r(batch, cfg.text_len, cfg.text_dim), "clip": r(batch, cfg.clip_tokens, cfg.clip_dim),
                "first_latent": r(batch, cfg.latent_channels, 1, H, W),
                "observation": r(batch, cfg.latent_channels, cfg.frames_per_chunk, H, W),
                "state": r(batch, cfg.states_per_chunk, cfg.state_dim),
                "embodiment": torch.zeros(batch, dtype=torch.long, device=device)}

    def new_cache(self, batch: int, dtype=None, device=None, overflow: str = "reset"):
        """A KV cache for this model (the class in ops.kv_cache: the reference KVCache or a fused one)."""
        p = self.patch_embedding.weight
        return self.ops.kv_cache(self.cfg, batch, dtype=dtype or p.dtype, device=device or p.device,
                                 overflow=overflow)

    def layout(self, mode: str = "train", **kw) -> SequenceLayout:
        return layout_for_config(self.cfg, mode, **kw)

    def _rope(self, layout: SequenceLayout, device, dtype=torch.float32) -> tuple:
        """cos/sin tables on `device`: float64 for a float64 model (no rounding of the angles), else float32."""
        tdt = torch.float64 if dtype == torch.float64 else torch.float32
        key = (layout.key(), str(device), tdt)
        if key not in self._rope_dev:
            cos, sin = rope_tables(layout, self.cfg, tdt)
            if len(self._rope_dev) > 64:
                self._rope_dev.clear()
            self._rope_dev[key] = (cos.to(device), sin.to(device))
        return self._rope_dev[key]

    # ------------------------------------------------------------------ embeddings
    def context_kv(self, text: torch.Tensor, clip: torch.Tensor) -> list:
        """Cross-attention keys/values of every layer for one instruction and first image (compute once, reuse in
        every forward of the episode). text [B, text_len, text_dim], clip [B, clip_tokens, clip_dim]."""
        cfg = self.cfg
        _check_shape("text", text, (None, cfg.text_len, cfg.text_dim))
        _check_shape("clip", clip, (text.shape[0], cfg.clip_tokens, cfg.clip_dim))
        dtype = self.text_embedding[0].weight.dtype
        t = self.text_embedding(text.to(dtype))
        i = self.img_emb(clip.to(dtype))
        return [blk.cross_attn.context_kv(t, i) for blk in self.blocks]

    def embed_video(self, latents: torch.Tensor, cond: torch.Tensor | None, name: str) -> torch.Tensor:
        """Patch embedding of [latents, cond] (cond None for a model without I2V channels) -> [B, F*h*w, C]."""
        cfg = self.cfg
        _check_shape(name, latents, (None, cfg.latent_channels, None, cfg.latent_height, cfg.latent_width))
        if cond is None and cfg.cond_channels:
            raise ValueError(f"{name}_cond is required: this model concatenates {cfg.cond_channels} I2V conditioning "
                             f"channels to the latents")
        if cond is not None:
            if not cfg.cond_channels and cond.dim() == 5 and cond.shape[1] != 0:
                raise ValueError(f"{name}_cond has {cond.shape[1]} channels but this model ({cfg.name}, "
                                 f"concat_first_frame_latent False) takes no I2V conditioning: pass None")
            _check_shape(name + "_cond", cond, (latents.shape[0], cfg.cond_channels, latents.shape[2],
                                                cfg.latent_height, cfg.latent_width))
            if cfg.cond_channels:
                latents = torch.cat([latents, cond.to(latents.dtype)], dim=1)
        x = latents.to(self.patch_embedding.weight.dtype)
        return self.patch_embedding(x).flatten(2).transpose(1, 2)

    def time_embed(self, t: torch.Tensor) -> tuple:
        """Per-token timesteps [B, L] -> e [B, L, C] and its projection e0 [B, L, 6, C]."""
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t).to(dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))
        return e, e0

    def unpatchify(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, F*h*w, Z*1*2*2] -> [B, Z, F, H, W] (Z = latent channels)."""
        cfg = self.cfg
        B = x.shape[0]
        pt, ph, pw = cfg.patch_size
        x = x.view(B, frames, cfg.grid_h, cfg.grid_w, pt, ph, pw, cfg.latent_channels)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(B, cfg.latent_channels, frames * pt, cfg.grid_h * ph, cfg.grid_w * pw)

    # ------------------------------------------------------------------ the forward
    def forward(self, layout: SequenceLayout, *, clean=None, clean_cond=None, noisy=None, noisy_cond=None,
                t_video=None, actions=None, t_action=None, state=None, embodiment=None, text=None, clip=None,
                context_kv=None, cache=None):
        """Run the DiT over the token sequence of `layout`; see the module doc for the inputs of each part.

        Training: layout = model.layout('train', num_chunks=K), clean/noisy [B, Z, 1+K*n, H, W], t_video over all
        noisy frames (the first included). Inference: a layout from `cache.layout(mode, chunk)` and the cache.
        Returns (video velocity of the noisy frames or None, action velocity or None).
        """
        cfg = self.cfg
        if context_kv is None:
            if text is None or clip is None:
                raise ValueError("pass either context_kv (from model.context_kv) or both text and clip features")
            context_kv = self.context_kv(text, clip)
        if len(context_kv) != len(self.blocks):
            raise ValueError(f"context_kv has {len(context_kv)} layers, the model has {len(self.blocks)}")
        if cache is None and layout.n_cached:
            raise ValueError("this layout reads cached keys but no cache was given")
        if cache is not None and layout.mode == "train":
            raise ValueError("a training layout does not use a KV cache")
        tokens, steps = [], []
        batch = None
        for part in layout.parts:
            if part.name in ("clean_video", "noisy_video"):
                lat, cond = (clean, clean_cond) if part.name == "clean_video" else (noisy, noisy_cond)
                if lat is None or (cond is None and cfg.cond_channels):
                    raise ValueError(f"the layout has a '{part.name}' part: pass its latents and cond")
                if lat.shape[2] != len(part.frames):
                    raise ValueError(f"'{part.name}' has {lat.shape[2]} latent frames, the layout expects "
                                     f"{len(part.frames)}")
                x = self.embed_video(lat, cond, part.name)
                # timesteps in float64 (exact for float32 and integer inputs), as the sinusoidal embedding takes them
                if part.name == "clean_video":
                    t = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=torch.float64)
                else:
                    _check_shape("t_video", t_video, (x.shape[0], len(part.frames)))
                    t = t_video.to(x.device, torch.float64).repeat_interleave(cfg.frame_tokens, dim=1)
            elif part.name == "action":
                n = len(part.chunks) * cfg.actions_per_chunk
                _check_shape("actions", actions, (None, n, cfg.action_dim))
                _check_shape("t_action", t_action, (actions.shape[0], n))
                emb = self._embodiment(embodiment, actions.shape[0], actions.device)
                x = self.action_encoder(actions.to(self.action_encoder.W1.W.dtype), t_action, emb)
                t = t_action.to(torch.float64)
            else:  # state
                n = len(part.chunks) * cfg.states_per_chunk
                _check_shape("state", state, (None, n, cfg.state_dim))
                emb = self._embodiment(embodiment, state.shape[0], state.device)
                x = self.state_encoder(state.to(self.state_encoder.layer1.W.dtype), emb)
                if t_action is None:
                    raise ValueError("state tokens take their timestep from t_action: pass t_action")
                stride = cfg.actions_per_chunk // cfg.states_per_chunk
                t = t_action.to(torch.float64)[:, ::stride][:, :n]  # the release: state timestep = action timestep
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"part '{part.name}' has batch {x.shape[0]}, expected {batch}")
            tokens.append(x)
            steps.append(t)
        x = torch.cat(tokens, dim=1)
        t = torch.cat(steps, dim=1)
        if cache is not None and cache.batch != batch:
            raise ValueError(f"batch {batch} does not match the cache's batch {cache.batch}")
        if context_kv[0][0].shape[0] != batch:
            raise ValueError(f"context batch {context_kv[0][0].shape[0]} does not match the input batch {batch}")
        e, e0 = self.time_embed(t)
        cos, sin = self._rope(layout, x.device, x.dtype)

        for i, blk in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(blk, x, e0, cos, sin, layout, context_kv[i], self.ops, None, i,
                                                      use_reentrant=False)
            else:
                x = blk(x, e0, cos, sin, layout, context_kv[i], self.ops, cache, i)
        if cache is not None:
            cache.commit(layout)

        video = action = None
        nv = layout.part("noisy_video")
        if nv is not None:
            sl = slice(nv.start, nv.start + nv.length)
            video = self.unpatchify(self.head(x[:, sl], e[:, sl], self.ops), len(nv.frames))
        ap = layout.part("action")
        if ap is not None:
            emb = self._embodiment(embodiment, batch, x.device)
            action = self.action_decoder(x[:, ap.start:ap.start + ap.length], emb)
        return video, action

    def _embodiment(self, embodiment, batch: int, device) -> torch.Tensor:
        if embodiment is None:
            if self.cfg.num_embodiments != 1:
                raise ValueError("the model has several embodiment slots: pass embodiment ids [B]")
            return torch.zeros(batch, dtype=torch.long, device=device)
        emb = torch.as_tensor(embodiment, device=device)
        if emb.dtype not in (torch.int32, torch.int64) or emb.shape != (batch,):
            raise ValueError(f"embodiment must be an int tensor of shape [{batch}], got {emb.dtype} {tuple(emb.shape)}")
        has_values = emb.numel() and emb.device.type != "meta"          # a meta tensor has a shape only
        if not torch.compiler.is_compiling() and has_values and (int(emb.min()) < 0 or
                                                                 int(emb.max()) >= self.cfg.num_embodiments):
            raise ValueError(f"embodiment ids must be in [0, {self.cfg.num_embodiments}), got {emb.tolist()}")
        return emb.long()

    # ------------------------------------------------------------------ embodiments
    def add_embodiment(self, init_from: int | None = None) -> int:
        """Add a slot to the category-specific action/state encoders and decoder (a new robot). The new slot is a
        copy of slot `init_from`, or freshly initialized. Other slots are unchanged. Returns the new slot's id."""
        for mod in (self.action_encoder.W1, self.action_encoder.W2, self.action_encoder.W3,
                    self.state_encoder.layer1, self.state_encoder.layer2,
                    self.action_decoder.layer1, self.action_decoder.layer2):
            W, b = mod.W.data, mod.b.data
            if init_from is None:
                nw, nb = 0.02 * torch.randn_like(W[:1]), torch.zeros_like(b[:1])
            else:
                nw, nb = W[init_from:init_from + 1].clone(), b[init_from:init_from + 1].clone()
            mod.W = nn.Parameter(torch.cat([W, nw]), requires_grad=mod.W.requires_grad)
            mod.b = nn.Parameter(torch.cat([b, nb]), requires_grad=mod.b.requires_grad)
        self.cfg = self.cfg.replace(num_embodiments=self.cfg.num_embodiments + 1)
        return self.cfg.num_embodiments - 1


def _check_shape(name: str, t, shape: tuple) -> None:
    if t is None:
        raise ValueError(f"{name} is required here")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {want}")
    if t.is_floating_point() is False and name not in ("embodiment",) and not name.startswith("t_"):
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
