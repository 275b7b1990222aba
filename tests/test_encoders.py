"""The frozen encoders (model/dreamzero/encoders.py) built from tiny random configs: shapes, Wan's conventions (padding zeroed,
penultimate CLIP block, latent normalization, the I2V mask layout), and loading from a local folder."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from dreamzero.config import get_config  # noqa: E402
from dreamzero.encoders import (CLIP_MEAN, CLIP_STD, ImageEncoder, TextEncoder, VideoVAE,  # noqa: E402
                                build_i2v_condition, clean_prompt, fold_raw_frames, i2v_mask)


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder.tiny()


@pytest.fixture(scope="module")
def vae():
    return VideoVAE.tiny()


# ---------------------------------------------------------------------------------------------- text
def test_text_features_shape_and_padding_zeroed(text_encoder):
    cfg = get_config("tiny")
    prompts = ["pick up the red block", "open drawer"]
    ids, mask = text_encoder.tokenize(prompts)
    assert ids.shape == mask.shape == (2, cfg.text_len)
    assert mask.sum(1).tolist() == [6, 3]                       # words + eos
    assert ids[0, 5].item() == 1 and ids[1, 2].item() == 1      # eos appended
    feats = text_encoder(prompts)
    assert feats.shape == (2, cfg.text_len, cfg.text_dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    for b, n in enumerate(mask.sum(1).tolist()):
        assert (feats[b, :n].abs().sum(-1) > 0).all()
        assert torch.equal(feats[b, n:], torch.zeros_like(feats[b, n:]))


def test_text_short_run_equals_full_padded_run(text_encoder):
    """The encoder runs only up to the last real token; that must equal Wan's run over all text_len positions."""
    ids, mask = text_encoder.tokenize(["move the cup", "put the blue cube into the bowl"])
    full = text_encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    torch.testing.assert_close(text_encoder.encode_ids(ids, mask), full, rtol=1e-5, atol=1e-6)
    # a batch whose prompts are all short runs on a prefix only; padding beyond must not change anything
    ids2, mask2 = text_encoder.tokenize(["open drawer", "close drawer"])
    full2 = text_encoder.model(input_ids=ids2, attention_mask=mask2).last_hidden_state * mask2[..., None]
    torch.testing.assert_close(text_encoder.encode_ids(ids2, mask2), full2, rtol=1e-5, atol=1e-6)


def test_text_truncation_and_padding_of_raw_ids(text_encoder):
    L = text_encoder.text_len
    long_ids = torch.randint(3, 20, (1, L + 5))
    out = text_encoder.encode_ids(long_ids, torch.ones_like(long_ids))
    assert out.shape == (1, L, text_encoder.text_dim)
    torch.testing.assert_close(out, text_encoder.encode_ids(long_ids[:, :L]))
    short = text_encoder.encode_ids(torch.tensor([[5, 6, 1]]))
    assert short.shape == (1, L, text_encoder.text_dim) and torch.equal(short[0, 3:], torch.zeros(L - 3, 24))
    ids, mask = text_encoder.tokenize("pick up the red green blue block cube cup bowl and put it")
    assert mask.sum().item() == L and ids[0, -1].item() == 1     # truncated, eos kept last (HF T5 convention)
    with pytest.raises(ValueError, match="input_ids"):
        text_encoder.encode_ids(torch.randn(1, 4))
    with pytest.raises(ValueError, match="no tokenizer"):
        TextEncoder.tiny(with_tokenizer=False)("hello")


def test_clean_prompt_like_wan():
    assert clean_prompt("  Pick\tup   the &amp;amp; cup \n") == "Pick up the & cup"


# ---------------------------------------------------------------------------------------------- image
def test_image_features_are_the_penultimate_block_without_post_norm():
    cfg = get_config("tiny")
    enc = ImageEncoder.tiny(clip_dim=cfg.clip_dim, clip_tokens=cfg.clip_tokens)
    images = torch.rand(2, 3, 40, 52) * 2 - 1
    out = enc(images)
    assert out.shape == (2, cfg.clip_tokens, cfg.clip_dim) and torch.isfinite(out).all()
    # independently: Wan's preprocessing, embeddings, pre-norm, every block but the last, no post-norm
    s = enc.image_size
    x = F.interpolate(images, size=(s, s), mode="bicubic", align_corners=False) * 0.5 + 0.5
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    m = enc.model
    with torch.no_grad():
        h = m.pre_layrnorm(m.embeddings(x)) if hasattr(m, "pre_layrnorm") else \
            m.vision_model.pre_layrnorm(m.vision_model.embeddings(x))
        layers = m.encoder.layers if hasattr(m, "encoder") else m.vision_model.encoder.layers
        assert len(layers) == 3
        for layer in layers[:-1]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.rand(2, 4, 8, 8))


# ---------------------------------------------------------------------------------------------- VAE
def test_vae_round_trip_shapes_and_normalization(vae):
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    lat = vae.encode(video)
    assert lat.shape == (1, 16, 2, 2, 3) and lat.dtype == torch.float32
    mu = vae.vae.encode(video).latent_dist.mean
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(lat, (mu - mean) / std)                          # Wan: (mu - mean) * (1 / std)
    rec = vae.decode(lat)
    assert rec.shape == video.shape and rec.min() >= -1 and rec.max() <= 1
    torch.testing.assert_close(rec, vae.vae.decode(lat * std + mean).sample.clamp(-1, 1))
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))


