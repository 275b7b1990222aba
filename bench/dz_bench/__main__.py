"""python -m dz_bench [--all | NAME ...] [--small | --full] [--out DIR] [--device cuda|cpu] [--list]
                    [--model PRESET] [--no-l2-flush] [--fail-on-error] [--no-progress] [--echo] [--budget-s S]
                    [--min-samples N] [--rows FILE]

Runs benches registered in bench/dz_bench/cases/*.py and writes bench/results/<device-slug>/<bench>.{json,md,png}.
Default shapes: small on CPU, full on CUDA. Every row is also appended to <bench>.rows.jsonl as it is measured
(--echo prints it too), so a run cut short keeps what it measured; --budget-s stops starting new rows after that
many seconds (the rest are recorded as skipped).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import textwrap
import time

from dz_kernels import env


def first_sentence(doc: str, name: str = "") -> str:
    """The first sentence of a bench module's docstring, whole (up to the first '. ' before a capital letter or the
    end of its first paragraph), without a leading "<name>: "."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    if name and para.lower().startswith(name.lower() + ":"):
        para = para[len(name) + 1:].strip()
    m = re.search(r"\.(?=\s+[A-Z(])", para)
    return para[:m.end()] if m else para


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dz bench", description="Run dz_kernels benchmarks.")
    parser.add_argument("names", nargs="*", help="benches to run (see --list)")
    parser.add_argument("--all", action="store_true", help="run every registered bench")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None, help="tiny shapes")
    size.add_argument("--full", dest="small", action="store_false", help="real shapes")
    parser.add_argument("--out", default=None, help="results root (default bench/results)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--list", action="store_true", help="list the benches and exit")
    parser.add_argument("--model", default=None, metavar="PRESET",
                        help="model preset of the stacked bench (droid-14b, agibot-14b, yam-14b, droid-5b; default "
                             "droid-14b; small shapes use the tiny variant of its backbone)")
    parser.add_argument("--no-l2-flush", action="store_true",
                        help="CUDA: time with CUDA events and no L2 flush between calls (warm-cache figures)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 when any row is an error")
    parser.add_argument("--echo", action="store_true", help="print every row the moment it is measured")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new row after this many seconds (the rows left are recorded as skipped)")
    parser.add_argument("--min-samples", type=int, default=None, help="timed calls per row, at least (default 5)")
    parser.add_argument("--rows", default=None, help="also append every row of every bench to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.min_samples is not None and args.min_samples < 1:
        parser.error(f"--min-samples must be at least 1, got {args.min_samples}")

    import torch
    if args.device == "cpu" or not torch.cuda.is_available():
        # our Triton kernels run in the interpreter on a CPU (set before triton is first imported)
        env.default_triton_interpret()
    from dz_bench import harness

    import_errors = harness.load_cases()
    reg = harness.registry()
    if args.list:
        width = max(60, min(120, shutil.get_terminal_size((120, 20)).columns))
        for name in sorted(reg):
            text = first_sentence(sys.modules[reg[name].__module__].__doc__ or "", name)
            print(textwrap.fill(text, width=width, initial_indent=f"{name:14s}", subsequent_indent=" " * 14,
                                break_on_hyphens=False))
        for name, err in sorted(import_errors.items()):
            print(f"{name:24s} BROKEN: {err}")
        return 0
    if args.all == bool(args.names):
        parser.error("give bench names or --all (not both); --list shows them")
    names = sorted(set(reg) | set(import_errors)) if args.all else args.names
    unknown = [n for n in names if n not in reg and n not in import_errors]
    if unknown:
        parser.error(f"unknown bench(es) {unknown}; known: {sorted(reg)}")
    if args.model is not None:
        from dreamzero.config import PRESETS
        if args.model not in PRESETS:
            parser.error(f"unknown --model {args.model!r}; presets: {', '.join(PRESETS)}")
    ctx = harness.BenchContext.detect(small=args.small, device=args.device)
    ctx.model = args.model
    ctx.flush_l2 = not args.no_l2_flush
    ctx.echo = args.echo
    if args.budget_s is not None:
        ctx.deadline = time.time() + args.budget_s
    if args.min_samples is not None:
        ctx.min_samples = args.min_samples
    ctx.rows_file = args.rows
    folder = os.path.join(args.out or harness.RESULTS_DIR, harness.device_slug(ctx))
    existed = {n for n in names if os.path.exists(os.path.join(folder, f"{n}.json"))}
    results = harness.run_benches(names, ctx=ctx, out_dir=args.out, progress=not args.no_progress)
    n_err = 0
    for name, records in results.items():
        counts = {}
        for r in records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
            if r["status"] == "error":
                print(f"  {name}/{r['case']}/{r['impl']}: {r['error']}", file=sys.stderr)
        n_err += counts.get("error", 0)
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        where = os.path.join(folder, name)
        where = (where if os.path.relpath(where).startswith("..") else os.path.relpath(where)) + ".{json,md,png}"
        print(f"{name}: {len(records)} rows ({summary}) on {records[0]['device_slug'] if records else '?'} -> "
              f"{where}" + (" (replacing the previous records)" if name in existed else ""))
        if records and any(r.get("triton_interpreter") for r in records):
            print(f"  {name}: our Triton kernels ran in the CPU interpreter: not speed figures (see {name}.md)")
    return 1 if (n_err and args.fail_on_error) else 0


if __name__ == "__main__":
    sys.exit(main())
