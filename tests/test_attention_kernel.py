"""Layout attention kernels (Triton; the interpreter on a CPU) against a float64 reference under the layout's dense
mask: forward, log-sum-exp, dq/dk/dv, odd sizes (1-token state blocks, 24-token action blocks, lengths that are not
multiples of the tile, binding windows, cached frames nobody sees), outputs poisoned with NaN, the deterministic
backward, the custom ops' fake implementations, torch.compile, the dense dispatch, the model, NaN and inf in keys
that some queries cannot see, and bad input.

Every test runs on the device of tests/conftest.py (CUDA when present, else the CPU under the Triton interpreter):
inputs are drawn on the CPU and moved there, float64 references are computed on the CPU.

Precision bar (FlashAttention's tests): the kernel's max error against float64 is at most 2x the error of the same
computation done by plain PyTorch in the inputs' dtype, plus an atol of twice the rounding error of values of that
size in that dtype; fp32 inputs get the same bar against PyTorch's fp32 computation."""
import pytest
import torch
from conftest import DEVICE, requires_cuda

from dreamzero.attention import attention_blockwise, attention_dense_reference
from dreamzero.config import get_config
from dreamzero.layout import inference_layout, layout_for_config, train_layout
from dz_kernels.attention import (AttentionPattern, TileConfig, dense_blocks, layout_attention, layout_is_dense,
                                  poison_outputs)
from dz_kernels.attention.ops import layout_attention_backward_op, layout_attention_op
from dz_kernels.testing import assert_within_lowp_bar

SMALL = TileConfig(fwd=(16, 16), dkv=(16, 32), dq=(32, 16), fwd_warps=4, fwd_stages=1, bwd_warps=4, bwd_stages=1)
WIDE = TileConfig(fwd=(32, 64), dkv=(64, 16), dq=(16, 64), fwd_warps=4, fwd_stages=1, bwd_warps=4, bwd_stages=1)

LAYOUTS = {
    # training: binding window (chunk 3 no longer sees frames 1-2), 3-token action blocks, 1-token states, 82 tokens
    "train-5-w3": lambda: train_layout(5, 2, 3, 1, 3, 3),
    # 24-token action blocks, 7-token frames: 120 tokens
    "train-7-a24": lambda: train_layout(7, 2, 24, 1, 2, -1),
    # inference with a cache whose frames 1-2 fall out of the window (keys nobody sees), consistent rule
    "denoise-w3": lambda: inference_layout(5, 2, 3, 1, "denoise", 3, (0, 1, 2, 3, 4), 3, "consistent"),
    # the control step: observed chunk 2 written + chunk 3 denoised in one call, against the cache
    "control-7": lambda: inference_layout(7, 2, 24, 1, "control", 3, (0, 1, 2), -1, "release"),
    # 13-token frames, one frame per chunk, window 2
    "train-13-w2": lambda: train_layout(13, 1, 3, 1, 3, 2),
}


def make_qkv(layout, B, H, D, dtype, seed=0, requires_grad=False, device=DEVICE):
    """q, k, v drawn on the CPU (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, layout.q_len, H, D, generator=g).to(dtype)
    k = torch.randn(B, layout.k_len, H, D, generator=g).to(dtype)
    v = torch.randn(B, layout.k_len, H, D, generator=g).to(dtype)
    return [t.to(device).requires_grad_(requires_grad) for t in (q, k, v)]


def cpu64(*ts):
    """Detached float64 CPU copies that require grad: the inputs of the float64 oracle."""
    return [t.detach().cpu().double().requires_grad_() for t in ts]


def torch_lowp(q, k, v, mask, scale=None):
    """Plain PyTorch attention in the inputs' own dtype: the error baseline of the precision bar."""
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * s
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def reference_lse(q, k, mask, scale):
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)


def bar_atol(ref64, dtype):
    """FlashAttention's atol: twice the rounding error of values of this size in this dtype,
    2 * max |(ref + 0.3 - 0.3) - ref| (flash-attention's tests), plus 1e-6."""
    r = ref64.detach().to(dtype)
    return 2 * ((r + 0.3 - 0.3) - r).abs().max().item() + 1e-6


