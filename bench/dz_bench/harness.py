"""Benchmark harness: cases register here, run on CUDA (or small on CPU), and leave JSON records plus a report.

A bench file bench/dz_bench/cases/<bench>.py::

    from dz_bench.harness import register, Case, Unavailable

    @register("attention")                  # records go to bench/results/<device-slug>/attention.json
    def cases(ctx):                         # ctx: BenchContext (ctx.device "cuda"/"cpu", ctx.small)
        yield Case(case="name", params={...}, flops=<useful FLOPs or None>, bytes=<bytes moved or None>,
                   impls={"dz": factory, "peer-name": factory}, check=None)

A factory is a zero-argument callable that does the set-up and returns the zero-argument callable to time; it may
raise Unavailable("reason"). "dz" is ours, every other key is a peer. Creating a Case must be cheap (allocate in the
factories, or in a `lazy(...)` shared by them): the harness lists a bench's cases first, then runs them one by one
and drops each before the next. `check`, if given, receives the value returned by an impl's first call and returns
an error figure (e.g. max abs error against a reference), recorded as `max_err`. The callable a factory returns
may carry a `params` attribute (a dict): it is merged into that impl's own row's params after the row ran (or
failed), for facts of one row such as its compile time or the details of its check.

Timing: on CUDA, CUDA events around each call after a warm-up, the L2 flushed before each call (the method of
triton.testing.do_bench, kept here so that the number of samples is known and at least `min_samples` even for calls
of seconds); on CPU, time.perf_counter over at least `min_samples` calls. Every record carries its sample count
(`samples`), the time of the factory (`setup_s`, where compilation ahead of time lands) and of the first call
(`first_call_s`, where lazy compilation lands), and whether our Triton kernels ran in Triton's CPU interpreter
during the first call (`triton_interpreter`: True/False where the interpreter is on, None elsewhere; such a time
is not a speed figure). Each record is a dict with the fields listed in RECORD_FIELDS; a failing impl becomes an
"error" row and the run goes on.

Rows are written as they are measured: each one is printed (with `echo=True`) and appended to
`<out>/<device-slug>/<bench>.rows.jsonl` the moment it is measured (its speedup counts the peers measured before it
in its case; the JSON holds the final figures), and the bench's JSON is rewritten after every row, so a run cut
short by a time limit keeps what it measured. `BenchContext.deadline` (a time.time() value) stops a run from starting
new rows after it; the rows left are recorded as "skipped" rows that say so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import pkgutil
import platform
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterable

from dz_kernels import env
from dz_kernels.atomic import atomic_write

__all__ = [
    "register", "unregister", "registry", "load_cases", "Case", "Unavailable", "BenchContext", "run_benches",
    "run_bench", "lazy", "device_slug", "versions", "commit", "RECORD_FIELDS", "RESULTS_DIR",
]

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/ (the source root of dz_bench)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
REPO_DIR = os.path.dirname(BENCH_DIR)
OURS = "dz"


def is_ours(impl: str) -> bool:
    """Our implementations are "dz" and any name starting with "dz+" or "dz-" (variants: dz-triton, dz+compile)."""
    return impl == OURS or impl.startswith((OURS + "+", OURS + "-"))

RECORD_FIELDS = (
    "bench", "case", "impl", "is_peer", "status", "device", "device_slug", "small", "params", "flops", "bytes",
    "median_ms", "p20_ms", "p80_ms", "samples", "setup_s", "first_call_s", "tflops", "gbps", "max_err",
    "speedup_vs_best_peer", "best_peer", "unavailable", "error", "timer", "versions", "commit", "timestamp",
    "triton_interpreter",
)


class Unavailable(Exception):
    """Raised by a factory when an implementation cannot run here (not installed, unsupported shape or device)."""


@dataclasses.dataclass
class Case:
    """One measured configuration of a bench: its implementations are timed on the same inputs."""
    case: str
    params: dict
    impls: dict
    flops: float | None = None
    bytes: float | None = None
    check: Callable[[Any], float] | None = None

    def __post_init__(self):
        if not isinstance(self.case, str) or not self.case:
            raise ValueError(f"Case.case must be a non-empty string, got {self.case!r}")
        if not isinstance(self.impls, dict) or not self.impls:
            raise ValueError(f"Case {self.case!r}: impls must be a non-empty dict of name -> factory")
        for name, factory in self.impls.items():
            if not callable(factory):
                raise TypeError(f"Case {self.case!r}: impl {name!r} is not callable")


@dataclasses.dataclass
class BenchContext:
    """Where and how big: `device` is "cuda" or "cpu"; `small` selects tiny shapes (the default on CPU).

    Timing: at least `min_samples` timed calls per row (also for calls of seconds), more while the total stays under
    `rep_ms` (CUDA, at most 2000) or `cpu_budget_s` (CPU, at most `cpu_max_reps`). `deadline`: a time.time() after
    which no new case starts (None: no limit). `echo`: print each row as it is measured. `rows_file`: also append
    every row of every bench to this one file (JSON lines), e.g. one file that a GPU run brings back."""
    device: str = "cpu"
    small: bool = True
    flush_l2: bool = True
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_samples: int = 5
    cpu_max_reps: int = 20
    cpu_budget_s: float = 0.2
    deadline: float | None = None
    echo: bool = False
    rows_file: str | None = None
    model: str | None = None          # model preset of the stacked bench (dreamzero.config.PRESETS); None: droid-14b

    @classmethod
    def detect(cls, small: bool | None = None, device: str | None = None) -> "BenchContext":
        """CUDA when available (full shapes by default), else CPU (small shapes by default)."""
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
        return cls(device=device, small=(device == "cpu") if small is None else small)

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[[BenchContext], Iterable[Case]]] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = False


def register(name: str):
    """Decorator: `fn(ctx)` yields the Cases of bench `name`. A name can be registered once."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"bench name must be letters, digits, '_', '.', '-', got {name!r}")

    def deco(fn):
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"bench {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = fn
        return fn

    return deco


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def load_cases() -> dict[str, str]:
    """Import every module in dz_bench.cases (once; modules whose name starts with "_" are helpers and skipped);
    returns {module: error} for those that failed to import."""
    global _LOADED
    if not _LOADED:
        import dz_bench.cases as pkg

        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_"):  # helpers shared by case files, imported by them
                continue
            modname = f"{pkg.__name__}.{info.name}"
            try:
                importlib.import_module(modname)
            except Exception as e:  # a broken case file is reported, not fatal to the other benches
                _IMPORT_ERRORS[info.name] = f"{type(e).__name__}: {e}"
        _LOADED = True
    return dict(_IMPORT_ERRORS)