# ---------------------------------------------------------------------------------------------- I2V condition
def test_wan22_vae_strides_and_channels():
    # the 5B's VAE (Wan2.2): 48 channels, 2x2 patchify before the 8x encoder -> stride (4, 16, 16); causal
    v = VideoVAE.tiny(z_dim=48, wan22=True)
    assert (v.latent_channels, v.temporal_stride, v.spatial_stride) == (48, 4, 16)
    x = torch.rand(1, 3, 5, 32, 64) * 2 - 1
    z = v.encode(x)
    assert z.shape == (1, 48, 2, 2, 4)
    torch.testing.assert_close(v.encode(x[:, :, :1])[:, :, 0], z[:, :, 0])    # frame 0 encodes alone
    assert v.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 16"):
        v.encode(torch.zeros(1, 3, 5, 24, 64))


def test_i2v_mask_hand_made():
    m = i2v_mask(batch=2, num_frames=9, height=2, width=3)
    assert m.shape == (2, 4, 3, 2, 3)
    want = torch.zeros(2, 4, 3, 2, 3)
    want[:, :, 0] = 1.0                 # raw frame 0 repeated 4 times fills all 4 channels of latent frame 0
    assert torch.equal(m, want)
    assert torch.equal(i2v_mask(1, 1, 1, 1), torch.ones(1, 4, 1, 1, 1))
    # Wan's folding (repeat the first raw frame 4x, view as [T_lat, 4], move the 4 to channels): raw frame r >= 1 is
    # padded frame r + 3, so it lands in latent frame (r + 3) // 4, channel (r + 3) % 4
    for r in range(1, 9):
        raw = torch.zeros(1, 9, 1, 1)
        raw[0, r] = 1.0
        folded = fold_raw_frames(raw)
        assert folded.shape == (1, 4, 3, 1, 1)
        assert folded.nonzero().tolist() == [[0, (r + 3) % 4, (r + 3) // 4, 0, 0]], r
    raw = torch.zeros(1, 9, 1, 1)
    raw[0, 0] = 1.0
    assert torch.equal(fold_raw_frames(raw)[0, :, :, 0, 0], want[0, :, :, 0, 0])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        i2v_mask(1, 8, 2, 2)


def test_build_i2v_condition_layout():
    lat = torch.randn(2, 16, 3, 2, 3)
    cond = build_i2v_condition(lat, num_frames=9)
    assert cond.shape == (2, 20, 3, 2, 3)
    assert torch.equal(cond[:, :4], i2v_mask(2, 9, 2, 3)) and torch.equal(cond[:, 4:], lat)
    assert torch.equal(build_i2v_condition(lat), cond)               # num_frames inferred: 1 + 4 * (3 - 1)
    with pytest.raises(ValueError, match="latent frames"):
        build_i2v_condition(lat, num_frames=5)


def test_encode_i2v_condition_encodes_first_frame_and_zeros(vae):
    first = torch.rand(1, 3, 16, 16) * 2 - 1
    cond = vae.encode_i2v_condition(first, num_frames=5)
    assert cond.shape == (1, 20, 2, 2, 2)
    clip = torch.cat([first[:, :, None], torch.zeros(1, 3, 4, 16, 16)], dim=2)
    torch.testing.assert_close(cond[:, 4:], vae.encode(clip))
    assert torch.equal(cond[:, :4, 0], torch.ones(1, 4, 2, 2)) and torch.equal(cond[:, :4, 1], torch.zeros(1, 4, 2, 2))
    assert cond[:, 4:, 1].abs().sum() > 0             # the zero frames do not encode to zero latents
    # causal VAE: the first latent frame depends on the first raw frame only
    torch.testing.assert_close(cond[:, 4:, :1], vae.encode(first[:, :, None]))


# ---------------------------------------------------------------------------------------------- local folders
def test_from_pretrained_local_pipeline_folder(tmp_path, text_encoder, vae):
    root = tmp_path / "Wan2.1-I2V-tiny-Diffusers"
    text_encoder.model.save_pretrained(root / "text_encoder")
    text_encoder.tokenizer.save_pretrained(root / "tokenizer")
    img = ImageEncoder.tiny()
    img.model.save_pretrained(root / "image_encoder")
    vae.vae.save_pretrained(root / "vae")

    te2 = TextEncoder.from_pretrained(root, text_len=text_encoder.text_len, dtype=torch.float32)
    prompts = ["pick up the cup", "open the drawer"]
    torch.testing.assert_close(te2(prompts), text_encoder(prompts))
    ie2 = ImageEncoder.from_pretrained(root, dtype=torch.float32)
    x = torch.rand(1, 3, 30, 30) * 2 - 1
    torch.testing.assert_close(ie2(x), img(x))
    vae2 = VideoVAE.from_pretrained(root)
    v = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(vae2.encode(v), vae.encode(v))
    # bf16 load converts the weights
    assert next(TextEncoder.from_pretrained(root, text_len=7).model.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        VideoVAE.from_pretrained(tmp_path / "nope")
