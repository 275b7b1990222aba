"""The layout description and the reference attention against masks built independently from the rule text."""
import numpy as np
import pytest
import torch

from dreamzero.attention import attention_blockwise, attention_dense_reference, attention_masked
from dreamzero.config import get_config
from dreamzero.layout import Kind, inference_layout, layout_for_config, train_layout


def rule_mask_train(ft, fpc, A, S, K, W, rule="consistent"):
    """docs/reference.md#training-sequence-and-mask, written token by token:
    [clean F0, clean chunks][noisy F0, noisy chunks][A1..AK][S1..SK].
    Window W (the first frame always visible), by the rule's text:
      consistent: a chunk starting at frame s sees earlier frames f >= s - (W - 1) (clean, noisy and action alike);
      release:    the clean tokens of chunk c see clean frames from max(1, 1 + c*fpc - W) on; noisy and action tokens
                  see every earlier clean frame."""
    nf = 1 + K * fpc
    half = nf * ft
    L = 2 * half + K * A + K * S
    m = np.zeros((L, L), dtype=bool)

    def frame_rng(base, f):
        return slice(base + f * ft, base + (f + 1) * ft)

    def chunk_frames(k):
        return range(1 + (k - 1) * fpc, 1 + k * fpc)

    def act(k):
        return slice(2 * half + (k - 1) * A, 2 * half + k * A)

    def st(k):
        return slice(2 * half + K * A + (k - 1) * S, 2 * half + K * A + k * S)

    def in_window(f, k, clean_query):
        if W < 0 or f == 0:
            return True
        if rule == "release":
            return f >= max(1, 1 + k * fpc - W) if clean_query else True
        return f >= (1 + (k - 1) * fpc) - (W - 1)

    m[frame_rng(0, 0), frame_rng(0, 0)] = True              # clean first frame: itself
    m[frame_rng(half, 0), frame_rng(half, 0)] = True        # noisy first frame: itself
    for k in range(1, K + 1):
        for f in chunk_frames(k):
            q = frame_rng(0, f)                              # clean chunk k
            m[q, frame_rng(0, 0)] = True
            for g in range(1, 1 + k * fpc):                   # clean frames of chunks <= k, in the window
                if in_window(g, k, True):
                    m[q, frame_rng(0, g)] = True
        for qs in [frame_rng(half, f) for f in chunk_frames(k)] + [act(k)]:   # noisy chunk k and action block k
            m[qs, frame_rng(0, 0)] = True
            for g in range(1, 1 + (k - 1) * fpc):
                if in_window(g, k, False):
                    m[qs, frame_rng(0, g)] = True
            for g in chunk_frames(k):
                m[qs, frame_rng(half, g)] = True
            m[qs, act(k)] = True
            m[qs, st(k)] = True
        m[st(k), st(k)] = True                               # state block: itself
    return m


def release_loop_mask(ft, fpc, A, S, K, W):
    """The release's training attention as its code runs it (CausalWanSelfAttention: _process_clean_image_only,
    _process_noisy_image_blocks, _process_noisy_action_blocks, _process_state_blocks), in token offsets: each query
    block attends to the concatenation of key ranges, which we mark here."""
    half = (1 + K * fpc) * ft
    L = 2 * half + K * (A + S)
    m = np.zeros((L, L), dtype=bool)
    block = ft * fpc
    m[:ft, :ft] = True                                       # clean first frame
    for i in range(K):                                       # clean blocks, windowed from the block's end
        b0, b1 = ft + i * block, ft + (i + 1) * block
        kv0 = max(ft, b1 - W * ft) if W > 0 else ft
        m[b0:b1, :ft] = True
        m[b0:b1, kv0:b1] = True
    n0, a0, s0 = half, 2 * half, 2 * half + K * A
    m[n0:n0 + ft, n0:n0 + ft] = True                         # noisy first frame
    for i in range(K):
        clean_end = ft + i * block                           # first clean frame + clean blocks < i: no window
        nb0, nb1 = n0 + ft + i * block, n0 + ft + (i + 1) * block
        ab0, ab1 = a0 + i * A, a0 + (i + 1) * A
        sb0, sb1 = s0 + i * S, s0 + (i + 1) * S
        for q0, q1 in ((nb0, nb1), (ab0, ab1)):              # noisy block i and action block i
            m[q0:q1, :clean_end] = True
            m[q0:q1, nb0:nb1] = True
            m[q0:q1, ab0:ab1] = True
            m[q0:q1, sb0:sb1] = True
        m[sb0:sb1, sb0:sb1] = True                           # state block: itself
    return m


@pytest.mark.parametrize("rule", ["consistent", "release"])
@pytest.mark.parametrize("ft,fpc,A,S,K,W", [(3, 2, 2, 1, 3, -1), (2, 1, 3, 1, 4, 3), (5, 2, 4, 2, 3, 4),
                                            (1, 3, 1, 1, 2, 9), (4, 2, 24, 1, 4, 9), (2, 2, 3, 1, 6, 9),
                                            (1, 2, 2, 1, 7, 5), (2, 3, 2, 1, 4, 2)])
