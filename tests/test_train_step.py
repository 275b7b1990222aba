"""The training step (dreamzero.train.step): noise-level sampling (Flash statistics and direction, base coupling),
the loss formula, masked action loss for video-only clips, per-clip randomness, the FLOP count, embodiment slots."""
import math

import pytest
import torch

from dreamzero.config import get_config
from dreamzero.schedulers import FlowMatchTrainingSchedule
from dreamzero.train.step import (Batch, NoiseConfig, draw_noise, flow_matching_loss, forward_flops, sample_seed,
                                  sample_timesteps, training_flops)
from tiny import tiny_model

CFG = get_config("tiny")
SCHED = FlowMatchTrainingSchedule()


def make_batch(cfg=CFG, B=2, K=2, seed=0, has_action=None):
    g = torch.Generator().manual_seed(seed)
    Fr, A, S = cfg.num_frames(K), K * cfg.actions_per_chunk, K * cfg.states_per_chunk
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = torch.zeros(B, A, cfg.action_dim, dtype=torch.bool)
    mask[..., :cfg.action_dim - 1] = True                               # one padded action dim
    return Batch(latents=r(B, 16, Fr, cfg.latent_height, cfg.latent_width),
                 cond=r(B, 20, Fr, cfg.latent_height, cfg.latent_width), text=r(B, cfg.text_len, cfg.text_dim),
                 clip=r(B, cfg.clip_tokens, cfg.clip_dim), actions=r(B, A, cfg.action_dim).clamp(-1, 1) * mask,
                 action_mask=mask, state=r(B, S, cfg.state_dim),
                 has_action=torch.ones(B, dtype=torch.bool) if has_action is None else torch.tensor(has_action),
                 embodiment=torch.arange(B) % cfg.num_embodiments)


def make_model(cfg=CFG, seed=0):
    m = tiny_model(cfg, seed=seed, std=None)           # Wan's init, as training starts
    with torch.no_grad():
        m.head.head.weight.normal_(0, 0.02)            # Wan zero-inits the head; give it a gradient path
    return m


def test_flash_statistics_and_direction():
    """Flash: r ~ Beta(7, 1), video index (1 - r) * 1000 into the noise-first table -> sigma mostly > 0.9."""
    g = torch.Generator().manual_seed(0)
    n = 40000
    v, a = sample_timesteps(SCHED, n, 1, 1, 1, NoiseConfig("flash"), g)
    # frame 0 and the chunk's first frame each draw their own index: 2n independent draws
    idx = v.index.reshape(-1).double()
    r_hat = 1.0 - (idx + 0.5) / 1000.0                  # the Beta draw, up to the index's floor
    assert abs(r_hat.mean().item() - 7 / 8) < 0.004
    sig = v.sigma.reshape(-1)
    frac = (sig > 0.9).double().mean().item()
    assert frac > 0.93                                   # ~0.955 at shift 5
    # the direction pin: sigma = 1 is pure noise; Flash must be the *noisy* end. The base schedule's mean sigma
    # (uniform indices over the shifted table) is ~0.81; Flash's is far above it, and its timesteps mostly >= 900
    vb, _ = sample_timesteps(SCHED, n, 1, 1, 1, NoiseConfig("base"), g)
    assert sig.mean().item() > 0.95 > vb.sigma.mean().item() + 0.1
    assert (v.timestep > 900).double().mean().item() > 0.93
    # actions: uniform over the table, independent of the video
    ai = a.index.reshape(-1).double()
    assert abs(ai.mean().item() - 499.5) < 6
    hist = torch.histc(ai, bins=10, min=0, max=1000) / ai.numel()
    assert (hist - 0.1).abs().max().item() < 0.01
    corr = torch.corrcoef(torch.stack([v.index[:, 1].double(), a.index[:, 0].double()]))[0, 1].item()
    assert abs(corr) < 0.03


def test_flash_direction_reaches_the_model():
    """Through the real step: the model's noisy half is mostly noise (x_t close to the noise) under Flash."""
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.cfg = m, m.cfg

        def layout(self, *a, **k):
            return self.m.layout(*a, **k)

        def forward(self, layout, **kw):
            seen.update(kw)
            return self.m(layout, **kw)

    batch = make_batch(B=8, K=2)
    noise = draw_noise(SCHED, batch, CFG, NoiseConfig("flash"), [sample_seed(0, 0, i) for i in range(8)])
    flow_matching_loss(Spy(make_model()), batch, SCHED, noise)
    assert (seen["t_video"] > 800).double().mean().item() > 0.85
    x_t, eps, x0 = seen["noisy"], noise.video_noise, batch.latents
    d_noise = (x_t - eps).pow(2).mean().item()
    d_clean = (x_t - x0).pow(2).mean().item()
    assert d_noise < 0.1 * d_clean
    torch.testing.assert_close(seen["clean"], x0)
    # every noisy frame (frame 0 included) got x_t = (1 - sigma) x0 + sigma eps with its own sigma
    s = noise.video.sigma[:, None, :, None, None]
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)


