"""Layout attention as an op: the dense dispatch to SDPA, the custom ops' fake implementations (opcheck),
torch.compile(fullgraph), the model's backend switch, the shared NaN-poisoning hook, bad input, and the GPU code path
compiled ahead of time. Layouts and inputs: tests/attention_cases.py."""
from unittest import mock

import pytest
import torch
from conftest import DEVICE

from attention_cases import LAYOUTS, SMALL, make_qkv
from dreamzero.attention import attention_blockwise
from dreamzero.config import get_config
from dreamzero.layout import inference_layout, layout_for_config, train_layout
from dz_kernels.attention import TileConfig, dense_blocks, layout_attention, layout_is_dense
from dz_kernels.attention.ops import layout_attention_backward_op, layout_attention_op


def test_dense_dispatch_rule():
    cfg = get_config("droid-14b")
    assert layout_is_dense(layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9))))
    assert not layout_is_dense(layout_for_config(cfg, "train"))
    assert not layout_is_dense(layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7))))
    assert not layout_is_dense(layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9)),
                                                 rule="consistent"))
    # the SDPA path (forced on a CPU) and the kernel agree on a dense layout
    lay = inference_layout(5, 2, 3, 1, "denoise", 2, (0, 1, 2), -1, "release")
    assert layout_is_dense(lay)
    q, k, v = make_qkv(lay, 1, 2, 16, torch.float32)
    a = layout_attention(q, k, v, lay, config=SMALL, dense_sdpa=True)
    b = layout_attention(q, k, v, lay, config=SMALL, dense_sdpa=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dense_blocks_dispatch():
    """The control step is two dense blocks (observed frames: cache + themselves; the denoised chunk: every key);
    with sdpa_blocks=2 it runs as one SDPA call per block and matches the kernel, gradients included."""
    cfg = get_config("droid-14b")
    ctl = layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7)))
    n_cached, n_obs = ctl.n_cached, 2 * cfg.frame_tokens
    assert dense_blocks(ctl) == ((0, n_obs, 0, n_cached + n_obs), (n_obs, ctl.q_len, 0, ctl.k_len))
    assert dense_blocks(layout_for_config(cfg, "train")) is None
    den = layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9)))
    assert dense_blocks(den) == ((0, den.q_len, 0, den.k_len),)
    lay = LAYOUTS["control-7"]()
    assert len(dense_blocks(lay)) == 2
    q, k, v = make_qkv(lay, 1, 2, 16, torch.float32, requires_grad=True)
    dout = torch.randn(q.shape).to(DEVICE)
    res = []
    for kw in (dict(dense_sdpa=True, sdpa_blocks=2), dict(dense_sdpa=False)):
        out = layout_attention(q, k, v, lay, config=SMALL, **kw)
        res.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [True, False])
def test_fake_impls_with_opcheck(deterministic):
    """opcheck: schema (no mutation or aliasing of the inputs), autograd registration, the fake impls and AOT
    dispatch, for both ops; the schedule tensors are looked up inside the op, so no input carries them."""
    lay = train_layout(5, 2, 3, 1, 1, -1)
    key = lay.attention_pattern().key
    q, k, v = make_qkv(lay, 1, 1, 16, torch.bfloat16, requires_grad=True)
    cfg = TileConfig(fwd=(32, 32), dkv=(32, 32), dq=(32, 32), fwd_stages=1, bwd_stages=1).as_list()
    torch.library.opcheck(layout_attention_op, (q, k, v, key, 0.25, cfg, deterministic))
    out, lse = layout_attention_op(q, k, v, key, 0.25, cfg, deterministic)
    dout = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(layout_attention_backward_op,
                              (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dlse, key,
                               0.25, cfg, deterministic))


def test_torch_compile_fullgraph():
    """fullgraph tracing through the public function (schedule tensors as constants, the fake impls, the autograd
    formula) gives the eager results; a second layout recompiles instead of reusing the first schedule."""
    lays = [train_layout(5, 2, 3, 1, 2, -1), train_layout(5, 2, 3, 1, 2, 3)]

    def f(q, k, v, lay):
        return layout_attention(q * 1.0, k, v, lay, None, True, config=SMALL)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for lay in lays + [lays[0].attention_pattern()]:
        q, k, v = make_qkv(lay, 1, 1, 16, torch.bfloat16, requires_grad=True)
        out = cf(q, k, v, lay)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        out_e = f(q, k, v, lay)
        grads_e = torch.autograd.grad(out_e.float().square().sum(), (q, k, v))
        assert torch.equal(out, out_e)
        for a, b in zip(grads, grads_e):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph_dense_dispatch():
    """The dense dispatch under fullgraph tracing (the GPU default, forced here): the pattern's dense flag and
    dense blocks are constants of the graph (torch 2.11 could not trace the old layout_is_dense(layout))."""
    den = inference_layout(5, 2, 3, 1, "denoise", 2, (0, 1, 2), -1, "release")
    for lay in (den, LAYOUTS["control-7"]()):
        def f(q, k, v):
            return layout_attention(q, k, v, lay, None, False, config=SMALL, dense_sdpa=True, sdpa_blocks=2)

        q, k, v = make_qkv(lay, 1, 2, 16, torch.float32)
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v),
                                   rtol=1e-6, atol=1e-6)


