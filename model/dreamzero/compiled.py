"""The policy's compiled forward: DiT blocks under torch.compile, and each layout's whole forward as a CUDA graph.

Two switches of PolicyConfig (policy_config.py), usable alone or together:

compile (a torch.compile backend: 'inductor', 'aot_eager', ...)
    Every DiT block runs through ONE compiled function, whole (fullgraph=True: a graph break is an error, not a
    silent fallback) and with static shapes (dynamic=False). The blocks share its graphs: dynamo guards on the
    block's type and on the shapes of its parameters, not on which block it is, and the KV cache reaches the
    block as a one-layer view (`layer_view`: the cache object with its per-layer lists cut to that layer), so the
    layer index is not a constant of the graph either. So a model compiles once per layout (mode, cached frames,
    batch), whatever its depth: 40 blocks cost what one costs. `compile_blocks(model, backend)` does it in place
    (it sets each block's `forward`; `uncompile_blocks` restores them); model.blocks, state_dict and every
    attribute stay as they were.

graphs (a bool)
    `GraphedForward` runs each layout's forward from static buffers: the first call with a new key (layout,
    cache, context, input shapes) copies the inputs into buffers it owns and runs the forward on them (the
    warm-up: compilation, RoPE tables, attention schedules and kernel autotuning all happen here, outside any
    capture; on CUDA on a side stream); on CUDA it then rewinds the cache (`cache.rewind`), captures the same
    forward into a torch.cuda.CUDAGraph (one memory pool per GraphedForward) and replays it once. Every later call
    with that key copies the new inputs into the buffers, replays, and sets the cache's host state (`cache.frames`)
    to what the captured pass committed: the device side of commit (the fused cache's `write_pos`, a roll's
    copies) is in the graph, the host side is that tuple. Outputs are cloned out of the graph's memory, so a caller may keep
    them across replays (the sampler's history does). Inputs: every tensor argument of the model's forward
    except `context_kv`, which the graphs read in place (its tensors are fixed per instruction); a new context or
    a new cache object gets new graphs (`clear()` drops the old ones).
    On a CPU the same static-buffer path runs without capture (each replay is a plain call on the buffers): no
    speed-up, but the path the GPU takes, buffers, rewinds and host state included, is exercised by the tests.
    A pass that cannot be rewound (a 'roll' cache evicting frames) runs uncaptured. A capture that fails (an op
    that is not capturable) falls back to the uncaptured path for that key, with a warning and the reason in
    `stats["capture_errors"]`.

`stats`: compile_s (wall time of each key's warm-up forward: tracing, compilation and one run), capture_s
(capture and the first replay), graphs (keys captured), replays.
"""
from __future__ import annotations

import copy
import time
import types
import warnings

import torch

__all__ = ["compile_blocks", "uncompile_blocks", "compiled_backend", "layer_view", "GraphedForward",
           "RECOMPILE_LIMIT"]

# Graphs one compiled block function may hold: one per layout, batch and op set in use (a control step uses two
# layouts; a benchmark of every Table-1 row about ten). torch's default (8) would send the rest to eager.
RECOMPILE_LIMIT = 64

_COMPILED: dict = {}


def _block_call(block, x, e0, cos, sin, layout, ctx_kv, ops, cache, layer):
    """The one function every block runs through when compiled (its code object holds the graphs)."""
    return type(block).forward(block, x, e0, cos, sin, layout, ctx_kv, ops, cache, layer)


def _compiled_fn(backend: str):
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_block_call, fullgraph=True, dynamic=False, backend=backend)
    return _COMPILED[backend]


def layer_view(cache, layer: int):
    """The cache as seen by one layer: a shallow copy whose per-layer lists (k, v, and the FP8 scales of a fused
    cache: every list attribute with one entry per layer) hold only that layer's entry, and num_layers = 1, so the
    block calls it as layer 0. Host state (frames) and device state (write_pos) are shared with `cache`; the
    view's methods are the cache class's own, so the block computes exactly what it computes on the cache."""
    view = copy.copy(cache)
    n = cache.num_layers
    for name, value in vars(cache).items():
        if isinstance(value, list) and len(value) == n:
            setattr(view, name, [value[layer]])
    view.num_layers = 1
    return view


def _compiled_forward(block, x, e0, cos, sin, layout, ctx_kv, ops, cache=None, layer: int = 0):
    fn = _compiled_fn(block._dz_compile_backend)
    return fn(block, x, e0, cos, sin, layout, ctx_kv, ops, None if cache is None else layer_view(cache, layer), 0)


def compile_blocks(model, backend: str = "inductor") -> None:
    """Compile every DiT block of `model` through one shared function (module doc), in place. `backend`: a
    torch.compile backend ('inductor', 'aot_eager', ...). Compiling is lazy: each layout compiles at its first
    forward. Raises the process's dynamo recompile limit to at least RECOMPILE_LIMIT."""
    if not isinstance(backend, str) or backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"unknown torch.compile backend {backend!r}; known: "
                         f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}")
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < RECOMPILE_LIMIT:
        setattr(cfg, name, RECOMPILE_LIMIT)
    for blk in model.blocks:
        blk._dz_compile_backend = backend
        blk.forward = types.MethodType(_compiled_forward, blk)


