"""python -m dz_bench.tune NAME [--out DIR] [--budget-s S] [--small] [--max-candidates N] [--no-install] [--list]

Tuning sweeps: for each kernel family, time candidate launch configurations at the real shapes and write the
fastest into the family's config table (dz_kernels/configs/<family>.json, read by the kernels through
dz_kernels.configs). NAME: attention (attention:fwd / attention:bwd for one half), fp8, nvfp4, fused, kv_cache, or
all. Rows are printed the moment they are measured and appended to DIR/tune-<family>.rows.jsonl; the table goes to
DIR/<family>.json, and on a GPU (not --small) it is also installed into dz_kernels/configs/ of this checkout, so a
bench run after it (scripts/gpu_run.sh tune:attention bench:attention) measures the tuned kernels. Commit the tables
that come back (git diff dz_kernels/configs shows what the sweep changed).

Method, per candidate (the current default first, so every sweep has a baseline):
  1. correctness before speed: fresh random inputs, outputs poisoned with NaN beforehand, the candidate's result
     against a reference on the same inputs: relative L2 error within a bar. Tile and launch candidates are held
     to 1e-2 against the release's attention (bf16 SDPA per block), the plain-PyTorch fused chains, or, for the
     FP8 / NVFP4 GEMMs, the float64 product of the same quantized operands (so the bar measures the kernel, not
     the format); the FP8 quantizer to 1e-6 against its bit-exact reference; a choice between paths that compute
     in different formats (FP8 vs bf16) to 0.1 against the unquantized product. A wrong or NaN result is a "wrong"
     row and never wins; a config that does not compile or run is an "error" row;
  2. then the time: on CUDA the call is captured in a CUDA graph when it can be (host overhead out, as in the
     model's CUDA-graph runs) and replayed under the harness's timer (CUDA events, L2 flushed before each call, at
     least 5 samples, median and p20-p80); a candidate that cannot be captured is timed eagerly (timer says so);
  3. the winner is the fastest "ok" candidate, unless it beats the default by less than MIN_GAIN (2%): then the
     default is kept (differences that small are within the run-to-run spread). Every written entry says where
     it was measured (device, commit, date) and the winner's and the default's times.
--budget-s bounds the whole run: no candidate starts after the deadline (the rest are "skipped" rows), and the
winners among what was measured are still written. Each family also has its own cap (CAPS_S: attention 170 s,
forward and backward together; fp8 90 s, nvfp4 60 s, fused 50 s, kv_cache 30 s): candidates are ordered so that
the decisions that matter most run first (the default, then the dq pass, then tiles), since each candidate
compiles once (a few seconds on the GPU machine) and is timed for about 0.1 s.

--small: every sweep end to end at tiny shapes (on a CPU in the Triton interpreter; its timings are not speeds),
the table written to DIR only, never installed. --max-candidates N keeps the first N candidates of each sweep.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Callable

FAMILIES = ("attention", "fp8", "nvfp4", "fused", "kv_cache")
NAMES = FAMILIES + ("attention:fwd", "attention:bwd", "all")
MIN_GAIN = 0.02
# seconds each family's sweep may take at most (attention: forward 45% / backward 55%); a run of several families
# splits what is left in proportion to these. Sized from the first H200 run's compile times (a few seconds per
# kernel variant) and the default candidate lists below.
CAPS_S = {"attention": 170.0, "fp8": 90.0, "nvfp4": 60.0, "fused": 50.0, "kv_cache": 30.0}
BF16_BAR = 1e-2


# ------------------------------------------------------------------------------------------------------ run state
@dataclasses.dataclass
class Tuner:
    device: str
    small: bool
    out: str
    deadline: float
    arch: str
    max_candidates: int | None = None
    echo: bool = True
    rows: list = dataclasses.field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.time()

    def bench_ctx(self):
        from dz_bench.harness import BenchContext

        ctx = BenchContext(device=self.device, small=self.small)
        ctx.rep_ms, ctx.warmup_ms, ctx.cpu_max_reps, ctx.cpu_budget_s = 40.0, 5.0, 5, 0.05
        return ctx

    def sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


@dataclasses.dataclass
class Row:
    family: str
    sweep: str
    case: str
    candidate: str
    config: dict
    status: str = "ok"          # ok / wrong / error / skipped
    err: float | None = None
    bar: float | None = None
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    samples: int | None = None
    first_call_s: float | None = None
    timer: str | None = None
    note: str | None = None


def _emit(t: Tuner, row: Row) -> None:
    t.rows.append(row)
    d = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)     # strict JSON: "inf", not Infinity
         for k, v in dataclasses.asdict(row).items()}
    path = os.path.join(t.out, f"tune-{row.family}.rows.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(d, default=str) + "\n")
    if t.echo:
        parts = [f"{row.family}/{row.sweep}/{row.case}/{row.candidate}: {row.status}"]
        if row.median_ms is not None:
            parts.append(f"{row.median_ms:.4g} ms (p20-p80 {row.p20_ms:.4g}-{row.p80_ms:.4g}, n={row.samples})")
        if row.err is not None:
            parts.append(f"err {row.err:.2e} (bar {row.bar:.1e})")
        if row.first_call_s is not None and row.first_call_s > 2:
            parts.append(f"first call {row.first_call_s:.1f} s")
        if row.note:
            parts.append(row.note)
        print("  " + ", ".join(parts), flush=True)


def _name(config: dict, reference: dict | None = None) -> str:
    """The fields of config that differ from reference ("default" when none do)."""
    diff = {k: v for k, v in config.items() if reference is None or reference.get(k) != v}
    return ",".join(f"{k}={v}" for k, v in diff.items()).replace(" ", "") or "default"


def rel_err(ref, out) -> float:
    """max over tensors of ||out - ref|| / ||ref|| in float64; inf when out has a NaN or Inf (unwritten memory)."""
    import torch

    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    outs = out if isinstance(out, (list, tuple)) else [out]
    worst = 0.0
    for r, o in zip(refs, outs):
        o64, r64 = o.detach().double(), r.detach().double()
        if not torch.isfinite(o64).all():
            return math.inf
        worst = max(worst, ((o64 - r64).norm() / r64.norm().clamp_min(1e-30)).item())
    return worst


@contextlib.contextmanager
def poisoned_outputs():
    """Every output buffer the kernels allocate comes filled with NaN (memory a config forgets to write fails): the
    shared hook of dz_kernels._common.empty (quant, fused, kv_cache) and the attention launchers' own."""
    import torch

    from dz_kernels.attention import poison_outputs as poison_attention
    from dz_kernels.testing import poison_outputs

    with poison_outputs(), poison_attention(), torch.no_grad():
        yield


