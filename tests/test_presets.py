"""The presets against the release's training scripts, data configs and model configs (dreamzero0/dreamzero @ab790c1),
their parameter counts against the release's CausalWanModel arithmetic, and the 5B ('ti2v') backbone in the model."""
import pytest
import torch

from dreamzero.cache import KVCache
from dreamzero.config import PRESETS, RELEASE_LORA, config_names, get_config, tiny_config
from dreamzero.dreamzero import DreamZero, count_parameters
from dreamzero.layout import layout_for_config
from tiny import tiny_model

# What the release's scripts/train/*.sh, data YAMLs and action-head YAMLs set, preset by preset.
RELEASE = {
    "droid-14b": dict(dim=5120, layers=40, heads=40, ffn=13824, in_dim=36, out_dim=16, frame_seqlen=880,
                      view=(176, 320), robot=("droid", 8, 8), hz=15.0, init="Wan-AI/Wan2.1-I2V-14B-480P", arch="full"),
    "agibot-14b": dict(dim=5120, layers=40, heads=40, ffn=13824, in_dim=36, out_dim=16, frame_seqlen=880,
                       view=(176, 320), robot=("agibot", 22, 32), hz=30.0, init="GEAR-Dreams/DreamZero-AgiBot",
                       arch="lora"),
    "yam-14b": dict(dim=5120, layers=40, heads=40, ffn=13824, in_dim=36, out_dim=16, frame_seqlen=880, view=(176, 320),
                    robot=("yam", 14, 14), hz=30.0, init="GEAR-Dreams/DreamZero-AgiBot", arch="lora"),
    "droid-5b": dict(dim=3072, layers=30, heads=24, ffn=14336, in_dim=48, out_dim=48, frame_seqlen=50, view=(160, 320),
                     robot=("droid", 8, 8), hz=15.0, init="Wan-AI/Wan2.2-TI2V-5B", arch="full"),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_the_release(name):
    r, c = RELEASE[name], get_config(name)
    assert set(PRESETS) == set(RELEASE) and name in config_names()
    # every script: num_frames=33, num_frame_per_block=2, num_action_per_block=24=action_horizon,
    # num_state_per_block=1, num_views=3, max_chunk_size=4; max_action_dim 32, max_state_dim 64
    assert (c.raw_frames, c.frames_per_chunk, c.actions_per_chunk, c.states_per_chunk, c.num_views, c.max_chunks) == \
        (33, 2, 24, 1, 3, 4)
    assert (c.action_dim, c.state_dim, c.local_attn_size, c.num_frames(c.max_chunks)) == (32, 64, 9, 9)
    assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim, c.in_channels, c.latent_channels) == \
        (r["dim"], r["layers"], r["heads"], r["ffn"], r["in_dim"], r["out_dim"])
    assert (c.head_dim, c.freq_dim, c.text_dim, c.text_len, c.clip_dim, c.clip_tokens, c.eps, c.patch_size) == \
        (128, 256, 4096, 512, 1280, 257, 1e-6, (1, 2, 2))
    assert c.frame_tokens == r["frame_seqlen"] and c.view_size == r["view"]
    assert (c.robot, c.robot_action_dim, c.robot_state_dim) == r["robot"]
    assert c.robot_action_dim <= c.action_dim and c.robot_state_dim <= c.state_dim
    assert (c.action_hz, c.init_from, c.finetune) == (r["hz"], r["init"], r["arch"])
    assert c.train_rule == c.inference_rule == "release" and c.num_embodiments == 1
    if name == "droid-5b":
        assert (c.model_type, c.cond_channels, c.concat_first_frame_latent, c.vae_spatial_stride) == \
            ("ti2v", 0, False, 16)
        assert (c.latent_height, c.latent_width, c.frame_size) == (10, 20, (160, 320))
    else:
        assert (c.model_type, c.cond_channels, c.concat_first_frame_latent, c.vae_spatial_stride) == \
            ("i2v", 20, True, 8)
        assert (c.latent_height, c.latent_width, c.frame_size) == (44, 80, (352, 640))
    assert RELEASE_LORA == {"rank": 4, "alpha": 4.0, "targets": ("q", "k", "v", "o", "ffn.0", "ffn.2")}


