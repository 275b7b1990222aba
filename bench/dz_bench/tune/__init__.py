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

Modules: core.py (run state, rows, check-then-time, the pick, the table writer), one per family (attention.py,
quant.py for fp8 and nvfp4, fused.py, kv_cache.py); this one runs them (run, main).
"""
from __future__ import annotations

import argparse
import os
import time

from .attention import tune_attention
from .core import (BF16_BAR, MIN_GAIN, Row, Tuner, measure, pick, pick_sum, poisoned_outputs, rel_err,
                   run_candidates, write_table)
from .fused import tune_fused
from .kv_cache import tune_kv_cache
from .quant import tune_fp8, tune_nvfp4

__all__ = ["FAMILIES", "NAMES", "CAPS_S", "MIN_GAIN", "BF16_BAR", "TUNERS", "Tuner", "Row", "rel_err", "measure",
           "poisoned_outputs", "run_candidates", "pick", "pick_sum", "write_table", "tune_attention", "tune_fp8",
           "tune_nvfp4", "tune_fused", "tune_kv_cache", "run", "main"]

FAMILIES = ("attention", "fp8", "nvfp4", "fused", "kv_cache")
NAMES = FAMILIES + ("attention:fwd", "attention:bwd", "all")
# seconds each family's sweep may take at most (attention: forward 45% / backward 55%); a run of several families
# splits what is left in proportion to these. Sized from the first H200 run's compile times (a few seconds per
# kernel variant) and the default candidate lists of the family modules.
CAPS_S = {"attention": 170.0, "fp8": 90.0, "nvfp4": 60.0, "fused": 50.0, "kv_cache": 30.0}

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
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = args.out or os.path.join(repo, "out", "tune")
    written = run(args.name, out, args.budget_s, small=args.small, max_candidates=args.max_candidates,
                  install=not args.no_install)
    missing = [f for f, p in written.items() if p is None]
    return 1 if missing else 0