def measure(t: Tuner, fn: Callable[[], Any]) -> tuple:
    """(median, p20, p80, samples, timer) of fn, replayed from a CUDA graph where it can be captured."""
    from dz_bench.harness import time_fn

    if t.device != "cuda":   # the interpreter: one call shows the sweep runs end to end; it is not a speed
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms, 1, "perf_counter (interpreter, 1 call: not a speed)"
    import torch

    run, suffix = fn, "+graph"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as e:  # timed eagerly; the row's timer says so
        torch.cuda.synchronize()
        suffix = f"+eager (graph capture failed: {type(e).__name__})"
    median, p20, p80, n, timer = time_fn(run, t.bench_ctx())
    return median, p20, p80, n, timer + suffix


def run_candidates(t: Tuner, family: str, sweep: str, case: str, candidates: list,
                   prepare: Callable[[dict, int], tuple], bar: float = BF16_BAR,
                   reference_config: dict | None = None, note: Callable[[dict], str] | None = None) -> list:
    """Check then time each candidate config (the default first). prepare(config, seed) -> (fn, reference):
    fn() runs the operation with that config and returns its output; reference is what it must equal (computed
    from the same fresh inputs); the relative error must be within `bar`. Rows are named by the fields that differ
    from reference_config (default: the first candidate); note(config) adds a remark to a row."""
    reference_config = candidates[0] if reference_config is None and candidates else reference_config
    if t.max_candidates is not None:
        candidates = candidates[:t.max_candidates]
    rows = []
    for i, cfg in enumerate(candidates):
        row = Row(family, sweep, case, _name(cfg, reference_config), dict(cfg))
        if t.left() <= 0:
            row.status, row.note = "skipped", "the tuning budget was spent before this candidate"
            _emit(t, row)
            rows.append(row)
            continue
        try:
            fn, reference = prepare(cfg, 1000 + i)
            t0 = time.perf_counter()
            with poisoned_outputs():
                out = fn()
                t.sync()
            row.first_call_s = time.perf_counter() - t0
            row.err = rel_err(reference, out)
            del out, reference
            row.bar = bar
            if note is not None:
                row.note = note(cfg)
            if not row.err <= row.bar:
                row.status = "wrong"
            else:
                row.median_ms, row.p20_ms, row.p80_ms, row.samples, row.timer = measure(t, fn)
            del fn
        except Exception as e:
            row.status = "error"
            row.note = traceback.format_exception_only(type(e), e)[-1].strip()[:400]
        finally:
            if t.device == "cuda":
                import torch

                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        _emit(t, row)
        rows.append(row)
    return rows


def pick(rows: list):
    """(winner row, default row) of a sweep: the fastest ok row unless it beats the default (rows[0]) by less than
    MIN_GAIN; None when nothing ran ok."""
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return None, None
    best = min(ok, key=lambda r: r.median_ms)
    default = rows[0] if rows and rows[0].status == "ok" else None
    if default is not None and best.median_ms > default.median_ms * (1 - MIN_GAIN):
        best = default
    return best, default


def _source(t: Tuner, case: str, best, default) -> str:
    from dz_bench.harness import BenchContext, commit, device_name

    dev = device_name(BenchContext(device=t.device, small=t.small))
    day = datetime.date.today().isoformat()
    vs = f" vs default {default.median_ms:.4g} ms" if default is not None else " (the default did not run ok)"
    return f"python -m dz_bench.tune on {dev}, {day}, commit {commit()[:12]}: {case} {best.median_ms:.4g} ms{vs}"


def _entry(t: Tuner, match: dict, config: dict, case: str, best, default) -> dict:
    return {"match": match, "config": config, "source": _source(t, case, best, default),
            "measured": {"case": case, "median_ms": best.median_ms, "default_ms": default.median_ms if default else None,
                         "p20_ms": best.p20_ms, "p80_ms": best.p80_ms, "samples": best.samples}}


# ------------------------------------------------------------------------------------------------------ tables
def write_table(t: Tuner, family: str, entries: dict, install: bool) -> str | None:
    """Merge {kind: [entries]} into the family's table for t.arch; write DIR/<family>.json and, with install,
    dz_kernels/configs/<family>.json. Returns the written path (None when nothing was measured)."""
    from dz_kernels import configs

    entries = {k: v for k, v in entries.items() if v}
    if not entries:
        print(f"  {family}: no candidate ran ok; no table written", flush=True)
        return None
    table = configs.table(family)
    for kind, new in entries.items():
        table = configs.merge_entries(table, t.arch, kind, new)
    configs.validate_table(table, family)
    text = configs.dumps(table)
    path = os.path.join(t.out, f"{family}.json")
    with open(path, "w") as f:
        f.write(text)
    print(f"  {family}: table written to {path}", flush=True)
    if install:
        dest = configs.table_path(family, directory=os.path.dirname(configs.__file__))
        tmp = dest + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, dest)
        configs.reload()
        print(f"  {family}: installed into {dest}", flush=True)
    return path


