"""The policy's release-parity rules: the unconditional branch's default negative prompt, the window reset at
inference (re-encoding the newest raw frame, as the release's lazy_joint_video_action does at a reset), and a policy
over the 5B backbone (no I2V channels)."""
import pytest
import torch

from dreamzero.config import get_config
from dreamzero.engine import DEFAULT_NEGATIVE_PROMPT, FirstFrame, Policy, PolicyConfig
from tiny import tiny_model

pytest.importorskip("transformers")
pytest.importorskip("diffusers")


def tiny(name="tiny"):
    return tiny_model(name, num_embodiments=1).eval()


@pytest.fixture(scope="module")
def encoders():
    from dreamzero.encoders import ImageEncoder, TextEncoder, VideoVAE
    from dreamzero.engine import Encoders
    cfg = get_config("tiny")
    return Encoders(text=TextEncoder.tiny(text_dim=cfg.text_dim, text_len=cfg.text_len),
                    image=ImageEncoder.tiny(clip_dim=cfg.clip_dim, clip_tokens=cfg.clip_tokens), vae=VideoVAE.tiny())


def test_default_negative_prompt_is_the_releases(encoders):
    assert PolicyConfig().negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert DEFAULT_NEGATIVE_PROMPT.startswith("Vibrant colors, overexposed, static, blurry details")
    assert DEFAULT_NEGATIVE_PROMPT.endswith("many people in the background, walking backwards.")
    m = tiny()
    cfg = m.cfg
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, cfg.latent_height * 8, cfg.latent_width * 8, generator=g) * 2 - 1
    expect = {DEFAULT_NEGATIVE_PROMPT: encoders.text([DEFAULT_NEGATIVE_PROMPT]), "": encoders.text([""])}
    for kw, key in ((dict(), DEFAULT_NEGATIVE_PROMPT), (dict(negative_prompt=""), "")):
        pol = Policy(m, PolicyConfig(num_steps=1))
        pol.reset_from_images(encoders, "pick up the cup", img, **kw)
        torch.testing.assert_close(pol._neg, expect[key], rtol=0, atol=0)
        assert pol.negative_source == "prompt"
    pol = Policy(m, PolicyConfig(num_steps=1, negative_prompt=None))
    pol.reset_from_images(encoders, "pick up the cup", img)
    assert pol.negative_source == "zeros" and not pol._neg.any()
    # the empty prompt is not zero features: umT5 encodes its end-of-sequence token
    assert expect[""].abs().sum() > 0
    # a feature-level reset encodes the prompt with the Policy's encoders, ...
    text = encoders.text(["pick up the cup"])
    first = torch.randn(1, 16, 1, cfg.latent_height, cfg.latent_width, generator=g)
    clip = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g)
    pol = Policy(m, PolicyConfig(num_steps=1), encoders=encoders)
    pol.reset(text, clip, first)
    torch.testing.assert_close(pol._neg, expect[DEFAULT_NEGATIVE_PROMPT], rtol=0, atol=0)
    # ... and without them falls back to zeros, says so and warns
    pol = Policy(m, PolicyConfig(num_steps=1))
    with pytest.warns(UserWarning, match="zero text features"):
        pol.reset(text, clip, first)
    assert "zeros" in pol.negative_source and not pol._neg.any()
    # no unconditional branch, no negative prompt needed
    pol = Policy(m, PolicyConfig(num_steps=1, actions_only=True))
    pol.reset(text, clip, first)
    assert pol._neg is None


def _frames(cfg, g, B=1):
    H, W = cfg.latent_height * 8, cfg.latent_width * 8
    return torch.rand(B, 3, 4 * cfg.frames_per_chunk, H, W, generator=g) * 2 - 1


