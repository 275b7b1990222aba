"""Tile schedules of layout attention (pure numpy, no kernel run): every visible (query, key) pair is covered by
exactly one scheduled tile, full tiles hold only visible pairs, skipped tiles none, and the in-tile mask the kernels
build from the bit tables equals the dense mask. The DROID training layout (15,940 tokens) is checked in full. And the
AttentionPattern, the op's whole view of a layout: what a SequenceLayout produces, its derived groups and blocks,
its checks, and that the kernel library imports no model code."""
import numpy as np
import pytest
import torch

from dreamzero.config import get_config
from dreamzero.layout import inference_layout, layout_for_config, train_layout
from dz_kernels.attention import AttentionPattern, as_pattern
from dz_kernels.attention.pattern import pattern_by_key
from dz_kernels.attention.schedule import (FULL, PARTIAL, PARTIAL_COST, SKIP, _pack_bits, build_schedule, nwin,
                                           schedule_for, tile_mask, token_tables)


def dense_band(layout, rows: np.ndarray) -> np.ndarray:
    """bool [len(rows), Lk]: the layout's dense mask for some query rows, expanded from the segment mask
    (the same expansion as layout.dense_mask(), without materializing Lq x Lk)."""
    seg = np.asarray(layout.segment_mask(), dtype=bool)
    qlen = np.array([s.length for s in layout.q])
    klen = np.array([s.length for s in layout.k])
    q_of = np.repeat(np.arange(len(qlen)), qlen)
    k_of = np.repeat(np.arange(len(klen)), klen)
    return seg[q_of[rows]][:, k_of]


def csr_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int):
    """{(row tile, col tile): is_full} from a CSR schedule, checking its structure on the way."""
    assert rows.dtype == np.int32 and cols.dtype == np.int32
    assert sorted(rows[:, 0].tolist()) == list(range(n_rows)), "every tile has exactly one row"
    pairs = {}
    for tile, start, mid, end in rows.tolist():
        assert 0 <= start <= mid <= end <= len(cols)
        seg_full, seg_part = cols[start:mid].tolist(), cols[mid:end].tolist()
        assert seg_full == sorted(seg_full) and seg_part == sorted(seg_part)
        for j in seg_full + seg_part:
            assert (tile, j) not in pairs, f"tile pair {(tile, j)} scheduled twice"
            pairs[(tile, j)] = j in seg_full
    covered = sum(r[3] - r[1] for r in rows.tolist())
    assert covered == len(cols), "the rows' ranges partition the column array"
    return pairs


