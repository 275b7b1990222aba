"""dz_kernels.env is the only reader of the environment: the variables the trainer and the benches read, and a scan
of model/ and bench/ for any other read."""
import os
import re

import pytest

from dz_kernels import env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_variables(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert (env.world_size(), env.local_rank()) == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (env.world_size(), env.local_rank()) == (8, 3)
    for name, bad, msg in (("WORLD_SIZE", "two", "not an integer"), ("WORLD_SIZE", "0", "at least 1"),
                           ("LOCAL_RANK", "-1", "at least 0")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name}={bad!r}.*{msg}"):
            env.world_size() if name == "WORLD_SIZE" else env.local_rank()
        monkeypatch.delenv(name)


def test_default_triton_interpret_keeps_an_explicit_value(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    env.default_triton_interpret()
    assert os.environ["TRITON_INTERPRET"] == "0" and not env.triton_interpret()
    monkeypatch.delenv("TRITON_INTERPRET")
    env.default_triton_interpret()
    assert env.triton_interpret()


def test_no_module_of_the_model_or_the_benches_reads_the_environment_itself():
    pattern = re.compile(r"os\.environ|os\.getenv|\bgetenv\(")
    offenders = []
    for top in ("model", "bench"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for fn in files:
                if fn.endswith(".py"):
                    path = os.path.join(dirpath, fn)
                    with open(path) as f:
                        for n, line in enumerate(f, 1):
                            if pattern.search(line):
                                offenders.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    assert not offenders, "read the environment through dz_kernels.env:\n" + "\n".join(offenders)