def test_window_reset_re_encodes_the_newest_raw_frame(encoders):
    """The release at a reset: CLIP features, I2V cond and first latent from the newest raw frame, the cache
    restarted with it as frame 0. So the reset step equals a fresh episode started from that frame."""
    m = tiny()
    cfg = m.cfg
    g = torch.Generator().manual_seed(2)
    H, W = cfg.latent_height * 8, cfg.latent_width * 8
    first = torch.rand(1, 3, H, W, generator=g) * 2 - 1
    state = torch.randn(1, 1, cfg.state_dim, generator=g)
    pc = PolicyConfig(num_steps=2)
    pol = Policy(m, pc)
    pol.reset_from_images(encoders, "pick up the cup", first)
    k_img0 = pol.context[0][0][2].clone()                            # layer 0's image keys (from the CLIP features)
    res = [pol.step_frames(encoders, None, state)]
    frames = None
    while not pol.will_reset():
        frames = _frames(cfg, g)
        res.append(pol.step_frames(encoders, frames, state))
    assert pol.chunk == (cfg.local_attn_size - 2) // cfg.frames_per_chunk + 1      # tiny: chunk 3 (frames 0..6)
    frames = _frames(cfg, g)
    r = pol.step_frames(encoders, frames, state)
    assert [x.window_reset for x in res] == [None] * len(res) and r.window_reset == "raw" and r.chunk == 1
    assert all(c.frames == (0,) for c in pol.caches.values())
    assert not torch.equal(pol.context[0][0][2], k_img0)             # the CLIP context changed with the frame
    fresh = Policy(m, pc)
    fresh.reset_from_images(encoders, "pick up the cup", frames[:, :, -1])
    ref = fresh.step_frames(encoders, None, state)
    torch.testing.assert_close(r.actions_raw, ref.actions_raw, rtol=0, atol=0)
    torch.testing.assert_close(pol.cond, fresh.cond, rtol=0, atol=0)
    torch.testing.assert_close(pol.first_latent, fresh.first_latent, rtol=0, atol=0)
    # the next step continues the new window like the fresh episode
    nxt = _frames(cfg, g)
    torch.testing.assert_close(pol.step_frames(encoders, nxt, state).actions_raw,
                               fresh.step_frames(encoders, nxt, state).actions_raw, rtol=0, atol=0)


def test_window_reset_when_fed_latents(encoders):
    """Latent inputs: with reset_to (the newest frame encoded) the step is the release's reset; without, the newest
    observed latent becomes the first frame and the CLIP context of reset() stays (documented)."""
    m = tiny()
    cfg = m.cfg
    g = torch.Generator().manual_seed(4)
    Hl, Wl = cfg.latent_height, cfg.latent_width
    text = encoders.text(["open the drawer"])
    neg = encoders.text([DEFAULT_NEGATIVE_PROMPT])
    first_img = torch.rand(1, 3, Hl * 8, Wl * 8, generator=g) * 2 - 1
    state = torch.randn(1, 1, cfg.state_dim, generator=g)
    obs = [torch.randn(1, 16, cfg.frames_per_chunk, Hl, Wl, generator=g) for _ in range(3)]
    newest = torch.rand(1, 3, Hl * 8, Wl * 8, generator=g) * 2 - 1

    def start():
        pol = Policy(m, PolicyConfig(num_steps=1))
        f = pol.encode_first_frame(encoders, first_img)
        pol.reset(text, f.clip, f.latent, negative_text=neg, cond=f.cond)
        pol.step(None, state)
        for o in obs[:2]:
            pol.step(o, state)
        assert pol.will_reset()
        return pol

    pol = start()
    ctx = [t.clone() for t in pol.context[1][0]]
    r = pol.step(obs[2], state)
    assert r.window_reset == "latent" and r.chunk == 1
    torch.testing.assert_close(pol.first_latent, obs[2][:, :, -1:], rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(pol.context[1][0], ctx))
    # reset_to: the release's reset from latents; no observation needed
    pol = start()
    ff = pol.encode_first_frame(encoders, newest)
    assert isinstance(ff, FirstFrame)
    r2 = pol.step(None, state, reset_to=ff)
    fresh = Policy(m, PolicyConfig(num_steps=1))
    fresh.reset(text, ff.clip, ff.latent, negative_text=neg, cond=ff.cond)
    assert r2.window_reset == "raw"
    torch.testing.assert_close(r2.actions_raw, fresh.step(None, state).actions_raw, rtol=0, atol=0)
    # a bad reset_to is refused before the cache is touched
    pol = start()
    frames = {b: c.frames for b, c in pol.caches.items()}
    with pytest.raises(ValueError, match="reset_to"):
        pol.step(None, state, reset_to=FirstFrame(ff.clip, ff.latent[:, :, :, :-1], ff.cond))
    assert {b: c.frames for b, c in pol.caches.items()} == frames
    with pytest.raises(ValueError, match="observation"):
        pol.step(None, state)                                        # no reset_to: the latent fallback needs one


