"""The closed-loop policy: every switch against the reference path (exact where the switch is exact, bounded where
it is not), the cache rules across steps, asynchronous playback, and CFG-parallel on two gloo ranks."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dreamzero.engine import STATIC_MASK_16, Policy, PolicyConfig, playback_loop
from dreamzero.smoothing import smooth_actions
from tiny import tiny_model


def episode(cfg, B=1, steps=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.latent_height, cfg.latent_width
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    clip = torch.randn(B, cfg.clip_tokens, cfg.clip_dim, generator=g)
    first = torch.randn(B, 16, 1, H, W, generator=g)
    obs = [None] + [torch.randn(B, 16, cfg.frames_per_chunk, H, W, generator=g) for _ in range(steps - 1)]
    states = [torch.randn(B, cfg.states_per_chunk, cfg.state_dim, generator=g) for _ in range(steps)]
    return text, clip, first, obs, states


def run(m, steps=6, **kw):
    text, clip, first, obs, states = episode(m.cfg, steps=steps)
    kw.setdefault("negative_prompt", None)      # zero features for the unconditional branch (no text encoder here)
    pol = Policy(m, PolicyConfig(**kw))
    pol.reset(text, clip, first)
    return [pol.step(o, s) for o, s in zip(obs, states)], pol


def max_diff(ra, rb):
    return max(float((a.actions_raw - b.actions_raw).abs().max()) for a, b in zip(ra, rb))


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_embodiments=1)


@pytest.fixture(scope="module")
def baseline(model):
    return run(model, num_steps=3)[0]


@pytest.mark.parametrize("switch", [dict(cfg_mode="batched"), dict(fused_control=True), dict(sampler_device="cpu"),
                                    dict(cfg_mode="batched", fused_control=True)])
def test_exact_switches_give_the_same_actions(model, baseline, switch):
    res, _ = run(model, num_steps=3, **switch)
    assert max_diff(res, baseline) < 1e-5
    assert [r.chunk for r in res] == [r.chunk for r in baseline]


def test_cache_follows_the_release_reset_rule(model, baseline):
    cfg = model.cfg
    # tiny: local_attn_size 7, 2 frames per chunk: chunks 1, 2, 3 then chunk 4 would start at frame 7 -> reset
    assert [r.chunk for r in baseline] == [1, 2, 3, 1, 2, 3]
    _, pol = run(model, steps=3, num_steps=1)
    for cache in pol.caches.values():
        assert cache.frames == tuple(range(0, 1 + 2 * cfg.frames_per_chunk))
    _, pol = run(model, steps=6, num_steps=1, overflow="roll")
    assert [len(c.frames) for c in pol.caches.values()] == [cfg.local_attn_size] * 2


def test_flash_actions_only_is_exact_and_skips_the_unconditional_branch(model):
    full, _ = run(model, num_steps=1)
    fast, pol = run(model, num_steps=1, actions_only=True)
    assert max_diff(full, fast) == 0.0
    assert list(pol.caches) == [0]            # no unconditional cache at all
    with pytest.raises(ValueError, match="actions_only"):
        PolicyConfig(num_steps=1, actions_only=True, return_video=True)


def test_guidance_matters_with_several_steps(model):
    a, _ = run(model, num_steps=3, guidance=5.0)
    b, _ = run(model, num_steps=3, guidance=1.0)
    assert max_diff(a, b) > 1e-4              # the unconditional branch acts through the video tokens


def test_dit_caching_static_and_dynamic(model):
    """DiT caching reuses the last computed guided video velocity (and the actions' conditional velocity) at the
    steps it skips.
    Exact: reusing the first step's velocities at every step is one step of the same sampler (DreamZero-Flash), and
    the dynamic rule gives exactly the static cache with the mask it chose.
    Bounded, and derived: a cache that skips DiT calls must land closer to the full 16-step result -- the actions
    and the predicted video, each relative to its scale -- than the uniform schedule with the same number of DiT
    calls (the plain alternative at the same cost). On this episode static (8 calls) scores 0.009 (actions) and
    0.032 (video) against 0.014 and 0.123 for 8 uniform steps; dynamic (4 calls) 0.041 and 0.145 against 0.044
    and 0.172. Garbage fails: 1 step (0.022, 0.27), other random weights (0.17, 1.27), a stale, zero or unguided
    velocity at the skipped steps."""
    chosen = []
    text, clip, first, obs, states = episode(model.cfg, steps=2)
    pol = Policy(model, PolicyConfig(num_steps=16, dit_cache="dynamic", return_video=True, negative_prompt=None))
    rule = pol._should_run

    def recording(i, mask, history, countdown):
        r = rule(i, mask, history, countdown)
        chosen.append(r[0] if isinstance(r, tuple) else r)
        return r

    pol._should_run = recording
    pol.reset(text, clip, first)
    dyn = [pol.step(o, s) for o, s in zip(obs, states)]
    masks = [tuple(chosen[:16]), tuple(chosen[16:])]
    assert masks[0] == masks[1] and [r.dit_steps for r in dyn] == [sum(masks[0])] * 2 and 2 <= sum(masks[0]) < 16

    def go(m=model, **kw):
        return run(m, steps=2, return_video=True, **kw)[0]

    full, static = go(num_steps=16), go(num_steps=16, dit_cache="static")
    assert [r.dit_steps for r in static] == [sum(STATIC_MASK_16)] * 2 == [8, 8]
    assert max_diff(dyn, go(num_steps=16, static_mask=masks[0])) == 0.0
    one = go(num_steps=1)
    scale_a = max(float(r.actions_raw.abs().max()) for r in full)
    scale_v = max(float(r.video.abs().max()) for r in full)
    assert max_diff(go(num_steps=16, static_mask=(True,) + (False,) * 15), one) < 1e-5 * scale_a

    def err(res):
        return (max_diff(full, res) / scale_a,
                max(float((a.video - b.video).abs().max()) for a, b in zip(full, res)) / scale_v)

    def within(res, bound):
        return all(e < b for e, b in zip(err(res), bound))

    static_bound, dynamic_bound = err(go(num_steps=8)), err(go(num_steps=sum(masks[0])))
    assert within(static, static_bound), (err(static), static_bound)
    assert within(dyn, dynamic_bound), (err(dyn), dynamic_bound)
    other_weights = go(tiny_model(num_embodiments=1, seed=1), num_steps=16)
    assert not within(one, static_bound) and not within(one, dynamic_bound)
    assert not within(other_weights, static_bound) and not within(other_weights, dynamic_bound)


def test_dynamic_schedule_rule():
    pol = Policy.__new__(Policy)
    pol.config = PolicyConfig(num_steps=16, dit_cache="dynamic")
    v = torch.ones(1, 8)
    assert pol._should_run(0, (), [], 0) == (True, 0)
    assert pol._should_run(2, (), [v, v], 0) == (False, 4)        # similarity 1 > 0.95: skip this and 3 more
    assert pol._should_run(3, (), [v, v], 4) == (False, 3)
    assert pol._should_run(6, (), [v, v], 1) == (True, 0)
    w = v.clone()
    w[0, :3] = -1.0                                               # cosine 0.25
    assert pol._should_run(2, (), [v, w], 0) == (True, 0)
    e, u = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.94, (1 - 0.94 ** 2) ** 0.5]])   # cosine 0.94
    assert pol._should_run(2, (), [e, u], 0) == (False, 2)                               # skip this and the next


def test_compiled_blocks_give_the_same_actions(baseline):
    m = tiny_model(num_embodiments=1)
    res, _ = run(m, num_steps=3, compile="aot_eager")
    assert max_diff(res, baseline) < 1e-5


def test_async_playback_gives_the_synchronous_actions(model):
    text, clip, first, obs, states = episode(model.cfg, steps=4)
    executed = []
    pol = Policy(model, PolicyConfig(num_steps=2, negative_prompt=None))
    pol.reset(text, clip, first)
    a = playback_loop(pol, obs, states, execute=executed.append, asynchronous=True)
    pol.reset(text, clip, first)
    b = playback_loop(pol, obs, states, asynchronous=False)
    assert len(executed) == 4 and max_diff(a, b) == 0.0


def test_step_bad_input(model):
    text, clip, first, obs, states = episode(model.cfg, steps=2)
    pol = Policy(model, PolicyConfig(num_steps=1, negative_prompt=None))
    with pytest.raises(RuntimeError, match="reset"):
        pol.step(None, states[0])
    pol.reset(text, clip, first)
    with pytest.raises(ValueError, match="first step"):
        pol.step(obs[1], states[0])
    pol.step(None, states[0])
    with pytest.raises(ValueError, match="observation"):
        pol.step(obs[1][:, :, :1], states[1])
    with pytest.raises(ValueError, match="state"):
        pol.step(obs[1], states[1][:, :, :-1])
    # a refused step leaves the policy as it was: the cache holds no frame of it, the same step then succeeds
    assert all(c.frames == (0,) for c in pol.caches.values()) and pol.chunk == 1
    assert pol.step(obs[1], states[1]).chunk == 2
    pol.step(obs[1], states[1])                                   # chunk 3; the next step resets at the window
    frames = {b: c.frames for b, c in pol.caches.items()}
    with pytest.raises(ValueError, match="observation"):
        pol.step(obs[1][..., :-1], states[1])                     # wrong latent width, refused before the reset
    assert {b: c.frames for b, c in pol.caches.items()} == frames and pol.chunk == 3
    with pytest.raises(ValueError, match="cfg_mode"):
        PolicyConfig(cfg_mode="both")
    cfg = model.cfg
    for F in (1, cfg.frames_per_chunk):         # too few frames: _cond_frames would wrap to negative indices
        with pytest.raises(ValueError, match="cond"):
            pol.reset(text, clip, first, cond=torch.zeros(1, cfg.cond_channels, F, cfg.latent_height,
                                                          cfg.latent_width))
    with pytest.raises(ValueError, match="cond"):
        pol.reset(text, clip, first, cond=torch.zeros(2, cfg.cond_channels, cfg.local_attn_size,
                                                      cfg.latent_height, cfg.latent_width))


def test_smoothing():
    t = np.linspace(0, 1, 24)
    a = np.stack([t ** 2, np.sin(3 * t)], axis=-1)
    s = smooth_actions(a)
    assert s.shape == a.shape and np.abs(s - a).max() < 1e-2          # a cubic passes through unchanged (nearly)
    noisy = a + 0.05 * np.random.default_rng(0).standard_normal(a.shape)
    assert np.abs(smooth_actions(noisy) - a).mean() < np.abs(noisy - a).mean()
    with pytest.raises(ValueError):
        smooth_actions(np.zeros(5))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cfg_parallel_on_two_gloo_ranks_matches_one_rank(tmp_path, baseline):
    script = tmp_path / "cfgpar.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_engine import tiny_model, episode
        from dreamzero.engine import Policy, PolicyConfig
        dist.init_process_group("gloo")
        m = tiny_model(num_embodiments=1)
        text, clip, first, obs, states = episode(m.cfg)
        pol = Policy(m, PolicyConfig(num_steps=3, cfg_mode="parallel", negative_prompt=None))
        pol.reset(text, clip, first)
        res = [pol.step(o, s) for o, s in zip(obs, states)]
        if dist.get_rank() == 0:
            torch.save(torch.stack([r.actions_raw for r in res]), {str(tmp_path / 'out.pt')!r})
        dist.destroy_process_group()
    """))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = torch.stack([r.actions_raw for r in baseline])
    assert float((got - ref).abs().max()) < 1e-5


