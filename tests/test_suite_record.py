"""The suite's record (dz_bench.suite_record): counts, skip reasons and failures read from pytest's JUnit XML."""
import json
import subprocess
import sys

from dz_bench.suite_record import read_junit, suite_record

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="5">
<testcase classname="tests.test_a" name="test_ok" time="0.5"/>
<testcase classname="tests.test_a" name="test_bad[x]" time="1.0"><failure message="AssertionError: 1 != 2">tb</failure></testcase>
<testcase classname="tests.test_b" name="test_gpu" time="0"><skipped type="pytest.skip" message="needs a CUDA GPU">s</skipped></testcase>
<testcase classname="tests.test_b" name="test_gpu2" time="0"><skipped type="pytest.skip" message="needs a CUDA GPU">s</skipped></testcase>
<testcase classname="tests.test_c" name="test_err" time="0"><error message="fixture broke">tb</error></testcase>
</testsuite></testsuites>
"""


def test_counts_reasons_and_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    cases = read_junit(str(path))
    assert [c["outcome"] for c in cases] == ["passed", "failed", "skipped", "skipped", "error"]
    assert cases[1]["id"] == "tests/test_a.py::test_bad[x]"
    rec = suite_record(cases, "dev", "dev-slug", {"torch": "x"}, "abc", 12.5)
    assert (rec["passed"], rec["failed"], rec["error"], rec["skipped"], rec["total"]) == (1, 1, 1, 2, 5)
    assert rec["ok"] is False
    assert rec["skip_reasons"] == {"needs a CUDA GPU": 2}
    assert [c["id"] for c in rec["not_passed"]] == ["tests/test_a.py::test_bad[x]", "tests/test_c.py::test_err"]
    assert rec["not_passed"][0]["message"] == "AssertionError: 1 != 2"
    assert rec["skips"][0] == {"id": "tests/test_b.py::test_gpu", "reason": "needs a CUDA GPU"}
    green = suite_record([c for c in cases if c["outcome"] in ("passed", "skipped")], "d", "s", {}, "c")
    assert green["ok"] is True


def test_command_line_writes_the_record_and_names_a_missing_file(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    out = tmp_path / "res" / "tests.json"
    proc = subprocess.run([sys.executable, "-m", "dz_bench.suite_record", str(path), str(out), "--duration-s", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["failed"] == 1 and rec["duration_s"] == 3.0 and rec["commit"] and rec["device"]
    proc = subprocess.run([sys.executable, "-m", "dz_bench.suite_record", str(tmp_path / "nope.xml"), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