# ------------------------------------------------------------------------------------------------------ attention
def _attn_shapes(t: Tuner):
    """{mode: (name, layout, B, H, D)}: training mask (B=1) and the control step (B=2, the CFG branches)."""
    from dreamzero.config import get_config
    from dreamzero.layout import inference_layout, layout_for_config

    if t.small:
        return {"train": ("train-tiny", layout_for_config(get_config("tiny"), "train", num_chunks=2), 1, 2, 16),
                "infer": ("control-tiny", inference_layout(6, 2, 3, 1, "control", 3, (0, 1, 2)), 1, 2, 16)}
    cfg = get_config("droid-14b")
    return {"train": ("train-droid-14b-B1", layout_for_config(cfg, "train"), 1, cfg.num_heads, cfg.head_dim),
            "infer": ("control-droid-14b-B2", layout_for_config(cfg, "control", chunk=5,
                                                                cached_frames=tuple(range(7))), 2,
                      cfg.num_heads, cfg.head_dim)}


def _attn_inputs(t, lay, B, H, D, seed, grad=False):
    import torch

    g = torch.Generator(device=t.device).manual_seed(seed)
    return [torch.randn(B, n, H, D, device=t.device, generator=g).to(torch.bfloat16)
            for n in (lay.q_len, lay.k_len, lay.k_len)]


def _attn_config(base, **changes):
    """A TileConfig field dict: base with changes."""
    d = dict(base)
    d.update(changes)
    return d


def fwd_candidates(t: Tuner, default: dict) -> list:
    if t.small:
        return [default, _attn_config(default, fwd=[16, 32], heads_first=True)]
    grid = [(128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
            (64, 128, 4, 3)]
    return [default] + [_attn_config(default, fwd=[m, n], fwd_warps=w, fwd_stages=s) for m, n, w, s in grid]


def bwd_dkv_candidates(t: Tuner, default: dict) -> list:
    base = _attn_config(default, atomic_dq=False)
    if t.small:
        return [base, _attn_config(base, dkv=[16, 32])]
    grid = [(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2)]
    return [base] + [_attn_config(base, dkv=[m, n], bwd_warps=w, bwd_stages=s) for m, n, w, s in grid]


def bwd_dq_candidates(t: Tuner, base: dict) -> list:
    if t.small:
        return [base, _attn_config(base, dq=[32, 16])]
    grid = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
    return [base] + [_attn_config(base, dq=[m, n], dq_warps=w, dq_stages=s) for m, n, w, s in grid]


def _tile_stats(lay, cfg: dict) -> str:
    """Schedule facts of the forward tiles on this layout (host, exact): full / partial tiles visited, and the
    useful fraction of the visited tiles' score entries (visible pairs over visited tiles x BLOCK_M x BLOCK_N)."""
    import dz_kernels.attention as attn

    bm, bn = cfg["fwd"]
    c = attn.schedule_for(lay, bm, bn).counts()
    visited = c["full"] + c["partial"]
    useful = lay.visible_pairs() / max(1, visited * bm * bn)
    return f"tiles {bm}x{bn}: {c['full']} full + {c['partial']} partial visited, {useful:.0%} of their entries visible"


def _default_tiles(t: Tuner, D: int, mode: str) -> dict:
    """The current default TileConfig (the table's on a GPU, the interpreter's on a CPU) as a JSON-able dict."""
    import torch

    from dz_kernels.attention import default_config

    d = dataclasses.asdict(default_config(torch.device(t.device), torch.bfloat16, D, mode))
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    d["dq_warps"] = d["dq_warps"] or d["bwd_warps"]
    d["dq_stages"] = d["dq_stages"] or d["bwd_stages"]
    return d


def tune_attention(t: Tuner, parts=("fwd", "bwd")) -> dict:
    """Forward at the training mask (mode train) and the control step (mode infer), then the backward at the
    training mask: dk/dv tiles (with the separate dq pass), dq tiles, then atomic dq and the grid order."""
    import torch

    import dz_kernels.attention as attn
    from dreamzero.attention import attention_blockwise as attn_ref
    from dz_kernels.attention import TileConfig

    shapes = _attn_shapes(t)
    entries = {"tiles": []}
    start, budget, deadline_all = time.time(), max(t.left(), 0.0), t.deadline
    fwd_share = 0.45 if "bwd" in parts else 1.0

    def prepare_fwd(lay, B, H, D):
        def prepare(cfg, seed):
            tc = TileConfig.from_dict(cfg)
            tc.validate()
            q, k, v = _attn_inputs(t, lay, B, H, D, seed)
            ref = attn_ref(q, k, v, lay)
            # sdpa_blocks > 1: the op's per-block SDPA dispatch (what the control step runs with that setting)
            dense = tc.sdpa_blocks > 1
            return (lambda: attn.layout_attention(q, k, v, lay, config=tc, dense_sdpa=dense)), ref
        return prepare

    train_rows = []
    if "fwd" in parts:
        t.deadline = min(deadline_all, start + fwd_share * budget)
        for mode in ("train", "infer"):
            name, lay, B, H, D = shapes[mode]
            default = _default_tiles(t, D, mode)
            cands = fwd_candidates(t, default)
            if mode == "infer" and train_rows and not t.small:   # the train sweep's best five, then the default
                ranked = sorted((r for r in train_rows if r.status == "ok"), key=lambda r: r.median_ms)
                cands = [default] + [dict(default, **{k: r.config[k] for k in ("fwd", "fwd_warps", "fwd_stages")})
                                     for r in ranked[:5]]
                cands = [c for i, c in enumerate(cands) if c not in cands[:i]]
            stats = (lambda cfg, lay=lay: _tile_stats(lay, cfg))
            rows = run_candidates(t, "attention", f"fwd-{mode}", name, cands, prepare_fwd(lay, B, H, D), note=stats)
            best, _ = pick(rows)
            if best is not None and not t.small:     # then the two launch options on the winner
                extra = [_attn_config(best.config, heads_first=True), _attn_config(best.config, fwd_ws=True)]
                rows += run_candidates(t, "attention", f"fwd-{mode}-options", name, extra, prepare_fwd(lay, B, H, D),
                                       reference_config=default)
            if mode == "train":
                train_rows = rows
            best, dflt = pick(rows)
            if best is not None and mode == "infer":   # the kernel's best against one SDPA call per dense block
                sdpa = run_candidates(t, "attention", "fwd-infer-dispatch", name,
                                      [_attn_config(best.config, sdpa_blocks=2)], prepare_fwd(lay, B, H, D),
                                      reference_config=default)
                if sdpa[0].status == "ok" and sdpa[0].median_ms < best.median_ms:
                    best = sdpa[0]
            if best is not None:
                keep = {k: best.config[k] for k in ("fwd", "fwd_warps", "fwd_stages", "heads_first", "fwd_ws",
                                                    "sdpa_blocks")}
                entries["tiles"].append(_entry(t, {"head_dim": D, "dtype": "bfloat16", "mode": mode}, keep,
                                               f"fwd {name}", best, dflt))

    if "bwd" in parts:
        t.deadline = deadline_all
        name, lay, B, H, D = shapes["train"]
        default = _default_tiles(t, D, "train")
        train_fwd = [e for e in entries["tiles"] if e["match"].get("mode") == "train"]
        if train_fwd:          # the forward this sweep just chose runs under every backward candidate
            default.update(train_fwd[0]["config"])

        def prepare_bwd(cfg, seed):
            # forward + backward through the public op (the forward fixed across the backward candidates): what a
            # training step runs, and what the bench's train/fwd+bwd case times
            tc = TileConfig.from_dict(cfg)
            tc.validate()
            q, k, v = (x.requires_grad_() for x in _attn_inputs(t, lay, B, H, D, seed))
            dout = torch.randn(q.shape, device=t.device, generator=torch.Generator(device=t.device)
                               .manual_seed(seed + 1)).to(torch.bfloat16)
            with torch.enable_grad():
                ref = torch.autograd.grad(attn_ref(q, k, v, lay), (q, k, v), dout)

            def run():
                with torch.enable_grad():
                    out = attn.layout_attention(q, k, v, lay, config=tc, dense_sdpa=False)
                    return torch.autograd.grad(out, (q, k, v), dout)
            return run, ref

        def sweep(label, cands):
            return run_candidates(t, "attention", label, name, cands, prepare_bwd, reference_config=default)

        rows = sweep("bwd-default", [default])                 # the current default (atomic dq) is the baseline
        rows += sweep("bwd-dkv", bwd_dkv_candidates(t, default))
        best, _ = pick(rows[1:])
        base = best.config if best is not None else _attn_config(default, atomic_dq=False)
        rows += sweep("bwd-dq", bwd_dq_candidates(t, base)[1:])
        best, _ = pick(rows[1:])
        base = best.config if best is not None else base
        more = [_attn_config(base, atomic_dq=True)]
        if not t.small:
            more.append(_attn_config(base, heads_first=not base.get("heads_first", False)))
        rows += sweep("bwd-atomic-and-order", more)
        best, dflt = pick(rows)
        if best is not None:
            keep = {k: best.config[k] for k in ("dkv", "dq", "bwd_warps", "bwd_stages", "dq_warps", "dq_stages",
                                                "atomic_dq", "heads_first")}
            if train_fwd:      # the backward's fields join the forward's train entry (one entry per key)
                train_fwd[0]["config"].update(keep)
                train_fwd[0]["source"] += "; backward: " + _source(t, f"fwd+bwd {name}", best, dflt)
                train_fwd[0]["measured_bwd"] = _entry(t, {}, {}, f"fwd+bwd {name}", best, dflt)["measured"]
            else:
                entries["tiles"].append(_entry(t, {"head_dim": D, "dtype": "bfloat16", "mode": "train"}, keep,
                                               f"fwd+bwd {name}", best, dflt))
    t.deadline = deadline_all
    return entries


# ------------------------------------------------------------------------------------------------------ quant
def _linear_inputs(t, M, K, N, seed):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(t.device, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(t.device, torch.bfloat16)
    b = (0.1 * torch.randn(N, generator=g)).to(t.device, torch.bfloat16)
    return x, w, b


def _quant_shapes(t: Tuner, small_m: bool):
    if t.small:
        return [(128, 128)], ([1, 16] if small_m else [48])
    return [(5120, 5120), (5120, 13824), (13824, 5120)], ([1, 16] if small_m else [1785, 3570])


def _m_entries(t, kind_rows: dict, make_match, keep: Callable[[dict], dict]) -> list:
    """Entries for one kind from {(k, n): {m: (best, default, case)}}: one per measured m, m_max = m in ascending
    order, the largest m's also as the catch-all of its (k, n)."""
    out = []
    for (K, N), by_m in kind_rows.items():
        ms = sorted(by_m)
        for j, m in enumerate(ms):
            best, dflt, case = by_m[m]
            if best is None:
                continue
            match = make_match(K, N)
            if j < len(ms) - 1:
                match["m_max"] = m
            out.append(_entry(t, match, keep(best.config), case, best, dflt))
    return out


GEMM_GRID = [  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
    (128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 3),
    (64, 256, 128, 8, 8, 3),
]
GEMM_SMALL_M = [(16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 4), (64, 64, 128, 1, 4, 4)]


def _gemm_configs(t, M):
    if t.small:
        return [{"autotune": True}, dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"),
                                             (16, 64, 64, 2, 1, 1)))]
    grid = GEMM_SMALL_M if M <= 64 else GEMM_GRID
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    return [{"autotune": True}] + [dict(zip(keys, g)) for g in grid]


