"""The layout description: which token is which kind, in which chunk, and who may attend to whom.

This is the spine of the project. A `SequenceLayout` describes one attention call as runs ("segments") of tokens:

    kind         FIRST (first latent frame, clean copy), FIRST_NOISY (the noisy half's copy of it, training only),
                 CLEAN (a clean or observed video frame, t = 0), NOISY (a video frame being denoised),
                 ACTION (an action block), STATE (a state block)
    chunk        0 for the first frame, 1..K for chunks (chunk c holds latent frames 1+(c-1)*n .. c*n)
    frame        latent frame index for video segments, -1 for action/state
    cached       the segment's keys/values come from the KV cache (key side only)

Video segments are one latent frame long, so every visibility rule, the frame window included, holds for whole
segments: the dense mask is a block matrix of the segment mask. The queries are `q`; the keys are `k`, which is
always `cached segments + q` (the new tokens attend to the cache and to each other).

Visibility (docs/reference.md#training-sequence-and-mask; W = local_attn_size in frames, the first frame always
visible):
  FIRST, FIRST_NOISY   see only themselves
  CLEAN of chunk c     the clean first frame and clean frames of chunks <= c inside the window
  NOISY, ACTION of c   the clean first frame, clean frames of chunks < c inside the window, and the noisy frames,
                       action block and state block of chunk c
  STATE of c           only itself (training, and the `consistent` rule at inference); under the `release` rule at
                       inference it sees every key (the release runs one unmasked call there)

The frame window, and what the two rules (`rule`: "release" or "consistent") make of it:
  consistent   (training and inference) a query of chunk c (first frame s_c = 1 + (c-1)*fpc) sees a clean key
               frame f when f >= s_c - (W - 1): at most W - 1 frames before the chunk, plus the first frame and the
               chunk's own frames. This is exactly what a KV cache of W frames (the sink + W - 1) holds when chunk c
               runs against it, so inference past the window (overflow 'roll') equals teacher forcing under it.
  release      (training) the release's own masks (CausalWanSelfAttention of dreamzero0/dreamzero): the CLEAN tokens
               of chunk c see the first frame plus the clean frames from max(1, 1 + c*fpc - W) to their own chunk's
               end (a window of W frames ending at the chunk's end); NOISY and ACTION tokens see every earlier clean
               frame, with no window at all.
               (inference) the same window as `consistent` (what the cache holds; with the release's reset policy
               the cache never holds more than W frames, so nothing binds), and the STATE difference above.
The two training rules agree while num_chunks <= max_chunks + 1 (W = max_chunks * fpc + 1 frames): only the clean
tokens of chunk max_chunks + 1 lose frame 1 under `release`, and no other token sees them. Past that they differ:
with 6 chunks and max_chunks = 4 (W = 9), `release` hides frames 1-3 from clean chunk 6 and frame 1 from clean chunk
5, while its noisy chunk 6 sees all of frames 1-10; `consistent` shows chunk 5 and 6 (clean and noisy alike) frames
>= 1 and >= 3. (The release's scripts train 33 frames with max_chunk_size 4, 4 chunks; its data configs default to
49 frames, 6 chunks, with max_chunk_size 5: 49 frames with max_chunk_size 4 binds.)
Use `release` to reproduce the release's training; use `consistent` to train what a W-frame cache shows at inference.

Layouts are built once per shape (the builders are cached) and read by the model (token order, RoPE positions,
per-token timesteps, cache writes), the attention ops (their tile schedules), the KV cache and the benchmarks.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

import numpy as np
import torch


class Kind(enum.IntEnum):
    FIRST = 0
    FIRST_NOISY = 1
    CLEAN = 2
    NOISY = 3
    ACTION = 4
    STATE = 5


VIDEO_KINDS = (Kind.FIRST, Kind.FIRST_NOISY, Kind.CLEAN, Kind.NOISY)


@dataclass(frozen=True)
class Segment:
    kind: Kind
    chunk: int
    frame: int
    start: int
    length: int
    cached: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def is_video(self) -> bool:
        return self.kind in VIDEO_KINDS


@dataclass(frozen=True)
class Part:
    """A contiguous run of query tokens the model embeds in one piece: 'clean_video', 'noisy_video', 'action',
    'state'. `frames` lists the latent frames of a video part; `chunks` the chunks of an action/state part."""
    name: str
    start: int
    length: int
    frames: tuple = ()
    chunks: tuple = ()


MODES = ("train", "first", "observe", "denoise", "control")
RULES = ("release", "consistent")


def plan_slots(frames: tuple, new_frames: tuple, capacity_frames: int, overflow: str) -> list:
    """The slots that `new_frames` are written to, given the frames cached now (in slot order): the next free
    slots; when full, policy 'reset' refuses and policy 'roll' evicts the oldest non-sink frames (their slots are
    reused in place, so the buffer stays full and the valid slots stay a prefix). The one rule of every cache class
    (through SequenceLayout.cache_slots)."""
    if not new_frames:
        return []
    frames = list(frames)
    free = capacity_frames - len(frames)
    if len(new_frames) <= free:
        return list(range(len(frames), len(frames) + len(new_frames)))
    if overflow == "reset":
        raise RuntimeError(f"KV cache overflow: {len(frames)} frames cached, {len(new_frames)} new, capacity "
                           f"{capacity_frames}; reset the cache (policy 'reset') before this chunk")
    need = len(new_frames) - free
    order = sorted((f, i) for i, f in enumerate(frames) if f != 0)
    if need > len(order):
        raise RuntimeError("KV cache too small to roll: it holds only the sink")
    evicted = sorted(i for _, i in order[:need])
    return evicted + list(range(len(frames), capacity_frames))


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    mode: str
    rule: str                 # "release" or "consistent": the training window and the inference STATE query
    window: int               # local_attn_size in latent frames; -1 = unbounded
    frame_tokens: int
    actions_per_chunk: int
    states_per_chunk: int
    q: tuple                  # query segments, in token order
    k: tuple                  # key segments: cached ones first, then the query segments again
    parts: tuple              # query parts, in token order
    writes_cache: tuple = ()  # query segment indices whose keys/values are written into the KV cache
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ sizes
    @property
    def q_len(self) -> int:
        return self.q[-1].end if self.q else 0

    @property
    def k_len(self) -> int:
        return self.k[-1].end if self.k else 0

    @property
    def n_cached(self) -> int:
        """Number of key tokens read from the cache (they come first in k)."""
        return sum(s.length for s in self.k if s.cached)

    @property
    def is_inference(self) -> bool:
        return self.mode != "train"

    def part(self, name: str) -> Part | None:
        for p in self.parts:
            if p.name == name:
                return p
        return None

    def cache_write_range(self) -> tuple:
        """(start, end) of the query tokens whose k/v are written into the cache (contiguous), or (0, 0)."""
        if not self.writes_cache:
            return (0, 0)
        segs = [self.q[i] for i in self.writes_cache]
        return (segs[0].start, segs[-1].end)

    def cache_write_frames(self) -> tuple:
        return tuple(self.q[i].frame for i in self.writes_cache)

    def cached_frames(self) -> tuple:
        """The latent frames read from the KV cache, in the cache's physical (slot) order."""
        return tuple(s.frame for s in self.k if s.cached)

    def cache_slots(self, capacity_frames: int, overflow: str) -> list:
        """The cache slots the frames this call writes go to (plan_slots over cached_frames())."""
        return plan_slots(self.cached_frames(), self.cache_write_frames(), capacity_frames, overflow)

    # ------------------------------------------------------------------ the rule
    def _in_window(self, key_frame: int, query: Segment, frames_per_chunk: int) -> bool:
        """Whether clean key frame `key_frame` is inside the frame window of query segment `query` (module doc)."""
        if self.window < 0 or key_frame == 0:
            return True
        chunk = query.chunk
        if self.rule == "release" and not self.is_inference:
            if query.kind != Kind.CLEAN:
                return True                      # the release's noisy and action tokens: no window
            return key_frame >= max(1, 1 + chunk * frames_per_chunk - self.window)
        chunk_start = 1 + (chunk - 1) * frames_per_chunk
        return key_frame >= chunk_start - (self.window - 1)

    def visible(self, qs: Segment, ks: Segment) -> bool:
        """Whether the tokens of query segment `qs` see the tokens of key segment `ks` (the rule of the module doc)."""
        fpc = self._frames_per_chunk
        if qs.kind == Kind.FIRST:
            return ks.kind == Kind.FIRST
        if qs.kind == Kind.FIRST_NOISY:
            return ks.kind == Kind.FIRST_NOISY
        if qs.kind == Kind.STATE:
            if self.is_inference and self.rule == "release":
                return True
            return ks.kind == Kind.STATE and ks.chunk == qs.chunk
        if ks.kind == Kind.FIRST:
            return True
        if qs.kind == Kind.CLEAN:
            return ks.kind == Kind.CLEAN and ks.chunk <= qs.chunk and self._in_window(ks.frame, qs, fpc)
        # NOISY or ACTION query of chunk c
        if ks.kind == Kind.CLEAN:
            return ks.chunk < qs.chunk and self._in_window(ks.frame, qs, fpc)
        if ks.kind in (Kind.NOISY, Kind.ACTION, Kind.STATE):
            return ks.chunk == qs.chunk
        return False

    @property
    def _frames_per_chunk(self) -> int:
        return self._cache["frames_per_chunk"]

    # ------------------------------------------------------------------ derived arrays (cached)
    def segment_mask(self) -> np.ndarray:
        """bool [len(q), len(k)]: True where query segment i sees key segment j."""
        if "segment_mask" not in self._cache:
            m = np.zeros((len(self.q), len(self.k)), dtype=bool)
            for i, qs in enumerate(self.q):
                for j, ks in enumerate(self.k):
                    m[i, j] = self.visible(qs, ks)
            m.setflags(write=False)
            self._cache["segment_mask"] = m
        return self._cache["segment_mask"]

    def segment_bounds(self, side: str = "q") -> np.ndarray:
        """int64 [n, 2]: (start, end) token offsets of the query ('q') or key ('k') segments."""
        key = "bounds_" + side
        if key not in self._cache:
            segs = self.q if side == "q" else self.k
            b = np.array([(s.start, s.end) for s in segs], dtype=np.int64).reshape(-1, 2)
            b.setflags(write=False)
            self._cache[key] = b
        return self._cache[key]

    def dense_mask(self, device="cpu") -> torch.Tensor:
        """bool [q_len, k_len] expanded from the segment mask (for reference attention and tests)."""
        seg = torch.from_numpy(self.segment_mask().copy())
        qlen = torch.tensor([s.length for s in self.q])
        klen = torch.tensor([s.length for s in self.k])
        m = seg.repeat_interleave(qlen, dim=0).repeat_interleave(klen, dim=1)
        return m.to(device)

    def attention_pattern(self):
        """The layout's mask as the kernel library's generic description: a dz_kernels.attention.AttentionPattern
        (segment lengths and who sees whom), built once (when the layout is built) and kept on the layout, so traced
        code reads it as a plain attribute."""
        pattern = getattr(self, "_attention_pattern", None)
        if pattern is None:
            from dz_kernels.attention.pattern import AttentionPattern

            pattern = AttentionPattern.from_mask([s.length for s in self.q], [s.length for s in self.k],
                                                 self.segment_mask())
            object.__setattr__(self, "_attention_pattern", pattern)
        return pattern

    def visible_pairs(self) -> int:
        """Number of visible (query, key) token pairs: the useful work of an attention call over this layout."""
        ql = np.array([s.length for s in self.q], dtype=np.int64)
        kl = np.array([s.length for s in self.k], dtype=np.int64)
        return int((self.segment_mask() * np.outer(ql, kl)).sum())

    def attention_flops(self, batch: int, heads: int, head_dim: int) -> int:
        """Forward FLOPs of the visible part: 4 * pairs * head_dim per head (QK^T and PV)."""
        return 4 * self.visible_pairs() * batch * heads * head_dim

    def token_kinds(self) -> torch.Tensor:
        """int8 [q_len]: the Kind of each query token."""
        if "token_kinds" not in self._cache:
            self._cache["token_kinds"] = torch.cat(
                [torch.full((s.length,), int(s.kind), dtype=torch.int8) for s in self.q])
        return self._cache["token_kinds"]

    def key(self) -> tuple:
        """A hashable description (used to cache schedules built from the layout)."""
        return (self.mode, self.rule, self.window, self.frame_tokens, self.actions_per_chunk, self.states_per_chunk,
                tuple((int(s.kind), s.chunk, s.frame, s.length, s.cached) for s in self.k))

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return isinstance(other, SequenceLayout) and self.key() == other.key()

    def describe(self) -> str:
        names = {Kind.FIRST: "F", Kind.FIRST_NOISY: "f", Kind.CLEAN: "C", Kind.NOISY: "N", Kind.ACTION: "A",
                 Kind.STATE: "S"}
        def fmt(segs):
            return " ".join(f"{'$' if s.cached else ''}{names[s.kind]}{s.chunk}" + (f".{s.frame}" if s.is_video else "")
                            + f"[{s.length}]" for s in segs)
        return f"{self.mode}/{self.rule} W={self.window}\n q: {fmt(self.q)}\n k: {fmt(self.k)}"


