"""`dz serve` and `dz client`: wired into dz, argument errors as one line, a checkpoint loaded, the demo.
"""
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

msgpack = pytest.importorskip("msgpack", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")
pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from dreamzero.serve import client_main, serve_main  # noqa: E402
from serve_helpers import serve_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return serve_model()


# ---------------------------------------------------------------------------------------------- commands
def test_commands_are_wired_into_dz():
    from dz_kernels.cli import _resolve, all_commands

    cmds = all_commands()
    assert _resolve(cmds["serve"][0]) is serve_main and _resolve(cmds["client"][0]) is client_main


def test_serve_command_argument_errors(capsys, tmp_path):
    for argv in (["--config", "tiny"], ["--random-weights", "--checkpoint", "x.safetensors"]):
        with pytest.raises(SystemExit) as e:
            serve_main(argv)
        assert e.value.code == 2
        assert "exactly one of EXPORT (an export folder), --checkpoint PATH and --random-weights" in \
            capsys.readouterr().err
    # ordinary mistakes: one line with the next step, exit code 2
    assert serve_main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--device", "cpu"]) == 2
    assert "missing.safetensors does not exist: give an export folder" in capsys.readouterr().err
    assert serve_main(["--random-weights", "--dit-cache", "static", "--steps", "4", "--device", "cpu"]) == 2
    assert "static mask is defined for 16 steps" in capsys.readouterr().err


def test_serve_loads_a_checkpoint(model, tmp_path):
    """--checkpoint goes through dreamzero.checkpoint.load_model: the served policy has the saved weights."""
    from dreamzero.serve import build_policy, serve_parser

    save_checkpoint = pytest.importorskip("dreamzero.checkpoint", reason="no dreamzero.checkpoint in this tree: "
                                          "dz serve then takes --random-weights only").save_checkpoint

    path = save_checkpoint(model, tmp_path / "tiny")
    policy, name = build_policy(serve_parser().parse_args(["--checkpoint", str(path), "--config", "tiny",
                                                           "--device", "cpu", "--steps", "1"]))
    assert name == "tiny" and policy.config.num_steps == 1 and policy.dtype == torch.float32
    want = model.state_dict()
    got = policy.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    w = model.blocks[0].ffn[0].weight
    seeded, _ = build_policy(serve_parser().parse_args(["--random-weights", "--device", "cpu"]))
    assert torch.equal(seeded.model.blocks[0].ffn[0].weight, w)            # --weight-seed 0, as the fixture
    other, _ = build_policy(serve_parser().parse_args(["--random-weights", "--weight-seed", "1", "--device", "cpu"]))
    assert not torch.equal(other.model.blocks[0].ffn[0].weight, w)


def test_client_command_without_a_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert client_main(["--url", f"ws://127.0.0.1:{port}", "--timeout", "5"]) == 2
    assert "cannot connect" in capsys.readouterr().err


def test_dz_serve_and_client_demo(capsys):
    proc = subprocess.Popen([sys.executable, "-m", "dz_kernels.cli", "serve", "--config", "tiny", "--random-weights",
                             "--steps", "1", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(120, proc.kill)
    killer.start()
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (ws://127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)
        assert client_main(["--url", url, "--demo", "--chunks", "2", "--batch", "2"]) == 0
        out = capsys.readouterr().out
        assert "model tiny on cpu" in out and "reset: batch 2" in out
        assert re.search(r"step 1: chunk 2, actions \[2, 3, 6\] float32, round trip [\d.]+ ms", out)
        assert "server step latency: count 2" in out
        assert client_main(["--url", url]) == 0
        assert '"metadata"' in capsys.readouterr().out
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        killer.cancel()
    assert proc.returncode == 0, err
    assert "dz serve: stopped" in out
