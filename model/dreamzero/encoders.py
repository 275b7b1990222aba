"""The frozen parts of DreamZero through well-kept libraries: umT5 text encoder and CLIP vision encoder from
transformers, the Wan video VAE from diffusers; and the I2V conditioning built from them.

Each encoder is built either from a local folder (`from_pretrained(local_dir)`, nothing is downloaded:
local_files_only=True; the folders of the *-Diffusers Wan2.1 release work as they are: text_encoder/ + tokenizer/,
image_encoder/, vae/, or the release root holding them), or from a tiny random config (`tiny()`) for tests.
The original Wan .pth files are pickles and are not read here.

What each one reproduces (Wan2.1's wan/image2video.py and modules/{t5,clip,vae}.py, and the DreamZero release):
- TextEncoder: umT5 encoder features of the prompt, tokenized with padding to `text_len` (512) tokens, the prompt
  cleaned as Wan's `HuggingfaceTokenizer(clean='whitespace')` does; positions past the prompt are zeroed (Wan trims
  the features to the prompt and the DiT pads them back with zeros). Out: [B, text_len, text_dim].
- ImageEncoder: the first image resized to the CLIP resolution (bicubic), mapped from [-1, 1] to [0, 1] and
  normalized with CLIP's mean/std, then the output of the penultimate transformer block with no post-layernorm
  (Wan's `use_31_block=True`; in transformers `hidden_states[-2]`). Out: [B, 257, 1280] for ViT-H/14.
- VideoVAE: Wan's causal 3D VAE, stride (4, 8, 8) and 16 channels (Wan2.1), or (4, 16, 16) and 48 channels (Wan2.2,
  the 5B's: `AutoencoderKLWan` with patch_size 2): encode takes the posterior mean and normalizes it with the Wan
  latent mean/std, (mu - mean) / std; decode inverts that and clamps to [-1, 1].
- I2V conditioning: 4 mask channels (Wan builds a per-raw-frame mask, 1 on the first frame, repeats the first frame
  4 times and folds every 4 raw frames into the 4 channels of one latent frame: all 4 channels are 1 on latent frame
  0 and 0 elsewhere) followed by the 16 channels of the VAE encoding of [first frame, zeros, ...]. The zero frames
  encode to non-zero latents through the causal VAE, so this needs the encoding of the whole clip, not just of the
  first frame (`VideoVAE.encode_i2v_condition` does both steps).
"""
from __future__ import annotations

import html
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _freeze(m: nn.Module) -> nn.Module:
    m.eval()
    m.requires_grad_(False)
    return m


def _subfolder(path: str, name: str) -> str:
    """`path/name` when `path` is a pipeline folder holding that subfolder, else `path`."""
    path = os.fspath(path)
    sub = os.path.join(path, name)
    return sub if os.path.isdir(sub) else path


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path} is not a local folder (nothing is downloaded at run time)")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy.fix_text when ftfy is installed, HTML unescaped twice, runs of whitespace
    collapsed to one space, stripped."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------- text