# ---------------------------------------------------------------------- builders
class _Builder:
    def __init__(self, frame_tokens, frames_per_chunk, actions_per_chunk, states_per_chunk):
        self.ft, self.fpc, self.apc, self.spc = frame_tokens, frames_per_chunk, actions_per_chunk, states_per_chunk
        self.segs: list = []
        self.parts: list = []
        self.pos = 0

    def frames_of(self, chunk: int) -> range:
        if chunk == 0:
            return range(0, 1)
        return range(1 + (chunk - 1) * self.fpc, 1 + chunk * self.fpc)

    def video(self, name: str, kind_first: Kind, kind: Kind, chunks) -> None:
        start, frames = self.pos, []
        for c in chunks:
            for f in self.frames_of(c):
                self.segs.append(Segment(kind_first if c == 0 else kind, c, f, self.pos, self.ft))
                self.pos += self.ft
                frames.append(f)
        self.parts.append(Part(name, start, self.pos - start, frames=tuple(frames)))

    def blocks(self, name: str, kind: Kind, chunks, per_chunk: int) -> None:
        start = self.pos
        for c in chunks:
            self.segs.append(Segment(kind, c, -1, self.pos, per_chunk))
            self.pos += per_chunk
        self.parts.append(Part(name, start, self.pos - start, chunks=tuple(chunks)))