def tune_fp8(t: Tuner) -> dict:
    import torch
    import torch.nn.functional as F

    from dz_kernels import configs
    from dz_kernels.quant import ops as fp8, quantize_fp8_rowwise
    from dz_kernels.quant.dispatch import scaled_mm_linear
    from dz_kernels.quant.reference import fp8_gemm_reference, quantize_fp8_reference

    entries = {"gemm": [], "quant_rows": [], "linear_path": []}
    shapes, ms = _quant_shapes(t, small_m=False)
    _, small_ms = _quant_shapes(t, small_m=True)
    gemm_best, path_best = {}, {}
    stop = time.time() + 0.8 * t.left()
    for K, N in shapes:
        # one decode-like M (the entry also serves smaller M: entries match m_max ascending), the chunk shapes
        for M in small_ms[-1:] + ms[:2]:
            if time.time() > stop:
                break
            case = f"fp8-linear/M{M}-K{K}-N{N}"

            def prepare_gemm(cfg, seed, M=M, K=K, N=N):
                # the reference: the float64 product of the quantized operands (the quantizers are bit-exact with
                # reference.py), so the bar measures the GEMM's own accumulation and output rounding
                x, w, b = _linear_inputs(t, M, K, N, seed)
                qw, sw = quantize_fp8_rowwise(w)
                qa, sa = quantize_fp8_reference(x, "row")
                ref = fp8_gemm_reference(qa, sa, qw, sw, bias=b, out_dtype=None, compute_dtype=torch.float64)

                def run():
                    with configs.forced("fp8", "gemm", cfg):
                        return fp8.fp8_linear(x, qw, sw.reshape(-1), b)
                return run, ref

            rows = run_candidates(t, "fp8", "gemm", case, _gemm_configs(t, M), prepare_gemm)
            best, dflt = pick(rows)
            gemm_best.setdefault((K, N), {})[M] = (best, dflt, case)

            # the path: our FP8 GEMM (at its best config), our quantizer + cuBLAS FP8, bf16 cuBLAS
            gcfg = best.config if best is not None else {"autotune": True}

            def prepare_path(cfg, seed, M=M, K=K, N=N, gcfg=gcfg):
                x, w, b = _linear_inputs(t, M, K, N, seed)
                qw, sw = quantize_fp8_rowwise(w)
                ref = x.float() @ w.float().t() + b.float()
                path = cfg["path"]
                if path == "bf16":
                    return (lambda: F.linear(x, w, b)), ref
                if path == "scaled_mm":
                    if t.device != "cuda" and not t.small:
                        raise RuntimeError("scaled_mm is timed on CUDA")
                    return (lambda: scaled_mm_linear(x, qw, sw.reshape(-1), b, torch.bfloat16)), ref

                def run():
                    with configs.forced("fp8", "gemm", gcfg):
                        return fp8.fp8_linear(x, qw, sw.reshape(-1), b)
                return run, ref

            # against the unquantized product: FP8's own error (about 4e-2 relative) is inside the bar
            prow = run_candidates(t, "fp8", "path", case, [{"path": "triton"}, {"path": "scaled_mm"},
                                                            {"path": "bf16"}], prepare_path, bar=0.1)
            # the path is a choice of function, not of tiles: the fastest wins outright (no default margin)
            ok = [r for r in prow if r.status == "ok"]
            pbest = min(ok, key=lambda r: r.median_ms) if ok else None
            path_best.setdefault((K, N), {})[M] = (pbest, prow[0] if prow[0].status == "ok" else None, case)

    def gemm_match(K, N):
        return {"block_scaled": False, "n": N, "k": K}

    entries["gemm"] = _m_entries(t, gemm_best, gemm_match, lambda c: c)
    entries["linear_path"] = _m_entries(t, path_best, gemm_match, lambda c: c)

    # the activation quantizer alone, at the widest K (one entry per K measured)
    for K in sorted({k for k, _ in shapes}):
        M = ms[1] if len(ms) > 1 else ms[0]
        case = f"quant-rows/M{M}-K{K}"
        cands = [{"BLOCK_M": 4, "BLOCK_K": 1024, "num_warps": 4}]
        if not t.small:
            cands += [{"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": w}
                      for bm, bk, w in ((1, 2048, 4), (2, 1024, 4), (4, 2048, 8), (8, 1024, 8), (1, 8192, 8),
                                        (2, 4096, 8), (16, 512, 8))]

        def prepare_q(cfg, seed, M=M, K=K):
            x, _, _ = _linear_inputs(t, M, K, 16, seed)
            rq, rs = quantize_fp8_reference(x, "row")

            def run():
                with configs.forced("fp8", "quant_rows", cfg):
                    q, s = quantize_fp8_rowwise(x)
                return [q.float() * s, s]
            return run, [rq.float() * rs, rs]

        rows = run_candidates(t, "fp8", "quant_rows", case, cands, prepare_q, bar=1e-6)
        best, dflt = pick(rows)
        if best is not None:
            entries["quant_rows"].append(_entry(t, {"k": K}, best.config, case, best, dflt))
    return entries