def registry() -> dict[str, Callable]:
    """{bench name: case generator} after importing the case files."""
    load_cases()
    return dict(_REGISTRY)


def lazy(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a zero-argument builder so it runs once, on first call; the impls and the check of a case share it and
    the value is freed with the case."""
    box: list = []

    def get():
        if not box:
            box.append(fn())
        return box[0]

    return get


# ----------------------------------------------------------------------------------------------------------------
# Environment facts
# ----------------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(ctx: BenchContext) -> str:
    if ctx.device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return _cpu_model()


def device_slug(ctx: BenchContext) -> str:
    """e.g. "nvidia-h100-80gb-hbm3" or "cpu-intel-r-xeon-r-platinum-8481c"."""
    name = device_name(ctx)
    return _slug(name) if ctx.device == "cuda" else "cpu-" + _slug(name)


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def versions() -> dict:
    """python, torch, triton, cuda (torch's), cupy, driver, dz_ext (compiled archs or why absent)."""
    import torch

    def mod_version(name):
        try:
            return importlib.import_module(name).__version__
        except Exception:
            return None

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": mod_version("triton"),
           "cuda": torch.version.cuda, "cupy": mod_version("cupy"), "driver": _driver_version()}
    try:
        from dz_kernels import _ext

        ext = _ext.cuda_ext()
        out["dz_ext"] = f"built for {ext.compiled_archs}" if ext is not None else "absent"
    except Exception as e:
        out["dz_ext"] = f"error: {type(e).__name__}: {e}"
    return out


def commit() -> str:
    """DZ_COMMIT, else `git rev-parse HEAD` of the repository (+ "-dirty" when tracked files changed), else
    "unknown"."""
    override = env.commit_override()
    if override:
        return override
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        sha = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=30)
        return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def _quantiles(values: list[float], qs=(0.5, 0.2, 0.8)) -> list[float]:
    xs = sorted(values)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def _time_cpu(fn, ctx: BenchContext) -> tuple[list[float], str]:
    times = []
    start_all = time.perf_counter()
    while len(times) < max(ctx.cpu_max_reps, ctx.min_samples):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= ctx.min_samples and time.perf_counter() - start_all > ctx.cpu_budget_s:
            break
    return times, "perf_counter"