def _finish(b: _Builder, mode, rule, window, cached_frames=(), writes=()) -> SequenceLayout:
    k, pos = [], 0
    for f in cached_frames:
        chunk = 0 if f == 0 else 1 + (f - 1) // b.fpc
        k.append(Segment(Kind.FIRST if f == 0 else Kind.CLEAN, chunk, f, pos, b.ft, cached=True))
        pos += b.ft
    for s in b.segs:
        k.append(Segment(s.kind, s.chunk, s.frame, pos + s.start, s.length))
    lay = SequenceLayout(mode=mode, rule=rule, window=window, frame_tokens=b.ft, actions_per_chunk=b.apc,
                         states_per_chunk=b.spc, q=tuple(b.segs), k=tuple(k), parts=tuple(b.parts),
                         writes_cache=tuple(writes))
    lay._cache["frames_per_chunk"] = b.fpc
    lay.attention_pattern()
    return lay


def _check_rule_window(rule: str, window: int) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be 'release' or 'consistent', got {rule!r}")
    if window != -1 and window < 1:
        raise ValueError(f"window must be -1 (unbounded) or >= 1 latent frames, got {window}")


@functools.lru_cache(maxsize=256)
def train_layout(frame_tokens: int, frames_per_chunk: int, actions_per_chunk: int, states_per_chunk: int,
                 num_chunks: int, window: int = -1, rule: str = "release") -> SequenceLayout:
    """Teacher forcing: [clean first frame, clean chunks 1..K][noisy first frame, noisy chunks 1..K]
    [action blocks 1..K][state blocks 1..K] (the release's order). `rule` picks the frame window (module doc);
    the two rules agree unless num_chunks > max_chunks + 1 for the window W = max_chunks * fpc + 1."""
    if num_chunks < 1:
        raise ValueError(f"a training sequence needs at least one chunk, got {num_chunks}")
    _check_rule_window(rule, window)
    b = _Builder(frame_tokens, frames_per_chunk, actions_per_chunk, states_per_chunk)
    chunks = range(0, num_chunks + 1)
    b.video("clean_video", Kind.FIRST, Kind.CLEAN, chunks)
    b.video("noisy_video", Kind.FIRST_NOISY, Kind.NOISY, chunks)
    b.blocks("action", Kind.ACTION, range(1, num_chunks + 1), actions_per_chunk)
    b.blocks("state", Kind.STATE, range(1, num_chunks + 1), states_per_chunk)
    return _finish(b, "train", rule, window)


