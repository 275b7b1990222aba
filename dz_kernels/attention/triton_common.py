"""What the layout-attention kernels share: the Triton device functions (the dot wrapper, the program ids, the
in-tile token mask, the non-finite row test), the row-flag kernel, and the launchers' small helpers.

Non-finite values in partially visible (PARTIAL) tiles: a masked probability is an exact 0, and 0 * NaN = NaN
inside a dot, so an operand row that is multiplied by masked probabilities is loaded as 0 for the dot when it holds
a NaN or an inf, and the outputs that really see such a row are made NaN explicitly. Fully visible tiles need none
of it (every product there is a visible one). Which rows are non-finite comes from int8 flags per (batch x head,
token), written before the loop that needs them (`_row_flags_kernel` for V, the backward's preprocess for q and dO,
the dk/dv kernel for K): the partial tiles then load a flag vector and fold it into the load's mask, instead of
testing each [BLOCK, HEAD_DIM] operand tile in registers inside the loop (which made every kernel spill registers
at head dim 128 on sm_90: `python -m dz_kernels.attention.compile_check`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """a @ b with an fp32 result. The interpreter's bf16/fp16 tl.dot is wrong, so it gets fp32 operands there;
    fp32 operands use full-precision ("ieee") products on the GPU, not TF32."""
    if INTERPRET:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _program_row(ROWS, H, HEADS_FIRST: tl.constexpr):
    """This program's (bh, b, h, tile, start, mid, end): its batch x head (and the two, int64), and its schedule row
    of ROWS (int32 [n, 4], schedule.py: the tile, then entries [start, mid) full and [mid, end) partial). The grid is
    (rows, B*H), or (B*H, rows) with HEADS_FIRST, which launches every head of the first (heaviest) row first."""
    if HEADS_FIRST:
        pid = tl.program_id(1)
        bh = tl.program_id(0)
    else:
        pid = tl.program_id(0)
        bh = tl.program_id(1)
    row = ROWS + pid * 4
    return (bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), tl.load(row), tl.load(row + 1), tl.load(row + 2),
            tl.load(row + 3))


@triton.jit
def _load_rows(base, offs, stride_l, ok, HEAD_DIM: tl.constexpr):
    """[len(offs), HEAD_DIM]: the rows `offs` of the [L, HEAD_DIM] slice at `base` (row stride stride_l, contiguous
    last dim); rows that are not `ok` read as 0."""
    return tl.load(base + offs[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _store_rows(base, offs, stride_l, ok, value, HEAD_DIM: tl.constexpr):
    """Store `value` [len(offs), HEAD_DIM] into the rows `offs` of the slice at `base` (as _load_rows), in the
    pointer's dtype; rows that are not `ok` are not written."""
    tl.store(base + offs[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :], value.to(base.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def _nonfinite(x, AXIS: tl.constexpr):
    """bool: which rows (AXIS=1) or columns (AXIS=0) of the 2D tile x hold a NaN or an inf."""
    xf = x.to(tl.float32)
    bad = (xf != xf) | (tl.abs(xf) == float("inf"))
    return tl.max(bad.to(tl.int32), AXIS) > 0


@triton.jit
def _tile_mask(row_seg, col_seg, col_ok, base, BITS, n_words,
               ROWS: tl.constexpr, COLS: tl.constexpr, NWIN: tl.constexpr):
    """bool [ROWS, COLS]: segment_mask[row_seg[r], col_seg[c]] & col_ok[c] (see schedule.py, "Token mask").

    row_seg int32 [ROWS]; col_seg int32 [COLS] (consecutive segments starting at `base`, the segment of the tile's
    first column); BITS int32 [n_row_segments, n_words], bit j of row i = visibility of column segment j.
    """
    w0 = base // 32
    local = col_seg - w0 * 32                      # in [0, 32 * NWIN)
    shift = local & 31
    which = local >> 5
    vis = tl.zeros([ROWS, COLS], dtype=tl.int32)
    row_ptr = BITS + row_seg * n_words
    for w in tl.static_range(NWIN):
        in_table = (w0 + w) < n_words               # words past the row's end read as zero
        word = tl.load(row_ptr + tl.minimum(w0 + w, n_words - 1))
        word = tl.where(in_table, word, 0)
        bit = (word[:, None] >> shift[None, :]) & 1
        vis = tl.where(which[None, :] == w, bit, vis)
    return (vis != 0) & col_ok[None, :]


@triton.jit
def _row_flags_kernel(X, FLAGS, TILES, stride_b, stride_l, stride_h, H, L,
                      BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """FLAGS int8 [B * H, L]: 1 where the (token, head) row of X [B, L, H, D] holds a NaN or an inf, 0 elsewhere,
    for the token tiles of BLOCK rows listed in TILES (int32; grid (len(TILES), B * H)); other entries untouched."""
    t = tl.load(TILES + tl.program_id(0))
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    x = _load_rows(X + b * stride_b + h * stride_h, offs, stride_l, ok, HEAD_DIM)
    tl.store(FLAGS + bh.to(tl.int64) * L + offs, _nonfinite(x, 1).to(tl.int8), mask=ok)


# ---------------------------------------------------------------------- launch helpers (`tiles`: TileConfig.as_list)
def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_kwargs(warps: int, stages: int) -> dict:
    return {"num_warps": warps, "num_stages": stages}


def tile_flags(tiles: list) -> int:
    return tiles[12] if len(tiles) > 12 else 0


def grid(n_rows: int, n_bh: int, heads_first: bool) -> tuple:
    return (n_bh, n_rows) if heads_first else (n_rows, n_bh)