def test_train_mask_matches_rule_text(ft, fpc, A, S, K, W, rule):
    lay = train_layout(ft, fpc, A, S, K, W, rule)
    expect = rule_mask_train(ft, fpc, A, S, K, W, rule)
    assert lay.rule == rule and lay.q_len == expect.shape[0]
    got = lay.dense_mask().numpy()
    assert (got == expect).all(), lay.describe()


@pytest.mark.parametrize("ft,fpc,A,S,K,max_chunks", [(2, 2, 3, 1, 6, 4), (3, 2, 2, 1, 5, 4), (1, 2, 4, 1, 7, 2),
                                                     (2, 1, 2, 2, 6, 3), (1, 3, 2, 1, 4, 1)])
def test_release_rule_matches_the_release_loop(ft, fpc, A, S, K, max_chunks):
    W = max_chunks * fpc + 1
    lay = train_layout(ft, fpc, A, S, K, W, "release")
    assert (lay.dense_mask().numpy() == release_loop_mask(ft, fpc, A, S, K, W)).all(), lay.describe()


def test_rules_differ_only_past_max_chunks_plus_one():
    ft, fpc, A, S, max_chunks = 2, 2, 3, 1, 4
    W = max_chunks * fpc + 1                                  # 9, as local_attn_size
    for K in range(1, max_chunks + 2):
        r, c = (train_layout(ft, fpc, A, S, K, W, rule) for rule in ("release", "consistent"))
        diff = r.segment_mask() != c.segment_mask()
        # at K = max_chunks + 1 only clean chunk K's queries differ (it loses frame 1), and nothing else sees them
        rows = {(r.q[i].kind.name, r.q[i].chunk) for i in np.nonzero(diff.any(axis=1))[0]}
        assert rows == ({("CLEAN", K)} if K == max_chunks + 1 else set()), (K, rows)
    K = 6                                                      # the case: 6 chunks with max_chunks = 4
    r, c = (train_layout(ft, fpc, A, S, K, W, rule) for rule in ("release", "consistent"))
    frames_seen = {}
    for lay in (r, c):
        for qs_kind, chunk in (("CLEAN", 5), ("CLEAN", 6), ("NOISY", 6), ("ACTION", 6)):
            i = next(i for i, s in enumerate(lay.q) if s.kind.name == qs_kind and s.chunk == chunk)
            frames_seen[(lay.rule, qs_kind, chunk)] = sorted(
                ks.frame for j, ks in enumerate(lay.k)
                if lay.segment_mask()[i, j] and ks.kind.name in ("FIRST", "CLEAN"))
    assert frames_seen[("release", "CLEAN", 5)] == [0] + list(range(2, 11))
    assert frames_seen[("release", "CLEAN", 6)] == [0] + list(range(4, 13))
    assert frames_seen[("release", "NOISY", 6)] == frames_seen[("release", "ACTION", 6)] == list(range(0, 11))
    assert frames_seen[("consistent", "CLEAN", 5)] == list(range(0, 11))
    assert frames_seen[("consistent", "CLEAN", 6)] == [0] + list(range(3, 13))
    assert frames_seen[("consistent", "NOISY", 6)] == [0] + list(range(3, 11))


def test_droid_training_shape():
    cfg = get_config("droid-14b")
    assert cfg.frame_tokens == 880 and cfg.frames_per_chunk == 2 and cfg.local_attn_size == 9
    assert cfg.actions_per_chunk == 24 and cfg.states_per_chunk == 1
    lay = layout_for_config(cfg)
    assert lay.q_len == 15940
    frac = lay.visible_pairs() / lay.q_len ** 2
    assert 0.28 < frac < 0.36          # "about a third of the score matrix visible"
    den = layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9)))
    assert den.q_len == 1785 and den.n_cached == 7920 and den.k_len == 7920 + 1785