def release_parameter_count(c) -> int:
    """CausalWanModel (wan_video_dit_action_casual_chunk.py) counted by hand: patch Conv3d, text/time embeddings and
    projection, per block the self-attention (q,k,v,o + 2 RMSNorms), the affine norm3, the I2V cross-attention
    (q,k,v,o,k_img,v_img + 3 RMSNorms), the FFN and the modulation; the head; img_emb = MLPProj(1280, dim) (built for
    'i2v' and 'ti2v'); one embodiment slot of the state encoder (64 -> 1024 -> dim), the action encoder (32 -> dim,
    2 dim -> dim, dim -> dim) and the action decoder (dim -> 1024 -> 32). (1280, 64, 32, 1024 are the release's
    constants; the config's fields stand for them, so the tiny variants count through the same arithmetic.)"""
    d, f, e, h, sd, ad = c.dim, c.ffn_dim, c.clip_dim, c.head_hidden, c.state_dim, c.action_dim

    def lin(i, o):
        return i * o + o
    n = c.in_channels * d * 4 + d + lin(c.text_dim, d) + lin(d, d) + lin(c.freq_dim, d) + lin(d, d) + lin(d, 6 * d)
    block = (4 * lin(d, d) + 2 * d) + 2 * d + (6 * lin(d, d) + 3 * d) + lin(d, f) + lin(f, d) + 6 * d
    n += c.num_layers * block + lin(d, c.latent_channels * 4) + 2 * d
    n += 2 * e + lin(e, e) + lin(e, d) + 2 * d
    n += lin(sd, h) + lin(h, d) + lin(ad, d) + lin(2 * d, d) + lin(d, d) + lin(d, h) + lin(h, ad)
    return n


@pytest.mark.parametrize("name", PRESETS + ("tiny", "tiny-ti2v"))
def test_parameter_count_matches_the_release_class(name):
    cfg = get_config(name, num_embodiments=1)
    with torch.device("meta"):
        m = DreamZero(cfg)
    n = count_parameters(m)
    assert n == release_parameter_count(cfg), (name, n)
    if name in PRESETS:
        assert (cfg.clip_dim, cfg.state_dim, cfg.action_dim, cfg.head_hidden) == (1280, 64, 32, 1024)
        assert abs(n - {"droid-5b": 5.607e9}.get(name, 16.484e9)) < 0.001e9


def test_5b_shapes_in_the_layouts_and_the_cache():
    cfg = get_config("droid-5b")
    lay = layout_for_config(cfg)
    assert lay.q_len == 2 * 9 * 50 + 4 * 24 + 4 == 1000
    den = layout_for_config(cfg, "denoise", chunk=4, cached_frames=tuple(range(7)))
    assert (den.q_len, den.n_cached, den.k_len) == (125, 350, 475)
    cache = KVCache(cfg, 1, torch.float32, device="meta")
    assert tuple(cache.k[0].shape) == (1, 9 * 50, 24, 128) and len(cache.k) == 30


def _ti2v_model():
    cfg = tiny_config("droid-5b")
    assert cfg.name == "tiny-ti2v" and tiny_config("yam-14b").name == "tiny"
    return tiny_model(cfg, dtype=torch.float64, std=0.2)


