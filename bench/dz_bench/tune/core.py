"""The tuning sweeps' machinery (dz_bench.tune): the run state, one row per candidate, check-then-time of each
candidate, the winner's pick, and the config table it is written into. The method is in dz_bench.tune's doc."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import time
import traceback
from typing import Any, Callable

from dz_kernels.atomic import atomic_write_text

MIN_GAIN = 0.02
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


def source_line(t: Tuner, case: str, best, default) -> str:
    from dz_bench.harness import BenchContext, commit, device_name

    dev = device_name(BenchContext(device=t.device, small=t.small))
    day = datetime.date.today().isoformat()
    vs = f" vs default {default.median_ms:.4g} ms" if default is not None else " (the default did not run ok)"
    return f"python -m dz_bench.tune on {dev}, {day}, commit {commit()[:12]}: {case} {best.median_ms:.4g} ms{vs}"


def table_entry(t: Tuner, match: dict, config: dict, case: str, best, default) -> dict:
    """One entry of a config table: where it applies (match), the winner's config, and what was measured."""
    default_ms = default.median_ms if default else None
    return {"match": match, "config": config, "source": source_line(t, case, best, default),
            "measured": {"case": case, "median_ms": best.median_ms, "default_ms": default_ms,
                         "p20_ms": best.p20_ms, "p80_ms": best.p80_ms, "samples": best.samples}}


def pick_sum(agg: dict):
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
    atomic_write_text(path, text)
    print(f"  {family}: table written to {path}", flush=True)
    if install:
        dest = configs.table_path(family, directory=os.path.dirname(configs.__file__))
        atomic_write_text(dest, text)
        configs.reload()
        print(f"  {family}: installed into {dest}", flush=True)
    return path

