"""`dz serve --protocol openpi` driven by the real `openpi-client` (PyPI), in an environment of its own.

openpi-client pins numpy < 2, so it lives in a separate virtual environment: `<repo>/.venv-openpi` (git-ignored; or
$DZ_OPENPI_VENV), made once with `python -m venv --without-pip` and this environment's pip installing
OPENPI_CLIENT into it (about 20 s with a warm pip cache), reused while its stamp names the same version. CI reaches
PyPI, so a failed install fails the test: it never passes without the real client. A machine without a package
index says so with DZ_OFFLINE=1 (scripts/gpu_run.sh does, for the GPU machine): the test then skips, naming why.

The server is a `dz serve` subprocess on a tiny DROID-shaped checkpoint written here in the DreamZero release's
layout (weights, dz_config.json, experiment_cfg/metadata.json + conf.yaml); the client is
tests/openpi_client_driver.py: openpi's WebsocketClientPolicy as is, and the release's RoboArena-style client with
"endpoint" and "session_id". The actions it receives are checked against the same pipeline run in this process.
"""
import dataclasses
import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from openpi_helpers import RES, VIEWS, tiny_cfg, tiny_droid_model, write_release_experiment_cfg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENPI_CLIENT = "openpi-client==0.1.2"
# openpi-client 0.1.2 imports typing_extensions (websocket_client_policy.py) without declaring it
OPENPI_EXTRA = ("typing-extensions>=4.6",)
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openpi_client_driver.py")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