def rule_mask_inference(ft, fpc, A, S, mode, chunk, cached, W, rule):
    """Inference rule text: the cache holds clean frames `cached`; observed frames see the first frame and the
    cached/observed frames of chunks <= theirs in the window; noisy/action see cached frames of earlier chunks in the
    window plus their own chunk; state sees itself (consistent) or everything (release)."""
    q_kinds = []   # (kind, chunk, frame)
    obs_chunk = {"first": 0, "observe": chunk, "control": chunk - 1}.get(mode)
    if obs_chunk is not None:
        frames = [0] if obs_chunk == 0 else list(range(1 + (obs_chunk - 1) * fpc, 1 + obs_chunk * fpc))
        q_kinds += [("obs", obs_chunk, f) for f in frames for _ in range(ft)]
    if mode in ("denoise", "control"):
        frames = list(range(1 + (chunk - 1) * fpc, 1 + chunk * fpc))
        q_kinds += [("noisy", chunk, f) for f in frames for _ in range(ft)]
        q_kinds += [("action", chunk, -1)] * A + [("state", chunk, -1)] * S
    k_kinds = [("cache", 0 if f == 0 else 1 + (f - 1) // fpc, f) for f in cached for _ in range(ft)] + q_kinds

    def win(f, c):
        return W < 0 or f == 0 or f >= 1 + (c - 1) * fpc - (W - 1)

    m = np.zeros((len(q_kinds), len(k_kinds)), dtype=bool)
    for i, (qk, qc, qf) in enumerate(q_kinds):
        for j, (kk, kc, kf) in enumerate(k_kinds):
            clean_key = kk in ("cache", "obs")
            if qk == "obs" and qc == 0:
                v = kf == 0 and clean_key
            elif qk == "obs":
                v = clean_key and (kf == 0 or (kc <= qc and win(kf, qc)))
            elif qk in ("noisy", "action"):
                v = (clean_key and (kf == 0 or (kc < qc and win(kf, qc)))) or (kk in ("noisy", "action", "state"))
            else:
                v = (rule == "release") or kk == "state"
            m[i, j] = v
    return m


@pytest.mark.parametrize("mode,chunk,cached", [("first", 0, ()), ("observe", 1, (0,)), ("observe", 3, (0, 1, 2, 3, 4)),
                                               ("denoise", 2, (0, 1, 2)), ("control", 1, ()),
                                               ("control", 3, (0, 1, 2)), ("denoise", 5, (0, 3, 4, 5, 6, 7, 8))])
@pytest.mark.parametrize("rule", ["release", "consistent"])
def test_inference_mask_matches_rule_text(mode, chunk, cached, rule):
    ft, fpc, A, S, W = 2, 2, 3, 1, 5
    lay = inference_layout(ft, fpc, A, S, mode, chunk, cached, W, rule)
    expect = rule_mask_inference(ft, fpc, A, S, mode, chunk, cached, W, rule)
    assert (lay.dense_mask().numpy() == expect).all(), lay.describe()


def _random_layouts():
    rng = np.random.default_rng(1)
    out = []
    for _ in range(6):
        ft, fpc, A, S = int(rng.integers(1, 5)), int(rng.integers(1, 3)), int(rng.integers(1, 5)), 1
        K = int(rng.integers(1, 4))
        W = int(rng.choice([-1, 2, 3, 9]))
        out.append(train_layout(ft, fpc, A, S, K, W, str(rng.choice(["release", "consistent"]))))
        c = int(rng.integers(1, 4))
        cached = tuple(range(0, 1 + (c - 1) * fpc))
        out.append(inference_layout(ft, fpc, A, S, "denoise", c, cached, W, str(rng.choice(["release", "consistent"]))))
        if c > 1:
            out.append(inference_layout(ft, fpc, A, S, "control", c, cached[:-fpc], W, "consistent"))
    return out


@pytest.mark.parametrize("layout", _random_layouts(), ids=lambda l: f"{l.mode}-{l.q_len}x{l.k_len}")
def test_reference_attention_equals_masked_dense(layout):
    B, H, D = 2, 3, 8
    q = torch.randn(B, layout.q_len, H, D, dtype=torch.float64)
    k = torch.randn(B, layout.k_len, H, D, dtype=torch.float64)
    v = torch.randn(B, layout.k_len, H, D, dtype=torch.float64)
    ref = attention_dense_reference(q, k, v, layout.dense_mask())
    torch.testing.assert_close(attention_blockwise(q, k, v, layout), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention_masked(q, k, v, layout), ref, rtol=1e-10, atol=1e-10)


def test_layout_bad_input():
    with pytest.raises(ValueError, match="at least one chunk"):
        train_layout(4, 2, 3, 1, 0)
    with pytest.raises(ValueError, match="already in the cache"):
        inference_layout(4, 2, 3, 1, "observe", 1, (0, 1), 5, "release")
    with pytest.raises(ValueError, match="unknown inference mode"):
        inference_layout(4, 2, 3, 1, "bogus", 1, (0,), 5, "release")
    with pytest.raises(ValueError, match="rule"):
        inference_layout(4, 2, 3, 1, "denoise", 1, (0,), 5, "strict")
    with pytest.raises(ValueError, match="rule"):
        train_layout(4, 2, 3, 1, 2, 5, "strict")
    with pytest.raises(ValueError, match="window"):
        train_layout(4, 2, 3, 1, 2, 0)
    lay = train_layout(2, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="query tokens"):
        attention_blockwise(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4), lay)


def test_layouts_are_cached_and_hashable():
    a = train_layout(3, 2, 2, 1, 2, 5)
    assert a is train_layout(3, 2, 2, 1, 2, 5)
    b = inference_layout(3, 2, 2, 1, "denoise", 1, (0,), 5, "release")
    assert len({a, b}) == 2 and a.key() != b.key()
    kinds = a.token_kinds()
    assert int(kinds[0]) == Kind.FIRST and int(kinds[-1]) == Kind.STATE