def test_policy_on_the_5b_backbone_takes_no_i2v_cond():
    m = tiny("tiny-ti2v")
    cfg = m.cfg
    assert cfg.model_type == "ti2v" and cfg.cond_channels == 0 and cfg.latent_channels == 48
    g = torch.Generator().manual_seed(5)
    H, W = cfg.latent_height, cfg.latent_width
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    clip = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g)
    first = torch.randn(1, 48, 1, H, W, generator=g)
    state = torch.randn(1, 1, cfg.state_dim, generator=g)
    pol = Policy(m, PolicyConfig(num_steps=2, negative_prompt=None))
    with pytest.raises(ValueError, match="no I2V conditioning"):
        pol.reset(text, clip, first, cond=torch.zeros(1, 20, cfg.local_attn_size, H, W))
    pol.reset(text, clip, first)
    assert pol.cond is None
    results = [pol.step(None, state)]
    for _ in range(4):                                               # past the window reset (chunk 4 of tiny)
        results.append(pol.step(torch.randn(1, 48, cfg.frames_per_chunk, H, W, generator=g), state))
    assert [r.chunk for r in results] == [1, 2, 3, 1, 2]
    assert results[3].window_reset == "latent"
    assert all(r.actions_raw.shape == (1, cfg.actions_per_chunk, cfg.action_dim) for r in results)
    assert all(torch.isfinite(r.actions_raw).all() for r in results)


def test_5b_policy_from_raw_frames_resets_like_the_release():
    from dreamzero.encoders import ImageEncoder, TextEncoder, VideoVAE
    from dreamzero.engine import Encoders
    m = tiny("tiny-ti2v")
    cfg = m.cfg
    enc = Encoders(text=TextEncoder.tiny(text_dim=cfg.text_dim, text_len=cfg.text_len),
                   image=ImageEncoder.tiny(clip_dim=cfg.clip_dim, clip_tokens=cfg.clip_tokens),
                   vae=VideoVAE.tiny(z_dim=48, wan22=True))
    assert enc.vae.spatial_stride == cfg.vae_spatial_stride == 16
    g = torch.Generator().manual_seed(6)
    H, W = cfg.frame_size
    state = torch.randn(1, 1, cfg.state_dim, generator=g)
    pc = PolicyConfig(num_steps=1)
    pol = Policy(m, pc)
    pol.reset_from_images(enc, "fold the towel", torch.rand(1, 3, H, W, generator=g) * 2 - 1)
    assert pol.cond is None and pol.first_latent.shape == (1, 48, 1, cfg.latent_height, cfg.latent_width)
    pol.step_frames(enc, None, state)
    while not pol.will_reset():
        pol.step_frames(enc, torch.rand(1, 3, 4 * cfg.frames_per_chunk, H, W, generator=g) * 2 - 1, state)
    frames = torch.rand(1, 3, 4 * cfg.frames_per_chunk, H, W, generator=g) * 2 - 1
    r = pol.step_frames(enc, frames, state)
    fresh = Policy(m, pc)
    fresh.reset_from_images(enc, "fold the towel", frames[:, :, -1])
    assert r.window_reset == "raw"
    torch.testing.assert_close(r.actions_raw, fresh.step_frames(enc, None, state).actions_raw, rtol=0, atol=0)