def _time_cuda(fn, ctx: BenchContext) -> tuple[list[float], str]:
    """CUDA events around each call; the L2 flushed (a 256 MB buffer zeroed) before each call when ctx.flush_l2."""
    import torch

    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda") if ctx.flush_l2 else None
    torch.cuda.synchronize()
    # estimate one call (after the first call the harness already made)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-4)
    n_warm = min(int(ctx.warmup_ms / est), 100)   # a call as long as the warm-up was the warm-up (calls of seconds)
    n_rep = min(max(ctx.min_samples, int(ctx.rep_ms / est)), 2000)
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return times, "cuda-events" + ("+l2flush" if flush is not None else "")


def time_fn(fn: Callable[[], Any], ctx: BenchContext) -> tuple[float, float, float, int, str]:
    """(median_ms, p20_ms, p80_ms, samples, timer name) of `fn` on ctx.device."""
    times, timer = (_time_cuda if ctx.device == "cuda" else _time_cpu)(fn, ctx)
    median, p20, p80 = _quantiles(times)
    return median, p20, p80, len(times), timer


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------
def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


@contextlib.contextmanager
def _interpreted_launches():
    """Counts the Triton kernel launches run by the CPU interpreter inside the block: yields a one-item list, [None]
    when the interpreter is off here (then nothing is counted)."""
    box: list = [None]
    from dz_kernels import env

    if not env.triton_interpret():
        yield box
        return
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        yield box
        return
    original = InterpretedFunction.run
    box[0] = 0

    def run(self, *args, **kwargs):
        box[0] += 1
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield box
    finally:
        InterpretedFunction.run = original


def _run_impl(name: str, factory, case: Case, ctx: BenchContext, base: dict) -> dict:
    row = dict(base, impl=name, is_peer=not is_ours(name), status="ok", median_ms=None, p20_ms=None, p80_ms=None,
               samples=None, setup_s=None, first_call_s=None, tflops=None, gbps=None, max_err=None,
               unavailable=None, error=None, timer=None, triton_interpreter=None)
    fn = None
    try:
        t0 = time.perf_counter()
        fn = factory()
        ctx.sync()
        row["setup_s"] = time.perf_counter() - t0
        if not callable(fn):
            raise TypeError(f"factory of {name!r} returned {type(fn).__name__}, not a callable")
        t0 = time.perf_counter()
        with _interpreted_launches() as launches:
            out = fn()
        ctx.sync()
        row["first_call_s"] = time.perf_counter() - t0
        if launches[0] is not None:
            row["triton_interpreter"] = launches[0] > 0
        if case.check is not None:
            row["max_err"] = float(case.check(out))
        del out
        median, p20, p80, samples, timer = time_fn(fn, ctx)
        row.update(median_ms=median, p20_ms=p20, p80_ms=p80, samples=samples, timer=timer)
        if case.flops is not None and median > 0:
            row["tflops"] = case.flops / (median * 1e-3) / 1e12
        if case.bytes is not None and median > 0:
            row["gbps"] = case.bytes / (median * 1e-3) / 1e9
    except Unavailable as e:
        row.update(status="unavailable", unavailable=str(e) or "unavailable")
    except Exception as e:
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        row.update(status="error", error=tb)
    finally:
        extra = getattr(fn, "params", None)
        if isinstance(extra, dict) and extra:
            row["params"] = {**(row.get("params") or {}), **extra}
        del fn
        if ctx.device == "cuda":
            try:
                import torch

                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:
                pass
    return row


def _fill_speedups(rows: list[dict]) -> None:
    peers = [r for r in rows if r["is_peer"] and r["status"] == "ok" and r["median_ms"]]
    best = min(peers, key=lambda r: r["median_ms"]) if peers else None
    for r in rows:
        r["best_peer"] = best["impl"] if best else None
        r["speedup_vs_best_peer"] = None
        if best is not None and not r["is_peer"] and r["status"] == "ok" and r["median_ms"]:
            r["speedup_vs_best_peer"] = best["median_ms"] / r["median_ms"]


def _echo(row: dict) -> None:
    """One line per measured row, printed the moment it is measured."""
    parts = [f"{row['bench']}/{row['case']}/{row['impl']}: {row['status']}"]
    if row.get("median_ms") is not None:
        parts.append(f"{row['median_ms']:.4g} ms (p20-p80 {row['p20_ms']:.4g}-{row['p80_ms']:.4g}, "
                     f"n={row['samples']})")
    for key, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if row.get(key) is not None:
            parts.append(f"{row[key]:.4g} {unit}")
    if row.get("max_err") is not None:   # a string after _json_safe when not finite ("nan": a different function)
        err = row["max_err"]
        parts.append(f"err {err:.3g}" if isinstance(err, (int, float)) else f"err {err}")
    if row.get("first_call_s") is not None and row["first_call_s"] + (row.get("setup_s") or 0) > 5:
        parts.append(f"setup {row.get('setup_s') or 0:.1f} s + first call {row['first_call_s']:.1f} s")
    if row.get("triton_interpreter"):
        parts.append("Triton interpreter: not a speed figure")
    if row.get("unavailable") or row.get("error"):
        parts.append(str(row.get("unavailable") or row.get("error")))
    print("  " + ", ".join(parts), flush=True)