class TextEncoder(nn.Module):
    """umT5 encoder (transformers UMT5EncoderModel) -> [B, text_len, text_dim] features, zero past the prompt."""

    def __init__(self, model: nn.Module, tokenizer=None, text_len: int = 512):
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    @classmethod
    def from_pretrained(cls, path, tokenizer_path=None, text_len: int = 512, dtype=torch.bfloat16,
                        device="cpu") -> "TextEncoder":
        """Load a local UMT5EncoderModel folder (or a Wan *-Diffusers root with text_encoder/ and tokenizer/)."""
        from transformers import AutoTokenizer, UMT5EncoderModel
        mpath = _subfolder(path, "text_encoder")
        _require_dir(mpath, "text encoder")
        model = UMT5EncoderModel.from_pretrained(mpath, dtype=dtype, local_files_only=True).to(device)
        tpath = tokenizer_path if tokenizer_path is not None else _subfolder(path, "tokenizer")
        _require_dir(os.fspath(tpath), "tokenizer")
        tok = AutoTokenizer.from_pretrained(tpath, local_files_only=True)
        return cls(model, tok, text_len)

    @classmethod
    def tiny(cls, text_dim: int = 24, text_len: int = 7, num_layers: int = 2, num_heads: int = 4,
             with_tokenizer: bool = True, seed: int = 0) -> "TextEncoder":
        """A random umT5 of width `text_dim` (and a small word-level tokenizer), built with nothing downloaded."""
        from transformers import UMT5Config, UMT5EncoderModel
        tok = _tiny_tokenizer() if with_tokenizer else None
        vocab = len(tok) if tok is not None else 64
        cfg = UMT5Config(vocab_size=vocab, d_model=text_dim, d_kv=max(1, text_dim // num_heads), d_ff=2 * text_dim,
                         num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                         relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                         pad_token_id=0, eos_token_id=1)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = UMT5EncoderModel(cfg)
        return cls(model, tok, text_len)

    def tokenize(self, texts) -> tuple:
        """texts (str or list of str) -> (input_ids, attention_mask), each int64 [B, text_len]."""
        if self.tokenizer is None:
            raise ValueError("this TextEncoder has no tokenizer: pass input_ids/attention_mask to encode_ids")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        out = self.tokenizer([clean_prompt(t) for t in texts], padding="max_length", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask [B, L] -> features [B, text_len, text_dim] in the encoder's dtype.

        Longer inputs are truncated to text_len, shorter ones padded; positions with mask 0 are zero. The encoder
        runs only up to the last real token of the batch (exact: padding is masked out of the attention anyway)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an int tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        dev = next(self.model.parameters()).device
        ids, mask = input_ids[:, :self.text_len].to(dev).long(), attention_mask[:, :self.text_len].to(dev).long()
        B = ids.shape[0]
        out = torch.zeros(B, self.text_len, self.text_dim, dtype=next(self.model.parameters()).dtype, device=dev)
        cols = torch.nonzero(mask.any(dim=0))
        if cols.numel() == 0:
            return out
        n = int(cols.max()) + 1
        h = self.model(input_ids=ids[:, :n], attention_mask=mask[:, :n]).last_hidden_state
        out[:, :n] = h * mask[:, :n, None].to(h.dtype)
        return out

    def forward(self, texts) -> torch.Tensor:
        """texts (str or list of str) -> [B, text_len, text_dim]."""
        return self.encode_ids(*self.tokenize(texts))


def _tiny_tokenizer():
    """A word-level tokenizer with T5's conventions (pad 0, eos 1 appended, unk 2), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ("pick up the red green blue block cube cup bowl and put it in on into left right of a to move "
             "open close drawer place robot arm gripper table").split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# ---------------------------------------------------------------------------------------------- image
class ImageEncoder(nn.Module):
    """CLIP vision tower (transformers CLIPVisionModel) -> penultimate-block features [B, tokens, hidden]."""

    def __init__(self, model: nn.Module, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model = _freeze(model)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.model.config.patch_size) ** 2 + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu") -> "ImageEncoder":
        """Load a local CLIP vision folder (or a Wan *-Diffusers root with image_encoder/)."""
        from transformers import CLIPVisionModel
        mpath = _subfolder(path, "image_encoder")
        _require_dir(mpath, "image encoder")
        model = CLIPVisionModel.from_pretrained(mpath, dtype=dtype, local_files_only=True).to(device)
        return cls(model)

    @classmethod
    def tiny(cls, clip_dim: int = 20, clip_tokens: int = 5, num_layers: int = 3, num_heads: int = 4,
             patch_size: int = 14, seed: int = 0) -> "ImageEncoder":
        """A random CLIP vision tower with `clip_tokens` = 1 + (image_size / patch_size)^2 tokens of width clip_dim."""
        from transformers import CLIPVisionConfig, CLIPVisionModel
        side = math.isqrt(clip_tokens - 1)
        if side * side != clip_tokens - 1:
            raise ValueError(f"clip_tokens - 1 must be a square number of patches, got {clip_tokens}")
        cfg = CLIPVisionConfig(hidden_size=clip_dim, intermediate_size=2 * clip_dim, num_hidden_layers=num_layers,
                               num_attention_heads=num_heads, image_size=side * patch_size, patch_size=patch_size,
                               hidden_act="gelu", layer_norm_eps=1e-5)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CLIPVisionModel(cfg)
        return cls(model)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> CLIP pixel values [B, 3, S, S] (bicubic resize, [0, 1], CLIP mean/std)."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [B, 3, H, W] in [-1, 1], got {images.dtype} "
                             f"{tuple(images.shape)}")
        s = self.image_size
        x = F.interpolate(images.float(), size=(s, s), mode="bicubic", align_corners=False)
        return (x * 0.5 + 0.5 - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> [B, num_tokens, hidden] (the penultimate block's output)."""
        p = next(self.model.parameters())
        px = self.preprocess(images.to(p.device)).to(p.dtype)
        out = self.model(pixel_values=px, output_hidden_states=True)
        return out.hidden_states[-2]


# ---------------------------------------------------------------------------------------------- video VAE
class VideoVAE(nn.Module):
    """Wan's causal video VAE (diffusers AutoencoderKLWan), with Wan's latent normalization."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = _freeze(vae)
        cfg = vae.config
        z = cfg.z_dim
        if len(cfg.latents_mean) != z or len(cfg.latents_std) != z:
            raise ValueError(f"the VAE config's latents_mean/std must have z_dim={z} entries")
        self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1),
                             persistent=False)
        self.temporal_stride = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        # Wan2.2's VAE (the 5B's, 48 channels) folds 2x2 pixels into channels before its 8x encoder: 16 in all
        self.spatial_stride = 2 ** (len(cfg.dim_mult) - 1) * (getattr(cfg, "patch_size", None) or 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "VideoVAE":
        """Load a local AutoencoderKLWan folder (or a Wan *-Diffusers root with vae/)."""
        from diffusers import AutoencoderKLWan
        mpath = _subfolder(path, "vae")
        _require_dir(mpath, "VAE")
        vae = AutoencoderKLWan.from_pretrained(mpath, torch_dtype=dtype, local_files_only=True).to(device)
        return cls(vae)

    @classmethod
    def tiny(cls, base_dim: int = 8, z_dim: int = 16, seed: int = 0, wan22: bool = False) -> "VideoVAE":
        """A random Wan VAE with the real strides but narrow layers: Wan2.1's (4, 8, 8), or with wan22=True the
        Wan2.2 VAE's layout (residual blocks, 2x2 patchify: stride (4, 16, 16); z_dim 48 for the 5B). With z_dim 16
        it keeps Wan2.1's latent mean/std; other widths normalize with mean 0, std 1."""
        from diffusers import AutoencoderKLWan
        stats = {} if z_dim == 16 else {"latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim}
        extra = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                     scale_factor_spatial=16) if wan22 else {}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], **stats, **extra)
        return cls(vae)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple:
        """Latent (frames, height, width) of a clip of `frames` raw frames (1 + stride*k) at height x width."""
        t, s = self.temporal_stride, self.spatial_stride
        if frames < 1 or (frames - 1) % t:
            raise ValueError(f"the causal VAE takes 1 + {t}k frames, got {frames}")
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}, got {height}x{width}")
        return (frames - 1) // t + 1, height // s, width // s

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalized latents [B, Z, 1 + k, H/s, W/s] (fp32; Z, s =
        16, 8 for Wan2.1's VAE, 48, 16 for Wan2.2's)."""
        if video.dim() != 5 or video.shape[1] != 3 or not video.is_floating_point():
            raise ValueError(f"video must be a float tensor [B, 3, T, H, W], got {video.dtype} {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])
        p = next(self.vae.parameters())
        mu = self.vae.encode(video.to(p.device, p.dtype)).latent_dist.mode().float()
        return (mu - self.mean.to(mu.device)) / self.std.to(mu.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents [B, Z, F, h, w] -> video [B, 3, 1 + 4(F-1), s*h, s*w] in [-1, 1] (fp32)."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, F, h, w], got {tuple(latents.shape)}")
        p = next(self.vae.parameters())
        z = latents.float().to(p.device) * self.std.to(p.device) + self.mean.to(p.device)
        return self.vae.decode(z.to(p.dtype)).sample.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode_i2v_condition(self, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """first_frame [B, 3, H, W] in [-1, 1] -> the I2V cond [B, 20, 1 + (num_frames-1)/4, H/8, W/8]: Wan's mask
        and the VAE encoding of [first frame, num_frames - 1 zero frames]."""
        if first_frame.dim() != 4 or first_frame.shape[1] != 3:
            raise ValueError(f"first_frame must be [B, 3, H, W], got {tuple(first_frame.shape)}")
        B, _, H, W = first_frame.shape
        self.latent_shape(num_frames, H, W)
        clip = torch.cat([first_frame[:, :, None].float(),
                          first_frame.new_zeros(B, 3, num_frames - 1, H, W, dtype=torch.float32)], dim=2)
        return build_i2v_condition(self.encode(clip), num_frames, temporal_stride=self.temporal_stride)


# ---------------------------------------------------------------------------------------------- I2V condition
def i2v_mask(batch: int, num_frames: int, height: int, width: int, temporal_stride: int = 4, dtype=torch.float32,
             device="cpu") -> torch.Tensor:
    """Wan's I2V mask [B, 4, 1 + (num_frames-1)/4, h, w] for `num_frames` raw frames (1 + 4k): built per raw frame
    (1 on the first, 0 elsewhere), the first frame repeated `temporal_stride` times, every `temporal_stride` raw
    frames folded into the channels of one latent frame (wan/image2video.py)."""
    t = temporal_stride
    if num_frames < 1 or (num_frames - 1) % t:
        raise ValueError(f"num_frames must be 1 + {t}k raw frames, got {num_frames}")
    msk = torch.zeros(batch, num_frames, height, width, dtype=dtype, device=device)
    msk[:, 0] = 1
    return fold_raw_frames(msk, t)


def fold_raw_frames(raw: torch.Tensor, temporal_stride: int = 4) -> torch.Tensor:
    """Wan's folding of a per-raw-frame map [B, 1 + s*k, h, w] into channels [B, s, 1 + k, h, w]: the first frame
    is repeated s times, then channel j of latent frame t holds padded raw frame s*t + j (raw frame s*t + j - s + 1)."""
    s = temporal_stride
    B, n, h, w = raw.shape
    if n < 1 or (n - 1) % s:
        raise ValueError(f"expected 1 + {s}k raw frames, got {n}")
    padded = torch.cat([raw[:, :1].repeat_interleave(s, dim=1), raw[:, 1:]], dim=1)   # [B, s * T_lat, h, w]
    return padded.view(B, -1, s, h, w).transpose(1, 2)                               # [B, s, T_lat, h, w]


def build_i2v_condition(cond_latent: torch.Tensor, num_frames: int | None = None,
                        temporal_stride: int = 4) -> torch.Tensor:
    """The 20-channel I2V cond: cat([mask (4), cond_latent (16)], channels) -> [B, 20, T, h, w].

    cond_latent [B, 16, T, h, w]: the normalized VAE encoding of [first frame, zeros...] over the whole clip
    (VideoVAE.encode_i2v_condition computes it from the image). num_frames (raw, 1 + 4k), when given, must match T.
    """
    if cond_latent.dim() != 5:
        raise ValueError(f"cond_latent must be [B, C, T, h, w], got {tuple(cond_latent.shape)}")
    B, _, T, h, w = cond_latent.shape
    if num_frames is None:
        num_frames = 1 + (T - 1) * temporal_stride
    elif (num_frames - 1) // temporal_stride + 1 != T or (num_frames - 1) % temporal_stride:
        raise ValueError(f"{num_frames} raw frames make {(num_frames - 1) // temporal_stride + 1} latent frames but "
                         f"cond_latent has {T} (it must encode [first frame, zeros] over the whole clip)")
    mask = i2v_mask(B, num_frames, h, w, temporal_stride, cond_latent.dtype, cond_latent.device)
    return torch.cat([mask, cond_latent], dim=1)