@functools.lru_cache(maxsize=1024)
def inference_layout(frame_tokens: int, frames_per_chunk: int, actions_per_chunk: int, states_per_chunk: int,
                     mode: str, chunk: int, cached_frames: tuple = (), window: int = -1,
                     rule: str = "release") -> SequenceLayout:
    """One inference call against a KV cache holding `cached_frames` (in the cache's physical order).

    mode 'first':   the first frame (chunk must be 0), written into the cache.
    mode 'observe': the observed (clean, t = 0) frames of `chunk`, written into the cache (ground-truth replacement).
    mode 'denoise': noisy frames, action block and state block of `chunk`; the cache is only read.
    mode 'control': one call for a whole control step: the observed frames of chunk - 1 (the first frame when
                    chunk == 1), written into the cache, then the noisy frames, action and state blocks of `chunk`.
    """
    if mode not in ("first", "observe", "denoise", "control"):
        raise ValueError(f"unknown inference mode {mode!r}")
    _check_rule_window(rule, window)
    if mode == "first" and chunk != 0:
        raise ValueError("mode 'first' is for chunk 0 (the first frame)")
    if mode != "first" and chunk < 1:
        raise ValueError(f"mode {mode!r} needs a chunk >= 1, got {chunk}")
    b = _Builder(frame_tokens, frames_per_chunk, actions_per_chunk, states_per_chunk)
    writes = ()
    if mode in ("first", "observe", "control"):
        obs_chunk = chunk if mode != "control" else chunk - 1
        b.video("clean_video", Kind.FIRST, Kind.CLEAN, [obs_chunk])
        writes = tuple(range(len(b.segs)))
    if mode in ("denoise", "control"):
        b.video("noisy_video", Kind.FIRST_NOISY, Kind.NOISY, [chunk])
        b.blocks("action", Kind.ACTION, [chunk], actions_per_chunk)
        b.blocks("state", Kind.STATE, [chunk], states_per_chunk)
    # every frame we would write must be new to the cache, and every cached frame must precede the query frames
    new_frames = [s.frame for s in b.segs if s.is_video]
    if set(cached_frames) & set(new_frames):
        raise ValueError(f"frames {sorted(set(cached_frames) & set(new_frames))} are already in the cache")
    if cached_frames and new_frames and max(cached_frames) >= min(new_frames):
        raise ValueError(f"cached frames {cached_frames} must precede the frames of this call {new_frames}")
    return _finish(b, mode, rule, window, cached_frames=tuple(cached_frames), writes=writes)


def layout_for_config(cfg, mode: str = "train", num_chunks: int | None = None, chunk: int = 1,
                      cached_frames: tuple = (), rule: str | None = None, window: int | None = None) -> SequenceLayout:
    """Build a layout from a DreamZeroConfig (see config.py). rule None: the config's `train_rule` for training,
    its `inference_rule` otherwise."""
    w = cfg.local_attn_size if window is None else window
    if mode == "train":
        return train_layout(cfg.frame_tokens, cfg.frames_per_chunk, cfg.actions_per_chunk, cfg.states_per_chunk,
                            cfg.max_chunks if num_chunks is None else num_chunks, w, rule or cfg.train_rule)
    return inference_layout(cfg.frame_tokens, cfg.frames_per_chunk, cfg.actions_per_chunk, cfg.states_per_chunk,
                            mode, chunk, tuple(cached_frames), w, rule or cfg.inference_rule)
