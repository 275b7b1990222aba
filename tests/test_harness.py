"""The benchmark harness on CPU: records and their fields, error and unavailable rows, speedups, reports."""
from __future__ import annotations

import datetime
import json
import subprocess
import time

import pytest
import torch

from dz_bench import harness, report
from dz_bench.harness import BenchContext, Case, Unavailable

FAST_CTX = dict(device="cpu", small=True, cpu_budget_s=0.01, min_samples=3, cpu_max_reps=5)


@pytest.fixture
def dummy_bench():
    name = "test-dummy"
    calls = {"listed": 0}

    @harness.register(name)
    def cases(ctx):
        calls["listed"] += 1
        x = torch.arange(6.0)

        def ours():
            return lambda: x * 2

        def slow_peer():
            def run():
                time.sleep(0.002)
                return x * 2
            return run

        def broken():
            def run():
                raise RuntimeError("boom in the peer")
            return run

        def missing():
            raise Unavailable("peer library not installed")

        def wrong():
            return lambda: x * 2 + 1

        yield Case(case="double", params={"n": 6}, flops=6.0, bytes=96.0,
                   impls={"dz": ours, "peer-slow": slow_peer, "peer-broken": broken, "peer-missing": missing,
                          "peer-wrong": wrong},
                   check=lambda out: (out - x * 2).abs().max().item())
        yield Case(case="only-ours", params={}, impls={"dz": ours})

    yield name, calls
    harness.unregister(name)


def _by_impl(records, case):
    return {r["impl"]: r for r in records if r["case"] == case}


def test_records_reports_and_speedup(dummy_bench, tmp_path):
    name, calls = dummy_bench
    ctx = BenchContext(**FAST_CTX)
    results = harness.run_benches([name], ctx=ctx, out_dir=str(tmp_path), progress=False)
    records = results[name]
    slug = harness.device_slug(ctx)
    assert slug.startswith("cpu-")
    folder = tmp_path / slug
    with open(folder / f"{name}.json") as f:
        assert json.load(f) == records
    for r in records:
        assert set(harness.RECORD_FIELDS) <= set(r), set(harness.RECORD_FIELDS) - set(r)
        assert r["bench"] == name and r["device_slug"] == slug and r["small"] is True
        assert {"python", "torch", "triton", "cuda", "cupy", "driver"} <= set(r["versions"])
        assert r["commit"]
        datetime.datetime.fromisoformat(r["timestamp"])

    rows = _by_impl(records, "double")
    assert [r["impl"] for r in records if r["case"] == "double"] == ["dz", "peer-slow", "peer-broken",
                                                                     "peer-missing", "peer-wrong"]
    ours, slow = rows["dz"], rows["peer-slow"]
    assert ours["status"] == "ok" and ours["is_peer"] is False and ours["timer"] == "perf_counter"
    assert 0 < ours["p20_ms"] <= ours["median_ms"] <= ours["p80_ms"]
    assert ours["tflops"] == pytest.approx(6.0 / (ours["median_ms"] * 1e-3) / 1e12)
    assert ours["gbps"] == pytest.approx(96.0 / (ours["median_ms"] * 1e-3) / 1e9)
    assert ours["max_err"] == 0.0 and rows["peer-wrong"]["max_err"] == 1.0
    assert slow["median_ms"] >= 2.0  # it sleeps 2 ms per call
    best = min((rows["peer-slow"], rows["peer-wrong"]), key=lambda r: r["median_ms"])
    assert ours["best_peer"] == best["impl"]
    assert ours["speedup_vs_best_peer"] == pytest.approx(best["median_ms"] / ours["median_ms"])
    assert all(r["speedup_vs_best_peer"] is None for r in rows.values() if r["is_peer"])

    broken = rows["peer-broken"]
    assert broken["status"] == "error" and "RuntimeError: boom in the peer" in broken["error"]
    assert broken["median_ms"] is None
    missing = rows["peer-missing"]
    assert missing["status"] == "unavailable" and missing["unavailable"] == "peer library not installed"

    only = _by_impl(records, "only-ours")["dz"]
    assert only["status"] == "ok" and only["best_peer"] is None and only["speedup_vs_best_peer"] is None
    assert only["max_err"] is None and only["tflops"] is None

    md = (folder / f"{name}.md").read_text()
    assert "| double | dz |" in md and "boom in the peer" in md and "peer library not installed" in md
    assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run replaces the bench's file
    harness.run_benches([name], ctx=ctx, out_dir=str(tmp_path), progress=False)
    with open(folder / f"{name}.json") as f:
        assert len(json.load(f)) == len(records)
    assert calls["listed"] == 2


def test_failing_case_listing_is_an_error_row(tmp_path):
    name = "test-broken-listing"

    @harness.register(name)
    def cases(ctx):
        raise KeyError("no such shape table")
        yield  # pragma: no cover

    try:
        records = harness.run_benches([name], ctx=BenchContext(**FAST_CTX), out_dir=str(tmp_path),
                                      progress=False)[name]
    finally:
        harness.unregister(name)
    assert len(records) == 1 and records[0]["status"] == "error"
    assert "listing cases failed" in records[0]["error"] and "no such shape table" in records[0]["error"]


def test_copy_bench_on_cpu(tmp_path):
    ctx = BenchContext(**FAST_CTX)
    records = harness.run_benches(["copy"], ctx=ctx, out_dir=str(tmp_path), progress=False)["copy"]
    assert records, "copy bench produced no rows"
    for case in {r["case"] for r in records}:
        rows = _by_impl(records, case)
        assert rows["dz"]["status"] == "unavailable" and "CUDA" in rows["dz"]["unavailable"]
        peer = rows["torch-copy_"]
        assert peer["status"] == "ok" and peer["max_err"] == 0.0 and peer["gbps"] > 0
        assert peer["bytes"] == 2 * torch.Size(peer["params"]["shape"]).numel() * 4
    folder = tmp_path / harness.device_slug(ctx)
    assert report.copy_bandwidth(str(folder)) == max(r["gbps"] for r in records if r["status"] == "ok")
    assert "% copy BW" in (folder / "copy.md").read_text()


def test_case_and_register_validation():
    with pytest.raises(ValueError, match="non-empty dict"):
        Case(case="x", params={}, impls={})
    with pytest.raises(TypeError, match="not callable"):
        Case(case="x", params={}, impls={"dz": 3})
    with pytest.raises(ValueError, match="bench name"):
        harness.register("bad name!")

    @harness.register("test-dup")
    def first(ctx):
        return []

    try:
        with pytest.raises(ValueError, match="already registered"):
            @harness.register("test-dup")
            def second(ctx):
                return []
    finally:
        harness.unregister("test-dup")


def test_quantiles_and_lazy():
    assert harness._quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == [3.0, 1.8, 4.2]
    built = []
    get = harness.lazy(lambda: built.append(1) or "value")
    assert get() == "value" and get() == "value" and built == [1]


def test_report_regenerates_from_json(dummy_bench, tmp_path):
    name, _ = dummy_bench
    ctx = BenchContext(**FAST_CTX)
    harness.run_benches([name], ctx=ctx, out_dir=str(tmp_path), progress=False, report=False)
    folder = tmp_path / harness.device_slug(ctx)
    assert not (folder / f"{name}.md").exists()
    assert report.main([str(folder)]) == 0
    assert (folder / f"{name}.md").exists() and (folder / f"{name}.png").exists()


def test_commit_override(monkeypatch, tmp_path):
    monkeypatch.setenv("DZ_COMMIT", "abc123")
    assert harness.commit() == "abc123"
    monkeypatch.delenv("DZ_COMMIT")
    # the value, in a repository made here: HEAD's sha, "-dirty" once a tracked file changes, "unknown" outside one
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "f.txt").write_text("a\n")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(harness, "REPO_DIR", str(repo))
    sha = git("rev-parse", "HEAD")
    assert len(sha) == 40 and harness.commit() == sha
    (repo / "untracked.txt").write_text("x")
    assert harness.commit() == sha                          # untracked files do not make it dirty
    (repo / "f.txt").write_text("b\n")
    assert harness.commit() == sha + "-dirty"
    monkeypatch.setattr(harness, "REPO_DIR", str(tmp_path / "not-a-repo"))
    (tmp_path / "not-a-repo").mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert harness.commit() == "unknown"


def test_rows_stream_samples_and_deadline(dummy_bench, tmp_path, capsys):
    """Every row is appended to <bench>.rows.jsonl and printed as it is measured, carries its sample count (at
    least min_samples), setup and first-call times; after the deadline no new row starts and the rest say why."""
    name, _ = dummy_bench
    combined = tmp_path / "all-rows.jsonl"
    ctx = BenchContext(**dict(FAST_CTX, min_samples=7, echo=True, rows_file=str(combined)))
    records = harness.run_benches([name], ctx=ctx, out_dir=str(tmp_path), progress=False, report=False)[name]
    folder = tmp_path / harness.device_slug(ctx)
    speedups = ("speedup_vs_best_peer", "best_peer")   # streamed rows count only the peers measured before them
    for path in (folder / f"{name}.rows.jsonl", combined):
        with open(path) as f:
            streamed = [json.loads(line) for line in f]
        assert [{k: v for k, v in r.items() if k not in speedups} for r in streamed] == \
            [{k: v for k, v in r.items() if k not in speedups} for r in records]
    printed = capsys.readouterr().out
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        assert r["samples"] >= 7 and r["setup_s"] >= 0 and r["first_call_s"] >= 0
        assert f"{r['bench']}/{r['case']}/{r['impl']}: ok" in printed and f"n={r['samples']}" in printed
    slow = _by_impl(records, "double")["peer-slow"]
    assert slow["median_ms"] >= 2.0  # it sleeps 2 ms per call

    late = BenchContext(**dict(FAST_CTX, deadline=time.time() - 1))
    skipped = harness.run_bench(name, late, progress=False)
    assert [r["status"] for r in skipped] == ["skipped"] * len(skipped) and len(skipped) == 6
    assert all("time budget" in r["unavailable"] for r in skipped)


def test_echo_prints_a_row_whose_error_is_not_finite(capsys):
    """A peer that computes a different function records max_err nan, which the JSON-safe record holds as "nan"."""
    row = {"bench": "b", "case": "c", "impl": "copy_", "status": "ok", "median_ms": 1.0, "p20_ms": 0.9,
           "p80_ms": 1.1, "samples": 5, "gbps": 10.0, "max_err": "nan", "first_call_s": 0.1, "setup_s": 0.1}
    harness._echo(row)
    assert "err nan" in capsys.readouterr().out
