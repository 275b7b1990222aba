"""Reports for benchmark records: a Markdown table (<bench>.md) and a PNG bar plot (<bench>.png) per bench.

When the same folder holds copy.json (the device-to-device copy bench), rows with a bandwidth figure also show it
as a share of the best copy bandwidth measured on that device: the memory roofline.

    python -m dz_bench.report bench/results/<device-slug>     # regenerate every report in that folder
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dz_kernels.atomic import atomic_write

__all__ = ["write_report", "markdown_table", "plot", "copy_bandwidth", "what_it_is", "main"]


def _fmt(value, spec: str) -> str:
    if value is None or isinstance(value, str):
        return "" if value is None else value
    return format(value, spec)


def copy_bandwidth(folder: str) -> float | None:
    """Best GB/s of the "copy" bench recorded in `folder`, or None."""
    path = os.path.join(folder, "copy.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        return None
    rates = [r["gbps"] for r in rows if r.get("status") == "ok" and isinstance(r.get("gbps"), (int, float))]
    return max(rates) if rates else None


INTERPRETER_NOTE = "Triton interpreter: not a speed figure"


def what_it_is(records: list[dict]) -> str | None:
    """The warning a report carries up top when its figures are not speed figures (CPU, small shapes), else None."""
    if not records:
        return None
    cpu = any(str(r.get("device_slug", "")).startswith("cpu-") for r in records)
    small = any(r.get("small") for r in records)
    if not (cpu or small):
        return None
    where = ", ".join(w for w, on in (("small shapes", small), ("CPU", cpu)) if on)
    text = f"**{where[0].upper() + where[1:]}: not speed figures.** This run checks that every implementation runs " \
           "and agrees with its reference"
    if cpu:
        text += ("; rows marked \"" + INTERPRETER_NOTE + "\" ran our Triton kernels in Triton's CPU interpreter, "
                 "which executes each kernel program in Python, orders of magnitude slower than the compiled kernel "
                 "on a GPU, so their times and ratios say nothing about speed")
    return text + ". Times vary run to run: read the p20-p80 spread and the sample count n."


def _note(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('unavailable') or r.get('error') or ''}".replace("|", "/")
    return INTERPRETER_NOTE if r.get("triton_interpreter") else ""


def markdown_table(records: list[dict], copy_gbps: float | None = None) -> str:
    """The records of one bench as Markdown: a header with device, commit and versions (and, for a CPU or
    small-shape run, that these are not speed figures), then one row per impl with the median, the p20-p80 spread,
    the sample count, the set-up and first-call times."""
    if not records:
        return "No records.\n"
    first = records[0]
    lines = [f"# {first['bench']}", ""]
    warning = what_it_is(records)
    if warning:
        lines += [warning, ""]
    lines += [f"- device: {first.get('device')} (`{first.get('device_slug')}`), "
              f"{'small' if first.get('small') else 'full'} shapes",
              f"- commit: `{first.get('commit')}`, {first.get('timestamp')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items()), ""]
    header = ["case", "impl", "median ms", "p20-p80 ms", "n", "setup s", "1st call s", "TFLOP/s", "GB/s"]
    if copy_gbps:
        header.append("% copy BW")
    header += ["speedup vs best peer", "max err", "note"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in records:
        ok = r.get("status") == "ok"
        spread = f"{_fmt(r.get('p20_ms'), '.4g')}-{_fmt(r.get('p80_ms'), '.4g')}" if ok else ""
        speed = r.get("speedup_vs_best_peer")
        cells = [str(r.get("case")), str(r.get("impl")), _fmt(r.get("median_ms"), ".4g"), spread,
                 _fmt(r.get("samples"), "d") if ok else "", _fmt(r.get("setup_s"), ".3g") if ok else "",
                 _fmt(r.get("first_call_s"), ".3g") if ok else "", _fmt(r.get("tflops"), ".3g"),
                 _fmt(r.get("gbps"), ".4g")]
        if copy_gbps:
            gbps = r.get("gbps")
            cells.append(f"{100 * gbps / copy_gbps:.0f}%" if isinstance(gbps, (int, float)) else "")
        cells += [f"{speed:.2f}x (vs {r.get('best_peer')})" if isinstance(speed, (int, float)) else "",
                  _fmt(r.get("max_err"), ".3g"), _note(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_metric(ok: list[dict]) -> tuple[str, str]:
    """The figure to draw: TFLOP/s or GB/s when every successful row has it (comparable across sizes), else ms."""
    if ok and all(isinstance(r.get("tflops"), (int, float)) for r in ok):
        return "tflops", "TFLOP/s, higher is better"
    if ok and all(isinstance(r.get("gbps"), (int, float)) for r in ok):
        return "gbps", "GB/s, higher is better"
    return "median_ms", "median time (ms), lower is better"


def plot(records: list[dict], path: str) -> str:
    """Grouped bars per case and impl: throughput when every row has one, else median time; the p20-p80 spread as
    error bars; our implementations hatched with a dark edge; "<impl>: n/a" where a row did not run (unavailable,
    error, skipped); log scale when the values span more than 50x; the title says "small shapes" and "CPU: not speed
    figures" when so. Returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dz_bench.harness import is_ours

    ok = [r for r in records if r.get("status") == "ok" and isinstance(r.get("median_ms"), (int, float))
          and r["median_ms"] > 0]
    cases = list(dict.fromkeys(r["case"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records if r.get("impl") != "*"))
    bench = records[0]["bench"] if records else "?"
    metric, label = _plot_metric(ok)
    fig, ax = plt.subplots(figsize=(min(20.0, max(6.0, 0.5 * len(cases) * max(1, len(impls)) + 2)), 4.8))
    if not ok:
        ax.text(0.5, 0.5, "no successful timings", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        width = 0.8 / len(impls)
        values, missing = [], []
        for j, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                x = i + (j - (len(impls) - 1) / 2) * width
                row = next((r for r in ok if r["case"] == case and r["impl"] == impl), None)
                if row is None:
                    if any(r["case"] == case and r["impl"] == impl for r in records):
                        missing.append((x, impl))
                    continue
                med = row["median_ms"]
                fast = row.get("p20_ms") or med
                slow = row.get("p80_ms") or med
                if metric == "median_ms":
                    y, y_lo, y_hi = med, fast, slow
                else:  # throughput scales as 1/time: the faster quantile gives the higher value
                    y = row[metric]
                    y_lo, y_hi = y * med / slow, y * med / fast
                xs.append(x)
                ys.append(y)
                lo.append(max(0.0, y - y_lo))
                hi.append(max(0.0, y_hi - y))
            values += ys
            ours = is_ours(impl)
            if xs:
                ax.bar(xs, ys, width=width, label=impl + (" (ours)" if ours else ""), yerr=[lo, hi], capsize=2,
                       color=f"C{j % 10}", hatch="//" if ours else None, edgecolor="black" if ours else None,
                       linewidth=1.2 if ours else 0)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("case (one bar per implementation; error bars: p20-p80)")
        ax.set_ylabel(label)
        if max(values) / min(values) > 50:
            ax.set_yscale("log")
        for x, impl in missing:           # a row that did not run: marked, not a silent gap
            ax.annotate(f"{impl}: n/a", (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", rotation=90, fontsize=7,
                        color="dimgray")
        ax.legend(fontsize=8)
    first = records[0] if records else {}
    title = f"{bench} on {first.get('device', '?')} ({str(first.get('commit', ''))[:12]})"
    if first.get("small"):
        title += ", small shapes"
    if str(first.get("device_slug", "")).startswith("cpu-"):
        title += ", CPU: not speed figures"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def _extra_section(bench: str, records: list[dict]) -> str:
    """A bench's own Markdown section: `report_extra(records) -> str` in dz_bench.cases.<bench>, if defined."""
    import importlib

    try:
        mod = importlib.import_module(f"dz_bench.cases.{bench}")
    except ImportError:
        return ""
    fn = getattr(mod, "report_extra", None)
    return fn(records) if callable(fn) else ""


def write_report(records: list[dict], folder: str, bench: str) -> tuple[str, str]:
    """Write <folder>/<bench>.md and <folder>/<bench>.png; returns both paths."""
    os.makedirs(folder, exist_ok=True)
    md_path = os.path.join(folder, f"{bench}.md")
    with atomic_write(md_path, "w") as f:
        f.write(markdown_table(records, copy_bandwidth(folder)))
        extra = _extra_section(bench, records)
        if extra:
            f.write("\n" + extra)
    png_path = plot(records, os.path.join(folder, f"{bench}.png"))
    return md_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dz_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="result folders, e.g. bench/results/<device-slug>")
    args = parser.parse_args(argv)
    for folder in args.folders:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    records = json.load(f)
                for p in write_report(records, folder, name[:-5]):
                    print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