def check_schedule(layout, bm: int, bn: int, check_masks: bool = True) -> None:
    """Exact coverage of the query-side and key-side schedules against the dense mask, band by band."""
    s = build_schedule(layout, bm, bn)
    tt = token_tables(layout)
    Lq, Lk = layout.q_len, layout.k_len
    n_m, n_n = -(-Lq // bm), -(-Lk // bn)
    assert s.kind.shape == (n_m, n_n)
    q_pairs = csr_pairs(s.rows, s.cols, n_m)
    k_pairs = csr_pairs(s.t_rows, s.t_cols, n_n)
    assert {(i, j): f for (j, i), f in k_pairs.items()} == q_pairs, "key-side schedule is the transpose"
    pad = n_n * bn - Lk
    visible_total = 0
    for i in range(n_m):
        rows = np.arange(i * bm, min((i + 1) * bm, Lq))
        band = dense_band(layout, rows)
        visible_total += int(band.sum())
        tiles = np.pad(band, ((0, 0), (0, pad))).reshape(len(rows), n_n, bn)
        count = tiles.sum(axis=(0, 2))
        area = np.array([len(rows) * min(bn, Lk - j * bn) for j in range(n_n)])
        for j in range(n_n):
            listed = (i, j) in q_pairs
            if count[j] == 0:
                assert not listed and s.kind[i, j] == SKIP, f"tile {(i, j)} has no visible pair but is scheduled"
            else:
                assert listed, f"tile {(i, j)} has {count[j]} visible pairs and is not scheduled"
            if listed and q_pairs[(i, j)]:
                # a full tile runs unmasked: every pair in it must be visible and inside the key range
                assert s.kind[i, j] == FULL and count[j] == area[j] and (j + 1) * bn <= Lk, f"tile {(i, j)}"
            elif listed:
                assert s.kind[i, j] == PARTIAL
                if check_masks:
                    want = np.zeros((bm, bn), dtype=bool)
                    want[:len(rows)] = tiles[:, j]
                    got = tile_mask(tt, i, j, bm, bn, Lq, Lk)
                    assert (got[:len(rows)] == want[:len(rows)]).all(), f"forward mask of tile {(i, j)}"
                    got_t = tile_mask(tt, i, j, bm, bn, Lq, Lk, transposed=True)
                    assert (got_t[:len(rows)] == want[:len(rows)]).all(), f"key-major mask of tile {(i, j)}"
    assert visible_total == layout.visible_pairs()


SMALL_LAYOUTS = {
    "train-5-w3": lambda: train_layout(5, 2, 3, 1, 3, 3),
    "train-7-a24": lambda: train_layout(7, 2, 24, 1, 2, -1),
    "train-13-w2": lambda: train_layout(13, 1, 3, 1, 3, 2),
    "train-1tok-frames": lambda: train_layout(1, 2, 3, 1, 4, -1),
    "denoise-w3-consistent": lambda: inference_layout(5, 2, 3, 1, "denoise", 3, (0, 1, 2, 3, 4), 3, "consistent"),
    "control-7": lambda: inference_layout(7, 2, 24, 1, "control", 3, (0, 1, 2), -1, "release"),
    "control-first": lambda: inference_layout(5, 2, 3, 1, "control", 1, (), -1, "release"),
    "observe-13": lambda: inference_layout(13, 2, 3, 1, "observe", 2, (0, 1, 2)),
    "first": lambda: inference_layout(13, 2, 3, 1, "first", 0),
}


@pytest.mark.parametrize("name", sorted(SMALL_LAYOUTS))
@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (32, 16), (64, 128)])
def test_small_layout_coverage(name, bm, bn):
    check_schedule(SMALL_LAYOUTS[name](), bm, bn)


@pytest.mark.parametrize("bm,bn", [(128, 64), (32, 128), (128, 32)])
def test_droid_training_layout_coverage(bm, bn):
    lay = layout_for_config(get_config("droid-14b"), "train")
    assert lay.q_len == 15940
    check_schedule(lay, bm, bn, check_masks=(bm, bn) == (128, 64))
    s = schedule_for(lay, bm, bn)
    c = s.counts()
    assert c["skip"] > 0 and c["full"] > c["partial"] > 0


def test_droid_inference_layouts():
    cfg = get_config("droid-14b")
    den = layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9)))
    tt = token_tables(den)
    assert tt.dense, "a release-rule denoising step against the full cache is dense"
    s = build_schedule(den, 128, 64)
    assert (s.kind != SKIP).all()
    ctl = layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7)))
    assert not token_tables(ctl).dense
    check_schedule(ctl, 128, 64)


def test_tile_mask_across_bit_words():
    """More than 32 and 64 key segments (1-token frames, many chunks): the bit window spans several words."""
    lay = train_layout(1, 1, 1, 1, 40, 7)
    assert len(lay.k) > 96
    for bm, bn in ((16, 16), (16, 64), (32, 128)):
        check_schedule(lay, bm, bn)


