"""FusedKVCache (dz_kernels.kv_cache.cache) against the model's reference cache (dreamzero.cache.KVCache), on the
suite's device (CUDA, else the CPU with the Triton interpreter): staging, commit, wrap-around, reset, a new
instruction, overflow under both policies, the default staging at the DROID shape; the whole tiny model running
chunk after chunk through both caches, through the model's own wiring (the fused `project` entry point, or the
drop-in `extend` path when the cache is seen without `project`); the FP8 cache's SQNR; torch.compile(fullgraph).
The kernels themselves: tests/test_kv_cache_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

from dreamzero.attention import attention_blockwise
from dreamzero.cache import KVCache
from dreamzero.config import get_config
from dreamzero.rope import rope_tables
from dz_kernels.kv_cache import FusedKVCache, dequantize_fp8_per_head
from dz_kernels.testing import max_abs_err, sqnr_db

from conftest import DEVICE
from tiny import tiny_model

FP8 = torch.float8_e4m3fn
EPS = 1e-6
TINY = get_config("tiny")
# FP8 thresholds (E4M3, one scale per (token, head)): measured at these shapes (CPU, interpreter) k/v 31.8-33.4 dB,
# the attention output 29.0 dB (errors in the keys also move the softmax weights). The bars leave about 3 dB.
FP8_KV_SQNR_DB = 28.0          # dequantized FP8 cache vs the bf16 cache
FP8_ATTN_SQNR_DB = 26.0        # attention output with the FP8 cache vs with the bf16 cache


def test_torch_compile_fullgraph_traces_the_op_and_the_cache():
    """The custom op (a cache mutation) and FusedKVCache.project trace without graph breaks (aot_eager: dynamo,
    fake tensors and functionalization, no code generation), and give the eager results."""
    cache_c = FusedKVCache(TINY, 2, torch.float32, device=DEVICE)
    cache_e = FusedKVCache(TINY, 2, torch.float32, device=DEVICE)
    lay = cache_c.layout("first", 0)
    cos, sin = (t.to(DEVICE) for t in rope_tables(lay, TINY))
    C = TINY.dim
    qkv = torch.randn(2, lay.q_len, 3 * C, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    q, k, v = qkv.split(C, dim=-1)
    w = torch.linspace(0.5, 1.5, C, device=DEVICE)

    def step(cache, q, k, v):
        q_rot, k_all, v_all = cache.project(0, q, k, v, w, w, EPS, cos, sin, lay)
        return q_rot * 2, k_all + 1, v_all - 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(cache_c, q, k, v)
        ref = step(cache_e, q, k, v)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert torch.equal(cache_c.k[0], cache_e.k[0]) and torch.equal(cache_c.v[0], cache_e.v[0])


# ------------------------------------------------------------------------------------------ FusedKVCache contract


def _kv(cache, L, g):
    shape = (cache.batch, L, TINY.num_heads, TINY.head_dim)
    return torch.randn(shape, generator=g).to(DEVICE), torch.randn(shape, generator=g).to(DEVICE)


def _drive(script, overflow="reset", backend="auto", capacity_frames=None, B=2):
    """Run the same passes through the reference KVCache and FusedKVCache (extend path, fp32) and compare the key
    sequences handed to the attention, the frames and the stored slots after every commit."""
    ref = KVCache(TINY, B, torch.float32, device=DEVICE, overflow=overflow, capacity_frames=capacity_frames)
    fused = FusedKVCache(TINY, B, torch.float32, device=DEVICE, overflow=overflow, capacity_frames=capacity_frames,
                         backend=backend)
    g = torch.Generator().manual_seed(11)
    for step in script:
        if step == "reset":
            ref.reset()
            fused.reset()
            assert int(fused.write_pos) == 0 and fused.frames == ()
            continue
        mode, chunk = step
        lay = ref.layout(mode, chunk)
        assert lay == fused.layout(mode, chunk)
        for layer in range(TINY.num_layers):
            k_new, v_new = _kv(fused, lay.q_len, g)
            rk, rv = ref.extend(layer, k_new, v_new, lay)
            fk, fv = fused.extend(layer, k_new, v_new, lay)
            assert fk.shape == (B, lay.k_len, TINY.num_heads, TINY.head_dim)
            assert torch.equal(fk, rk) and torch.equal(fv, rv), f"{step} layer {layer}: key sequence differs"
        ref.commit(lay)
        fused.commit(lay)
        assert fused.frames == ref.frames, f"{step}: frames {fused.frames} != {ref.frames}"
        n = fused.num_tokens
        assert int(fused.write_pos) == n
        for layer in range(TINY.num_layers):
            assert torch.equal(fused.k[layer][:, :n], ref.k[layer][:, :n])
            assert torch.equal(fused.v[layer][:, :n], ref.v[layer][:, :n])
    return ref, fused


def _episode(chunks, control=False):
    if control:
        return [("control", c) for c in range(1, chunks + 1)]
    out = [("first", 0)]
    for c in range(1, chunks + 1):
        out += [("denoise", c), ("denoise", c), ("observe", c)]
    return out


def test_cache_reset_policy_episode_then_new_instruction():
    """Denoising passes stay in staging; observations land in order; reset (a new instruction) starts over."""
    script = _episode(3) + ["reset"] + _episode(1)
    ref, fused = _drive(script, "reset", backend="triton")
    assert fused.frames == (0, 1, 2)


def test_cache_reset_policy_refuses_overflow():
    # tiny: local_attn_size 7 = sink + chunks 1..3: full
    ref, fused = _drive(_episode(3), "reset", backend="torch")
    assert len(fused.frames) == fused.capacity_frames and fused.needs_reset(4)
    lay = fused.layout("observe", 4)
    k_new, v_new = _kv(fused, lay.q_len, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="overflow"):
        fused.extend(0, k_new, v_new, lay)
    with pytest.raises(RuntimeError, match="overflow"):
        ref.extend(0, k_new, v_new, lay)
    # the release resets there and goes on with the chunk against an empty cache
    fused.reset()
    lay = fused.layout("denoise", 4)
    assert lay.n_cached == 0
    k_all, _ = fused.extend(0, *_kv(fused, lay.q_len, torch.Generator().manual_seed(1)), lay)
    assert k_all.shape[1] == lay.q_len


def test_cache_roll_policy_wraps_around():
    """Past the window the oldest non-sink frames are evicted and their slots reused (the reference's plan): the new
    frames are moved from staging into the evicted slots at commit."""
    ref, fused = _drive(_episode(5), "roll")
    assert fused.frames == (0, 7, 8, 9, 10, 5, 6)
    assert list(fused.frames) != sorted(fused.frames), "wrapped: physical order differs from time order"


def test_cache_roll_with_partial_eviction_and_control_passes():
    """Capacity 4 frames: a chunk of 2 new frames finds 1 free slot and evicts 1 (a move into the middle while the
    other frame stays in place); fused control passes write the observation and denoise in one call."""
    _drive(_episode(4), "roll", capacity_frames=4)
    ref, fused = _drive(_episode(5, control=True), "roll", capacity_frames=4, backend="triton")
    assert fused.frames[0] == 0 and len(fused.frames) == 4


@pytest.mark.parametrize("overflow", ["reset", "roll"])
def test_default_staging_fits_every_pass_at_the_droid_shape(overflow):
    """Buffer geometry only (meta tensors): every pass of long episodes, chunk by chunk and with control calls, fits
    [0, n + L) of the buffer; with 'reset' the staging is just the action and state tokens."""
    cfg = get_config("droid-14b")
    cache = FusedKVCache(cfg, 1, torch.bfloat16, device="meta", num_layers=1, overflow=overflow)
    assert cache.staging_tokens == (25 if overflow == "reset" else 2 * 2 * 880 + 25)
    worst = 0
    for control in (False, True):
        cache.reset()
        passes = [] if control else [("first", 0)]
        for c in range(1, 9):
            passes += [("control", c)] if control else [("denoise", c), ("observe", c)]
        for mode, c in passes:
            if cache.needs_reset(c):
                cache.reset()
            lay = cache.layout(mode, c)
            n = cache._begin(0, 1, lay.q_len, lay)
            worst = max(worst, n + lay.q_len)
            cache.commit(lay)
    assert worst == cache.total_tokens, "the default staging is as small as the episodes allow"


def test_cache_rejects_bad_calls():
    cache = FusedKVCache(TINY, 2, torch.float32, device=DEVICE, backend="torch")
    lay = cache.layout("first", 0)
    k_new, v_new = _kv(cache, lay.q_len, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cached tokens"):
        cache.extend(0, k_new, v_new, TINY.layout("denoise", chunk=1, cached_frames=(0,)))
    with pytest.raises(ValueError, match="batch"):
        cache.extend(0, k_new[:1], v_new[:1], lay)
    with pytest.raises(TypeError, match="this cache takes"):
        cache.extend(0, k_new.bfloat16(), v_new.bfloat16(), lay)
    with pytest.raises(ValueError, match="outside"):
        cache.extend(TINY.num_layers, k_new, v_new, lay)
    with pytest.raises(ValueError, match="query tokens"):
        cache.extend(0, k_new[:, :-1], v_new[:, :-1], lay)
    with pytest.raises(ValueError, match="fp8=True"):
        cache.fp8_views(0, 4)
    small = FusedKVCache(TINY, 2, torch.float32, device=DEVICE, backend="torch", capacity_frames=3, staging_tokens=3)
    g = torch.Generator().manual_seed(1)
    for mode, chunk in (("first", 0), ("observe", 1)):          # fills the 3-frame window
        lay = small.layout(mode, chunk)
        for layer in range(small.num_layers):
            small.extend(layer, *_kv(small, lay.q_len, g), lay)
        small.commit(lay)
    lay = small.layout("denoise", 2)                              # 16 new tokens, 3 staging rows
    with pytest.raises(ValueError, match="staging_tokens"):
        small.extend(0, *_kv(small, lay.q_len, g), lay)
    swapped = TINY.layout("denoise", chunk=2, cached_frames=(0, 2, 1))   # same count, another slot order
    ref = KVCache(TINY, 2, torch.float32, device=DEVICE, capacity_frames=3)
    ref.frames = small.frames
    for c in (small, ref):
        with pytest.raises(ValueError, match=r"built for cached frames \(0, 2, 1\)"):
            c.extend(0, *_kv(small, swapped.q_len, g), swapped)
    with pytest.raises(ValueError, match="overflow must be"):
        FusedKVCache(TINY, 2, overflow="evict")
    with pytest.raises(TypeError, match="fp8=True"):
        FusedKVCache(TINY, 2, dtype=FP8)


def test_reference_cache_rejects_bad_calls():
    """The reference KVCache (dreamzero.cache): a negative layer used to write the last layer's cache, a batch of -1
    or a wrong length/head dim failed deep in torch; each now names the argument."""
    for kw, expect in [(dict(batch=-1), "batch must be a positive int, got -1"),
                       (dict(batch=2, num_layers=0), "num_layers must be a positive int"),
                       (dict(batch=2.0), "batch must be a positive int, got 2.0")]:
        with pytest.raises(ValueError, match=expect):
            KVCache(TINY, dtype=torch.float32, device=DEVICE, **kw)
    cache = KVCache(TINY, 2, torch.float32, device=DEVICE)
    lay = cache.layout("first", 0)
    k_new, v_new = _kv(cache, lay.q_len, torch.Generator().manual_seed(0))
    for layer in (-1, TINY.num_layers, True, 0.0):
        with pytest.raises(ValueError, match=r"layer .* is outside \[0, 2\)"):
            cache.extend(layer, k_new, v_new, lay)
    assert all(not k.any() for k in cache.k)                       # nothing was written
    with pytest.raises(ValueError, match="batch 1/1 .* does not match the cache's batch 2"):
        cache.extend(0, k_new[:1], v_new[:1], lay)
    with pytest.raises(ValueError, match=f"but the layout has {lay.q_len} query tokens"):
        cache.extend(0, k_new[:, 1:], v_new[:, 1:], lay)
    with pytest.raises(ValueError, match=r"v_new must be a \[B, L, H, D\] = \[B, L, 4, 16\] tensor, got \[2, "):
        cache.extend(0, k_new, v_new[..., :8], lay)
    with pytest.raises(ValueError, match=r"k_new must be a \[B, L, H, D\]"):
        cache.extend(0, k_new.flatten(2), v_new, lay)
    k_all, _ = cache.extend(0, k_new, v_new, lay)                  # and a right call still works
    assert torch.equal(k_all, k_new)


# ------------------------------------------------------------------------------------------- the tiny model, whole
class _WithoutProject:
    """A cache seen without its fused entry point: the model's own SelfAttention then runs its reference chain
    (q/k RMSNorm + RoPE through model.ops) and calls cache.extend, the drop-in path of a fused cache."""

    def __init__(self, cache):
        self._cache = cache

    def __getattr__(self, name):
        if name == "project":
            raise AttributeError(name)
        return getattr(self._cache, name)


def _tiny_model():
    return tiny_model(TINY, std=0.2, dtype=torch.float32).eval().to(DEVICE)


def _tiny_inputs(B, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY
    F, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    A, S = K * cfg.actions_per_chunk, K * cfg.states_per_chunk
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(clean=r(B, 16, F, H, W), cond=r(B, 20, F, H, W), noisy=r(B, 16, F, H, W),
             t_video=torch.rand(B, F, generator=g) * 1000, actions=r(B, A, cfg.action_dim),
             t_action=torch.rand(B, A, generator=g) * 1000, state=r(B, S, cfg.state_dim),
             text=r(B, cfg.text_len, cfg.text_dim), clip=r(B, cfg.clip_tokens, cfg.clip_dim),
             embodiment=torch.arange(B) % cfg.num_embodiments)
    return {k: v.to(DEVICE) for k, v in x.items()}


def _run_episode(m, x, cache, K, control=False, restart=False):
    """Chunk after chunk: (first frame), then per chunk denoise + observe, or one control call. With the 'reset'
    policy the cache is reset when the release would (and the chunk runs against the empty cache); restart=True
    ends with a new instruction: reset and run the first frame and chunk 1 again. Returns every output."""
    cfg = m.cfg
    fpc, A, S = cfg.frames_per_chunk, cfg.actions_per_chunk, cfg.states_per_chunk
    ckv = m.context_kv(x["text"], x["clip"])
    outs = []

    def first():
        m(cache.layout("first", 0), clean=x["clean"][:, :, :1], clean_cond=x["cond"][:, :, :1], context_kv=ckv,
          cache=cache)

    def chunk(c):
        if cache.needs_reset(c):
            cache.reset()
        fr = slice(1 + (c - 1) * fpc, 1 + c * fpc)
        common = dict(noisy=x["noisy"][:, :, fr], noisy_cond=x["cond"][:, :, fr], t_video=x["t_video"][:, fr],
                      actions=x["actions"][:, (c - 1) * A:c * A], t_action=x["t_action"][:, (c - 1) * A:c * A],
                      state=x["state"][:, (c - 1) * S:c * S], embodiment=x["embodiment"], context_kv=ckv,
                      cache=cache)
        if control:
            prev = slice(0, 1) if c == 1 else slice(1 + (c - 2) * fpc, 1 + (c - 1) * fpc)
            outs.extend(m(cache.layout("control", c), clean=x["clean"][:, :, prev], clean_cond=x["cond"][:, :, prev],
                          **common))
        else:
            outs.extend(m(cache.layout("denoise", c), **common))
            m(cache.layout("observe", c), clean=x["clean"][:, :, fr], clean_cond=x["cond"][:, :, fr], context_kv=ckv,
              cache=cache)

    with torch.no_grad():
        if not control:
            first()
        for c in range(1, K + 1):
            chunk(c)
        if restart:
            cache.reset()
            if not control:
                first()
            chunk(1)
    return outs


@pytest.mark.parametrize("path", ["extend", "project"])
@pytest.mark.parametrize("overflow,control", [("reset", False), ("reset", True), ("roll", False), ("roll", True)])
def test_tiny_model_chunk_after_chunk_matches_reference_cache(path, overflow, control):
    """DreamZero('tiny') in fp32 over an episode that passes the 7-frame window (chunks 1..5, or 1..6 with control
    calls, so that passes read the cache after frames were evicted or after a reset), then a new instruction:
    outputs with FusedKVCache -- through the model's own wiring (SelfAttention calls cache.project, the fused
    kernel; the cache made by model.new_cache from ops.kv_cache), or through the drop-in extend path (the same
    cache seen without `project`) -- equal those with the reference KVCache up to fp32 reduction order."""
    m = _tiny_model()
    K = 6 if control else 5
    x = _tiny_inputs(2, K)
    ref_cache = m.new_cache(2, overflow=overflow)
    assert type(ref_cache) is KVCache
    m.ops = m.ops.replace(kv_cache=FusedKVCache)
    fused_cache = m.new_cache(2, overflow=overflow)
    assert isinstance(fused_cache, FusedKVCache) and fused_cache.dtype == torch.float32
    ref = _run_episode(m, x, ref_cache, K, control=control, restart=True)
    got = _run_episode(m, x, fused_cache if path == "project" else _WithoutProject(fused_cache), K, control=control,
                       restart=True)
    assert fused_cache.frames == ref_cache.frames
    assert len(got) == len(ref) == 2 * (K + 1)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and torch.isfinite(a).all()
        err = max_abs_err(b, a)
        assert err <= 2e-5 * max(1.0, b.abs().max().item()), f"output {i}: max error {err:.3e}"


def test_fp8_cache_sqnr_of_keys_values_and_attention():
    """The FP8 cache against the bf16 cache on the same projections: SQNR of the dequantized keys/values handed to
    the attention and of the attention output (thresholds FP8_KV_SQNR_DB, FP8_ATTN_SQNR_DB)."""
    cfg = get_config("tiny", dim=256, num_heads=4)          # head dim 64
    B, H, D, C = 2, cfg.num_heads, cfg.head_dim, cfg.dim
    caches = {name: FusedKVCache(cfg, B, torch.bfloat16, device=DEVICE, num_layers=1, fp8=(name == "fp8"),
                                 overflow="roll")
              for name in ("bf16", "fp8")}
    g = torch.Generator().manual_seed(5)
    w = (1 + 0.3 * torch.randn(2, C, generator=g)).bfloat16().to(DEVICE)
    results = {}
    steps = [("first", 0), ("observe", 1), ("observe", 2), ("denoise", 3)]
    for mode, chunk in steps:
        lay = caches["bf16"].layout(mode, chunk)
        cos, sin = (t.to(DEVICE) for t in rope_tables(lay, cfg))
        qkv = (torch.randn(B, lay.q_len, 3 * C, generator=g) * 2).bfloat16().to(DEVICE)
        q, k, v = qkv.split(C, dim=-1)
        for name, cache in caches.items():
            with torch.no_grad():
                q_rot, k_all, v_all = cache.project(0, q, k, v, w[0], w[1], EPS, cos, sin, lay)
            assert k_all.dtype == torch.bfloat16 and k_all.shape == (B, lay.k_len, H, D)
            results[name] = (q_rot, k_all, v_all, lay)
            cache.commit(lay)
    q_b, k_b, v_b, lay = results["bf16"]
    q_f, k_f, v_f, _ = results["fp8"]
    assert torch.equal(q_b, q_f), "q_rot does not depend on the cache format"
    assert sqnr_db(k_b, k_f) > FP8_KV_SQNR_DB
    assert sqnr_db(v_b, v_f) > FP8_KV_SQNR_DB
    o_b = attention_blockwise(q_b.float(), k_b.float(), v_b.float(), lay)
    o_f = attention_blockwise(q_f.float(), k_f.float(), v_f.float(), lay)
    assert sqnr_db(o_b, o_f) > FP8_ATTN_SQNR_DB
    kq, ks, vq, vs = caches["fp8"].fp8_views(0, lay.k_len)
    assert kq.dtype == FP8 and ks.shape == (B, lay.k_len, H)
    torch.testing.assert_close(dequantize_fp8_per_head(kq, ks, torch.bfloat16), k_f, rtol=0, atol=0)