def test_ti2v_model_embeds_latents_only_and_keeps_the_clip_branch():
    m = _ti2v_model()
    cfg = m.cfg
    assert m.patch_embedding.in_channels == 48 and m.head.head.out_features == 48 * 4
    assert hasattr(m, "img_emb") and hasattr(m.blocks[0].cross_attn, "k_img")
    g = torch.Generator().manual_seed(1)
    B, K = 2, cfg.max_chunks
    F, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = dict(clean=r(B, 48, F, H, W), noisy=r(B, 48, F, H, W), t_video=torch.rand(B, F, generator=g) * 1000,
             actions=r(B, K * cfg.actions_per_chunk, cfg.action_dim),
             t_action=torch.rand(B, K * cfg.actions_per_chunk, generator=g) * 1000,
             state=r(B, K, cfg.state_dim), text=r(B, cfg.text_len, cfg.text_dim),
             clip=r(B, cfg.clip_tokens, cfg.clip_dim))
    lay = layout_for_config(cfg, "train", num_chunks=K)
    v_tf, a_tf = m(lay, **x)
    assert v_tf.shape == x["noisy"].shape and a_tf.shape == x["actions"].shape
    # the CLIP features reach the output (the release keeps the image branch for 'ti2v')
    v2, _ = m(lay, **{**x, "clip": r(B, cfg.clip_tokens, cfg.clip_dim)})
    assert (v2 - v_tf).abs().max() > 1e-6
    with pytest.raises(ValueError, match="takes no I2V conditioning"):
        m(lay, **x, clean_cond=r(B, 20, F, H, W), noisy_cond=r(B, 20, F, H, W))
    # chunked inference against the KV cache equals teacher forcing (consistent rule, as for the 14B)
    ckv = m.context_kv(x["text"], x["clip"])
    cache = KVCache(cfg, B, torch.float64)
    fpc, A = cfg.frames_per_chunk, cfg.actions_per_chunk
    m(cache.layout("first", 0), clean=x["clean"][:, :, :1], context_kv=ckv, cache=cache)
    vids, acts = [], []
    with torch.no_grad():
        for c in range(1, K + 1):
            fr = slice(1 + (c - 1) * fpc, 1 + c * fpc)
            v, a = m(cache.layout("denoise", c, rule="consistent"), noisy=x["noisy"][:, :, fr],
                     t_video=x["t_video"][:, fr], actions=x["actions"][:, (c - 1) * A:c * A],
                     t_action=x["t_action"][:, (c - 1) * A:c * A], state=x["state"][:, c - 1:c], context_kv=ckv,
                     cache=cache)
            m(cache.layout("observe", c), clean=x["clean"][:, :, fr], context_kv=ckv, cache=cache)
            vids.append(v)
            acts.append(a)
    torch.testing.assert_close(torch.cat(vids, 2), v_tf[:, :, 1:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat(acts, 1), a_tf, rtol=1e-9, atol=1e-9)


def test_kernels_take_the_5b_shapes(device):
    """dz_kernels at the droid-5b shapes: head dim 128, 50-token frames, 24 action + 1 state tokens (one head for
    the attention, to stay fast under the CPU interpreter), and the fused q/k norm + RoPE + cache write at C = 3072,
    24 heads."""
    from dreamzero.attention import attention_dense_reference
    from dreamzero.rope import rope_tables
    from dz_kernels.attention import layout_attention
    from dz_kernels.kv_cache.ops import qk_norm_rope_kv_write
    from dz_kernels.kv_cache.reference import qk_norm_rope_reference

    cfg = get_config("droid-5b")
    g = torch.Generator().manual_seed(0)
    lay = layout_for_config(cfg, "control", chunk=2, cached_frames=(0,))   # observe chunk 1, denoise chunk 2
    q = torch.randn(1, lay.q_len, 1, cfg.head_dim, generator=g)
    k, v = (torch.randn(1, lay.k_len, 1, cfg.head_dim, generator=g) for _ in range(2))
    out = layout_attention(q.to(device), k.to(device), v.to(device), lay, dense_sdpa=False)
    ref = attention_dense_reference(q, k, v, lay.dense_mask())
    assert float((out.cpu().double() - ref).abs().max()) < 1e-4
    obs = layout_for_config(cfg, "observe", chunk=2, cached_frames=(0, 1, 2))
    L, C, H = obs.q_len, cfg.dim, cfg.num_heads
    cos, sin = rope_tables(obs, cfg)
    qq, kk, vv = (torch.randn(1, L, C, generator=g) for _ in range(3))
    wq, wk = (torch.rand(C, generator=g) + 0.5 for _ in range(2))
    kc = torch.full((1, cfg.local_attn_size * cfg.frame_tokens, H, cfg.head_dim), float("nan"), device=device)
    vc = kc.clone()
    pos = 3 * cfg.frame_tokens
    dev = lambda t: t.to(device)  # noqa: E731
    q_rot = qk_norm_rope_kv_write(dev(qq), dev(kk), dev(vv), dev(wq), dev(wk), cfg.eps, dev(cos), dev(sin), H,
                                  kc, vc, torch.tensor([pos], dtype=torch.int32, device=device))
    q_ref, k_ref = qk_norm_rope_reference(qq, kk, wq, wk, cfg.eps, cos, sin, H)
    torch.testing.assert_close(q_rot.cpu(), q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[:, pos:pos + L].cpu(), k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vc[:, pos:pos + L].cpu(), vv.view(1, L, H, cfg.head_dim))
    assert torch.isnan(kc[:, :pos]).all() and torch.isnan(kc[:, pos + L:]).all()      # nothing else written