def test_pack_bits_roundtrip():
    rng = np.random.default_rng(0)
    for cols in (1, 31, 32, 33, 70):
        m = rng.random((5, cols)) < 0.5
        packed = _pack_bits(m)
        assert packed.dtype == np.int32 and packed.shape == (5, (cols + 31) // 32)
        bits = (packed[:, :, None].astype(np.int64) >> np.arange(32)) & 1
        assert (bits.reshape(5, -1)[:, :cols].astype(bool) == m).all()
    assert nwin(16) == 2 and nwin(32) == 2 and nwin(64) == 3 and nwin(128) == 5
    assert nwin(128, 1) == 1 and nwin(128, 2) == 2 and nwin(64, 7) == 3 and nwin(16, 0) == 1


def test_schedule_is_cached_per_layout_and_blocks():
    lay = train_layout(5, 2, 3, 1, 3, 3)
    a = schedule_for(lay, 16, 32)
    assert schedule_for(lay, 16, 32) is a
    assert schedule_for(lay, 32, 16) is not a
    assert token_tables(lay) is token_tables(lay)
    with pytest.raises(ValueError, match="block sizes"):
        build_schedule(lay, 0, 16)


def test_rows_are_in_load_balance_order():
    lay = layout_for_config(get_config("droid-14b"), "train")
    s = schedule_for(lay, 128, 64)
    work = (s.rows[:, 2] - s.rows[:, 1]) + PARTIAL_COST * (s.rows[:, 3] - s.rows[:, 2])
    assert (np.diff(work) <= 1e-9).all(), "heaviest query tiles launch first"


# ---------------------------------------------------------------------- the pattern (the op's whole view of a layout)
def test_layout_pattern_is_the_segment_mask():
    for name, make in SMALL_LAYOUTS.items():
        lay = make()
        pat = lay.attention_pattern()
        assert isinstance(pat, AttentionPattern) and lay.attention_pattern() is pat, name
        assert pat.q_lengths == tuple(s.length for s in lay.q) and pat.k_lengths == tuple(s.length for s in lay.k)
        assert (pat.q_len, pat.k_len) == (lay.q_len, lay.k_len)
        assert (pat.segment_mask() == lay.segment_mask()).all(), name
        assert (pat.segment_bounds("k") == lay.segment_bounds("k")).all()
        assert torch.equal(pat.dense_mask(), lay.dense_mask()), name
        assert pat.dense == bool(lay.segment_mask().all())


def test_pattern_groups_blocks_and_keys():
    lengths = (2, 3, 4)
    pat = AttentionPattern(lengths, lengths, (0b001, 0b001, 0b101))
    assert pat.groups == ((0, 5, ((0, 2),)), (5, 9, ((0, 2), (5, 9))))
    assert pat.dense_blocks is None and not pat.dense
    dense = AttentionPattern(lengths, (4, 4), (0b11, 0b11, 0b11))
    assert dense.dense and dense.dense_blocks == ((0, 9, 0, 8),)
    # equal content, one key (and so one memoized schedule); other content, another key
    same = AttentionPattern.from_mask(lengths, lengths, [[1, 0, 0], [1, 0, 0], [1, 0, 1]])
    assert same == pat and hash(same) == hash(pat) and same.key == pat.key
    assert schedule_for(same, 16, 16) is schedule_for(pat, 16, 16)
    assert dense.key != pat.key and pattern_by_key(dense.key) == dense
    assert as_pattern(pat) is pat and as_pattern(train_layout(5, 2, 3, 1, 3, 3)).q_len == 82


def test_pattern_rejects_bad_descriptions():
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        AttentionPattern((2, 0), (2,), (1, 1))
    with pytest.raises(ValueError, match="rows has 1 entries"):
        AttentionPattern((2, 2), (2,), (1,))
    with pytest.raises(ValueError, match="bit mask over the 2 key segments"):
        AttentionPattern((2,), (2, 2), (0b100,))
    with pytest.raises(TypeError, match="tuple of ints"):
        AttentionPattern([2], (2,), (1,))
    with pytest.raises(ValueError, match="expected \\(1, 2\\)"):
        AttentionPattern.from_mask((2,), (2, 2), [[True]])
    with pytest.raises(TypeError, match="attention_pattern"):
        as_pattern("train")
    with pytest.raises(ValueError, match="no attention pattern has key"):
        pattern_by_key(10 ** 9)


def test_kernel_library_does_not_import_the_model():
    """dz_kernels.attention stands on its own (issue 16): importing it, building a pattern and a schedule pulls in
    neither dreamzero nor (for the pattern) triton."""
    import subprocess
    import sys

    code = ("import sys; import dz_kernels.attention as a; p = a.AttentionPattern((3, 2), (3, 2), (1, 3)); "
            "assert 'triton' not in sys.modules, 'pattern import pulled in triton'; "
            "a.schedule_for(p, 16, 16); a.token_tables(p); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'dreamzero'); assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