def run_bench(name: str, ctx: BenchContext, progress: bool = True, out_root: str | None = None) -> list[dict]:
    """Run every case of bench `name`; returns its records. With `out_root`, every row is appended to
    <out_root>/<device-slug>/<name>.rows.jsonl as it is measured and <name>.json is rewritten after every row."""
    reg = registry()
    common = {"bench": name, "device": device_name(ctx), "device_slug": device_slug(ctx), "small": ctx.small,
              "versions": versions(), "commit": commit()}

    def stamp():
        return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    if name not in reg:
        err = _IMPORT_ERRORS.get(name, f"no bench named {name!r}")
        return [dict(common, case="*", impl="*", is_peer=False, status="error", params={}, flops=None,
                     bytes=None, error=f"case file failed: {err}", timestamp=stamp())]
    try:
        cases = list(reg[name](ctx))
    except Exception as e:
        return [dict(common, case="*", impl="*", is_peer=False, status="error", params={}, flops=None, bytes=None,
                     error=f"listing cases failed: {type(e).__name__}: {e}", timestamp=stamp())]
    records: list[dict] = []
    rows_path = None
    if out_root is not None:
        folder = os.path.join(out_root, common["device_slug"])
        os.makedirs(folder, exist_ok=True)
        rows_path = os.path.join(folder, f"{name}.rows.jsonl")
        open(rows_path, "w").close()  # this run's rows only, as <name>.json holds this run's records
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc=name, unit="case", file=sys.stderr, leave=False)
    while cases:
        case = cases.pop(0)
        base = dict(common, case=case.case, params=case.params, flops=case.flops, bytes=case.bytes)
        rows = []
        for impl_name, factory in case.impls.items():
            if ctx.deadline is not None and time.time() > ctx.deadline:
                row = dict(base, impl=impl_name, is_peer=not is_ours(impl_name), status="skipped",
                           unavailable="the run's time budget was spent before this row started")
            else:
                if bar is not None:
                    bar.set_postfix_str(f"{case.case} / {impl_name}")
                row = _run_impl(impl_name, factory, case, ctx, base)
            rows.append(dict(row, timestamp=stamp()))
            _fill_speedups(rows)                      # over the rows measured so far: the row is streamed now
            done = _json_safe({k: rows[-1].get(k) for k in RECORD_FIELDS})
            if ctx.echo:
                _echo(done)
            for path in (rows_path, ctx.rows_file):
                if path is not None:
                    with open(path, "a") as f:
                        f.write(json.dumps(done) + "\n")
            if out_root is not None and len(rows) < len(case.impls):
                write_records(records + [_json_safe({k: r.get(k) for k in RECORD_FIELDS}) for r in rows], out_root,
                              name)
        del case, base
        _fill_speedups(rows)
        records.extend(_json_safe({k: r.get(k) for k in RECORD_FIELDS}) for r in rows)
        if out_root is not None:
            write_records(records, out_root, name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return records


def write_records(records: list[dict], out_root: str, bench: str) -> str:
    """Write (replace) <out_root>/<device-slug>/<bench>.json; returns its path."""
    slug = records[0]["device_slug"] if records else "unknown"
    folder = os.path.join(out_root, slug)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{bench}.json")
    with atomic_write(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    return path


def run_benches(names: Iterable[str] | None = None, ctx: BenchContext | None = None, out_dir: str | None = None,
                progress: bool = True, report: bool = True) -> dict[str, list[dict]]:
    """Run the named benches (all registered ones when None), write their records under out_dir (default
    bench/results) and, with report=True, the Markdown table and PNG plot beside them. Returns {bench: records}."""
    reg = registry()
    ctx = ctx or BenchContext.detect()
    out_root = out_dir or RESULTS_DIR
    if names is None:
        names = sorted(set(reg) | set(_IMPORT_ERRORS))
    results = {}
    for name in names:
        records = run_bench(name, ctx, progress=progress, out_root=out_root)
        path = write_records(records, out_root, name)
        if report:
            from dz_bench import report as report_mod

            report_mod.write_report(records, os.path.dirname(path), name)
        results[name] = records
    return results