@pytest.mark.parametrize("mode", ["base", "flash"])
def test_block_structure_and_base_coupling(mode):
    g = torch.Generator().manual_seed(1)
    K, n, A = 3, 2, 5
    v, a = sample_timesteps(SCHED, 64, K, n, A, NoiseConfig(mode), g)
    assert v.index.shape == (64, 1 + K * n) and a.index.shape == (64, K * A)
    blocks = v.index[:, 1:].view(64, K, n)
    assert (blocks == blocks[:, :, :1]).all()                  # the frames of a chunk share one index
    assert (v.index[:, 0] != blocks[:, 0, 0]).any()            # the first frame draws its own
    per_chunk = a.index.view(64, K, A)
    if mode == "base":
        # each action chunk takes its own video block's index (coupled)
        assert (per_chunk == blocks[:, :, :1]).all()
    else:
        assert (per_chunk != blocks[:, :, :1]).float().mean() > 0.9
    torch.testing.assert_close(v.timestep, SCHED.timesteps[v.index])


def test_loss_is_the_release_formula():
    """The loss equals the release's: per-frame MSE x table weight, masked per-token action MSE x weight."""
    batch = make_batch(B=2, K=2, has_action=[True, False])
    noise = draw_noise(SCHED, batch, CFG, NoiseConfig("base"), [11, 12])
    g = torch.Generator().manual_seed(5)
    pv = torch.randn(batch.latents.shape, generator=g)
    pa = torch.randn(batch.actions.shape, generator=g)

    class Fixed(torch.nn.Module):
        cfg = CFG

        def layout(self, *a, **k):
            return None

        def forward(self, layout, **kw):
            return pv, pa

    out = flow_matching_loss(Fixed(), batch, SCHED, noise)
    tv = noise.video_noise - batch.latents
    w_v = SCHED.weights[noise.video.index]
    want_v = sum(((pv[b, :, f] - tv[b, :, f]) ** 2).mean() * w_v[b, f]
                 for b in range(2) for f in range(tv.shape[2])) / (2 * tv.shape[2])
    ta = noise.action_noise - batch.actions
    w_a = SCHED.weights[noise.action.index]
    per = ((pa - ta) ** 2 * batch.action_mask).sum(-1) / CFG.action_dim          # mean over all (padded) dims
    per[1] = 0                                                                    # clip 1 has no actions
    want_a = (per * w_a).mean()
    torch.testing.assert_close(out.video_loss, want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.action_loss, want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, want_v + want_a)


def test_video_only_clips_give_no_action_gradient():
    m = make_model()
    decoder = list(m.action_decoder.parameters())
    robot = make_batch(B=1, K=2, seed=3)
    human = make_batch(B=1, K=2, seed=4, has_action=[False])
    both = Batch(**{k: torch.cat([getattr(robot, k), getattr(human, k)]) for k in Batch.__dataclass_fields__})
    seeds = {"robot": [101], "human": [202], "both": [101, 202]}

    def grads(batch, key):
        m.zero_grad(set_to_none=True)
        out = flow_matching_loss(m, batch, SCHED, draw_noise(SCHED, batch, CFG, NoiseConfig("flash"), seeds[key]))
        out.loss.backward()
        return out, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in decoder]

    out_h, g_h = grads(human, "human")
    assert out_h.action_loss.item() == 0.0
    assert all((g == 0).all() for g in g_h)                     # no action gradient at all
    assert m.blocks[0].ffn[0].weight.grad.abs().sum() > 0       # while the video loss trains the backbone
    _, g_r = grads(robot, "robot")
    _, g_b = grads(both, "both")
    assert any(g.abs().sum() > 0 for g in g_r)
    # in a mixed batch the video-only clip adds nothing to the action decoder's gradient (batch mean: half of it)
    for a, b in zip(g_b, g_r):
        torch.testing.assert_close(a, 0.5 * b, rtol=1e-4, atol=1e-7)


