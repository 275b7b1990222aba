"""dz_kernels.atomic (re-exported as dreamzero.atomic): the one durable-write rule (temporary file in the same folder, fsync, os.replace, fsync of the
folder), and a failed write that leaves the old file and no temporary file."""
import json
import os

import pytest

from dz_kernels import atomic
from dz_kernels.atomic import atomic_output, atomic_write, atomic_write_json, atomic_write_text


def _trace(monkeypatch):
    """Record fsync (of a file or a folder) and os.replace calls in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
@pytest.mark.parametrize("how", ["file", "path", "json", "text"])
def test_every_writer_fsyncs_the_file_then_replaces_then_fsyncs_the_folder(tmp_path, monkeypatch, how):
    events = _trace(monkeypatch)
    path = tmp_path / "sub" / "out.json"
    if how == "file":
        with atomic_write(path, "w") as f:
            f.write('{"a": 1}')
    elif how == "path":
        with atomic_output(path) as tmp:
            assert tmp.endswith(".json") and os.path.dirname(tmp) == str(path.parent)
            with open(tmp, "w") as f:
                f.write('{"a": 1}')
    elif how == "json":
        atomic_write_json(path, {"a": 1})
    else:
        atomic_write_text(path, '{"a": 1}')
    assert events == [("fsync", "file"), ("replace", "out.json"), ("fsync", "dir")]
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(path.parent) == ["out.json"]


@pytest.mark.parametrize("how", ["file", "path"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, how):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        if how == "file":
            with atomic_write(path, "wb") as f:
                f.write(b"new, half")
                raise RuntimeError("disk full (simulated)")
        else:
            with atomic_output(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"new, half")
                raise RuntimeError("disk full (simulated)")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_atomic_write_refuses_append_and_read_modes(tmp_path):
    for mode in ("a", "r+", "ab"):
        with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
            with atomic_write(tmp_path / "x", mode):
                pass
    assert os.listdir(tmp_path) == []


def test_the_model_s_name_is_the_same_implementation():
    import dreamzero.atomic

    for name in dreamzero.atomic.__all__:
        assert getattr(dreamzero.atomic, name) is getattr(atomic, name), name