def check_forward(layout, B, H, D, dtype, config, scale=None):
    q, k, v = make_qkv(layout, B, H, D, dtype)
    mask = layout.dense_mask()
    with poison_outputs():
        out = layout_attention(q, k, v, layout, scale, config=config)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref = attention_dense_reference(*cpu64(q, k, v), mask, scale).detach()
    low = torch_lowp(q, k, v, mask.to(q.device), scale).cpu()
    assert_within_lowp_bar(out.cpu(), ref, low, atol=bar_atol(ref, dtype), name="out")
    return q, k, v, out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_forward_bf16(name):
    check_forward(LAYOUTS[name](), 2, 1, 16, torch.bfloat16, SMALL)


@pytest.mark.parametrize("D,dtype,config", [(32, torch.float16, WIDE), (64, torch.bfloat16, SMALL),
                                            (128, torch.float16, None), (16, torch.float32, SMALL)])
def test_forward_head_dims_dtypes(D, dtype, config):
    check_forward(LAYOUTS["train-5-w3"](), 1, 2, D, dtype, config, scale=0.3)


def test_forward_lse_matches_reference():
    lay = LAYOUTS["control-7"]()
    q, k, v = make_qkv(lay, 1, 2, 32, torch.bfloat16)
    cfg = SMALL.as_list()
    with poison_outputs():
        out, lse = layout_attention_op(q, k, v, lay.attention_pattern().key, 0.2, cfg, False)
    assert lse.shape == (1, 2, lay.q_len) and lse.dtype == torch.float32
    ref = reference_lse(q.cpu(), k.cpu(), lay.dense_mask(), 0.2)
    torch.testing.assert_close(lse.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def check_backward(layout, B, H, D, dtype, config, deterministic, scale=None):
    q, k, v = make_qkv(layout, B, H, D, dtype, requires_grad=True)
    mask = layout.dense_mask()
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(B, layout.q_len, H, D, generator=g).to(dtype)
    with poison_outputs():
        out = layout_attention(q, k, v, layout, scale, deterministic, config=config)
        grads = torch.autograd.grad(out, (q, k, v), dout.to(q.device))
    q64, k64, v64 = cpu64(q, k, v)
    ref = attention_dense_reference(q64, k64, v64, mask, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    low = torch_lowp(q, k, v, mask.to(q.device), scale)
    low_grads = [t.cpu() for t in torch.autograd.grad(low, (q, k, v), dout.to(q.device))]
    assert_within_lowp_bar(out.cpu(), ref, low.cpu(), atol=bar_atol(ref, dtype), name="out")
    for name, got, want, base in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert got.shape == want.shape and got.dtype == dtype and got.device == q.device
        assert_within_lowp_bar(got.cpu(), want, base, atol=bar_atol(want, dtype), name=name)
    return [t.cpu() for t in grads]


@pytest.mark.parametrize("name", ["train-5-w3", "denoise-w3", "control-7", "train-13-w2"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_bf16(name, deterministic):
    check_backward(LAYOUTS[name](), 1, 1, 16, torch.bfloat16, SMALL, deterministic)


def test_backward_fp16_wide_tiles_head_dim_64():
    check_backward(LAYOUTS["train-7-a24"](), 1, 2, 64, torch.float16, WIDE, True, scale=0.2)


def test_backward_fp32_default_tiles():
    check_backward(LAYOUTS["control-7"](), 2, 1, 32, torch.float32, None, False)


def test_keys_nobody_sees_get_zero_gradients():
    lay = LAYOUTS["denoise-w3"]()
    mask = lay.dense_mask()
    unseen = ~mask.any(dim=0)
    assert unseen.sum() >= 10, "frames 1 and 2 are out of every query's window"
    dk, dv = check_backward(lay, 1, 1, 16, torch.bfloat16, SMALL, True)[1:]
    assert (dk[:, unseen] == 0).all() and (dv[:, unseen] == 0).all()


def test_deterministic_backward_is_bitwise_reproducible():
    lay = LAYOUTS["train-5-w3"]()
    runs = []
    for _ in range(2):
        q, k, v = make_qkv(lay, 1, 1, 16, torch.bfloat16, requires_grad=True)
        out = layout_attention(q, k, v, lay, None, True, config=SMALL)
        runs.append((out,) + torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [True, False])
def test_lse_gradient(deterministic):
    """The op's second output (lse) is differentiable too: d lse_i / d s_ij = p_ij enters through delta."""
    lay = LAYOUTS["train-5-w3"]()
    q, k, v = make_qkv(lay, 1, 1, 16, torch.float32, requires_grad=True)
    cfg = SMALL.as_list()
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(1, lay.q_len, 1, 16, generator=g)
    w_lse = torch.randn(1, 1, lay.q_len, generator=g)
    out, lse = layout_attention_op(q, k, v, lay.attention_pattern().key, 0.25, cfg, deterministic)
    loss = (out * w_out.to(q.device)).sum() + (lse * w_lse.to(q.device)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = cpu64(q, k, v)
    mask = lay.dense_mask()
    ref = attention_dense_reference(q64, k64, v64, mask, 0.25)
    ref_lse = reference_lse(q64, k64, mask, 0.25)
    ref_grads = torch.autograd.grad((ref * w_out.double()).sum() + (ref_lse * w_lse.double()).sum(),
                                    (q64, k64, v64))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)


def test_rows_that_see_nothing_are_safe():
    """No DreamZero layout has a query that sees nothing (every token sees itself), but a pattern may, and the
    kernels must not make NaN of one: out 0, lse -inf, zero gradients. Query segment 1 sees nothing while its
    neighbours see keys of the same tiles (partial tiles with fully masked rows); the last pattern sees nothing
    at all (every tile skipped)."""
    lengths = (5, 7, 3, 6)
    for rows in ((0b0001, 0b0000, 0b0111, 0b1011), (0, 0, 0, 0)):
        pat = AttentionPattern(lengths, lengths, rows)
        blind = pat.dense_mask().any(dim=1).logical_not()
        q, k, v = make_qkv(pat, 1, 2, 16, torch.bfloat16, requires_grad=True)
        for det in (True, False):
            with poison_outputs():
                out, lse = layout_attention_op(q, k, v, pat.key, 0.25, SMALL.as_list(), det)
                loss = out.float().sum() + lse.masked_fill(blind.to(q.device), 0.0).sum()
                grads = torch.autograd.grad(loss, (q, k, v))
            out, lse = out.cpu(), lse.cpu()
            assert (out[:, blind] == 0).all() and (lse[:, :, blind] == float("-inf")).all()
            assert torch.isfinite(out).all()
            ref = attention_blockwise(*cpu64(q, k, v), pat, 0.25)
            torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=2e-2)
            dq = grads[0].cpu()
            assert (dq[:, blind] == 0).all() and all(torch.isfinite(g).all() for g in grads)
            unseen = ~pat.dense_mask().any(dim=0)
            for g in grads[1:]:
                assert (g.cpu()[:, unseen] == 0).all()


def test_strided_inputs():
    """q, k, v as views of a packed [B, L, 3, H, D] projection (strided tokens and heads), and a last dim that is
    not contiguous (copied by the public function, as documented)."""
    lay = LAYOUTS["train-5-w3"]()            # training: keys = queries, so one packed projection holds q, k, v
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, lay.q_len, 3, 2, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    with poison_outputs():
        out = layout_attention(q, k, v, lay, config=SMALL)
    ref = attention_dense_reference(q.cpu(), k.cpu(), v.cpu(), lay.dense_mask())
    low = torch_lowp(q, k, v, lay.dense_mask(DEVICE)).cpu()
    assert_within_lowp_bar(out.cpu(), ref, low, atol=bar_atol(ref, torch.bfloat16))
    kt = k.transpose(-1, -2).contiguous().transpose(-1, -2)      # same values, last-dim stride != 1
    assert kt.stride(-1) != 1
    with poison_outputs():
        out2 = layout_attention(q, kt, v, lay, config=SMALL)
    assert torch.equal(out, out2)


def test_matches_release_loop_reference():
    """The kernel and the release-style per-block loop agree (float32, tight)."""
    lay = LAYOUTS["control-7"]()
    q, k, v = make_qkv(lay, 1, 2, 16, torch.float32)
    out = layout_attention(q, k, v, lay, config=SMALL)
    torch.testing.assert_close(out, attention_blockwise(q, k, v, lay), rtol=1e-5, atol=1e-5)


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


# ---------------------------------------------------------------------- non-finite values
def nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """bool [B, L, H]: the (token, head) rows holding a NaN or an inf."""
    return ~torch.isfinite(t.detach().cpu()).all(dim=-1)


def check_nonfinite(lay, which: str, deterministic: bool, **kw):
    """NaN / inf planted in some rows of `which` (k, v or dout): the output and gradients of the kernel are
    non-finite in exactly the (token, head) rows where the release's per-block loop (float64, only visible keys
    gathered) has them, and equal to it elsewhere."""
    q, k, v = make_qkv(lay, 1, 2, 16, torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    mask = lay.dense_mask()
    seen_by = mask.sum(dim=0)
    # a key that some queries see and others do not, and (if the layout has one) a key nobody sees
    partial = [int(j) for j in torch.nonzero((seen_by > 0) & (seen_by < lay.q_len)).flatten()[::7][:3]]
    nobody = [int(j) for j in torch.nonzero(seen_by == 0).flatten()[:2]]
    rows = partial + nobody
    if which == "dout":
        rows = [int(i) for i in torch.nonzero(~mask[:, partial[0]]).flatten()[:2]]
        rows += [int(torch.nonzero(mask[:, partial[0]]).flatten()[0])]
    bad = {"k": k, "v": v, "dout": dout}[which].detach()
    bad_cpu = bad.cpu()
    bad_cpu[:, rows[0], :, 3] = float("nan")
    bad_cpu[:, rows[1:], :, 5] = float("nan") if which == "k" else float("inf")
    bad.copy_(bad_cpu.to(bad.device))
    dout = dout.to(q.device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with poison_outputs():
        out = layout_attention(q, k, v, lay, None, deterministic, config=SMALL, **kw)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = cpu64(q, k, v)
    ref = attention_blockwise(q64, k64, v64, lay)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
        got_bad, want_bad = nonfinite_rows(got), nonfinite_rows(want)
        assert torch.equal(got_bad, want_bad), (
            f"{name}: non-finite rows {torch.nonzero(got_bad).tolist()}, the reference has "
            f"{torch.nonzero(want_bad).tolist()}")
        ok = ~want_bad
        torch.testing.assert_close(got.detach().cpu().double()[ok], want.detach()[ok], rtol=1e-4, atol=1e-5,
                                   msg=name)
    assert nonfinite_rows(out).any() or which == "dout", "the planted values must reach some query"


@pytest.mark.parametrize("which", ["v", "k", "dout"])
@pytest.mark.parametrize("name", ["denoise-w3", "train-5-w3"])
def test_nonfinite_values_reach_only_the_queries_that_see_them(name, which):
    """NaN/inf in V or K at keys some queries cannot see (and keys nobody sees, from the cache), NaN in dO: masked
    probabilities never multiply them, in the forward and in both backward schedules."""
    check_nonfinite(LAYOUTS[name](), which, deterministic=(which != "k"))
    if which == "v":
        check_nonfinite(LAYOUTS[name](), which, deterministic=False)


def test_nonfinite_values_in_the_dense_block_dispatch():
    """The SDPA dispatch of the control step (one call per dense block on views of k and v) is as clean."""
    check_nonfinite(LAYOUTS["control-7"](), "v", deterministic=False, dense_sdpa=True, sdpa_blocks=2)


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


def test_kernels_compile_for_hopper():
    """The GPU code path (bf16 tensor-core dots, atomics, shared memory at the default H100 tiles) compiles for
    sm_90 with Triton's bundled ptxas; the interpreter never sees it. Runs in a subprocess with TRITON_INTERPRET=0
    (see dz_kernels.attention.compile_check, which compiles every kernel, dtype and head dim; the dq kernel uses
    nothing the two compiled here do not)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "dz_kernels.attention.compile_check", "--arch", "90", "--dtypes",
                           "bf16", "--head-dims", "128", "--kernels", "fwd,dkdv-atomic-dq"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sm_90") == 2, proc.stdout


# ---------------------------------------------------------------------- on a GPU (skipped on a CPU, with the reason)
def _gpu_check(layout, B, H, deterministic):
    q, k, v = (t.cuda() for t in make_qkv(layout, B, H, 128, torch.bfloat16))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(torch.bfloat16)
    mask = layout.dense_mask("cuda")
    with poison_outputs():
        out = layout_attention(q, k, v, layout, None, deterministic, dense_sdpa=False)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_dense_reference(q64, k64, v64, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    del q64, k64, v64
    low = torch_lowp(q, k, v, mask)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    assert_within_lowp_bar(out, ref, low, atol=bar_atol(ref, torch.bfloat16), name="out")
    for name, got, want, base in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_within_lowp_bar(got, want, base, atol=bar_atol(want, torch.bfloat16), name=name)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_droid_training_layout(deterministic):
    _gpu_check(layout_for_config(get_config("droid-14b"), "train"), 1, 1, deterministic)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_gpu_small_layouts(name):
    _gpu_check(LAYOUTS[name](), 2, 3, False)


@requires_cuda
@pytest.mark.gpu
def test_gpu_control_step_and_dense_dispatch():
    cfg = get_config("droid-14b")
    _gpu_check(layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7))), 2, 2, False)
    den = layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9)))
    q, k, v = (t.cuda() for t in make_qkv(den, 2, 4, 128, torch.bfloat16))
    a = layout_attention(q, k, v, den)                        # dispatched to SDPA (dense)
    b = layout_attention(q, k, v, den, dense_sdpa=False)      # the Triton kernel
    ref = attention_dense_reference(q, k, v, den.dense_mask("cuda"))
    low = torch_lowp(q, k, v, den.dense_mask("cuda"))
    for got in (a, b):
        assert_within_lowp_bar(got, ref, low, atol=bar_atol(ref, torch.bfloat16))


@requires_cuda
@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    """Forward + backward captured in a CUDA graph (after a warm-up that builds the schedule and compiles the
    kernels) and under torch.compile(fullgraph=True) give the eager results."""
    lay = LAYOUTS["train-7-a24"]()
    q, k, v = (t.cuda().requires_grad_() for t in make_qkv(lay, 2, 4, 128, torch.bfloat16))
    dout = torch.randn(q.shape, device="cuda").to(torch.bfloat16)

    def step():
        out = layout_attention(q, k, v, lay, None, True)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    # detached: a live autograd graph from the default stream would keep q/k/v's AccumulateGrad nodes on that stream,
    # and the captured backward would then have to sync with it (cudaErrorStreamCaptureImplicit)
    want = tuple(t.detach() for t in step())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    static = tuple(t.detach() for t in static)
    for t in static:
        t.fill_(float("nan"))                # the replay must write every output
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, want):
        assert torch.equal(a, b)

    cf = torch.compile(lambda q, k, v: layout_attention(q, k, v, lay, None, True), fullgraph=True)
    out = cf(q, k, v)
    got = (out,) + torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.gpu
def test_gpu_compile_with_the_dense_dispatch_and_cuda_graphs():
    """torch.compile (inductor, mode reduce-overhead: CUDA graphs) of the public function on a dense layout (the
    SDPA dispatch reads the pattern as constants) and on the control step (two SDPA blocks), eager results."""
    den = inference_layout(5, 2, 3, 1, "denoise", 2, (0, 1, 2), -1, "release")
    ctl = LAYOUTS["control-7"]()
    for lay, kw in ((den, {}), (ctl, dict(sdpa_blocks=2))):
        q, k, v = (t.cuda() for t in make_qkv(lay, 1, 2, 64, torch.bfloat16))
        want = layout_attention(q, k, v, lay, **kw)
        cf = torch.compile(lambda q, k, v: layout_attention(q, k, v, lay, **kw), fullgraph=True,
                           mode="reduce-overhead")
        for _ in range(3):                   # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            got = cf(q, k, v).clone()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
