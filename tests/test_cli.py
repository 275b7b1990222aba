"""The `dz` command line: env, bench --list, dispatch of commands added by other packages."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dz_kernels import cli, env


def test_dz_env(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "cuda_available", "dz_kernels._C", "cupy", "environment variables:"):
        assert key in out
    for var in env.ENV_VARS:
        assert var.name in out


def test_dz_env_json(capsys, monkeypatch):
    monkeypatch.setenv("DZ_CUDA_ARCHS", "90a")
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["env"]["DZ_CUDA_ARCHS"] == "90a"
    assert isinstance(info["cuda_available"], bool)
    assert info["dz_ext"]["available"] in (True, False)
    assert info["dz_ext"].get("reason") or info["dz_ext"].get("archs")


def test_dz_entry_point_runs_as_a_program():
    proc = subprocess.run([sys.executable, "-m", "dz_kernels.cli", "bench", "--list"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # one entry per case module of bench/dz_bench/cases, none broken, each with the first sentence of its docstring
    # (wrapped: continuation lines are indented)
    import dz_bench.cases

    folder = Path(dz_bench.cases.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    entries = []
    for line in proc.stdout.splitlines():
        if line.startswith(" "):
            entries[-1] += " " + line.strip()
        else:
            entries.append(line)
    assert [e.split()[0] for e in entries] == modules and "BROKEN" not in proc.stdout
    for name, entry in zip(modules, entries):
        doc = " ".join(ast.get_docstring(ast.parse((folder / f"{name}.py").read_text())).split())
        text = entry.split(None, 1)[1]
        assert doc.startswith(f"{name}: {text}") and text.endswith("."), (name, text)


def test_dz_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "env" in out and "bench" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_dz_bench_runs_on_cpu(tmp_path, capsys):
    assert cli.main(["bench", "copy", "--device", "cpu", "--small", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "copy: 2 rows" in capsys.readouterr().out
    assert list(tmp_path.glob("cpu-*/copy.json"))
    with pytest.raises(SystemExit):
        cli.main(["bench", "no-such-bench", "--device", "cpu"])


def test_commands_from_an_extension_module(monkeypatch, capsys):
    seen = {}

    def serve(argv):
        seen["argv"] = argv
        return 3

    fake_target = types.ModuleType("dz_test_fake_target")
    fake_target.serve = serve
    fake = types.ModuleType("dz_test_fake_commands")
    fake.COMMANDS = {"serve": ("dz_test_fake_target:serve", "run the test server"),
                     "env": "dz_test_fake_target:serve"}  # a built-in name is not replaced
    monkeypatch.setitem(sys.modules, "dz_test_fake_target", fake_target)
    monkeypatch.setitem(sys.modules, "dz_test_fake_commands", fake)
    monkeypatch.setattr(cli, "EXTENSION_MODULES", ("dz_test_fake_commands", "dz_test_module_that_is_absent"))
    commands = cli.all_commands()
    assert commands["serve"] == ("dz_test_fake_target:serve", "run the test server")
    assert commands["env"] == cli.COMMANDS["env"]
    assert cli.main(["serve", "--port", "1"]) == 3 and seen["argv"] == ["--port", "1"]
    assert cli.main(["--help"]) == 0 and "run the test server" in capsys.readouterr().out


def test_broken_extension_module_does_not_break_builtins(monkeypatch, capsys, tmp_path):
    (tmp_path / "dz_test_broken_commands.py").write_text("raise RuntimeError('bad import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "EXTENSION_MODULES", ("dz_test_broken_commands",))
    assert set(cli.all_commands()) == set(cli.COMMANDS)
    assert "ignoring dz_test_broken_commands: RuntimeError: bad import" in capsys.readouterr().err
    assert cli.main(["env", "--json"]) == 0