def tune_nvfp4(t: Tuner) -> dict:
    """The split-K kernel's tiles at decode-like M, then which W4A16 path runs per shape: split-K (at its best),
    dequant + dense GEMM, or the tiled kernel, at the largest decode-like M and at the chunk M."""
    import torch

    from dz_kernels import configs
    from dz_kernels.quant import ops as nvfp4
    from dz_kernels.quant import reference as fmt

    entries = {"splitk": [], "w4a16_path": []}
    shapes, ms = _quant_shapes(t, small_m=False)
    _, small_ms = _quant_shapes(t, small_m=True)
    split_best, path_best = {}, {}

    def prepare(path, M, K, N, splitk_cfg=None):
        def prep(cfg, seed):
            _, w, b = _linear_inputs(t, 1, K, N, seed)
            wq, ws, wg = nvfp4.quantize_nvfp4(w)
            x, _, _ = _linear_inputs(t, M, K, 16, seed + 7)
            ref = fmt.nvfp4_gemm_w4a16_reference(x, wq, ws, wg, bias=b, out_dtype=None,
                                                 compute_dtype=torch.float64)
            p = cfg.get("path", path)
            sk = splitk_cfg if "path" in cfg else cfg

            def run():
                with configs.forced("nvfp4", "w4a16_path", {"path": p}), \
                        configs.forced("nvfp4", "splitk", sk or {}):
                    return nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg, bias=b)
            return run, ref
        return prep

    splitk_default = configs.table("nvfp4")["defaults"]["splitk"][-1]["config"]
    stop = time.time() + 0.7 * t.left()
    for K, N in shapes:
        for M in small_ms:
            if time.time() > stop:
                break
            case = f"nvfp4-w4a16/M{M}-K{K}-N{N}"
            cands = [dict(splitk_default)]
            if t.small:
                cands.append(dict(splitk_default, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2))
            else:
                cands += [dict(splitk_default, BLOCK_N=bn, BLOCK_K=bk, waves=wv, num_warps=w, num_stages=s)
                          for bn, bk, wv, w, s in ((64, 256, 4, 4, 3), (128, 128, 4, 4, 3), (32, 256, 4, 4, 3),
                                                   (64, 128, 8, 4, 4), (128, 256, 2, 8, 3))]
            rows = run_candidates(t, "nvfp4", "splitk", case, cands, prepare("splitk", M, K, N))
            split_best.setdefault((K, N), {})[M] = (*pick(rows), case)
    for K, N in shapes:
        for M in small_ms[-1:] + ms[:1]:
            if t.left() <= 0:
                break
            case = f"nvfp4-w4a16/M{M}-K{K}-N{N}"
            sb = split_best.get((K, N), {}).get(small_ms[-1], (None,))[0]
            sk = sb.config if sb is not None else dict(splitk_default)
            paths = ["splitk", "dequant", "tiled"] if M in small_ms else ["dequant", "tiled"]
            rows = run_candidates(t, "nvfp4", "path", case, [{"path": p} for p in paths],
                                  prepare("splitk", M, K, N, splitk_cfg=sk))
            ok = [r for r in rows if r.status == "ok"]       # a choice of function: the fastest wins outright
            if ok:
                win = min(ok, key=lambda r: r.median_ms)
                path_best.setdefault((K, N), {})[M] = (win, rows[0] if rows[0].status == "ok" else None, case)

    def match(K, N):
        return {"n": N, "k": K}

    entries["splitk"] = _m_entries(t, split_best, match, lambda c: c)
    entries["w4a16_path"] = _m_entries(t, path_best, match, lambda c: c)
    return entries


# ------------------------------------------------------------------------------------------------------ fused
def _fused_rows(t):
    if t.small:
        return 256, 512, [(1, 64)], [(1, 64)]
    return 5120, 13824, [(2, 1785)], [(1, 15940)]


