"""The policy's compiled forward (dreamzero.compiled): blocks compiled once per layout whatever the depth, the
static-buffer (CUDA-graph) path against the eager policy, the host state of the cache across replays, prefill."""
import pytest
import torch

from dreamzero.compiled import GraphedForward, compiled_backend, layer_view, uncompile_blocks
from dreamzero.engine import Policy, PolicyConfig
from tiny import tiny_model

from conftest import DEVICE


def episode(cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.latent_height, cfg.latent_width
    return dict(text=torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
                clip=torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g),
                first=torch.randn(1, 16, 1, H, W, generator=g),
                obs=[torch.randn(1, 16, cfg.frames_per_chunk, H, W, generator=g) for _ in range(3)],
                state=torch.randn(1, cfg.states_per_chunk, cfg.state_dim, generator=g))


def replayed_steps(model, x, calls=2, **kw):
    """Prefill chunk 1, then replay the control step of chunk 2 `calls` times, then one step of the episode."""
    pol = Policy(model, PolicyConfig(return_video=not kw.get("actions_only"), negative_prompt=None, **kw))
    pol.reset(x["text"], x["clip"], x["first"])
    pol.prefill(x["obs"][:1])
    saved = {b: c.frames for b, c in pol.caches.items()}
    out = []
    for _ in range(calls):
        for b, c in pol.caches.items():
            c.rewind(saved[b])
        pol.chunk = 2
        out.append(pol.step(x["obs"][1], x["state"]))
    out.append(pol.step(x["obs"][2], x["state"]))     # chunk 4 would start at frame 7: the window resets
    return out, pol


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_embodiments=1, num_layers=3).to(DEVICE).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x(model):
    return episode(model.cfg)


@pytest.fixture(scope="module")
def eager(model, x):
    return replayed_steps(model, x, num_steps=2, cfg_mode="batched")[0]


def _same(a, b, tol=1e-5):
    for ra, rb in zip(a, b):
        assert ra.chunk == rb.chunk
        assert float((ra.actions_raw - rb.actions_raw).abs().max()) <= tol
        if ra.video is not None:
            assert float((ra.video - rb.video).abs().max()) <= tol


def test_blocks_share_one_graph_per_layout_and_replays_match_eager(model, x, eager):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        res, pol = replayed_steps(model, x, num_steps=2, cfg_mode="batched", compile="aot_eager", graphs=True)
        assert compiled_backend(model) == "aot_eager"
        # the step's observe and denoise layouts, then after the window reset the first frame and chunk 1's
        # denoising: four layouts, one graph each for all three blocks (the prefill runs eagerly)
        assert counters["stats"]["unique_graphs"] == 4
        _same(res, eager)
        st = pol.compile_stats
        assert st["replays"] >= 3 and st["compile_s"] > 0 and st["capture_errors"] == []
        assert st["graphs"] == (4 if DEVICE == "cuda" else 0)     # captured on CUDA only
    finally:
        uncompile_blocks(model)
        torch._dynamo.reset()
    assert compiled_backend(model) is None and all("forward" not in vars(b) for b in model.blocks)


@pytest.mark.parametrize("kw", [dict(cfg_mode="sequential"), dict(fused_control=True),
                                dict(num_steps=1, actions_only=True)])
def test_the_static_buffer_path_matches_eager(model, x, kw):
    kw = dict(dict(num_steps=2), **kw)
    ref, _ = replayed_steps(model, x, **kw)
    res, pol = replayed_steps(model, x, graphs=True, **kw)
    _same(res, ref, tol=0.0 if DEVICE == "cpu" else 1e-5)
    # the cache's host state after the replays is the eager one's
    _, pol_ref = replayed_steps(model, x, calls=3, **kw)
    assert {b: c.frames for b, c in pol.caches.items()} == {b: c.frames for b, c in pol_ref.caches.items()}


def test_new_inputs_reach_the_replayed_graph(model, x):
    """A replay reads the inputs of its call, not those of the capture: a different state gives the actions an
    eager policy gives for that state."""
    other = dict(x, state=x["state"] + 1.0)
    ref, _ = replayed_steps(model, other, calls=1, num_steps=1)
    pol = Policy(model, PolicyConfig(num_steps=1, graphs=True, negative_prompt=None))
    pol.reset(x["text"], x["clip"], x["first"])
    pol.prefill(x["obs"][:1])
    saved = {b: c.frames for b, c in pol.caches.items()}
    for state in (x["state"], other["state"]):
        for b, c in pol.caches.items():
            c.rewind(saved[b])
        pol.chunk = 2
        r = pol.step(x["obs"][1], state)
    assert float((r.actions_raw - ref[0].actions_raw).abs().max()) == 0.0