def test_policy_from_raw_images_with_tiny_encoders():
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from dreamzero.encoders import ImageEncoder, TextEncoder, VideoVAE
    from dreamzero.engine import Encoders

    m = tiny_model(num_embodiments=1, std=None)
    cfg = m.cfg
    enc = Encoders(text=TextEncoder.tiny(text_dim=cfg.text_dim, text_len=cfg.text_len),
                   image=ImageEncoder.tiny(clip_dim=cfg.clip_dim, clip_tokens=cfg.clip_tokens), vae=VideoVAE.tiny())
    H, W = cfg.latent_height * 8, cfg.latent_width * 8
    g = torch.Generator().manual_seed(0)
    first = torch.rand(1, 3, H, W, generator=g) * 2 - 1
    frames = torch.rand(1, 3, 4 * cfg.frames_per_chunk, H, W, generator=g) * 2 - 1
    state = torch.randn(1, 1, cfg.state_dim, generator=g)
    pol = Policy(m, PolicyConfig(num_steps=1))
    pol.reset_from_images(enc, "pick up the cup", first)
    assert pol.cond.shape == (1, 20, cfg.local_attn_size, cfg.latent_height, cfg.latent_width)
    r1 = pol.step_frames(enc, None, state)
    r2 = pol.step_frames(enc, frames, state)
    assert r1.actions.shape == r2.actions.shape == (1, cfg.actions_per_chunk, cfg.action_dim)
    assert [c.frames for c in pol.caches.values()][0] == (0, 1, 2)
    with pytest.raises(ValueError, match="frames must be"):
        pol.step_frames(enc, frames[:, :, :3], state)


def test_fp8_linears_stay_within_a_documented_bound(baseline):
    """FP8 (E4M3, per-token activations, per-channel weights) on every DiT linear: the actions of the whole
    policy loop stay within 25 dB SQNR of the fp32 reference (measured about 49 dB on the tiny model); undo restores
    the exact actions."""
    from dz_kernels.quant import Float8DynamicActivationFloat8Weight, dequantize_, quantize_
    from dz_kernels.testing import sqnr_db

    m = tiny_model(num_embodiments=1)
    quantize_(m, Float8DynamicActivationFloat8Weight())
    assert any(type(mod).__name__ == "Float8Linear" for mod in m.modules())
    res, _ = run(m, num_steps=3)
    got = torch.stack([r.actions_raw for r in res])
    ref = torch.stack([r.actions_raw for r in baseline])
    assert sqnr_db(ref, got) > 25.0
    dequantize_(m)
    res, _ = run(m, num_steps=3)
    assert max_diff(res, baseline) < 1e-6