def test_tiny_model_with_the_kernel_matches_reference_path():
    """The model's backend switch: teacher forcing (forward and parameter gradients) and one fused control step
    against the KV cache, fp32, kernel vs the reference attention."""
    from tiny import tiny_model

    from dreamzero.cache import KVCache

    m = tiny_model(num_layers=1, std=0.2).to(DEVICE)
    cfg = m.cfg
    K, B = 2, 1
    g = torch.Generator().manual_seed(1)
    F_, Hh, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    A, S = K * cfg.actions_per_chunk, K * cfg.states_per_chunk
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(clean=r(B, 16, F_, Hh, W), clean_cond=r(B, 20, F_, Hh, W), noisy=r(B, 16, F_, Hh, W),
             noisy_cond=r(B, 20, F_, Hh, W), t_video=torch.rand(B, F_, generator=g) * 1000,
             actions=r(B, A, cfg.action_dim), t_action=torch.rand(B, A, generator=g) * 1000,
             state=r(B, S, cfg.state_dim), embodiment=torch.zeros(B, dtype=torch.long),
             text=r(B, cfg.text_len, cfg.text_dim), clip=r(B, cfg.clip_tokens, cfg.clip_dim))
    x = {name: t.to(DEVICE) for name, t in x.items()}
    lay = m.layout("train", num_chunks=K)
    kernel_ops = m.ops.replace(attention=lambda q, k, v, layout, scale: layout_attention(q, k, v, layout, scale,
                                                                                         config=SMALL))
    results = []
    for ops in (m.ops, kernel_ops):
        m.ops = ops
        m.zero_grad()
        vel, act = m(lay, **x)
        (vel.square().mean() + act.square().mean()).backward()
        results.append((vel.detach(), act.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (v0, a0, g0), (v1, a1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-4)
    assert len(g0) == len(g1) > 0
    for p0, p1 in zip(g0, g1):
        torch.testing.assert_close(p1, p0, rtol=1e-3, atol=1e-4)

    # inference: two fused control steps against the KV cache (observe the first frame + denoise chunk 1, then
    # observe chunk 1 + denoise chunk 2: its attention reads the cache the first step wrote)
    fpc, a_, s_ = cfg.frames_per_chunk, cfg.actions_per_chunk, cfg.states_per_chunk
    outs = []
    for attn in (attention_blockwise, kernel_ops.attention):
        m.ops = m.ops.replace(attention=attn)
        cache = KVCache(cfg, B, torch.float32, device=DEVICE)
        ckv = m.context_kv(x["text"], x["clip"])
        step = []
        with torch.no_grad():
            for c in (1, 2):
                prev = slice(0, 1) if c == 1 else slice(1 + (c - 2) * fpc, 1 + (c - 1) * fpc)
                fr = slice(1 + (c - 1) * fpc, 1 + c * fpc)
                ac, st = slice((c - 1) * a_, c * a_), slice((c - 1) * s_, c * s_)
                step += m(cache.layout("control", c), clean=x["clean"][:, :, prev],
                          clean_cond=x["clean_cond"][:, :, prev], noisy=x["noisy"][:, :, fr],
                          noisy_cond=x["noisy_cond"][:, :, fr], t_video=x["t_video"][:, fr],
                          actions=x["actions"][:, ac], t_action=x["t_action"][:, ac], state=x["state"][:, st],
                          embodiment=x["embodiment"], context_kv=ckv, cache=cache)
        assert cache.frames == (0, 1, 2)
        outs.append(step)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_outputs_come_from_the_shared_poisoning_hook():
    """Every buffer the launchers allocate (out, lse; delta, dk, dv and the deterministic dq) comes from
    dz_kernels._common.empty, so the one switch (dz_kernels.testing.poison_outputs, on in every test through
    tests/conftest.py; dz_kernels.attention.poison_outputs is the same function) fills it with NaN first."""
    import dz_kernels._common as cm
    import dz_kernels.attention as attn
    import dz_kernels.testing

    assert attn.poison_outputs is dz_kernels.testing.poison_outputs
    lay = LAYOUTS["train-5-w3"]()
    B, H, D, Lq = 1, 2, 16, lay.q_len
    q, k, v = make_qkv(lay, B, H, D, torch.bfloat16, requires_grad=True)
    with mock.patch.object(cm, "poisoned", wraps=cm.poisoned) as spy:
        out = layout_attention(q, k, v, lay, None, True, config=SMALL)
        torch.autograd.grad(out.float().sum(), (q, k, v))
    made = sorted((tuple(c.args[0]), str(c.args[1])) for c in spy.call_args_list)
    assert lay.k_len == Lq                   # training: dk and dv have q's shape
    assert made == sorted([((B, H, Lq), "torch.float32")] * 2 + [((B, Lq, H, D), "torch.bfloat16")] * 4), made
    with dz_kernels.testing.poison_outputs(False), mock.patch.object(cm, "poisoned", wraps=cm.poisoned) as spy:
        layout_attention(q, k, v, lay, None, True, config=SMALL)
    assert not spy.called


# ---------------------------------------------------------------------- bad input
def test_bad_input_errors():
    lay = LAYOUTS["train-5-w3"]()
    q, k, v = make_qkv(lay, 1, 2, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="rank 4"):
        layout_attention(q[0], k, v, lay)
    with pytest.raises(TypeError, match="share a dtype"):
        layout_attention(q, k.half(), v, lay)
    with pytest.raises(TypeError, match="unsupported dtype"):
        layout_attention(q.double(), k.double(), v.double(), lay)
    with pytest.raises(ValueError, match="query tokens"):
        layout_attention(q[:, :-1], k, v, lay)
    with pytest.raises(ValueError, match="key tokens"):
        layout_attention(q, k[:, :-1], v[:, :-1], lay)
    with pytest.raises(ValueError, match="same shape"):
        layout_attention(q, k, v[:, :-1], lay)
    with pytest.raises(ValueError, match="batch, heads or head dim"):
        layout_attention(q, k[:, :, :1], v[:, :, :1], lay)
    with pytest.raises(ValueError, match="head dim 24"):
        layout_attention(*make_qkv(lay, 1, 1, 24, torch.bfloat16), lay)
    with pytest.raises(ValueError, match="head dim 256"):
        layout_attention(*make_qkv(lay, 1, 1, 256, torch.bfloat16), lay)
    with pytest.raises(TypeError, match="SequenceLayout"):
        layout_attention(q, k, v, "train")
    with pytest.raises(TypeError, match="torch.Tensor"):
        layout_attention([1], k, v, lay)
    with pytest.raises(ValueError, match="one device"):
        layout_attention(q, k.to("meta"), v, lay)
    with pytest.raises(ValueError, match="TileConfig.fwd"):
        layout_attention(q, k, v, lay, config=TileConfig(fwd=(16, 24)))
    with pytest.raises(ValueError, match="TileConfig.dq"):
        layout_attention(q, k, v, lay, config=TileConfig(dq=(8, 16)))


def test_kernels_compile_for_hopper_without_spilling():
    """The GPU code path (bf16 tensor-core dots, atomics, shared memory at the table's H100/H200 tiles) compiles for
    sm_90 with Triton's bundled ptxas, the interpreter never sees it; and no kernel spills registers at head dim 128,
    each launch specialized as Triton's launcher specializes it at the droid-14b training mask (the first version
    spilled 316 B in the forward and 2.8 KB in dk/dv: NaN tests on whole operand tiles inside the key loop, and a
    32x128 dk/dv tile on 4 warps). Runs compile_check in a subprocess with TRITON_INTERPRET=0."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "dz_kernels.attention.compile_check", "--arch", "90", "--dtypes",
                           "bf16", "--head-dims", "128", "--modes", "train"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spills = {m.group(1): int(m.group(2)) for m in re.finditer(r"sm_90 (\S+) .* spills +(\d+) B", proc.stdout)}
    assert set(spills) == {"fwd", "dkdv", "dq", "preprocess", "row-flags", "dkdv-atomic-dq"}, proc.stdout
    assert not any(spills.values()), f"register spills on sm_90:\n{proc.stdout}"


@pytest.mark.parametrize("args,says", [(["--dtypes", "bf17"], "--dtypes takes bf16"),
                                       (["--config", '{"fwd": [100, 64]}'], "--config: TileConfig.fwd must be"),
                                       (["--kernels", "fwdx"], "unknown kernels ['fwdx']")])
def test_compile_check_mistakes_are_one_line(args, says):
    """A command-line mistake is one line naming it (argparse's usage line above it), exit status 2, no traceback."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dz_kernels.attention.compile_check", *args],
                          env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert says in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_compile_check_patterns_are_the_models():
    """compile_check carries the droid-14b patterns as plain data (the kernel library does not import the model):
    they must be the model's."""
    from dreamzero.config import get_config
    from dreamzero.layout import layout_for_config
    from dz_kernels.attention import as_pattern
    from dz_kernels.attention.compile_check import DROID_14B

    cfg = get_config("droid-14b")
    for mode, layout in (("train", layout_for_config(cfg, "train")),
                         ("infer", layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7))))):
        p = as_pattern(layout)
        assert (p.q_lengths, p.k_lengths, p.rows) == DROID_14B[mode], mode