def compiled_backend(model) -> str | None:
    """The backend the model's blocks are compiled with (compile_blocks), or None."""
    backends = {getattr(blk, "_dz_compile_backend", None) for blk in model.blocks}
    return backends.pop() if len(backends) == 1 else None


def uncompile_blocks(model) -> None:
    """Undo compile_blocks: the blocks run their own forward again (eager)."""
    for blk in model.blocks:
        if "forward" in vars(blk):
            del blk.forward
        vars(blk).pop("_dz_compile_backend", None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Entry:
    """One key's static buffers, its captured graph (None: replayed by a plain call) and the cache's host state
    before and after the pass."""

    def __init__(self, layout, cache, context_kv, static: dict, frames_before: tuple):
        self.layout, self.cache, self.context_kv = layout, cache, context_kv
        self.static = static
        self.frames_before = frames_before
        self.frames_after = None
        self.graph = None
        self.out = None


class GraphedForward:
    """The model's forward over static buffers, one CUDA graph per key (module doc). Call it as the model:
    `graphed(layout, cache=cache, context_kv=ctx, **inputs) -> (video, action)`."""

    def __init__(self, model, capture: bool | None = None):
        self.model = model
        p = next(model.parameters())
        self.device = p.device
        self.capture = (self.device.type == "cuda") if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA-graph capture needs the model on a CUDA device")
        self.entries: dict = {}
        self.pool = None
        self.stats = {"compile_s": 0.0, "capture_s": 0.0, "graphs": 0, "replays": 0, "capture_errors": []}

    def clear(self) -> None:
        """Drop every graph and buffer (a new instruction, first frame or cache)."""
        self.entries.clear()

    @staticmethod
    def _key(layout, cache, context_kv, inputs: dict) -> tuple:
        shapes = tuple((k, None if v is None else (tuple(v.shape), v.dtype, str(v.device)))
                       for k, v in sorted(inputs.items()) if not isinstance(v, (int, float, str)))
        return (layout, id(cache), id(context_kv), shapes)

    def __call__(self, layout, *, cache, context_kv, **inputs):
        if cache is None:
            raise ValueError("GraphedForward runs inference passes: pass the KV cache")
        key = self._key(layout, cache, context_kv, inputs)
        entry = self.entries.get(key)
        if entry is None:
            return self._first(key, layout, cache, context_kv, inputs)
        return self._replay(entry, cache, inputs)

    # ------------------------------------------------------------------ first call of a key
    def _run(self, entry: _Entry):
        return self.model(entry.layout, cache=entry.cache, context_kv=entry.context_kv, **entry.static)

    def _first(self, key, layout, cache, context_kv, inputs: dict):
        static = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        entry = _Entry(layout, cache, context_kv, static, tuple(cache.frames))
        t0 = time.perf_counter()
        if self.capture and self.device.type == "cuda":   # warm up on a side stream (cuBLAS/cuDNN state per stream)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._run(entry)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = self._run(entry)
        _sync(self.device)
        self.stats["compile_s"] += time.perf_counter() - t0
        if not self.capture:                  # later calls run the same forward on the buffers
            entry.frames_after = tuple(cache.frames)
            self.entries[key] = entry
            return self._outputs(out)
        try:
            cache.rewind(entry.frames_before)
        except ValueError:
            # the pass evicted frames (a 'roll' cache): it cannot run again from the same host state, so this key
            # is not kept; its warm-up result stands
            return self._outputs(out)
        t0 = time.perf_counter()
        try:
            self._capture(entry)
        except Exception as e:                # an op that cannot be captured: this key runs uncaptured
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self.stats["capture_errors"].append(reason)
            warnings.warn(f"CUDA-graph capture failed, this layout runs uncaptured: {reason}", stacklevel=4)
            _sync(self.device)
            cache.rewind(entry.frames_before)     # host and device state as before the pass, which runs again
            entry.graph, entry.out = None, self._run(entry)
            entry.frames_after = tuple(cache.frames)
            self.entries[key] = entry
            return self._outputs(entry.out)
        self.entries[key] = entry
        entry.graph.replay()                  # the capture ran nothing: this replay is the pass
        cache.frames = entry.frames_after
        _sync(self.device)
        self.stats["capture_s"] += time.perf_counter() - t0
        self.stats["graphs"] += 1
        return self._outputs(entry.out)

    def _capture(self, entry: _Entry) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(entry)
        entry.frames_after = tuple(entry.cache.frames)   # the host side of the captured commit
        entry.cache.frames = entry.frames_before         # not run yet: the replay runs it
        entry.graph, entry.out = graph, out

    # ------------------------------------------------------------------ later calls
    def _replay(self, entry: _Entry, cache, inputs: dict):
        if tuple(cache.frames) != entry.frames_before:
            raise RuntimeError(f"the cache holds frames {cache.frames}, the graph was captured at "
                               f"{entry.frames_before}")
        for k, v in inputs.items():
            s = entry.static[k]
            if isinstance(v, torch.Tensor):
                s.copy_(v)
            elif v is not s and v != s:
                raise ValueError(f"input {k!r} is {v!r}, the graph was captured with {s!r}")
        self.stats["replays"] += 1
        if entry.graph is None:
            entry.out = self._run(entry)
            return self._outputs(entry.out)
        entry.graph.replay()
        cache.frames = entry.frames_after
        return self._outputs(entry.out)

    @staticmethod
    def _outputs(out):
        return tuple(None if t is None else t.clone() for t in out)
