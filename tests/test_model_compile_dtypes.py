"""CPU guards for what the first GPU run found in the model: torch.compile of the whole model and of the policy's
compiled blocks must trace without a graph break for every apply_ option (a break inside a block is what made
per-block CUDA graphs read overwritten memory, and what the frozen-layout error stopped), and the training step under
bf16 autocast and the control step of a bf16 model must run with every option (q/k used to leave the norm/RoPE in
fp32 next to a bf16 v).

The tiny model (1 layer, 2x4 latents: 2 tokens per frame) runs on the device of tests/conftest.py; torch.compile uses
the aot_eager backend (dynamo, AOT autograd and the custom ops' fake implementations, no code generation), which
catches what inductor would trip on before it compiles anything."""
import pytest
import torch
import torch._dynamo
from conftest import DEVICE
from test_convergence import make_batches
from tiny import tiny_model as build_tiny

from dreamzero.engine import Policy, PolicyConfig
from dreamzero.schedulers import FlowMatchTrainingSchedule
from dreamzero.train.step import flow_matching_loss
from dz_kernels import ApplyConfig, apply_

# "all" swaps in every op apply_ has (the kernel attention, the fused norms, the fused KV cache); dynamo traces each
# op on its own, so the reference model and "all" together cover every op's code (the single options only mix them)
OPTIONS = {
    "reference": None,
    "attention": ApplyConfig(attention=True, norms=False, kv_cache=False),
    "all": ApplyConfig(attention=True, norms=True, kv_cache=True),
}


def tiny_model(option: str, dtype=torch.float32):
    m = build_tiny(num_layers=1, num_embodiments=1, latent_height=2, latent_width=4).to(DEVICE, dtype)
    if OPTIONS[option] is not None:
        apply_(m, OPTIONS[option])
    return m


def train_inputs(cfg, K=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    F_, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    A = K * cfg.actions_per_chunk
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return dict(clean=r(1, 16, F_, H, W), clean_cond=r(1, 20, F_, H, W), noisy=r(1, 16, F_, H, W),
                noisy_cond=r(1, 20, F_, H, W), t_video=(torch.rand(1, F_, generator=g) * 1000).to(DEVICE),
                actions=r(1, A, cfg.action_dim), t_action=(torch.rand(1, A, generator=g) * 1000).to(DEVICE),
                state=r(1, K, cfg.state_dim), embodiment=torch.zeros(1, dtype=torch.long, device=DEVICE),
                text=r(1, cfg.text_len, cfg.text_dim), clip=r(1, cfg.clip_tokens, cfg.clip_dim))


def policy_inputs(cfg, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return dict(text=r(1, cfg.text_len, cfg.text_dim), clip=r(1, cfg.clip_tokens, cfg.clip_dim),
                first=r(1, 16, 1, cfg.latent_height, cfg.latent_width),
                obs=r(1, 16, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width), state=r(1, 1, cfg.state_dim))


def run_policy(m, config: PolicyConfig, x: dict) -> list:
    pol = Policy(m, config)
    pol.reset(x["text"], x["clip"], x["first"])
    return [pol.step(None, x["state"]).actions_raw, pol.step(x["obs"], x["state"]).actions_raw]


@pytest.mark.parametrize("option", ["reference", "all"])
def test_whole_model_compiles_without_graph_breaks(option):
    """torch.compile(fullgraph=True) of the model's forward: teacher forcing with its backward, and a fused control
    step against a fresh KV cache; the compiled results equal the eager ones. The compiled call comes first, so it
    traces what a first call does (the RoPE tables of a new layout too)."""
    m = tiny_model(option)
    x = train_inputs(m.cfg)
    lay = m.layout("train", num_chunks=2)
    compiled = torch.compile(lambda lay, x: m(lay, **x), fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, lambda lay, x: m(lay, **x)):
        m.zero_grad()
        v, a = fn(lay, x)
        (v.square().mean() + a.square().mean()).backward()
        results.append([v.detach(), a.detach()] + [p.grad.clone() for p in m.parameters() if p.grad is not None])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    fpc, apc = m.cfg.frames_per_chunk, m.cfg.actions_per_chunk
    ckv = m.context_kv(x["text"], x["clip"])
    step = dict(clean=x["clean"][:, :, :1], clean_cond=x["clean_cond"][:, :, :1], noisy=x["noisy"][:, :, 1:1 + fpc],
                noisy_cond=x["noisy_cond"][:, :, 1:1 + fpc], t_video=x["t_video"][:, 1:1 + fpc],
                actions=x["actions"][:, :apc], t_action=x["t_action"][:, :apc], state=x["state"][:, :1],
                embodiment=x["embodiment"], context_kv=ckv)
    compiled_step = torch.compile(lambda lay, cache, kw: m(lay, cache=cache, **kw), fullgraph=True,
                                  backend="aot_eager")
    outs = []
    with torch.no_grad():
        for fn in (compiled_step, lambda lay, cache, kw: m(lay, cache=cache, **kw)):
            cache = m.new_cache(1)
            outs.append(fn(cache.layout("control", 1), cache, step))
            assert cache.frames == (0,)
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", ["reference", "all"])
def test_policy_compiled_blocks_trace_whole(option):
    """The engine's compile switch (every DiT block through one compiled function, fullgraph: dreamzero.compiled) on
    the fused control steps of two chunks (the first against an empty cache): whole blocks (a break inside a block
    would make per-block CUDA graphs read the block's input after it was overwritten; fullgraph makes one an
    error), one graph per layout, the eager policy's actions."""
    from dreamzero.compiled import compiled_backend, uncompile_blocks

    m = tiny_model(option)
    x = policy_inputs(m.cfg)
    want = run_policy(m, PolicyConfig(num_steps=1, fused_control=True, negative_prompt=None), x)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    got = run_policy(m, PolicyConfig(num_steps=1, fused_control=True, compile="aot_eager", negative_prompt=None), x)
    assert compiled_backend(m) == "aot_eager"
    assert not counters["graph_break"] and not counters["resumes"], {k: dict(counters[k])
                                                                     for k in ("graph_break", "resumes")}
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])    # the control layouts of chunks 1, 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    uncompile_blocks(m)


@pytest.mark.parametrize("option", ["reference", "attention", "all"])
def test_training_step_under_bf16_autocast(option):
    """The trainer's bf16 path (fp32 master weights, torch.autocast bf16): the loss runs forward and backward with
    every option, finite, within bf16 rounding of the fp32 loss."""
    m = tiny_model(option)
    batch, noise = make_batches(m.cfg, 1, 1, 1, 1, DEVICE)[0]
    schedule = FlowMatchTrainingSchedule()
    ref = flow_matching_loss(m, batch, schedule, noise).loss.item()
    out = flow_matching_loss(m, batch, schedule, noise, autocast_dtype=torch.bfloat16)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert abs(out.loss.item() - ref) < 3e-2 * abs(ref), (out.loss.item(), ref)


@pytest.mark.parametrize("option", ["reference", "all"])
def test_control_step_of_a_bf16_model(option):
    """A bf16 model (the engine's inference dtype) through two control steps, fused control and the KV cache
    included: bf16 actions close to the fp32 model's."""
    x32 = policy_inputs(tiny_model("reference").cfg)
    want = run_policy(tiny_model(option), PolicyConfig(num_steps=1, fused_control=True, negative_prompt=None), x32)
    m = tiny_model(option, torch.bfloat16)
    got = run_policy(m, PolicyConfig(num_steps=1, fused_control=True, negative_prompt=None),
                     {k: v.bfloat16() for k, v in x32.items()})
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)