def test_noise_is_per_clip_and_reproducible():
    b1 = make_batch(B=1, K=2, seed=7)
    b2 = make_batch(B=2, K=2, seed=7)
    b2.latents[0] = b1.latents[0]
    n1 = draw_noise(SCHED, b1, CFG, NoiseConfig("flash"), [sample_seed(3, 5, 0)])
    n2 = draw_noise(SCHED, b2, CFG, NoiseConfig("flash"), [sample_seed(3, 5, 0), sample_seed(3, 5, 1)])
    torch.testing.assert_close(n1.video_noise[0], n2.video_noise[0], rtol=0, atol=0)
    torch.testing.assert_close(n1.action.index[0], n2.action.index[0], rtol=0, atol=0)
    assert not torch.equal(n2.video_noise[0], n2.video_noise[1])
    assert sample_seed(3, 5, 0) != sample_seed(3, 6, 0) != sample_seed(4, 5, 0)
    with pytest.raises(ValueError, match="seeds"):
        draw_noise(SCHED, b2, CFG, NoiseConfig(), [1])


def test_forward_flops_match_the_counted_matmuls():
    """step.forward_flops equals torch's FLOP counter on the reference model (whose release-style attention computes
    exactly the visible pairs), so the MFU figures rest on a verified count."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    cfg = get_config("tiny", num_embodiments=1)
    # torch's counter has no formula for the CPU flash-attention kernel SDPA dispatches to: give it the SDPA one
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    m = make_model(cfg)
    batch = make_batch(cfg, B=2, K=2)
    batch.embodiment.zero_()
    noise = draw_noise(SCHED, batch, cfg, NoiseConfig(), [1, 2])
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as fc:
        flow_matching_loss(m, batch, SCHED, noise)
    assert fc.get_total_flops() == forward_flops(cfg, 2, batch=2)
    assert training_flops(cfg, 2, 3) == 9 * forward_flops(cfg, 2, 1)
    # the droid-14b training step: 15,940 tokens, ~463 TFLOP forward, about a third of the attention visible
    big = get_config("droid-14b")
    assert 4.5e14 < forward_flops(big, 4) < 4.8e14


def test_adding_an_embodiment_leaves_the_other_slots_unchanged():
    m = make_model().double()
    batch = make_batch(B=2, K=2)
    noise = draw_noise(SCHED, batch, CFG, NoiseConfig("base"), [1, 2])
    m.eval()

    def outputs(model, emb):
        lay = model.layout("train", num_chunks=2)
        b = batch
        n = noise
        s = n.video.sigma.double()[:, None, :, None, None]
        with torch.no_grad():
            return model(lay, clean=b.latents.double(), clean_cond=b.cond.double(),
                         noisy=((1 - s) * b.latents + s * n.video_noise).double(), noisy_cond=b.cond.double(),
                         t_video=n.video.timestep, actions=b.actions.double(), t_action=n.action.timestep,
                         state=b.state.double(), embodiment=torch.tensor(emb), text=b.text.double(),
                         clip=b.clip.double())

    before = {e: outputs(m, list(e)) for e in ((0, 1), (1, 0))}
    slot = m.add_embodiment(init_from=1)
    assert slot == 2 and m.cfg.num_embodiments == 3
    for e, (v, a) in before.items():
        v2, a2 = outputs(m, list(e))
        assert torch.equal(v, v2) and torch.equal(a, a2)
    # a copied slot computes what its source does; a fresh one differs
    _, a_copy = outputs(m, [2, 2])
    _, a_src = outputs(m, [1, 1])
    torch.testing.assert_close(a_copy, a_src, rtol=0, atol=0)
    m.add_embodiment(init_from=None)
    _, a_fresh = outputs(m, [3, 3])
    assert not torch.allclose(a_fresh, a_src)


def test_bad_batches_are_rejected():
    m = make_model()
    b = make_batch(B=2, K=2)
    b.text = b.text[:, :3]
    with pytest.raises(ValueError, match="batch.text"):
        flow_matching_loss(m, b, SCHED, None)
    b = make_batch(B=2, K=2)
    b.action_mask = b.action_mask.float()
    with pytest.raises(TypeError, match="bool"):
        b.validate(CFG)
    with pytest.raises(ValueError, match="noise mode"):
        NoiseConfig("decoupled")
    with pytest.raises(ValueError, match="beta_a"):
        NoiseConfig("flash", beta_a=0)
    assert math.isclose(NoiseConfig().beta_a / (NoiseConfig().beta_a + NoiseConfig().beta_b), 0.875)