def tune_fused(t: Tuner) -> dict:
    import torch

    import dz_kernels.fused as fz
    from dz_kernels import configs

    C, FF, infer, train = _fused_rows(t)
    block_c = 1 << (C - 1).bit_length()
    entries = {"row_fwd": [], "row_bwd": [], "elementwise": []}
    dt = torch.bfloat16

    def rnd(shape, seed, scale=1.0):
        g = torch.Generator(device=t.device).manual_seed(seed)
        return (scale * torch.randn(shape, device=t.device, generator=g)).to(dt)

    def fwd_prep(kind, op, B, L, width):
        def prep(cfg, seed):
            if op == "layernorm_modulate":
                args = [rnd((B, L, C), seed), rnd((B, L, C), seed + 1, 0.5), rnd((B, L, C), seed + 2, 0.5)]
                fn, ref = (lambda a: fz.layernorm_modulate(*a, 1e-6)), \
                    (lambda a: fz.layernorm_modulate_reference(*[x.float() for x in a], 1e-6))
            elif op == "gelu_tanh":
                args = [rnd((B, L, width), seed, 2.0)]
                fn, ref = (lambda a: fz.gelu_tanh(*a)), (lambda a: fz.gelu_tanh_reference(a[0].float()))
            else:  # gated_residual
                args = [rnd((B, L, C), seed), rnd((B, L, C), seed + 1), rnd((B, L, C), seed + 2, 0.5)]
                fn, ref = (lambda a: fz.gated_residual(*a)), \
                    (lambda a: fz.gated_residual_reference(*[x.float() for x in a]))

            def run():
                with configs.forced("fused", kind, cfg):
                    return fn(args)
            return run, ref(args)
        return prep

    def bwd_prep(kind, B, L):
        def prep(cfg, seed):
            x = rnd((B, L, C), seed).requires_grad_()
            sh, sc = (rnd((B, L, C), seed + i, 0.5).requires_grad_() for i in (1, 2))
            g = rnd((B, L, C), seed + 3)
            with torch.enable_grad():
                ref = torch.autograd.grad(fz.layernorm_modulate_reference(x.double(), sh.double(), sc.double(), 1e-6),
                                          (x, sh, sc), g.double())
                with configs.forced("fused", kind, cfg):
                    out = fz.layernorm_modulate(x, sh, sc, 1e-6)

            def run():
                with torch.enable_grad(), configs.forced("fused", kind, cfg):
                    return torch.autograd.grad(out, (x, sh, sc), g, retain_graph=True)
            return run, ref
        return prep

    tables = configs.table("fused")["defaults"]

    def default_of(kind, **key):
        return configs.lookup("fused", kind, "cpu", **key).config

    # row kernels, forward (key block_c): LayerNorm + modulate at the inference and training shapes
    fwd_default = default_of("row_fwd", block_c=block_c)
    warps = [2, 4] if t.small else [4, 8, 16, 32]
    cands = [fwd_default] + [{"num_warps": w} for w in warps if w != fwd_default["num_warps"]]
    agg = {}
    for B, L in infer + train:
        case = f"layernorm_modulate/fwd/{B}x{L}"
        for r in run_candidates(t, "fused", "row_fwd", case, cands, fwd_prep("row_fwd", "layernorm_modulate", B, L,
                                                                           C), bar=BF16_BAR):
            agg.setdefault(r.candidate, []).append(r)
    best, dflt = _pick_sum(agg)
    if best is not None:
        entries["row_fwd"].append(_entry(t, {"block_c": block_c}, best.config, "layernorm_modulate/fwd (sum over "
                                         "shapes)", best, dflt))

    # row kernels, backward: warps and reduction programs at the training shape
    bwd_default = default_of("row_bwd", block_c=block_c)
    cands = [bwd_default]
    if t.small:
        cands.append({"num_warps": 2, "programs_per_sm": 2})
    else:
        cands += [{"num_warps": w, "programs_per_sm": p} for w, p in ((16, 4), (8, 4), (32, 2), (16, 2), (32, 8),
                                                                      (16, 8))]
    B, L = train[0]
    rows = run_candidates(t, "fused", "row_bwd", f"layernorm_modulate/bwd/{B}x{L}", cands, bwd_prep("row_bwd", B, L),
                          bar=BF16_BAR)
    best, dflt = pick(rows)
    if best is not None:
        entries["row_bwd"].append(_entry(t, {"block_c": block_c}, best.config, f"layernorm_modulate/bwd/{B}x{L}",
                                         best, dflt))

    # elementwise kernels: GELU (FFN width) and the gated residual, forward, at both shapes
    ew_default = tables["elementwise"][-1]["config"]
    cands = [ew_default] + ([{"BLOCK": 512, "num_warps": 2}] if t.small else
                            [{"BLOCK": b, "num_warps": w} for b, w in ((2048, 4), (2048, 8), (4096, 8), (512, 4),
                                                                       (8192, 16))])
    for op, width in (("gelu_tanh", FF), ("gated_residual", C)):
        agg = {}
        for B, L in infer + train:
            case = f"{op}/fwd/{B}x{L}"
            for r in run_candidates(t, "fused", f"elementwise-{op}", case, cands,
                                    fwd_prep("elementwise", op, B, L, width), bar=BF16_BAR):
                agg.setdefault(r.candidate, []).append(r)
        best, dflt = _pick_sum(agg)
        if best is not None:
            for direction in ("fwd", "bwd"):   # the backward kernels share the forward's memory pattern
                entries["elementwise"].append(_entry(t, {"op": f"{op}_{direction}"}, best.config,
                                                     f"{op}/fwd (sum over shapes)", best, dflt))
    return entries


def _pick_sum(agg: dict):
    """pick() over candidates measured at several shapes: a candidate's time is its sum over the shapes (only
    candidates ok at every shape count)."""
    rows = []
    for name, rs in agg.items():
        if all(r.status == "ok" for r in rs):
            rows.append(dataclasses.replace(rs[0], median_ms=sum(r.median_ms for r in rs),
                                            p20_ms=sum(r.p20_ms for r in rs), p80_ms=sum(r.p80_ms for r in rs)))
        else:
            rows.append(dataclasses.replace(rs[0], status="wrong"))
    return pick(rows)


