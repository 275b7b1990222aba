"""apply_: the fast ops swapped into the DreamZero model give the same outputs, and undo restores the original.
The model runs on the device of tests/conftest.py (CUDA when present, else the CPU with the Triton interpreter), at
the tiny config in fp32."""
import pytest
import torch
from conftest import DEVICE
from tiny import tiny_model

from dreamzero.engine import Policy, PolicyConfig
from dz_kernels import ApplyConfig, apply_


def tiny(seed=0, device=DEVICE):
    return tiny_model(seed=seed, num_embodiments=1, num_layers=1).to(device)


def tf_inputs(cfg, B=1, K=2, seed=1, device=DEVICE):
    """Teacher-forcing inputs, drawn on the CPU (the same values on every device), on `device`."""
    g = torch.Generator().manual_seed(seed)
    F, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    A = K * cfg.actions_per_chunk
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(clean=r(B, 16, F, H, W), clean_cond=r(B, 20, F, H, W), noisy=r(B, 16, F, H, W),
             noisy_cond=r(B, 20, F, H, W), t_video=torch.rand(B, F, generator=g) * 1000,
             actions=r(B, A, cfg.action_dim), t_action=torch.rand(B, A, generator=g) * 1000,
             state=r(B, K, cfg.state_dim), text=r(B, cfg.text_len, cfg.text_dim),
             clip=r(B, cfg.clip_tokens, cfg.clip_dim))
    return {k: v.to(device) for k, v in x.items()}


@pytest.mark.parametrize("config", [ApplyConfig(attention=True, norms=False, kv_cache=False),
                                    ApplyConfig(attention=False, norms=True, kv_cache=False),
                                    ApplyConfig(attention=True, norms=True, kv_cache=False)],
                         ids=["attention", "norms", "both"])
def test_apply_teacher_forcing_same_outputs_and_undo(config):
    m = tiny()
    x = tf_inputs(m.cfg)
    lay = m.layout("train", num_chunks=2)
    with torch.no_grad():
        v0, a0 = m(lay, **x)
        ops0 = m.ops
        handle = apply_(m, config)
        # the swap really happened (else v1 == v0 trivially): the chosen fields are dz_kernels functions
        swapped = (["attention"] if config.attention else []) + (["layernorm_modulate", "gated_residual",
                                                                    "rms_norm", "gelu_tanh"] if config.norms else [])
        for name in swapped:
            assert getattr(m.ops, name) is not getattr(ops0, name)
            assert getattr(m.ops, name).__module__.startswith("dz_kernels."), name
        v1, a1 = m(lay, **x)
        handle.undo()
        assert m.ops is ops0
        v2, a2 = m(lay, **x)
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-4)
    assert torch.equal(v2, v0) and torch.equal(a2, a0)


def test_apply_gradients_match_reference():
    m = tiny()
    x = tf_inputs(m.cfg)
    lay = m.layout("train", num_chunks=2)

    def grads():
        m.zero_grad()
        v, a = m(lay, **x)
        (v.square().mean() + a.square().mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    g0 = grads()
    handle = apply_(m, ApplyConfig(attention=True, norms=True, kv_cache=False))
    g1 = grads()
    handle.undo()
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.parametrize("kv_cache", [False, True], ids=["reference-cache", "fused-cache"])
def test_apply_in_the_policy_loop(kv_cache):
    m = tiny()
    cfg = m.cfg
    g = torch.Generator().manual_seed(2)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(DEVICE)
    clip = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g).to(DEVICE)
    first = torch.randn(1, 16, 1, cfg.latent_height, cfg.latent_width, generator=g).to(DEVICE)
    obs = torch.randn(1, 16, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width, generator=g).to(DEVICE)
    state = torch.randn(1, 1, cfg.state_dim, generator=g).to(DEVICE)

    def run():
        pol = Policy(m, PolicyConfig(num_steps=2, fused_control=True, negative_prompt=None))
        pol.reset(text, clip, first)
        return [pol.step(None, state).actions_raw, pol.step(obs, state).actions_raw]

    ref = run()
    handle = apply_(m, ApplyConfig(attention=True, norms=True, kv_cache=kv_cache))
    got = run()
    handle.undo()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_apply_rejects_unknown_models():
    with pytest.raises(TypeError, match="supports"):
        apply_(torch.nn.Linear(2, 2))


def test_apply_names_a_config_that_is_not_an_apply_config():
    m = tiny()
    before = m.ops
    for bad in (None, {"attention": True}, True):
        with pytest.raises(TypeError, match=f"apply_: config must be a dz_kernels.ApplyConfig .*got "
                                            f"{type(bad).__name__}"):
            apply_(m, bad)
    assert m.ops is before                                          # nothing was swapped
