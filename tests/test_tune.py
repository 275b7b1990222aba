"""The tuning sweeps (python -m dz_bench.tune): every family end to end at tiny shapes in the interpreter (one
candidate per sweep), and the rules that keep a wrong fast configuration from winning."""
import json
import time

import pytest
import torch

from dz_bench import tune
from dz_kernels import configs


@pytest.mark.slow
@pytest.mark.parametrize("family", tune.FAMILIES)
def test_sweep_runs_end_to_end_small(family, tmp_path):
    configs.reload()
    before = configs.dumps(configs.table(family))
    written = tune.run(family, str(tmp_path), budget_s=900, small=True, max_candidates=1, install=False,
                       device=str(tune_device()))
    path = written[family]
    assert path is not None and path.startswith(str(tmp_path))
    with open(path) as f:
        table = json.load(f)
    configs.validate_table(table, family)
    arch = configs.arch_of(tune_device())
    assert table["arch"][arch], f"no {arch} entries written"
    for entries in table["arch"][arch].values():
        for e in entries:
            assert "python -m dz_bench.tune" in e["source"] and e["measured"]["median_ms"] > 0
    rows = [json.loads(line) for line in (tmp_path / f"tune-{family}.rows.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["err"] <= r["bar"] for r in rows)
    configs.reload()
    assert configs.dumps(configs.table(family)) == before      # --small never installs


def tune_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tuner(tmp_path, deadline_s=60.0):
    return tune.Tuner(device="cpu", small=True, out=str(tmp_path), deadline=time.time() + deadline_s, arch="cpu")


def test_a_wrong_or_unwritten_fast_candidate_never_wins(tmp_path):
    ref = torch.arange(6.0)

    def prepare(cfg, seed):
        kind = cfg["kind"]

        def run():
            if kind == "right":
                time.sleep(0.05)
                return ref.clone()
            if kind == "wrong":
                return ref + 1.0
            if kind == "unwritten":
                out = ref.clone()
                out[2] = float("nan")
                return out
            raise RuntimeError("does not compile")
        return run, ref

    t = _tuner(tmp_path)
    rows = tune.run_candidates(t, "fused", "test", "case", [{"kind": k} for k in ("right", "wrong", "unwritten",
                                                                                  "broken")], prepare)
    assert [r.status for r in rows] == ["ok", "wrong", "wrong", "error"]
    assert rows[2].err == float("inf") and "does not compile" in rows[3].note
    best, default = tune.pick(rows)
    assert best is rows[0] and default is rows[0]
    lines = (tmp_path / "tune-fused.rows.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[1])["status"] == "wrong" and json.loads(lines[2])["err"] == "inf"


def test_pick_keeps_the_default_unless_the_gain_is_real(tmp_path):
    def row(ms, status="ok"):
        return tune.Row("fused", "s", "c", "x", {}, status=status, median_ms=ms, p20_ms=ms, p80_ms=ms)

    default, close, fast = row(1.0), row(0.99), row(0.9)
    assert tune.pick([default, close])[0] is default            # within MIN_GAIN: noise, keep the default
    assert tune.pick([default, close, fast])[0] is fast
    assert tune.pick([row(None, "error"), fast])[0] is fast       # a default that failed is no baseline
    assert tune.pick([row(None, "wrong")]) == (None, None)


def test_budget_spent_means_skipped_rows_and_no_table(tmp_path):
    t = _tuner(tmp_path, deadline_s=-1.0)
    rows = tune.run_candidates(t, "kv_cache", "s", "c", [{"a": 1}], lambda cfg, seed: (None, None))
    assert [r.status for r in rows] == ["skipped"]
    assert tune.write_table(t, "kv_cache", {"epilogue": []}, install=False) is None


def test_cli_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        tune.main(["nonsense"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "give a sweep name" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        tune.main(["fp8", "--budget-s", "0"])
    assert tune.main(["--list"]) == 0
    assert "attention:bwd" in capsys.readouterr().out


def test_fp8_gemm_sweep_times_its_tile_candidates_not_the_autotuner():
    """A forced entry is merged over the table's default, which says autotune: the sweep's tile candidates must turn
    it off, or the launcher runs the autotuned kernel for every candidate and the table gets tiles nobody timed
    (it did, until the candidates said autotune=False)."""
    from dz_bench.tune.quant import gemm_configs
    from dz_kernels.quant._common import launch_config

    tiles = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    for small, M in ((False, 16), (False, 1785), (True, 48)):
        cands = gemm_configs(small, M)
        assert cands[0] == {"autotune": True} and len(cands) > 1
        for cand in cands:
            with configs.forced("fp8", "gemm", cand):
                got = launch_config("fp8", "gemm", torch.device("cpu"), m=M, n=5120, k=5120, block_scaled=False)
            assert bool(got.get("autotune")) == cand["autotune"], (cand, got)
            if not cand["autotune"]:
                assert {k: got[k] for k in tiles} == {k: cand[k] for k in tiles}