def test_prefill_leaves_the_cache_a_step_would(model, x):
    """prefill writes what the replacement passes of the skipped control steps write (the denoising passes only
    read the cache), and the step after it computes what it computes after those steps."""
    a = Policy(model, PolicyConfig(num_steps=1, negative_prompt=None))
    a.reset(x["text"], x["clip"], x["first"])
    a.step(None, x["state"])
    a.step(x["obs"][0], x["state"])
    b = Policy(model, PolicyConfig(num_steps=1, negative_prompt=None))
    b.reset(x["text"], x["clip"], x["first"])
    b.prefill(x["obs"][:1])
    assert a.chunk == b.chunk == 2
    for key in a.caches:
        ca, cb = a.caches[key], b.caches[key]
        assert ca.frames == cb.frames
        n = ca.num_tokens
        for la, lb in zip(ca.k + ca.v, cb.k + cb.v):
            assert torch.equal(la[:, :n], lb[:, :n])
    ra, rb = a.step(x["obs"][1], x["state"]), b.step(x["obs"][1], x["state"])
    assert torch.equal(ra.actions_raw, rb.actions_raw)
    with pytest.raises(RuntimeError, match="right after reset"):
        b.prefill(x["obs"][:1])
    b.reset(x["text"], x["clip"], x["first"])
    with pytest.raises(ValueError, match="window"):
        b.prefill(x["obs"][:3] + [x["obs"][0]])        # chunk 4 would start at local_attn_size
    with pytest.raises(ValueError, match="observation 0"):
        b.prefill([x["obs"][0][:, :, :1]])


def test_layer_view_cuts_the_per_layer_lists(model):
    cache = model.new_cache(1)
    view = layer_view(cache, 2)
    assert view.num_layers == 1 and view.k[0] is cache.k[2] and view.v[0] is cache.v[2]
    assert cache.num_layers == 3 and len(cache.k) == 3 and view.frames is cache.frames


def test_bad_switches():
    with pytest.raises(TypeError, match="compile"):
        PolicyConfig(compile=True)
    with pytest.raises(ValueError, match="backend"):
        Policy(tiny_model(num_embodiments=1, num_layers=1), PolicyConfig(compile="no-such-backend"))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA device"):
            GraphedForward(tiny_model(num_embodiments=1, num_layers=1), capture=True)


class EmulatedCapture(GraphedForward):
    """The CUDA-graph path's bookkeeping on a CPU: 'capturing' runs the forward with the host effects a capture has
    (commit updates frames) and then puts the cache back as the capture finds it; a 'replay' runs the forward on the
    buffers into the captured outputs with the host effects a replay has (none: frames stay)."""

    def _capture(self, entry):
        out = self._run(entry)
        entry.frames_after = tuple(entry.cache.frames)
        entry.cache.rewind(entry.frames_before)          # a capture executes nothing on the device

        class Graph:
            def replay(graph):
                frames = tuple(entry.cache.frames)
                for t, new in zip(entry.out, self._run(entry)):
                    if t is not None:
                        t.copy_(new)
                entry.cache.frames = frames

        entry.graph, entry.out = Graph(), out


@pytest.mark.parametrize("fused", [False, True])
def test_capture_bookkeeping_keeps_the_cache_consistent(model, x, fused):
    """The capture path (rewind, capture, first replay, later replays) leaves the cache's frames and the fused
    cache's device write position where the eager policy leaves them, and the same actions and video."""
    kw = dict(num_steps=2, fused_control=True)
    handle = None
    if fused:
        from dz_kernels import ApplyConfig, apply_
        handle = apply_(model, ApplyConfig(attention=False, norms=False, kv_cache=True))
    try:
        ref, pol_ref = replayed_steps(model, x, calls=3, **kw)
        pol = Policy(model, PolicyConfig(return_video=True, negative_prompt=None, graphs=True, **kw))
        pol._graphed = EmulatedCapture(model)
        pol._graphed.capture = True
        pol.reset(x["text"], x["clip"], x["first"])
        pol.prefill(x["obs"][:1])
        saved = {b: c.frames for b, c in pol.caches.items()}
        res = []
        for _ in range(3):
            for b, c in pol.caches.items():
                c.rewind(saved[b])
            pol.chunk = 2
            res.append(pol.step(x["obs"][1], x["state"]))
        res.append(pol.step(x["obs"][2], x["state"]))
        _same(res, ref, tol=1e-6)
        # per branch (sequential CFG: two caches): chunk 3's control and denoising layouts, then after the window
        # reset chunk 1's two
        assert pol.compile_stats["graphs"] == 8 and pol.compile_stats["replays"] >= 8
        for key, cache in pol.caches.items():
            assert cache.frames == pol_ref.caches[key].frames
            if fused:
                assert int(cache.write_pos) == cache.num_tokens
    finally:
        if handle is not None:
            handle.undo()
