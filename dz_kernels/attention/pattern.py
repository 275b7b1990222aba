"""The attention pattern: the small, generic description of who sees whom that the layout-attention op needs.

An attention call over L_q query tokens and L_k key tokens is cut into runs of tokens ("segments") on both sides;
every query token of a segment sees the same key segments, all of their tokens or none:

    AttentionPattern(q_lengths=(7, 7, 3), k_lengths=(7, 7, 3), rows=(0b001, 0b011, 0b111))

q_lengths / k_lengths: tokens per query / key segment, in token order; rows[i]: a bit mask over the key segments
(bit j set = query segment i sees key segment j). A model describes its mask this way (dreamzero's
`SequenceLayout.attention_pattern()` does), and the op reads nothing else: no dreamzero import here.

The pattern is frozen, hashable and plain data (tuples of ints), so torch.compile traces through it: everything
the traced code reads is a Python constant. Each distinct pattern gets a process-wide integer `key` when it is made
(equal patterns share one); the custom op takes that int and finds the pattern's tile schedules, built and uploaded
once per (pattern, tiles, device), by it (schedule.py). A query segment may see nothing (its output is 0, its
log-sum-exp -inf).

Derived, computed once when the pattern is made (all plain tuples, for traced code):
    q_len, k_len    token counts
    dense           every query sees every key
    groups          ((q_start, q_end, ((k_start, k_end), ...)), ...): runs of consecutive query segments that see
                    the same keys, with their visible keys as maximal contiguous token spans (what the release's
                    per-block loop gathers)
    dense_blocks    the groups as (q_start, q_end, k_start, k_end) when each sees one contiguous key span, else None
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["AttentionPattern", "as_pattern", "pattern_by_key"]

_LOCK = threading.Lock()
_KEYS: dict = {}          # (q_lengths, k_lengths, rows) -> key
_PATTERNS: list = []      # key -> the first AttentionPattern made with that content


@dataclass(frozen=True)
class AttentionPattern:
    q_lengths: tuple
    k_lengths: tuple
    rows: tuple

    def __post_init__(self):
        for name in ("q_lengths", "k_lengths", "rows"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(x, (int, np.integer)) for x in value):
                raise TypeError(f"AttentionPattern.{name} must be a tuple of ints, got {value!r}")
            object.__setattr__(self, name, tuple(int(x) for x in value))
        if not self.q_lengths or not self.k_lengths:
            raise ValueError("an attention pattern needs at least one query and one key segment")
        if min(self.q_lengths) < 1 or min(self.k_lengths) < 1:
            raise ValueError(f"segment lengths must be >= 1, got q {self.q_lengths}, k {self.k_lengths}")
        if len(self.rows) != len(self.q_lengths):
            raise ValueError(f"rows has {len(self.rows)} entries for {len(self.q_lengths)} query segments")
        full = (1 << len(self.k_lengths)) - 1
        if any(r < 0 or r > full for r in self.rows):
            raise ValueError(f"each row must be a bit mask over the {len(self.k_lengths)} key segments")
        derived = _derive(self.q_lengths, self.k_lengths, self.rows)
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        content = (self.q_lengths, self.k_lengths, self.rows)
        with _LOCK:
            key = _KEYS.get(content)
            if key is None:
                key = _KEYS[content] = len(_PATTERNS)
                _PATTERNS.append(self)
        object.__setattr__(self, "key", key)

    @classmethod
    def from_mask(cls, q_lengths, k_lengths, mask) -> "AttentionPattern":
        """From a boolean segment mask [n_q_segments, n_k_segments] (True: query segment i sees key segment j)."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != (len(q_lengths), len(k_lengths)):
            raise ValueError(f"mask has shape {m.shape}, expected ({len(q_lengths)}, {len(k_lengths)})")
        weights = [1 << j for j in range(m.shape[1])]
        rows = tuple(sum(w for w, on in zip(weights, row) if on) for row in m.tolist())
        return cls(tuple(int(x) for x in q_lengths), tuple(int(x) for x in k_lengths), rows)

    # ------------------------------------------------------------------ views for the host side (schedules, tests)
    def segment_mask(self) -> np.ndarray:
        """bool [n_q_segments, n_k_segments]."""
        nk = len(self.k_lengths)
        return np.array([[(r >> j) & 1 for j in range(nk)] for r in self.rows], dtype=bool).reshape(-1, nk)

    def segment_bounds(self, side: str = "q") -> np.ndarray:
        """int64 [n, 2]: (start, end) token offsets of the query ('q') or key ('k') segments."""
        lengths = np.asarray(self.q_lengths if side == "q" else self.k_lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        return np.stack([ends - lengths, ends], axis=1)

    def dense_mask(self, device="cpu"):
        """bool torch tensor [q_len, k_len] expanded from the segment mask (for references and tests)."""
        import torch

        seg = torch.from_numpy(self.segment_mask())
        m = seg.repeat_interleave(torch.tensor(self.q_lengths), dim=0)
        return m.repeat_interleave(torch.tensor(self.k_lengths), dim=1).to(device)

    def __repr__(self) -> str:
        return (f"AttentionPattern(key={self.key}, q_len={self.q_len}, k_len={self.k_len}, "
                f"{len(self.q_lengths)}x{len(self.k_lengths)} segments, dense={self.dense})")


def _derive(q_lengths: tuple, k_lengths: tuple, rows: tuple) -> dict:
    k_starts, pos = [], 0
    for n in k_lengths:
        k_starts.append(pos)
        pos += n
    k_len = pos
    groups, q0 = [], 0
    for n, row in zip(q_lengths, rows):
        if groups and groups[-1][3] == row:
            groups[-1][1] = q0 + n
        else:
            spans = []
            for j, (ks, kn) in enumerate(zip(k_starts, k_lengths)):
                if (row >> j) & 1:
                    if spans and spans[-1][1] == ks:
                        spans[-1] = (spans[-1][0], ks + kn)
                    else:
                        spans.append((ks, ks + kn))
            groups.append([q0, q0 + n, tuple(spans), row])
        q0 += n
    groups = tuple((a, b, spans) for a, b, spans, _ in groups)
    blocks = None
    if all(len(spans) == 1 for _, _, spans in groups):
        blocks = tuple((a, b) + spans[0] for a, b, spans in groups)
    full = (1 << len(k_lengths)) - 1
    return dict(q_len=q0, k_len=k_len, dense=all(r == full for r in rows), groups=groups, dense_blocks=blocks)


def pattern_by_key(key: int) -> AttentionPattern:
    """The pattern registered under `key` (AttentionPattern.key)."""
    if not isinstance(key, int) or not 0 <= key < len(_PATTERNS):
        raise ValueError(f"no attention pattern has key {key!r} in this process")
    return _PATTERNS[key]


def as_pattern(layout) -> AttentionPattern:
    """An AttentionPattern as is, or the pattern of an object that describes one (`layout.attention_pattern()`,
    e.g. a dreamzero SequenceLayout)."""
    if isinstance(layout, AttentionPattern):
        return layout
    get = getattr(layout, "attention_pattern", None)
    if get is None:
        raise TypeError(f"layout must be a dz_kernels.attention.AttentionPattern or have an attention_pattern() "
                        f"method (e.g. a dreamzero SequenceLayout), got {type(layout).__name__}")
    pattern = get()
    if not isinstance(pattern, AttentionPattern):
        raise TypeError(f"{type(layout).__name__}.attention_pattern() returned {type(pattern).__name__}, "
                        f"not an AttentionPattern")
    return pattern
