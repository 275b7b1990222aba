"""The trainer's checkpoint folders (`<out>/checkpoints/`): when a folder is a complete checkpoint, which one a run
resumes from, and how folders are removed so that none is ever left half-written under a final name. The save itself
(dreamzero.train.trainer.Trainer.save) writes into `step_XXXXXXXX.tmp`, lists every file in `trainer_state.json`
last, renames the folder, then replaces `latest`; `DZ_FAULT_AT` (dz_kernels/env.py) ends the process at one of
FAULT_POINTS for the kill tests.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings

from dz_kernels import env
from dz_kernels.atomic import fsync_dir

__all__ = ["STEP_RE", "FAULT_POINTS", "FAULT_EXIT_CODE", "fault_point", "checkpoint_problem", "latest_checkpoint",
           "remove_checkpoint", "clean_stale", "quiet_single_process"]

STEP_RE = re.compile(r"^step_\d{8}$")
# where DZ_FAULT_AT may end a save (the kill tests): after the new checkpoint got its final name, before `latest`
# names it; and while an old checkpoint is being deleted (pruned), after its first file is gone
FAULT_POINTS = ("save:after-rename", "prune:mid-delete")
FAULT_EXIT_CODE = 75


def fault_point(point: str) -> None:
    """End the process here, at once and without any cleanup (as a kill would), when DZ_FAULT_AT names `point`."""
    if env.fault_at() == point:
        os._exit(FAULT_EXIT_CODE)


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint folder `path` is not complete, or None when it is: its trainer_state.json parses and every
    file it lists is there with its size (a folder saved before the list existed: DCP's .metadata and one
    __<rank>_0.distcp per rank of its world size)."""
    st_path = os.path.join(path, "trainer_state.json")
    if not os.path.isdir(path):
        return "no such folder"
    try:
        with open(st_path) as f:
            st = json.load(f)
        int(st["step"])
    except FileNotFoundError:
        return "no trainer_state.json (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable trainer_state.json ({type(e).__name__}: {e})"
    files = st.get("files") or {n: None for n in [".metadata"] + [f"__{r}_0.distcp"
                                                                  for r in range(int(st.get("world_size", 1)))]}
    for name, size in sorted(files.items()):
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            return f"{name} is missing"
        if size is not None and os.path.getsize(fp) != size:
            return f"{name} holds {os.path.getsize(fp)} bytes, the checkpoint lists {size}"
    return None


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint to resume `out_dir` from: the folder `<out_dir>/checkpoints/latest` names when it is complete
    (`checkpoint_problem`), else the newest complete step_XXXXXXXX folder (a run killed after renaming its first
    checkpoint but before writing `latest`); None when there is no complete checkpoint."""
    root = os.path.join(out_dir, "checkpoints")
    p = os.path.join(root, "latest")
    if os.path.isfile(p):
        with open(p) as f:
            name = f.read().strip()
        if STEP_RE.match(name) and checkpoint_problem(os.path.join(root, name)) is None:
            return os.path.join(root, name)
    names = sorted((d for d in os.listdir(root) if STEP_RE.match(d)), reverse=True) if os.path.isdir(root) else []
    for name in names:
        if checkpoint_problem(os.path.join(root, name)) is None:
            return os.path.join(root, name)
    return None


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder without ever leaving part of it under its name: it is renamed out of the way
    first (`<name>.deleting-<pid>`, which `clean_stale` removes if a kill interrupts the deletion)."""
    if not os.path.exists(path):
        return
    trash = f"{path}.deleting-{os.getpid()}"
    os.rename(path, trash)
    fsync_dir(os.path.dirname(path))
    shards = sorted(f for f in os.listdir(trash) if f.endswith(".distcp"))
    for f in shards[:1]:
        os.unlink(os.path.join(trash, f))
        fault_point("prune:mid-delete")
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(root: str) -> None:
    """Remove what a killed save left in `root`: unfinished folders (step_X.tmp), folders half deleted
    (.deleting-<pid>), temporary files of `latest`; a checkpoint moved aside to be replaced (step_X.old-<pid>)
    goes back under its name when its replacement never arrived, else it is removed."""
    if not os.path.isdir(root):
        return
    for d in sorted(os.listdir(root)):
        p = os.path.join(root, d)
        base, sep, _ = d.partition(".old-")
        if sep and STEP_RE.match(base):
            if not os.path.exists(os.path.join(root, base)) and checkpoint_problem(p) is None:
                os.rename(p, os.path.join(root, base))
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif re.match(r"^step_\d{8}(\.tmp|\.deleting-\d+)$", d):
            shutil.rmtree(p, ignore_errors=True)
        elif re.match(r"^(\.latest\..*\.tmp|latest\.tmp.*)$", d) and os.path.isfile(p):
            os.unlink(p)
    fsync_dir(root)


@contextlib.contextmanager
def quiet_single_process():
    """Silence DCP's 'assuming the intent is to save/load in a single process' warning (that is the intent)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield
