"""Run one benchmark and read its report.

    python examples/bench_and_report.py [--bench kv_cache] [--out DIR] [--small]

The same as `dz bench kv_cache --out DIR` (or `bash scripts/bench.sh kv_cache`), from Python: the harness runs every
implementation of every case of the bench on the same inputs (ours are "dz..."; the others are the peers it must
beat), checks each result, and writes `<out>/<device-slug>/<bench>.json` (one record per row: device, versions,
commit, median, p20-p80 spread, sample count, set-up and first-call times, max error, speedup over the best peer
measured in the same run), `<bench>.md` (the table) and `<bench>.png` (the plot). Here the records are read back
and summed up: per case, our time against the best peer's. On a CPU the shapes are small and our Triton kernels run
in Triton's interpreter: the run checks that everything runs and agrees, its times are not speed figures (the
report says so). On a GPU the real shapes run and the ratio is the figure that counts.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import dz_kernels  # noqa: F401  (first: without CUDA it turns Triton's CPU interpreter on before triton is imported)
from dz_bench import harness, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default="kv_cache", help="a bench name (`dz bench --list`)")
    p.add_argument("--out", default=None, help="results root (default: a new temporary folder)")
    p.add_argument("--small", action="store_true", help="small shapes also on a GPU (the default on a CPU)")
    a = p.parse_args(argv)
    out = a.out or tempfile.mkdtemp(prefix="dz-bench-")
    ctx = harness.BenchContext.detect(small=True if a.small else None)   # CUDA: real shapes; CPU: small ones
    harness.run_benches([a.bench], ctx=ctx, out_dir=out, progress=False)

    folder = os.path.join(out, harness.device_slug(ctx))
    with open(os.path.join(folder, f"{a.bench}.json")) as f:
        records = json.load(f)                       # the records as written (report.py reads the same files)
    warning = report.what_it_is(records)
    print(f"{a.bench} on {records[0]['device']}, commit {records[0]['commit'][:12]}: {len(records)} rows")
    if warning:
        print(warning.replace("**", ""))
    for case in dict.fromkeys(r["case"] for r in records):
        rows = [r for r in records if r["case"] == case]
        ours = [r for r in rows if not r["is_peer"] and r["status"] == "ok"]
        peers = {r["impl"]: r for r in rows if r["is_peer"] and r["status"] == "ok"}
        for r in ours:
            best = peers.get(r["best_peer"])
            vs = (f"best peer {best['impl']} {best['median_ms']:.4g} ms -> {r['speedup_vs_best_peer']:.2f}x"
                  if best else "no peer ran")
            note = " [Triton interpreter: not a speed figure]" if r.get("triton_interpreter") else ""
            print(f"  {case}: {r['impl']} {r['median_ms']:.4g} ms (p20-p80 {r['p20_ms']:.4g}-{r['p80_ms']:.4g}, "
                  f"n={r['samples']}), {vs}{note}")
        for r in rows:
            if r["status"] != "ok":
                print(f"  {case}: {r['impl']} {r['status']}: {r.get('unavailable') or r.get('error')}")
    for ext in ("md", "png"):
        path = os.path.join(folder, f"{a.bench}.{ext}")
        assert os.path.getsize(path) > 0
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
