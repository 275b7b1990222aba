"""Benchmark reports say what they are: a CPU or small-shape run is labelled "not speed figures" up top, rows whose
kernels ran in Triton's CPU interpreter say so, the table shows the spread, the sample count, set-up and first-call
times; plots label the x axis, mark our bars, show "n/a" where a row did not run and say "small shapes"; `dz bench`
says where the records went and lists whole first sentences; the stacked case is named after the config it ran."""
from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from conftest import DEVICE

from dz_bench import harness, report
from dz_bench.__main__ import first_sentence
from dz_bench.__main__ import main as bench_main
from dz_bench.harness import BenchContext, Case, Unavailable

FAST_CTX = dict(device=DEVICE.type, small=True, cpu_budget_s=0.01, min_samples=3, cpu_max_reps=5)
ON_CPU = DEVICE.type == "cpu"            # our kernels run in the interpreter there


@pytest.fixture
def kernel_bench():
    """ours: a Triton kernel (the interpreter on a CPU); peers: plain torch, and one that cannot run."""
    name = "test-report-kernel"

    @harness.register(name)
    def cases(ctx):
        from dz_kernels.fused import rms_norm, rms_norm_reference

        x, w = torch.randn(4, 32, device=DEVICE), torch.randn(32, device=DEVICE)
        yield Case(case="rms", params={}, bytes=2.0 * x.numel() * 4,
                   impls={"dz": lambda: (lambda: rms_norm(x, w, 1e-6)),
                          "torch": lambda: (lambda: rms_norm_reference(x, w, 1e-6)),
                          "absent-peer": lambda: (_ for _ in ()).throw(Unavailable("not installed"))})
        yield Case(case="torch-only", params={}, impls={"dz": lambda: (lambda: x * 2), "torch": lambda: (lambda: x + x)})

    yield name
    harness.unregister(name)


def test_interpreter_rows_and_the_cpu_warning(kernel_bench, tmp_path):
    ctx = BenchContext(**FAST_CTX)
    records = harness.run_benches([kernel_bench], ctx=ctx, out_dir=str(tmp_path), progress=False)[kernel_bench]
    rows = {(r["case"], r["impl"]): r for r in records}
    if not ON_CPU:                                                    # compiled kernels: nothing to say
        assert all(r["triton_interpreter"] is None for r in records)
        pytest.skip("the interpreter notes are for a CPU run")
    assert rows[("rms", "dz")]["triton_interpreter"] is True          # our kernel ran in the interpreter
    assert rows[("rms", "torch")]["triton_interpreter"] is False
    assert rows[("torch-only", "dz")]["triton_interpreter"] is False  # ours, but no Triton kernel ran
    md = (tmp_path / records[0]["device_slug"] / f"{kernel_bench}.md").read_text()
    lines = md.splitlines()
    assert lines[0] == f"# {kernel_bench}" and lines[2].startswith("**Small shapes, CPU: not speed figures.**")
    header = next(ln for ln in lines if ln.startswith("| case |"))
    for col in ("median ms", "p20-p80 ms", "n", "setup s", "1st call s", "speedup vs best peer", "note"):
        assert f"| {col} |" in header
    dz_rms = next(ln for ln in lines if ln.startswith("| rms | dz |"))
    assert dz_rms.endswith("| Triton interpreter: not a speed figure |")
    n = rows[("rms", "dz")]["samples"]
    assert f"| {n} |" in dz_rms and n >= 3
    assert next(ln for ln in lines if ln.startswith("| torch-only | dz |")).endswith("|  |")
    assert "unavailable: not installed" in md


def test_a_full_shape_gpu_report_has_no_warning():
    r = dict(bench="b", case="c", impl="dz", is_peer=False, status="ok", device="NVIDIA H200",
             device_slug="nvidia-h200", small=False, median_ms=1.0, p20_ms=0.9, p80_ms=1.1, samples=100, setup_s=0.1,
             first_call_s=0.2, triton_interpreter=None, commit="abc", versions={})
    md = report.markdown_table([r])
    assert "not speed figures" not in md and report.what_it_is([r]) is None
    assert "| c | dz | 1 | 0.9-1.1 | 100 | 0.1 | 0.2 |" in md


def test_plot_labels_ours_and_unavailable_rows(kernel_bench, tmp_path, monkeypatch):
    ctx = BenchContext(**FAST_CTX)
    records = harness.run_benches([kernel_bench], ctx=ctx, out_dir=str(tmp_path), progress=False,
                                  report=False)[kernel_bench]
    figures = []
    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    path = report.plot(records, str(tmp_path / "plot.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    (ax,) = figures[0].axes
    assert ax.get_xlabel().startswith("case") and ax.get_ylabel()
    assert "small shapes" in ax.get_title() and ("CPU: not speed figures" in ax.get_title()) == ON_CPU
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dz (ours)", "torch"]
    hatched = {p.get_hatch() for p in ax.patches if p.get_hatch()}
    assert hatched == {"//"}
    assert sum(bool(p.get_hatch()) for p in ax.patches) == 2          # our two bars, one per case
    assert [t.get_text() for t in ax.texts] == ["absent-peer: n/a"]


def test_dz_bench_says_where_records_go(kernel_bench, tmp_path, capsys):
    argv = [kernel_bench, "--device", DEVICE.type, "--small", "--out", str(tmp_path), "--no-progress",
            "--min-samples", "3"]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    slug = next(p.name for p in tmp_path.iterdir())
    assert f"-> {tmp_path / slug / kernel_bench}.{{json,md,png}}" in out and "replacing" not in out
    assert ("ran in the CPU interpreter: not speed figures" in out) == ON_CPU
    assert bench_main(argv) == 0
    assert "(replacing the previous records)" in capsys.readouterr().out
    assert json.loads((tmp_path / slug / f"{kernel_bench}.json").read_text())


def test_list_prints_whole_first_sentences(capsys):
    assert bench_main(["--list"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    assert "stacked the paper's Table 1 on one device -- latency of a whole control step" in text
    assert "every row measured in the same run and checked against a reference." in text
    assert "The project's main job" not in text       # the first sentence only
    doc = "name: one thing (e.g. two). Second sentence.\n\nMore."
    assert first_sentence(doc, "name") == "one thing (e.g. two)."
    assert first_sentence("a paragraph without a stop\nacross lines\n\nnext", "") == "a paragraph without a stop across lines"


def test_the_stacked_case_is_named_after_the_config_it_runs():
    harness.load_cases()
    small = list(harness.registry()["stacked"](BenchContext(device="cpu", small=True)))
    assert [c.case for c in small] == ["tiny-control-step-b1"] and small[0].params["config"] == "tiny"
