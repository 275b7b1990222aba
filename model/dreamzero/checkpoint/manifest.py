"""Checksums of exported weights: a `SHA256SUMS` file beside them, in the format of coreutils' `sha256sum`
("<64 hex digits>  <file name>" per line), so `sha256sum -c SHA256SUMS` checks an export by hand as well.

`dz export` (dreamzero.train.export) writes it last, over every file it wrote; `load_checkpoint` / `load_model`
verify it when it is there: every file the manifest lists must be present with its digest, and every file they
read must be listed. A weight file changed after export (a flipped bit, a partial copy) then fails at load with
an error naming the file, instead of loading without a word.
"""
from __future__ import annotations

import hashlib
import os
import re

from dz_kernels.atomic import atomic_write_text

from .keys import CheckpointError

MANIFEST_NAME = "SHA256SUMS"
_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")

__all__ = ["MANIFEST_NAME", "sha256_file", "write_manifest", "read_manifest", "verify_manifest"]


def sha256_file(path: str, chunk_bytes: int = 16 * 2 ** 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str, names) -> str:
    """Write the digests of the files `names` (plain names inside `folder`) into `<folder>/SHA256SUMS`, atomically;
    returns its path. Entries of an existing manifest for other files that are still there are kept (two exports
    into one folder both stay verifiable)."""
    try:
        sums = read_manifest(folder) or {}
    except CheckpointError:
        sums = {}
    sums = {n: h for n, h in sums.items() if os.path.isfile(os.path.join(folder, n))}
    for name in set(names):
        if os.path.basename(name) != name or name == MANIFEST_NAME:
            raise ValueError(f"write_manifest: {name!r} is not a plain file name inside {folder}")
        sums[name] = sha256_file(os.path.join(folder, name))
    path = os.path.join(folder, MANIFEST_NAME)
    atomic_write_text(path, "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
    return path


def read_manifest(folder: str) -> dict | None:
    """{file name: sha256 hex} of `<folder>/SHA256SUMS`, or None when the folder has none."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            m = _LINE_RE.match(line)
            if m is None or os.path.basename(m.group(2)) != m.group(2):
                raise CheckpointError(f"{path}, line {i}: not a '<sha256>  <file name>' line: {line[:100]!r}")
            out[m.group(2)] = m.group(1)
    return out


def verify_manifest(files) -> int:
    """Check the weight files a load reads against the SHA256SUMS of their folder(s), when there is one: each must
    be listed and match its digest, and so must the small files the manifest lists beside them that are there
    (the index, the config: every listed .json). Raises CheckpointError naming the file; returns how many files
    were verified (0 without a manifest)."""
    by_folder: dict = {}
    for fp in files:
        by_folder.setdefault(os.path.dirname(os.path.abspath(fp)), []).append(os.path.basename(fp))
    checked = 0
    for folder, names in sorted(by_folder.items()):
        sums = read_manifest(folder)
        if sums is None:
            continue
        manifest = os.path.join(folder, MANIFEST_NAME)
        unlisted = sorted(n for n in names if n not in sums)
        if unlisted:
            raise CheckpointError(f"{os.path.join(folder, unlisted[0])}: not listed in {manifest}: the folder changed "
                                  f"after export (export it again, or remove {MANIFEST_NAME} if the change was meant)")
        small = {n for n in sums if n.endswith(".json") and os.path.isfile(os.path.join(folder, n))}
        for name in sorted(set(names) | small):
            fp = os.path.join(folder, name)
            got = sha256_file(fp)
            if got != sums[name]:
                raise CheckpointError(f"{fp}: sha256 {got} does not match {sums[name]} in {manifest}: the file "
                                      f"changed after export (corrupted or partly copied); copy or export it again")
            checked += 1
    return checked
