"""The DreamZero model in plain PyTorch: shapes, the chunked-inference/teacher-forcing equivalence, the two inference
rules, the fused control step, RoPE, adaLN, per-token timesteps, the action/state modules and bad input."""
import math

import pytest
import torch

from dreamzero.backend import apply_rope, layernorm_modulate
from dreamzero.cache import KVCache
from dreamzero.config import get_config
from dreamzero.dreamzero import DreamZero, count_parameters
from dreamzero.layout import layout_for_config
from dreamzero.modules import action_time_encoding, sinusoidal_embedding
from dreamzero.rope import rope_tables
from tiny import tiny_model


def make_model(cfg):
    """The tiny model in float64, random everywhere."""
    return tiny_model(cfg, std=0.2, dtype=torch.float64)


def make_inputs(cfg, B=2, K=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    K = K or cfg.max_chunks
    F, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    A, S = K * cfg.actions_per_chunk, K * cfg.states_per_chunk
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(clean=r(B, 16, F, H, W), cond=r(B, 20, F, H, W), noisy=r(B, 16, F, H, W),
                t_video=torch.rand(B, F, generator=g) * 1000, actions=r(B, A, cfg.action_dim),
                t_action=torch.rand(B, A, generator=g) * 1000, state=r(B, S, cfg.state_dim),
                text=r(B, cfg.text_len, cfg.text_dim), clip=r(B, cfg.clip_tokens, cfg.clip_dim),
                embodiment=torch.arange(B) % cfg.num_embodiments)


def teacher_forcing(m, x, K):
    lay = m.layout("train", num_chunks=K)
    return m(lay, clean=x["clean"], clean_cond=x["cond"], noisy=x["noisy"], noisy_cond=x["cond"], t_video=x["t_video"],
             actions=x["actions"], t_action=x["t_action"], state=x["state"], embodiment=x["embodiment"],
             text=x["text"], clip=x["clip"])


def chunked(m, x, K, rule, fused=False, overflow="reset"):
    """First frame, then for each chunk: denoise it against the cache, then write its observation (or, fused, one
    control call that writes the previous observation and denoises the chunk)."""
    cfg = m.cfg
    B = x["clean"].shape[0]
    ckv = m.context_kv(x["text"], x["clip"])
    cache = KVCache(cfg, B, torch.float64, overflow=overflow)
    fpc, A, S = cfg.frames_per_chunk, cfg.actions_per_chunk, cfg.states_per_chunk
    vids, acts = [], []
    if not fused:
        m(cache.layout("first", 0), clean=x["clean"][:, :, :1], clean_cond=x["cond"][:, :, :1], context_kv=ckv,
          cache=cache)
    for c in range(1, K + 1):
        fr = slice(1 + (c - 1) * fpc, 1 + c * fpc)
        common = dict(noisy=x["noisy"][:, :, fr], noisy_cond=x["cond"][:, :, fr], t_video=x["t_video"][:, fr],
                      actions=x["actions"][:, (c - 1) * A:c * A], t_action=x["t_action"][:, (c - 1) * A:c * A],
                      state=x["state"][:, (c - 1) * S:c * S], embodiment=x["embodiment"], context_kv=ckv, cache=cache)
        if fused:
            prev = slice(0, 1) if c == 1 else slice(1 + (c - 2) * fpc, 1 + (c - 1) * fpc)
            v, a = m(cache.layout("control", c, rule=rule), clean=x["clean"][:, :, prev],
                     clean_cond=x["cond"][:, :, prev], **common)
        else:
            v, a = m(cache.layout("denoise", c, rule=rule), **common)
            m(cache.layout("observe", c), clean=x["clean"][:, :, fr], clean_cond=x["cond"][:, :, fr], context_kv=ckv,
              cache=cache)
        vids.append(v)
        acts.append(a)
    return torch.cat(vids, dim=2), torch.cat(acts, dim=1), cache


def test_droid_14b_parameter_count_and_layout():
    with torch.device("meta"):
        m = DreamZero("droid-14b")
    n = count_parameters(m)
    assert abs(n - 16.48e9) / 16.48e9 < 0.01, n
    cfg = m.cfg
    assert (cfg.frame_tokens, cfg.frames_per_chunk, cfg.actions_per_chunk, cfg.states_per_chunk,
            cfg.local_attn_size) == (880, 2, 24, 1, 9)
    slot = sum(p.numel() for n_, p in m.named_parameters() if n_.startswith(("action_", "state_")))
    assert 85e6 < slot < 93e6          # one embodiment slot: about 89M


def test_forward_shapes_tiny():
    """Shapes, and values: batch items are independent, teacher forcing is causal over chunks (new noisy latents
    of the last chunk change exactly its own outputs), and Wan's init (zeroed head) predicts a zero velocity."""
    cfg = get_config("tiny")
    m = make_model(cfg)
    x = make_inputs(cfg)
    K, fpc, A = cfg.max_chunks, cfg.frames_per_chunk, cfg.actions_per_chunk
    v, a = teacher_forcing(m, x, K)
    assert v.shape == x["noisy"].shape and a.shape == x["actions"].shape
    assert torch.isfinite(v).all() and torch.isfinite(a).all() and v.abs().max() > 1 and a.abs().max() > 1
    v1, a1 = teacher_forcing(m, {k: t[1:] for k, t in x.items()}, K)
    torch.testing.assert_close(v1, v[1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(a1, a[1:], rtol=0, atol=1e-12)
    y = dict(x, noisy=x["noisy"].clone())
    y["noisy"][:, :, 1 + (K - 1) * fpc:] += 1.0
    v2, a2 = teacher_forcing(m, y, K)
    assert torch.equal(v2[:, :, :1 + (K - 1) * fpc], v[:, :, :1 + (K - 1) * fpc])
    assert torch.equal(a2[:, :(K - 1) * A], a[:, :(K - 1) * A])
    assert (v2[:, :, 1 + (K - 1) * fpc:] - v[:, :, 1 + (K - 1) * fpc:]).abs().amax(dim=(1, 3, 4)).min() > 0.1
    assert (a2[:, (K - 1) * A:] - a[:, (K - 1) * A:]).abs().max() > 0.1
    v0, _ = teacher_forcing(tiny_model(cfg, std=None, dtype=torch.float64), x, K)
    assert not v0.any()


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_inference_matches_teacher_forcing_consistent(fused):
    cfg = get_config("tiny")
    m = make_model(cfg)
    x = make_inputs(cfg)
    K = cfg.max_chunks
    v_tf, a_tf = teacher_forcing(m, x, K)
    with torch.no_grad():
        v, a, cache = chunked(m, x, K, "consistent", fused=fused)
    fpc = cfg.frames_per_chunk
    torch.testing.assert_close(v, v_tf[:, :, 1:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a, a_tf, rtol=1e-9, atol=1e-9)
    expect_frames = tuple(range(0, 1 + (K - 1 if fused else K) * fpc))
    assert cache.frames == expect_frames


def test_release_rule_differs_only_through_the_state_token():
    # With one layer, the state token's own output never reaches another token: release == teacher forcing.
    cfg = get_config("tiny", num_layers=1)
    m = make_model(cfg)
    x = make_inputs(cfg)
    v_tf, a_tf = teacher_forcing(m, x, cfg.max_chunks)
    with torch.no_grad():
        v, a, _ = chunked(m, x, cfg.max_chunks, "release")
    torch.testing.assert_close(v, v_tf[:, :, 1:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a, a_tf, rtol=1e-9, atol=1e-9)
    # With two layers the state token (which sees everything under 'release') feeds video and actions of layer 2.
    cfg2 = get_config("tiny", num_layers=2)
    m2 = make_model(cfg2)
    x2 = make_inputs(cfg2)
    v_tf2, a_tf2 = teacher_forcing(m2, x2, cfg2.max_chunks)
    with torch.no_grad():
        v2, a2, _ = chunked(m2, x2, cfg2.max_chunks, "release")
        v3, a3, _ = chunked(m2, x2, cfg2.max_chunks, "consistent")
    assert (a2 - a_tf2).abs().max() > 1e-6 and (v2 - v_tf2[:, :, 1:]).abs().max() > 1e-6
    torch.testing.assert_close(a3, a_tf2, rtol=1e-9, atol=1e-9)
    # the state token is the only query whose visibility differs between the rules
    lay_r = layout_for_config(cfg2, "denoise", chunk=2, cached_frames=(0, 1, 2), rule="release")
    lay_c = layout_for_config(cfg2, "denoise", chunk=2, cached_frames=(0, 1, 2), rule="consistent")
    diff = (lay_r.segment_mask() != lay_c.segment_mask()).any(axis=1)
    assert [s.kind.name for s, d in zip(lay_r.q, diff) if d] == ["STATE"]


def test_fused_control_step_equals_two_passes_release_rule():
    cfg = get_config("tiny")
    m = make_model(cfg)
    x = make_inputs(cfg)
    with torch.no_grad():
        v1, a1, c1 = chunked(m, x, cfg.max_chunks, "release", fused=False)
        v2, a2, c2 = chunked(m, x, cfg.max_chunks, "release", fused=True)
    torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a1, a2, rtol=1e-9, atol=1e-9)
    n = len(c2.frames) * cfg.frame_tokens
    torch.testing.assert_close(c1.k[0][:, :n], c2.k[0][:, :n])


def test_rolling_cache_beyond_the_window_matches_windowed_teacher_forcing():
    # tiny: local_attn_size 7 frames; 5 chunks of 2 frames make 11 frames, so the window binds.
    cfg = get_config("tiny")
    K = 5
    m = make_model(cfg)
    x = make_inputs(cfg, K=K)
    lay = layout_for_config(cfg, "train", num_chunks=K, rule="consistent")   # the window a W-frame cache holds
    v_tf, a_tf = m(lay, clean=x["clean"], clean_cond=x["cond"], noisy=x["noisy"], noisy_cond=x["cond"],
                   t_video=x["t_video"], actions=x["actions"], t_action=x["t_action"], state=x["state"],
                   embodiment=x["embodiment"], text=x["text"], clip=x["clip"])
    with torch.no_grad():
        v, a, cache = chunked(m, x, K, "consistent", overflow="roll")
    torch.testing.assert_close(v, v_tf[:, :, 1:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a, a_tf, rtol=1e-9, atol=1e-9)
    assert 0 in cache.frames and len(cache.frames) == cfg.local_attn_size
    assert sorted(cache.frames) == [0] + list(range(2 * K + 1 - (cfg.local_attn_size - 1), 2 * K + 1))


def test_training_rules_agree_up_to_max_chunks_plus_one_and_differ_past_it():
    # tiny: max_chunks 3, local_attn_size 7. The video and action outputs (what the loss sees) agree for K <= 4.
    cfg = get_config("tiny")
    m = make_model(cfg)
    for K, same in ((cfg.max_chunks + 1, True), (cfg.max_chunks + 2, False)):
        x = make_inputs(cfg, K=K)
        out = {}
        for rule in ("release", "consistent"):
            lay = layout_for_config(cfg, "train", num_chunks=K, rule=rule)
            out[rule] = m(lay, clean=x["clean"], clean_cond=x["cond"], noisy=x["noisy"], noisy_cond=x["cond"],
                          t_video=x["t_video"], actions=x["actions"], t_action=x["t_action"], state=x["state"],
                          embodiment=x["embodiment"], text=x["text"], clip=x["clip"])
        (vr, ar), (vc, ac) = out["release"], out["consistent"]
        if same:
            torch.testing.assert_close(vr, vc, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ar, ac, rtol=1e-12, atol=1e-12)
        else:
            fpc = cfg.frames_per_chunk
            last = slice(1 + (K - 1) * fpc, None)
            torch.testing.assert_close(vr[:, :, :last.start], vc[:, :, :last.start], rtol=1e-12, atol=1e-12)
            assert (vr[:, :, last] - vc[:, :, last]).abs().max() > 1e-6
            assert (ar[:, -cfg.actions_per_chunk:] - ac[:, -cfg.actions_per_chunk:]).abs().max() > 1e-6


def test_reset_policy_refuses_overflow_and_resets():
    cfg = get_config("tiny")
    cache = KVCache(cfg, 1, torch.float64, overflow="reset")
    assert not cache.needs_reset(3) and cache.needs_reset(4)      # chunk 4 starts at frame 7 = local_attn_size
    cache.frames = tuple(range(cfg.local_attn_size))
    lay = layout_for_config(cfg, "observe", chunk=4, cached_frames=cache.frames)
    k = torch.zeros(1, lay.q_len, cfg.num_heads, cfg.head_dim, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.extend(0, k, k, lay)
    cache.reset()
    assert cache.frames == () and cache.num_tokens == 0


def test_rope_tables_hand_computed():
    cfg = get_config("tiny")           # head dim 16 -> split (8, 4, 4): 4 + 2 + 2 complex pairs
    assert cfg.rope_split == (8, 4, 4)
    lay = layout_for_config(cfg, "denoise", chunk=2, cached_frames=(0, 1, 2))
    cos, sin = rope_tables(lay, cfg)
    # token 7 of the first noisy frame (frame 3): grid 2x3 -> h = 2, w = 1
    i = 7 % cfg.frame_tokens + 0
    tok = lay.q[0].start + i
    h, w, t = i // cfg.grid_w, i % cfg.grid_w, 3
    ang = [t / 10000 ** (j / 8) for j in (0, 2, 4, 6)] + [h / 10000 ** (j / 4) for j in (0, 2)] + \
          [w / 10000 ** (j / 4) for j in (0, 2)]
    torch.testing.assert_close(cos[tok], torch.tensor([math.cos(a) for a in ang]))
    torch.testing.assert_close(sin[tok], torch.tensor([math.sin(a) for a in ang]))
    # the second action token of chunk 2: 1D position A + 1 over the full head dim
    a_seg = [s for s in lay.q if s.kind.name == "ACTION"][0]
    p = cfg.actions_per_chunk + 1
    ang = [p / 10000 ** (j / 16) for j in range(0, 16, 2)]
    torch.testing.assert_close(cos[a_seg.start + 1], torch.tensor([math.cos(a) for a in ang]))
    # rotation of adjacent pairs
    x = torch.tensor([[[[1.0, 0.0, 0.0, 2.0]]]])
    c = torch.tensor([[0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(apply_rope(x, c, s), torch.tensor([[[[0.0, 1.0, 0.0, 2.0]]]]))


def test_adaln_hand_computed():
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 4)
    norm = (x - mean) / math.sqrt(var + 1e-6)
    shift = torch.tensor([[[0.5, 0.0, -1.0, 2.0]]])
    scale = torch.tensor([[[1.0, -1.0, 0.0, 0.5]]])
    torch.testing.assert_close(layernorm_modulate(x, shift, scale, 1e-6), norm * (1 + scale) + shift)


def test_float64_runs_stay_float64():
    # adaLN LayerNorm: float64 in, float64 math (a float32 detour leaves ~1e-8 errors)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g, dtype=torch.float64) * 3 + 1
    shift, scale = torch.randn(2, 5, 64, generator=g, dtype=torch.float64), torch.randn(2, 1, 64, generator=g,
                                                                                        dtype=torch.float64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-6) * (1 + scale) + shift
    assert (layernorm_modulate(x, shift, scale, 1e-6) - ref).abs().max() < 1e-13
    # RoPE: float64 tables and the release's complex128 rotation (view_as_complex(x) * polar(1, angle))
    cfg = get_config("tiny")
    lay = layout_for_config(cfg, "denoise", chunk=2, cached_frames=(0, 1, 2))
    cos64, sin64 = rope_tables(lay, cfg, torch.float64)
    cos32, _ = rope_tables(lay, cfg)
    assert cos64.dtype == torch.float64 and cos32.dtype == torch.float32
    ang = torch.atan2(sin64, cos64)
    q = torch.randn(1, lay.q_len, cfg.num_heads, cfg.head_dim, generator=g, dtype=torch.float64)
    rel = torch.view_as_real(torch.view_as_complex(q.unflatten(-1, (-1, 2)).contiguous())
                             * torch.polar(torch.ones_like(ang), ang)[None, :, None]).flatten(-2)
    assert (apply_rope(q, cos64, sin64) - rel).abs().max() < 1e-13
    assert (apply_rope(q, cos32, sin64.float()) - rel).abs().max() > 1e-9      # float32 tables would round
    # bf16 is unchanged: fp32 math on fp32 tables, rounded once
    qb = q.to(torch.bfloat16)
    expect = apply_rope(qb.float(), cos32, sin64.float()).to(torch.bfloat16)
    assert torch.equal(apply_rope(qb, cos32, sin64.float()), expect)
    # the model hands float64 tables to its blocks when it runs in float64, float32 otherwise
    m = make_model(cfg)
    seen = []
    orig = m.ops.qk_norm_rope

    def spy(q, k, wq, wk, eps, cos, sin, h):
        seen.append(cos.dtype)
        return orig(q, k, wq, wk, eps, cos, sin, h)
    m.ops = m.ops.replace(qk_norm_rope=spy)
    teacher_forcing(m, make_inputs(cfg), cfg.max_chunks)
    assert seen and set(seen) == {torch.float64}
    seen.clear()
    m32 = m.float()
    x32 = {k: (v.float() if v.is_floating_point() else v) for k, v in make_inputs(cfg).items()}
    teacher_forcing(m32, x32, cfg.max_chunks)
    assert set(seen) == {torch.float32}


def test_per_token_timesteps(monkeypatch):
    cfg = get_config("tiny")
    m = make_model(cfg)
    x = make_inputs(cfg, B=1)
    seen = {}
    orig = m.time_embed

    def spy(t):
        seen["t"] = t.clone()
        return orig(t)

    monkeypatch.setattr(m, "time_embed", spy)
    K = cfg.max_chunks
    teacher_forcing(m, x, K)
    t = seen["t"][0]
    lay = m.layout("train", num_chunks=K)
    ft, A = cfg.frame_tokens, cfg.actions_per_chunk
    clean, noisy = lay.part("clean_video"), lay.part("noisy_video")
    assert (t[clean.start:clean.start + clean.length] == 0).all()
    for f in range(cfg.num_frames(K)):
        seg = t[noisy.start + f * ft: noisy.start + (f + 1) * ft]
        assert (seg == x["t_video"][0, f].float()).all()
    act, st = lay.part("action"), lay.part("state")
    torch.testing.assert_close(t[act.start:act.start + act.length], x["t_action"][0].double())
    torch.testing.assert_close(t[st.start:st.start + st.length], x["t_action"][0, ::A].double())


def test_action_and_state_modules_hand_computed():
    cfg = get_config("tiny")
    m = make_model(cfg)
    B, T = 2, 3
    a = torch.randn(B, T, cfg.action_dim, dtype=torch.float64)
    t = torch.tensor([[0.0, 10.0, 999.0], [5.0, 5.0, 500.0]])
    ids = torch.tensor([1, 0])
    enc = m.action_encoder
    out = enc(a, t, ids)
    for b in range(B):
        i = int(ids[b])
        h1 = a[b] @ enc.W1.W[i] + enc.W1.b[i]
        half = cfg.dim // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * math.log(10000.0) / half)
        tau = torch.cat([torch.sin(t[b, :, None] * freqs), torch.cos(t[b, :, None] * freqs)], -1).double()
        h2 = torch.cat([h1, tau], -1) @ enc.W2.W[i] + enc.W2.b[i]
        h2 = h2 * torch.sigmoid(h2)
        torch.testing.assert_close(out[b], h2 @ enc.W3.W[i] + enc.W3.b[i])
    s = torch.randn(B, 1, cfg.state_dim, dtype=torch.float64)
    so = m.state_encoder(s, ids)
    for b in range(B):
        i = int(ids[b])
        h = torch.relu(s[b] @ m.state_encoder.layer1.W[i] + m.state_encoder.layer1.b[i])
        torch.testing.assert_close(so[b], h @ m.state_encoder.layer2.W[i] + m.state_encoder.layer2.b[i])
    torch.testing.assert_close(action_time_encoding(4, torch.tensor([0.0])), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    torch.testing.assert_close(sinusoidal_embedding(4, torch.tensor([0.0])),
                               torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))


def test_add_embodiment_leaves_other_slots_unchanged():
    cfg = get_config("tiny")
    m = make_model(cfg)
    x = make_inputs(cfg)
    _, a0 = teacher_forcing(m, x, cfg.max_chunks)
    new = m.add_embodiment(init_from=0)
    assert new == cfg.num_embodiments and m.cfg.num_embodiments == cfg.num_embodiments + 1
    _, a1 = teacher_forcing(m, x, cfg.max_chunks)
    torch.testing.assert_close(a0, a1)
    x["embodiment"] = torch.tensor([new, 0])
    _, a2 = teacher_forcing(m, x, cfg.max_chunks)
    # slot `new` was copied from slot 0: sample 0 with id `new` equals sample 0 with id 0
    x["embodiment"] = torch.tensor([0, 0])
    _, a3 = teacher_forcing(m, x, cfg.max_chunks)
    torch.testing.assert_close(a2[0], a3[0])


def test_bad_input_gives_clear_errors():
    cfg = get_config("tiny")
    m = make_model(cfg)
    x = make_inputs(cfg)
    K = cfg.max_chunks
    lay = m.layout("train", num_chunks=K)
    base = dict(clean=x["clean"], clean_cond=x["cond"], noisy=x["noisy"], noisy_cond=x["cond"],
                t_video=x["t_video"], actions=x["actions"], t_action=x["t_action"], state=x["state"],
                embodiment=x["embodiment"], text=x["text"], clip=x["clip"])
    with pytest.raises(ValueError, match="noisy_video has shape"):
        m(lay, **{**base, "noisy": x["noisy"][:, :, :, :-1]})
    with pytest.raises(ValueError, match="latent frames"):
        m(lay, **{**base, "noisy": x["noisy"][:, :, :-2], "noisy_cond": x["cond"][:, :, :-2]})
    with pytest.raises(ValueError, match="actions has shape"):
        m(lay, **{**base, "actions": x["actions"][:, :-1]})
    with pytest.raises(TypeError, match="floating-point"):
        m(lay, **{**base, "state": x["state"].long()})
    with pytest.raises(ValueError, match="embodiment ids"):
        m(lay, **{**base, "embodiment": torch.tensor([0, 7])})
    with pytest.raises(ValueError, match="text has shape"):
        m(lay, **{**base, "text": x["text"][:, :-1]})
    with pytest.raises(ValueError, match="context_kv"):
        m(lay, **{k: v for k, v in base.items() if k not in ("text", "clip")})
    cache = KVCache(cfg, 2, torch.float64)
    with pytest.raises(ValueError, match="cached"):
        m(layout_for_config(cfg, "observe", chunk=1, cached_frames=(0,)), clean=x["clean"][:, :, 1:3],
          clean_cond=x["cond"][:, :, 1:3], text=x["text"], clip=x["clip"], cache=cache)
    # too many chunks for the RoPE tables (tiny: 64 video positions)
    far = layout_for_config(cfg, "denoise", chunk=40, cached_frames=(0,), window=-1)
    with pytest.raises(ValueError, match="RoPE table"):
        rope_tables(far, cfg)


def test_rewind_replays_a_step():
    cfg = get_config("tiny")
    m = make_model(cfg)
    x = make_inputs(cfg)
    with torch.no_grad():
        _, _, cache = chunked(m, x, 2, "consistent")
    full = cache.frames
    cache.rewind(full[:3])
    assert cache.frames == (0, 1, 2) and cache.num_tokens == 3 * cfg.frame_tokens
    with pytest.raises(ValueError, match="rewind"):
        cache.rewind((0, 5))
