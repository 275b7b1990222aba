"""Tile schedules for layout attention: which key tiles each query tile visits, and which need a mask.

An `AttentionPattern` (pattern.py) describes the score matrix as a block matrix of segments (for DreamZero: video
frames, action blocks, state blocks, cached frames) with a small boolean segment mask. The kernels work on tiles of
BLOCK_M queries by BLOCK_N keys. For every (query tile, key tile) pair the schedule decides:

    FULL     every valid (query, key) pair of the tile is visible and the tile lies inside the key range:
             the kernel runs it without any mask;
    PARTIAL  some pairs are visible: the kernel builds the token mask inside the tile (below);
    SKIP     no pair is visible: the kernel never touches it.

The classification is exact and vectorized: a query tile covers a contiguous range of query segments and a key
tile a contiguous range of key segments, so a 2D prefix sum of the segment mask counts the visible segment pairs
of every tile at once (full when the count equals the rectangle's area, skip when it is zero).

Token mask inside a PARTIAL tile (what the kernels compute, emulated by `tile_mask` below):
    every query token carries its segment id (`q_seg`, int32 [Lq]) and every key token its segment id
    (`k_seg`, int32 [Lk]); `qk_bits` (int32 [n_q_segments, n_words]) holds row i of the segment mask as a bit
    string (bit j of the row = word j // 32, bit j % 32). A key tile spans at most BLOCK_N consecutive key
    segments starting at `base` (the segment of its first key), so the kernel loads NWIN = (BLOCK_N + 30) // 32 + 1
    words per query row (at most the table's words per row: `nwin`) starting at word base // 32 and picks bit
    (k_seg - 32 * (base // 32)) for each column: a handful of [BLOCK_M] gathers from a table of a few hundred
    bytes, no [BLOCK_M, BLOCK_N] gather.
    `kq_bits` is the transposed table for the kernels that hold a key tile and walk query tiles (dk, dv).

Flattened for the kernels (CSR-like, int32, built with numpy, cached per (pattern, BLOCK_M, BLOCK_N)):
    rows     int32 [n_tiles, 4]: (tile index, start, mid, end), in launch order (heaviest rows first, for load
             balance); entries [start, mid) are FULL tiles, [mid, end) PARTIAL tiles, each in increasing order.
             Every tile has a row, also one with no entries (its outputs are still written: zeros).
    cols     int32 [nnz]: the other side's tile indices.
The query-side schedule (`rows`, `cols`: for each query tile, its key tiles) drives the forward and the dq pass;
the key-side schedule (`t_rows`, `t_cols`: for each key tile, the query tiles that see it) drives the dk/dv pass.

Every function here takes an AttentionPattern or an object with `attention_pattern()` (a dreamzero SequenceLayout).
The host time of the schedules at the DROID shapes is a benchmark case: `python -m dz_bench attention`
(schedule/train).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .pattern import as_pattern

SKIP, PARTIAL, FULL = 0, 1, 2
PARTIAL_COST = 1.25   # relative cost of a partial tile in the load-balance order (mask work on top of the dots)


def nwin(block_n: int, n_words: int | None = None) -> int:
    """Bit-table words a kernel loads per row of a tile BLOCK_N wide (see the module doc); with `n_words`, the words
    per row of the table, at most that many: a window never selects a word past the table's last (the column
    segments of a tile are < 32 * n_words), so a layout of up to 32 segments (every DreamZero layout) needs one."""
    w = (block_n + 30) // 32 + 1
    return w if n_words is None else max(1, min(w, int(n_words)))


@dataclass(frozen=True, eq=False)
class TokenTables:
    """Per-token segment ids and the bit-packed segment mask of a layout (independent of the tiling)."""
    q_seg: np.ndarray     # int32 [Lq]
    k_seg: np.ndarray     # int32 [Lk]
    qk_bits: np.ndarray   # int32 [n_q_segments, ceil(n_k_segments / 32)]: bit j of row i = segment_mask[i, j]
    kq_bits: np.ndarray   # int32 [n_k_segments, ceil(n_q_segments / 32)]: the transposed mask
    dense: bool           # every query sees every key


@dataclass(frozen=True, eq=False)
class TileSchedule:
    """The tile schedule of one layout at one tiling (see the module doc for the arrays)."""
    block_m: int
    block_n: int
    q_len: int
    k_len: int
    kind: np.ndarray      # int8 [n_m, n_n]: SKIP / PARTIAL / FULL
    rows: np.ndarray      # int32 [n_m, 4]: query-side rows (tile, start, mid, end)
    cols: np.ndarray      # int32 [nnz]: key tile ids
    t_rows: np.ndarray    # int32 [n_n, 4]: key-side rows
    t_cols: np.ndarray    # int32 [nnz]: query tile ids

    @property
    def n_m(self) -> int:
        return self.kind.shape[0]

    @property
    def n_n(self) -> int:
        return self.kind.shape[1]

    def partial_key_tiles(self) -> np.ndarray:
        """int32: the key tiles that are PARTIAL for some query tile (increasing): the keys whose rows the forward
        must check for non-finite values (triton_fwd.py)."""
        return np.flatnonzero((self.kind == PARTIAL).any(axis=0)).astype(np.int32)

    def counts(self) -> dict:
        """Number of full, partial and skipped tiles."""
        return {"full": int((self.kind == FULL).sum()), "partial": int((self.kind == PARTIAL).sum()),
                "skip": int((self.kind == SKIP).sum())}


def _pack_bits(mask: np.ndarray) -> np.ndarray:
    """bool [r, c] -> int32 [r, ceil(c / 32)], bit j of row i = mask[i, j] (little-endian bit order)."""
    r, c = mask.shape
    n_words = max(1, (c + 31) // 32)
    packed = np.packbits(mask, axis=1, bitorder="little")          # uint8 [r, ceil(c / 8)]
    out = np.zeros((r, n_words * 4), dtype=np.uint8)
    out[:, :packed.shape[1]] = packed
    return np.ascontiguousarray(out).view("<u4").view(np.int32).reshape(r, n_words)


# host-side memo per pattern key: token tables, schedules (numpy) and their device copies (schedule_tensors)
_MEMO: dict = {}
_MEMO_LOCK = threading.Lock()


def _memo(key, build):
    value = _MEMO.get(key)
    if value is None:
        value = build()
        with _MEMO_LOCK:
            value = _MEMO.setdefault(key, value)
    return value


def build_token_tables(layout) -> TokenTables:
    """The per-token segment ids and bit tables of a pattern (no caching)."""
    pattern = as_pattern(layout)
    mask = pattern.segment_mask()
    qb, kb = pattern.segment_bounds("q"), pattern.segment_bounds("k")
    q_seg = np.repeat(np.arange(len(qb), dtype=np.int32), qb[:, 1] - qb[:, 0])
    k_seg = np.repeat(np.arange(len(kb), dtype=np.int32), kb[:, 1] - kb[:, 0])
    tables = TokenTables(q_seg=q_seg, k_seg=k_seg, qk_bits=_pack_bits(mask), kq_bits=_pack_bits(mask.T),
                         dense=bool(mask.all()))
    for a in (q_seg, k_seg, tables.qk_bits, tables.kq_bits):
        a.setflags(write=False)
    return tables


def token_tables(layout) -> TokenTables:
    """The per-token segment ids and bit tables of a pattern (memoized per pattern)."""
    pattern = as_pattern(layout)
    return _memo(("tables", pattern.key), lambda: build_token_tables(pattern))


def _tile_segment_ranges(bounds: np.ndarray, length: int, block: int):
    """For tiles of `block` tokens over `length` tokens: first and last segment index of each tile."""
    n_tiles = -(-length // block)
    first_tok = np.arange(n_tiles, dtype=np.int64) * block
    last_tok = np.minimum(first_tok + block, length) - 1
    starts = bounds[:, 0]
    first = np.searchsorted(starts, first_tok, side="right") - 1
    last = np.searchsorted(starts, last_tok, side="right") - 1
    return first, last


def _classify(mask: np.ndarray, qb: np.ndarray, kb: np.ndarray, q_len: int, k_len: int, bm: int, bn: int) -> np.ndarray:
    """int8 [n_m, n_n] tile kinds from the segment mask (exact, vectorized)."""
    qa, qz = _tile_segment_ranges(qb, q_len, bm)
    ka, kz = _tile_segment_ranges(kb, k_len, bn)
    p = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)
    p[1:, 1:] = mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    rows = p[qz + 1] - p[qa]                                   # [n_m, nk + 1]: column prefix sums over each row range
    count = rows[:, kz + 1] - rows[:, ka]                       # visible segment pairs per tile
    area = (qz - qa + 1).astype(np.int32)[:, None] * (kz - ka + 1).astype(np.int32)[None, :]
    inside = (np.arange(len(ka)) + 1) * bn <= k_len             # a key tile running past Lk needs the bounds mask
    full = (count == area) & inside[None, :]
    return np.where(full, np.int8(FULL), np.where(count == 0, np.int8(SKIP), np.int8(PARTIAL))).astype(np.int8)


def _csr(kind: np.ndarray):
    """CSR rows (tile, start, mid, end) in launch order and the column ids, FULL entries first in each row."""
    n_rows, n_cols = kind.shape
    flat = kind.ravel()
    nz = np.flatnonzero(flat)                                  # scheduled tiles, row-major (SKIP == 0)
    row, col = np.divmod(nz, n_cols)
    is_full = flat[nz] == FULL
    n = np.bincount(row, minlength=n_rows)
    nf = np.bincount(row, weights=is_full, minlength=n_rows).astype(np.int64)
    start = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(n, out=start[1:])
    # rank of each entry among the full (or partial) entries of its row, from running counts
    run_full = np.cumsum(is_full) - is_full
    run_part = np.arange(len(nz)) - run_full
    full_before_row = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(nf, out=full_before_row[1:])
    part_before_row = start - full_before_row
    pos = np.where(is_full, start[row] + (run_full - full_before_row[row]),
                   start[row] + nf[row] + (run_part - part_before_row[row]))
    cols = np.empty(len(nz), dtype=np.int32)
    cols[pos] = col
    rows = np.stack([np.arange(n_rows), start[:-1], start[:-1] + nf, start[1:]], axis=1)
    order = np.argsort(-(nf + PARTIAL_COST * (n - nf)), kind="stable")
    return np.ascontiguousarray(rows[order], dtype=np.int32), cols


def build_schedule(layout, block_m: int, block_n: int) -> TileSchedule:
    """Build the tile schedule of a pattern for tiles of `block_m` queries by `block_n` keys (no caching)."""
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block sizes must be positive, got {block_m} x {block_n}")
    pattern = as_pattern(layout)
    mask = pattern.segment_mask()
    qb, kb = pattern.segment_bounds("q"), pattern.segment_bounds("k")
    kind = _classify(mask, qb, kb, pattern.q_len, pattern.k_len, block_m, block_n)
    rows, cols = _csr(kind)
    t_rows, t_cols = _csr(np.ascontiguousarray(kind.T))
    sched = TileSchedule(block_m=block_m, block_n=block_n, q_len=pattern.q_len, k_len=pattern.k_len, kind=kind,
                         rows=rows, cols=cols, t_rows=t_rows, t_cols=t_cols)
    for a in (kind, rows, cols, t_rows, t_cols):
        a.setflags(write=False)
    return sched


def schedule_for(layout, block_m: int, block_n: int) -> TileSchedule:
    """`build_schedule`, memoized per (pattern, block_m, block_n)."""
    pattern = as_pattern(layout)
    return _memo(("schedule", pattern.key, block_m, block_n), lambda: build_schedule(pattern, block_m, block_n))


# ---------------------------------------------------------------------- numpy emulation of the kernels' mask
def tile_mask(tables: TokenTables, q_tile: int, k_tile: int, block_m: int, block_n: int, q_len: int, k_len: int,
              transposed: bool = False) -> np.ndarray:
    """bool [block_m, block_n]: the mask the kernels build inside tile (q_tile, k_tile), computed with the same
    bit-window arithmetic (for tests). Entries of rows past Lq are whatever the kernels compute there (never
    stored); columns past Lk are False. `transposed` emulates the dk/dv kernel instead, which holds the key tile as
    rows and reads the key-major table (`kq_bits`); its result is transposed back to [block_m, block_n], and its
    entries of rows past Lq are False (that kernel masks both ends)."""
    offs_m = q_tile * block_m + np.arange(block_m)
    offs_n = k_tile * block_n + np.arange(block_n)
    m_ok, n_ok = offs_m < q_len, offs_n < k_len
    q_seg = np.where(m_ok, tables.q_seg[np.minimum(offs_m, q_len - 1)], 0).astype(np.int64)
    k_seg = np.where(n_ok, tables.k_seg[np.minimum(offs_n, k_len - 1)], 0).astype(np.int64)
    if transposed:
        row_seg, row_ok, col_seg, col_ok, bits = k_seg, n_ok, q_seg, m_ok, tables.kq_bits
    else:
        row_seg, row_ok, col_seg, col_ok, bits = q_seg, None, k_seg, n_ok, tables.qk_bits
    base = int(col_seg[0])                       # the segment of the tile's first column (always in range)
    col_seg = np.where(col_ok, col_seg, base)
    n_words = bits.shape[1]
    w0 = base // 32
    local = col_seg - 32 * w0
    vis = np.zeros((len(row_seg), len(col_seg)), dtype=np.int64)
    for w in range(nwin(len(col_seg))):
        word = bits[row_seg, min(w0 + w, n_words - 1)].astype(np.int64)
        if w0 + w >= n_words:
            word = np.zeros_like(word)
        bit = (word[:, None] >> (local[None, :] & 31)) & 1
        vis = np.where((local >> 5)[None, :] == w, bit, vis)
    out = (vis != 0) & col_ok[None, :]
    if row_ok is not None:
        out &= row_ok[:, None]
    return out.T if transposed else out