@pytest.fixture(scope="session")
def openpi_python() -> str:
    """The python of the openpi-client environment, made on first use (see the module doc)."""
    root = os.environ.get("DZ_OPENPI_VENV") or os.path.join(REPO, ".venv-openpi")
    py, stamp = os.path.join(root, "bin", "python"), os.path.join(root, ".dz-openpi-stamp")

    def ready() -> bool:
        try:
            with open(stamp) as f:
                want = [OPENPI_CLIENT, *OPENPI_EXTRA]
                return json.load(f).get("packages") == want and os.path.exists(py)
        except (OSError, ValueError):
            return False

    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(os.path.abspath(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready() and os.environ.get("DZ_OFFLINE") == "1":
            pytest.skip(f"no package index on this machine (DZ_OFFLINE=1, set by scripts/gpu_run.sh): "
                        f"{OPENPI_CLIENT} cannot be installed here; CI installs it and runs this test")
        if not ready():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import shutil, sys; shutil.rmtree(sys.argv[1], True)", root],
                           check=True)
            steps = [[sys.executable, "-m", "venv", "--without-pip", root],
                     [sys.executable, "-m", "pip", "--python", py, "install", "--quiet", OPENPI_CLIENT,
                      *OPENPI_EXTRA]]
            for cmd in steps:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_clean_env())
                if r.returncode:
                    pytest.fail(f"could not make the openpi-client environment ({' '.join(cmd)}): exit "
                                f"{r.returncode}\n{(r.stdout + r.stderr)[-3000:]}\nThis test needs {OPENPI_CLIENT} "
                                f"from PyPI (CI has PyPI access); or point DZ_OPENPI_VENV at an environment with it.")
            with open(stamp, "w") as f:
                json.dump({"packages": [OPENPI_CLIENT, *OPENPI_EXTRA],
                           "install_s": round(time.perf_counter() - t0, 1)}, f)
    check = "import numpy, openpi_client.websocket_client_policy; print(numpy.__version__)"
    r = subprocess.run([py, "-c", check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("1."), r.stdout + r.stderr      # its own numpy < 2
    return py


def ckpt_cfg():
    """The tiny DROID model with one embodiment slot: the release's metadata names slot 17 (oxe_droid), which a
    one-slot model runs in its only slot."""
    return tiny_cfg().replace(num_embodiments=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DROID-shaped checkpoint in the release's layout: weights, dz_config.json, experiment_cfg/."""
    from dreamzero.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("droid_ckpt")
    cfg = ckpt_cfg()
    save_checkpoint(tiny_droid_model(cfg), str(folder))
    with open(folder / "dz_config.json", "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    write_release_experiment_cfg(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def served(checkpoint):
    """`dz serve --protocol openpi` on the checkpoint (tiny random encoders, one denoising step, one thread)."""
    proc = subprocess.Popen([sys.executable, "-m", "dz_kernels.cli", "serve", "--protocol", "openpi", "--checkpoint",
                             checkpoint, "--encoders", "tiny", "--steps", "1", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_clean_env(OMP_NUM_THREADS="1"))
    killer = threading.Timer(600, proc.kill)
    killer.start()
    try:
        line = proc.stdout.readline()
        m = re.search(r"openpi protocol; listening on (ws://127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield m.group(1)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
        killer.cancel()


def test_openpi_client_and_roboarena_variant(openpi_python, served, checkpoint, tmp_path):
    out = tmp_path / "calls.npz"
    r = subprocess.run([openpi_python, DRIVER, served, str(out)], capture_output=True, text=True, timeout=600,
                       env=_clean_env())
    assert r.returncode == 0, r.stderr[-4000:]
    log = json.loads(r.stdout.strip().splitlines()[-1])
    roboarena = {"image_resolution": list(RES), "needs_wrist_camera": True, "n_external_cameras": 2,
                 "needs_stereo_camera": False, "needs_session_id": True, "action_space": "joint_position"}
    assert log["metadata"] == roboarena and log["arena_metadata"] == roboarena
    calls = log["calls"]
    ok = [c for c in calls if "error" not in c]
    assert all(c["shape"] == [3, 8] and c["dtype"] == "float32" and c["same_action_key"] for c in ok)
    assert all(0 < c["server_timing"]["infer_ms"] <= c["server_timing"]["latency_ms"] for c in ok)
    # openpi: one episode per connection; the refused call (index 4) leaves it as it was
    assert [c["episode"]["call"] for c in calls[:4]] == [1, 2, 3, 4]
    assert "error" in calls[4] and "wrist_image_left has shape" in calls[4]["error"]
    assert calls[5]["episode"]["call"] == 5 and not calls[5]["episode"]["new"]
    # RoboArena: a session, the release's numbering of the exterior views, reset, a new episode in the same session
    assert [c["episode"]["call"] for c in calls[6:8]] == [1, 2] and calls[6]["episode"]["new"]
    assert calls[6]["naming"] == "release"
    assert log["reset_reply"] == "reset successful"
    assert calls[8]["episode"]["new"] and calls[8]["episode"]["call"] == 1

    # the same observations through the same checkpoint, metadata and encoders in this process
    from dreamzero.checkpoint import load_model
    from dreamzero.engine import Policy, PolicyConfig
    from dreamzero.serve.droid import RobotPolicy
    from dreamzero.serve.openpi_server import build_encoders
    from dreamzero.serve.policy_meta import load_policy_metadata

    cfg = ckpt_cfg()
    robot = RobotPolicy(Policy(load_model(cfg, checkpoint), PolicyConfig(num_steps=1)),
                        build_encoders("tiny", cfg, "cpu"), load_policy_metadata(checkpoint))
    arrays = np.load(out)
    for i, c in enumerate(calls):
        if "error" in c:
            continue
        if i == 8:
            robot.end_episode()                     # the RoboArena reset
        obs = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(f"{i}/") and
               not k.endswith("/actions")}
        obs["prompt"] = c["prompt"]
        if c["session_id"] is not None:
            obs["session_id"] = c["session_id"]
        got = robot.infer(robot.spec.parse(obs), "0")
        assert got["episode"]["call"] == c["episode"]["call"]
        np.testing.assert_allclose(arrays[f"{i}/actions"], got["actions"], rtol=1e-5, atol=1e-5)
    assert robot.meta.video_keys == VIEWS and robot.meta.embodiment_id == 17 and robot.embodiment == 0
