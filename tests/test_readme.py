"""The README as a newcomer runs it: every ```python block and every ```bash block marked `<!-- readme-test: run -->`
is executed, in the README's order, in one scratch folder (its /tmp/ paths moved there), in processes that set no
TRITON_INTERPRET (dz_kernels turns the interpreter on itself without CUDA); every other ```bash block names the
tests that check its commands (`<!-- readme-test: tests/x.py::test_y ... -->`), and those tests exist. The input
shapes table is checked against the configs, and the Python snippet's calls against the droid-14b shapes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def readme_blocks() -> list:
    """(language, code, marker or None) of every fenced block, in order."""
    return [(m["lang"], m["code"], m["marker"]) for m in BLOCK.finditer(README.read_text())]


def _scratch_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")     # `dz` of this venv
    env["OMP_NUM_THREADS"] = "1"
    return env


def _localize(code: str, tmp_path: Path) -> str:
    code = code.replace("/tmp/", f"{tmp_path}/")
    return re.sub(r'DreamZero\("(droid-14b|agibot-14b)"\)', 'DreamZero("tiny")', code)   # the tiny size here


def test_every_bash_block_is_run_or_names_its_tests():
    blocks = readme_blocks()
    assert sum(lang == "python" for lang, _, _ in blocks) >= 2
    for lang, code, marker in blocks:
        if lang != "bash":
            continue
        assert marker, f"a ```bash block without a <!-- readme-test: ... --> marker:\n{code}"
        if marker == "run":
            continue
        for node in marker.split():
            file, _, name = node.partition("::")
            assert (REPO / file).is_file(), f"{node}: no such test file"
            assert re.search(rf"^def {re.escape(name)}\(", (REPO / file).read_text(), re.M), f"{node}: no such test"


def test_the_readme_runs_in_order(tmp_path):
    """The Python snippet (at the tiny size, our kernels in the CPU interpreter), the training commands, the export
    loaded in Python: each block as written."""
    env = _scratch_env(tmp_path)
    ran = []
    for i, (lang, code, marker) in enumerate(readme_blocks()):
        if lang == "python":
            cmd = [sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + _localize(code, tmp_path)]
        elif lang == "bash" and marker == "run":
            cmd = ["bash", "-euo", "pipefail", "-c", _localize(code, tmp_path)]
        else:
            continue
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README block {i} ({lang}) failed:\n{code}\n{proc.stdout[-2000:]}\n" \
                                     f"{proc.stderr[-4000:]}"
        ran.append((lang, proc.stdout))
    assert [lang for lang, _ in ran] == ["python", "bash", "python"]
    assert "exported" in ran[1][1] and "joint_position" in ran[2][1]


def _shape_row(shape) -> str:
    return "`[" + ", ".join(["B"] + [str(s) for s in shape[1:]]) + "]`"


def test_the_input_shapes_table_matches_the_configs():
    from dreamzero.config import get_config
    from dreamzero.dreamzero import DreamZero

    text = README.read_text()
    cols = []
    for name in ("tiny", "droid-14b"):
        with torch.device("meta"):
            model = DreamZero(name)
        x = model.example_inputs(batch=1)
        cfg = get_config(name)
        col = {k: _shape_row(x[k].shape) for k in ("text", "clip", "first_latent", "observation", "state")}
        col["embodiment"] = f"{cfg.num_embodiments} slot" + ("s" if cfg.num_embodiments > 1 else "")
        col["actions (out)"] = _shape_row((1, cfg.actions_per_chunk, cfg.action_dim))
        assert tuple(x["embodiment"].shape) == (1,) and x["embodiment"].dtype == torch.long
        cols.append(col)
    for key in cols[0]:
        name = key if key == "actions (out)" else f"`{key}`"
        row = re.search(rf"^\| {re.escape(name)} \|[^|]*\| (?P<tiny>[^|]*) \| (?P<droid>[^|]*) \|$", text, re.M)
        assert row, f"no README row for {name}"
        assert (row["tiny"], row["droid"]) == (cols[0][key], cols[1][key]), key


def test_the_snippet_fits_the_droid_14b_shapes():
    """The README's calls with example_inputs at the real shapes, on the meta device (shapes without values): reset,
    and the fused control step's whole 40-block forward with its cache write; only reading the actions needs
    values."""
    from dreamzero.dreamzero import DreamZero
    from dreamzero.engine import Policy, PolicyConfig

    with torch.device("meta"):
        model = DreamZero("droid-14b")
    policy = Policy(model, PolicyConfig(num_steps=1, actions_only=True, cfg_mode="batched", fused_control=True))
    x = model.example_inputs(batch=1)
    policy.reset(x["text"], x["clip"], x["first_latent"], embodiment=x["embodiment"])
    with pytest.raises(NotImplementedError, match="meta"):
        policy.step(None, x["state"])
    assert all(0 in cache.frames for cache in policy.caches.values())


def test_several_embodiment_slots_need_ids_at_reset():
    from dreamzero.dreamzero import DreamZero
    from dreamzero.engine import Policy

    model = DreamZero("tiny")
    x = model.example_inputs(batch=2, seed=1)
    assert x["text"].shape[0] == 2 and not torch.equal(x["text"], model.example_inputs(batch=2)["text"])
    with pytest.raises(ValueError, match=r"2 embodiment slots: pass embodiment= ids \[2\] to reset"):
        Policy(model).reset(x["text"], x["clip"], x["first_latent"])


def test_the_gpu_command_names_real_phases():
    """The GPU block runs only on the GPU machine; here: its phases are ones gpu_run.sh takes, its benches exist."""
    from dz_bench import harness

    (code,) = [c for lang, c, m in readme_blocks() if lang == "bash" and "gpu_run.sh" in c]
    args = code.split("gpu_run.sh", 1)[1].split()
    usage = subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh"), "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    phases = [a for a in args if not a.startswith("-") and not a.isdigit()]
    assert phases and all(p.split(":")[0] in ("build", "tests", "convergence", "tune", "bench") for p in phases)
    assert all(p.split(":")[0] in usage for p in phases)
    for p in phases:
        if p.startswith("bench:"):
            assert set(p[6:].split(",")) <= set(harness.registry()), p


def test_the_two_commands():
    """scripts/test.sh is the suite (CI runs it: .ci/run); scripts/bench.sh runs every bench or the ones named."""
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    bench_sh = (REPO / "scripts" / "bench.sh").read_text()
    assert '-m pytest "${ARGS[@]}"' in test_sh

    def pytest_args(*argv):
        cmd = 'source "$1" && shift && dz_pytest_args "$@"'          # sourced: defines the function, runs nothing
        out = subprocess.run(["bash", "-c", cmd, "bash", str(REPO / "scripts" / "test.sh"), *argv],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        return out.splitlines()
    assert pytest_args() == ["-q", "tests"]                                      # the whole suite, quietly
    assert pytest_args("-q", "-x") == ["tests", "-q", "-x"]                      # a flag the user gives is not doubled
    assert pytest_args("-vv", "-k", "tests") == ["tests", "-vv", "-k", "tests"]
    assert pytest_args("tests/test_env.py", "-p", "no:x") == ["-q", "tests/test_env.py", "-p", "no:x"]
    assert pytest_args("--deselect", "tests/a.py::b") == ["-q", "tests", "--deselect", "tests/a.py::b"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    assert '-m dz_bench "$@"' in bench_sh and '-m dz_bench --all "$@"' in bench_sh
    for script in ("test.sh", "bench.sh", "gpu_run.sh", "setup_env.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0, script
