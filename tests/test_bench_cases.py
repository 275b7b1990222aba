"""The bench case lists (no timing): every case name says what it measured, and the peers the issues ask for are
there. Listing cases allocates nothing, so this runs at the full shapes on any machine."""
import re

import pytest

from dz_bench import harness


def _cases(name, small):
    harness.load_cases()
    return list(harness.registry()[name](harness.BenchContext(device="cpu", small=small)))


@pytest.mark.parametrize("small", [True, False])
def test_quant_case_names_carry_their_shapes(small):
    cases = _cases("quant", small)
    names = [c.case for c in cases]
    assert len(names) == len(set(names)), "two cases share a name"
    for c in cases:
        m = re.fullmatch(r"[a-z0-9-]+/M(\d+)-K(\d+)-N(\d+)", c.case)
        assert m and (int(m[1]), int(m[2]), int(m[3])) == (c.params["M"], c.params["K"], c.params["N"]), c.case
    if not small:
        fp8_m = {c.params["M"] for c in cases if c.case.startswith("fp8-linear/")}
        w4a16_m = {c.params["M"] for c in cases if c.case.startswith("nvfp4-w4a16/")}
        assert {1, 4, 16, 1785, 3570} <= fp8_m and {1, 4, 16, 1785, 3570} <= w4a16_m
    for c in cases:
        if c.case.startswith("fp8-linear/"):
            assert {"dz", "dz-triton", "bf16-cublas", "te-linear"} <= set(c.impls)
        if c.case.startswith("nvfp4-w4a4-emulation/"):     # no FP4 tensor cores here: no peer, no ratio
            assert set(c.impls) == {"dz"} and "emulation" in c.params["path"]


@pytest.mark.parametrize("bench", ["fused_ops", "kv_cache", "attention"])
def test_case_names_are_unique(bench):
    names = [c.case for c in _cases(bench, True)]
    assert names and len(names) == len(set(names))


def test_host_time_tool_times_every_op_and_refuses_a_bad_count():
    """python -m dz_bench.host (bench/NOTES.md, "Host time of the ops") runs every op with its launches skipped, on
    any machine; a mistaken --calls is one line."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "dz_bench.host", "--small", "--calls", "3"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("host time per call, us") and len(lines) == 11, r.stdout
    assert all(float(line.split()[-1]) > 0 for line in lines[1:]), r.stdout
    bad = subprocess.run([sys.executable, "-m", "dz_bench.host", "--calls", "0"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "--calls must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
