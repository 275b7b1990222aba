"""Tile schedules of layout attention (pure numpy, no kernel run): every visible (query, key) pair is covered by
exactly one scheduled tile, full tiles hold only visible pairs, skipped tiles none, and the in-tile mask the kernels
build from the bit tables equals the dense mask. The DROID training layout (15,940 tokens) is checked in full."""
import numpy as np
import pytest

from dreamzero.config import get_config
from dreamzero.layout import inference_layout, layout_for_config, train_layout
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