# ------------------------------------------------------------------------------------------------------ kv cache
def tune_kv_cache(t: Tuner) -> dict:
    import torch

    from dreamzero.config import get_config
    from dreamzero.layout import layout_for_config
    from dreamzero.rope import rope_tables
    from dz_kernels import configs
    from dz_kernels.kv_cache import FusedKVCache, qk_norm_rope_kv_write
    from dz_kernels.kv_cache import cuda as kv_cuda
    from dz_kernels.kv_cache.reference import qk_norm_rope_kv_reference

    cfg = get_config("tiny" if t.small else "droid-14b")
    cached = tuple(range(1 + (cfg.max_chunks - 1) * cfg.frames_per_chunk))
    lay = layout_for_config(cfg, "observe", chunk=cfg.max_chunks, cached_frames=cached)
    H, D, C = cfg.num_heads, cfg.head_dim, cfg.dim
    entries = {"epilogue": [], "backend": []}
    default = configs.table("kv_cache")["defaults"]["epilogue"][-1]["config"]
    cands = [default] + ([{"block_rows": 2, "num_warps": 2}] if t.small else
                         [{"block_rows": r, "num_warps": w} for r, w in ((1, 4), (1, 8), (2, 8), (1, 16))])
    B = 2
    for fp8 in (False, True):
        cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
        case = f"observe-{'fp8' if fp8 else 'bf16'}/B{B}"

        def prep(c, seed, fp8=fp8):
            g = torch.Generator(device=t.device).manual_seed(seed)
            qkv = torch.randn(B, lay.q_len, 3 * C, device=t.device, generator=g).to(torch.bfloat16)
            q, k, v = qkv.split(C, dim=-1)
            wq, wk = ((1 + 0.1 * torch.randn(C, device=t.device, generator=g)).to(torch.bfloat16) for _ in range(2))
            cos, sin = (x.to(t.device) for x in rope_tables(lay, cfg))
            cache = FusedKVCache(cfg, B, torch.bfloat16, device=t.device, num_layers=1, fp8=fp8, backend="torch")
            cache.write_pos.fill_(lay.n_cached)
            ks, vs = (cache.k_scale[0], cache.v_scale[0]) if fp8 else (None, None)
            a, b = lay.n_cached, lay.n_cached + lay.q_len
            refk, refv = cache.k[0].clone(), cache.v[0].clone()
            refks, refvs = (ks.clone(), vs.clone()) if fp8 else (None, None)
            for buf in (cache.k[0], cache.v[0]) + ((ks, vs) if fp8 else ()):   # rows the kernel must write
                buf[:, lay.n_cached:lay.n_cached + lay.q_len] = float("nan")
            ref_q = qk_norm_rope_kv_reference(q, k, v, wq, wk, 1e-6, cos, sin, H, refk, refv, lay.n_cached,
                                              refks, refvs)

            def rows_of(kc, vc, kss, vss):
                if fp8:
                    return [kc[:, a:b].float() * kss[:, a:b, :, None], vc[:, a:b].float() * vss[:, a:b, :, None]]
                return [kc[:, a:b], vc[:, a:b]]

            backend = c.get("backend", "triton")

            def run():
                with configs.forced("kv_cache", "epilogue", c):
                    q_rot = qk_norm_rope_kv_write(q, k, v, wq, wk, 1e-6, cos, sin, H, cache.k[0], cache.v[0],
                                                  cache.write_pos, ks, vs, backend=backend, check=False)
                return [q_rot] + rows_of(cache.k[0], cache.v[0], ks, vs)
            return run, [ref_q] + rows_of(refk, refv, refks, refvs)

        bar = BF16_BAR if not fp8 else 0.05
        rows = run_candidates(t, "kv_cache", "epilogue", case, cands, prep, bar=bar)
        best, dflt = pick(rows)
        if best is not None:
            entries["epilogue"].append(_entry(t, {"H": H, "D": D, "cache": configs.dtype_name(cache_dtype)},
                                              best.config, case, best, dflt))
            # which backend backend="auto" runs: the Triton kernel at its best, or the CUDA kernels
            if t.device == "cuda" and kv_cuda.available()[0]:
                cuda_row = run_candidates(t, "kv_cache", "backend", case, [dict(best.config, backend="cuda")], prep,
                                          bar=bar, reference_config=best.config)[0]
                win = cuda_row if cuda_row.status == "ok" and cuda_row.median_ms < best.median_ms else best
                entries["backend"].append(_entry(t, {"cache": configs.dtype_name(cache_dtype)},
                                                 {"backend": "cuda" if win is cuda_row else "triton"},
                                                 f"{case}: triton at its best vs cuda", win, best))
    return entries


TUNERS = {"attention": tune_attention, "fp8": tune_fp8, "nvfp4": tune_nvfp4, "fused": tune_fused,
          "kv_cache": tune_kv_cache}


# ------------------------------------------------------------------------------------------------------ main
def run(name: str, out: str, budget_s: float, small: bool | None = None, max_candidates: int | None = None,
        install: bool = True, device: str | None = None) -> dict:
    """Run the sweeps of `name` (see the module doc); returns {family: table path or None}."""
    import torch

    from dz_kernels import configs

    if name not in NAMES:
        raise ValueError(f"unknown tuning sweep {name!r}; choose from {', '.join(NAMES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if small is None:
        small = device != "cuda"
    os.makedirs(out, exist_ok=True)
    t = Tuner(device=device, small=small, out=out, deadline=time.time() + budget_s,
              arch=configs.arch_of(torch.device(device)), max_candidates=max_candidates)
    families = FAMILIES if name == "all" else (name.split(":")[0],)
    install = install and device == "cuda" and not small
    written = {}
    for i, fam in enumerate(families):
        share = CAPS_S[fam] / sum(CAPS_S[f] for f in families[i:])
        fam_deadline = min(t.deadline, time.time() + min(CAPS_S[fam], share * max(t.left(), 0)))
        saved, t.deadline = t.deadline, fam_deadline
        open(os.path.join(out, f"tune-{fam}.rows.jsonl"), "w").close()
        print(f"== tune {fam} on {t.arch} ({'small shapes' if small else 'full shapes'}, {t.left():.0f} s)",
              flush=True)
        try:
            if fam == "attention" and ":" in name:
                entries = tune_attention(t, parts=(name.split(":")[1],))
            else:
                entries = TUNERS[fam](t)
        finally:
            t.deadline = saved
        written[fam] = write_table(t, fam, entries, install)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dz_bench.tune", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help=f"one of {', '.join(NAMES)}")
    parser.add_argument("--out", default=None, help="output folder (default out/tune)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="the whole run's deadline (default 300)")
    parser.add_argument("--small", action="store_true", default=None, help="tiny shapes (the default on a CPU)")
    parser.add_argument("--max-candidates", type=int, default=None, help="at most this many candidates per sweep")
    parser.add_argument("--no-install", action="store_true", help="write the tables to --out only")
    parser.add_argument("--list", action="store_true", help="list the sweeps and exit")
    args = parser.parse_args(argv)
    if args.list:
        for n in NAMES:
            print(n)
        return 0
    if args.name not in NAMES:
        parser.error(f"give a sweep name: {', '.join(NAMES)} (got {args.name!r})")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.max_candidates is not None and args.max_candidates < 1:
        parser.error(f"--max-candidates must be at least 1, got {args.max_candidates}")
    import torch

    if not torch.cuda.is_available():
        from dz_kernels import env

        env.default_triton_interpret()   # before triton is imported: the CPU interpreter
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   "out", "tune")
    written = run(args.name, out, args.budget_s, small=args.small, max_candidates=args.max_candidates,
                  install=not args.no_install)
    missing = [f for f, p in written.items() if p is None]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
