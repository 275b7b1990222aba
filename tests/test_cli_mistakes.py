"""Ordinary command-line mistakes, run as a user runs them (`python -m dz_kernels.cli ...` in a subprocess): exit code
2, one line on stderr that names the problem and the next step, no traceback; `--debug` shows the traceback."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest


def dz(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dz_kernels.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def one_line_mistake(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The process failed with exit code 2 and exactly one line on stderr holding every `expected` fragment."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for e in expected:
        assert e in err, (e, err)
    return err


def test_prepare_data_on_a_missing_folder(tmp_path):
    one_line_mistake(dz("prepare-data", tmp_path / "absent"), "absent does not exist",
                     "dz make-synthetic-data")


def test_prepare_data_without_encoders_names_the_flag(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text("{}")
    err = one_line_mistake(dz("prepare-data", tmp_path), "--encoder-path", "--encoders tiny")
    assert "path=" not in err


def test_train_on_a_missing_data_folder(tmp_path):
    one_line_mistake(dz("train", "--data", tmp_path / "absent", "--out", tmp_path / "run", "--config",
                        "tiny-synthetic"), "absent does not exist", "dz prepare-data")


def test_train_with_zero_steps(tmp_path):
    one_line_mistake(dz("train", "--data", tmp_path, "--out", tmp_path / "run", "--config", "tiny-synthetic",
                        "--steps", "0"), "--steps must be >= 1, got 0", "dz train --help")


def test_a_negative_learning_rate_parses_and_is_refused_by_value(tmp_path):
    """argparse would read `-1e-3` as a flag ("expected one argument"); it is a value, refused as one."""
    err = one_line_mistake(dz("train", "--data", tmp_path, "--out", tmp_path / "run", "--config", "tiny-synthetic",
                              "--lr", "-1e-3"), "--lr", "must be > 0")
    assert "expected one argument" not in err


def test_unknown_config_names_list_every_preset(tmp_path):
    for proc in (dz("train", "--data", tmp_path, "--out", tmp_path / "run", "--config", "tiny-synth"),
                 dz("serve", "--random-weights", "--config", "tiny-synth")):
        one_line_mistake(proc, "tiny-synth", "agibot-14b", "droid-14b", "'tiny", "tiny-synthetic")


def test_serve_on_a_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_mistake(dz("serve", "--random-weights", "--port", port, "--device", "cpu"),
                         f"port {port} on 127.0.0.1 is already in use", "--port 0")


def test_client_with_an_http_url():
    one_line_mistake(dz("client", "--url", "http://127.0.0.1:8765"), "HTTP URL", "--url ws://127.0.0.1:8765")


def test_export_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    one_line_mistake(dz("export", tmp_path, tmp_path / "out"), "neither a training checkpoint",
                     "the --out folder of `dz train`")
    from dreamzero.train.cli import export_main

    assert export_main([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert "absent does not exist: pass the --out folder of `dz train`" in capsys.readouterr().err


def test_serve_of_a_training_checkpoint_says_run_dz_export(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")
    one_line_mistake(dz("serve", ckpt), "is a training checkpoint", f"run `dz export {ckpt} <out>`")


def test_make_synthetic_data_keeps_a_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_line_mistake(dz("make-synthetic-data", tmp_path), "is not empty", "--overwrite")
    # --overwrite replaces a dataset, never a folder of something else
    one_line_mistake(dz("make-synthetic-data", tmp_path, "--overwrite"), "holds no LeRobot dataset")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_make_synthetic_data_overwrite_replaces_a_dataset(tmp_path):
    root = tmp_path / "syn"
    args = ("make-synthetic-data", root, "--episodes", "1", "--length", "10")
    assert dz(*args).returncode == 0
    (root / "dz_prepared").mkdir()                       # stale features of the old dataset go with it
    assert dz(*args, "--overwrite").returncode == 0
    assert (root / "meta" / "info.json").exists() and not (root / "dz_prepared").exists()


def test_debug_shows_the_traceback():
    url = ("--url", "http://127.0.0.1:8765")
    for args in (("--debug", "client", *url), ("client", *url, "--debug")):
        proc = dz(*args)
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "CommandError" in proc.stderr


@pytest.mark.parametrize("text, value", [("-1e-3", -1e-3), ("-2", -2.0), ("-.5", -0.5), ("-3.5E+2", -350.0)])
def test_negative_numbers_are_values(text, value):
    from dreamzero.cli_support import ArgumentParser

    p = ArgumentParser(prog="dz test")
    p.add_argument("--lr", type=float)
    p.add_argument("--betas", type=float, nargs=2)
    a = p.parse_args(["--lr", text, "--betas", text, "1"])
    assert a.lr == value and a.betas == [value, 1.0]
    with pytest.raises(SystemExit):
        p.parse_args(["--lr", "-x"])
