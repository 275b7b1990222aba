"""The test suite's result as a record: device, versions, commit, counts and every skip and failure, from pytest's
JUnit XML (`pytest --junitxml=...`).

    python -m dz_bench.suite_record junit.xml bench/results/<device-slug>/tests.json [--duration-s S]

The record is what "the suite passes on this machine" means in this repository: a GPU run commits it under
bench/results/<device-slug>/tests.json for the commit it ran.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import xml.etree.ElementTree as ET

__all__ = ["read_junit", "suite_record", "main"]


def read_junit(path: str) -> list[dict]:
    """One dict per test case: id ("file::name"), outcome (passed/failed/error/skipped), message, seconds."""
    root = ET.parse(path).getroot()
    cases = []
    for tc in root.iter("testcase"):
        classname = tc.get("classname") or ""
        test_id = (classname.replace(".", "/") + ".py::" if classname else "") + (tc.get("name") or "?")
        outcome, message = "passed", None
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or (child.text or "").strip().splitlines()[-1:] or [""])
                message = message if isinstance(message, str) else message[0]
                break
        cases.append({"id": test_id, "outcome": outcome, "message": (message or "")[:500],
                      "seconds": float(tc.get("time") or 0.0)})
    return cases


def suite_record(cases: list[dict], device: str, device_slug: str, versions: dict, commit: str,
                 duration_s: float | None = None) -> dict:
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for c in cases:
        counts[c["outcome"]] += 1
    skip_reasons: dict[str, int] = {}
    for c in cases:
        if c["outcome"] == "skipped":
            skip_reasons[c["message"]] = skip_reasons.get(c["message"], 0) + 1
    return {
        "device": device, "device_slug": device_slug, "versions": versions, "commit": commit,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": duration_s, "total": len(cases), **counts,
        "ok": counts["failed"] == 0 and counts["error"] == 0 and len(cases) > 0,
        "skip_reasons": dict(sorted(skip_reasons.items(), key=lambda kv: -kv[1])),
        "not_passed": [c for c in cases if c["outcome"] in ("failed", "error")],
        "skips": [{"id": c["id"], "reason": c["message"]} for c in cases if c["outcome"] == "skipped"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dz_bench.suite_record", description=__doc__.splitlines()[0])
    parser.add_argument("junit", help="pytest's --junitxml file")
    parser.add_argument("out", help="the tests.json to write")
    parser.add_argument("--duration-s", type=float, default=None, help="wall time of the pytest run")
    args = parser.parse_args(argv)
    try:
        cases = read_junit(args.junit)
    except (OSError, ET.ParseError) as e:
        print(f"suite_record: cannot read {args.junit}: {e}; run pytest with --junitxml first", file=sys.stderr)
        return 2
    from dz_kernels.atomic import atomic_write_json
    from dz_bench import harness

    ctx = harness.BenchContext.detect()
    record = suite_record(cases, harness.device_name(ctx), harness.device_slug(ctx), harness.versions(),
                          harness.commit(), args.duration_s)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_json(args.out, record, indent=1)
    print(f"suite on {record['device']}: {record['passed']} passed, {record['failed']} failed, {record['error']} "
          f"errors, {record['skipped']} skipped ({'ok' if record['ok'] else 'NOT ok'}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
