"""Launch configurations of the kernels, per GPU architecture, read from committed JSON tables.

One table per kernel family, `dz_kernels/configs/<family>.json` (attention, fp8, nvfp4, fused, kv_cache), written by
the tuning sweeps (`python -m dz_bench.tune NAME`, bench/dz_bench/tune/) and read here by every launcher:

    {"family": "attention", "format": 1, "doc": "...",
     "defaults": {KIND: [ENTRY, ...]},               the configurations the code used before any tuning
     "arch":     {"sm90": {KIND: [ENTRY, ...]}}}     what a sweep measured best on that architecture
    ENTRY = {"match": {...}, "config": {...}, "source": "..."}

`lookup(family, kind, arch, **key)` returns a `Choice(config, source)`:
  1. the first `defaults[kind]` entry whose `match` holds for `key` gives the base configuration (each default list
     ends with an entry that matches everything, `"match": {}`);
  2. the first `arch[arch][kind]` entry whose `match` holds, if any, is laid over it (its fields replace the base's;
     a tuned entry may name only the fields it changed);
  3. so an architecture the table does not know (a new GPU, "cpu") gets the defaults, and so does a key no tuned
     entry matches (a head dim or shape the sweep did not cover).
A `match` holds when every item holds: `"name": v` means key[name] == v; `"name_max": v` means key[name] <= v;
`"name_min": v` means key[name] >= v. A match item whose name is not in `key` does not hold.

`DZ_CONFIG_DIR=<dir>`: a `<dir>/<family>.json` there replaces the packaged table of that family (e.g. the tables a
tuning run just wrote, before they are committed). `forced(family, kind, config)` pins one kind's configuration
inside a `with` block (the tuning sweeps time their candidates through the kernels' own launch paths with it).

Architectures are named "sm<major><minor>" from the CUDA device's compute capability (an H100 or H200 is "sm90");
CPU tensors (the Triton interpreter) are "cpu", for which the launchers keep their own small interpreter tiles.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any, NamedTuple

import torch

__all__ = ["FAMILIES", "Choice", "arch_of", "lookup", "table", "reload", "forced", "matches", "table_path",
           "validate_table", "merge_entries", "dtype_name", "dumps", "generation", "invalidate"]

FAMILIES = ("attention", "fp8", "nvfp4", "fused", "kv_cache")
FORMAT = 1
_HERE = os.path.dirname(os.path.abspath(__file__))
_TABLES: dict[str, dict] = {}
_FORCED: dict[tuple[str, str], dict] = {}


class Choice(NamedTuple):
    """A looked-up configuration and where it came from ("default", or the tuned entry's source)."""
    config: dict
    source: str


def table_path(family: str, directory: str | None = None) -> str:
    """Where the table of `family` is read from: DZ_CONFIG_DIR's copy when it has one, else the packaged one."""
    _check_family(family)
    if directory is None:
        from dz_kernels import env

        override = env.config_dir_override()
        if override and os.path.isfile(os.path.join(override, f"{family}.json")):
            directory = override
        else:
            directory = _HERE
    return os.path.join(directory, f"{family}.json")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown config family {family!r}; known: {', '.join(FAMILIES)}")


def validate_table(t: Any, family: str) -> dict:
    """Check a table's structure (raises ValueError naming the problem); returns it."""
    where = f"config table {family!r}"
    if not isinstance(t, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(t).__name__}")
    if t.get("family") != family:
        raise ValueError(f"{where}: its 'family' field is {t.get('family')!r}")
    if t.get("format") != FORMAT:
        raise ValueError(f"{where}: format {t.get('format')!r}, this loader reads format {FORMAT}")
    defaults, arch = t.get("defaults"), t.get("arch", {})
    if not isinstance(defaults, dict) or not defaults:
        raise ValueError(f"{where}: 'defaults' must be a non-empty object of kind -> entries")
    if not isinstance(arch, dict):
        raise ValueError(f"{where}: 'arch' must be an object of architecture -> kind -> entries")

    def check_entries(entries, label):
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: {label} must be a non-empty list of entries")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("match"), dict) or not isinstance(e.get("config"), dict):
                raise ValueError(f"{where}: {label}[{i}] must be an object with 'match' and 'config' objects")

    for kind, entries in defaults.items():
        check_entries(entries, f"defaults.{kind}")
        if entries[-1]["match"]:
            raise ValueError(f"{where}: the last entry of defaults.{kind} must match everything (\"match\": {{}})")
    for a, kinds in arch.items():
        if not isinstance(kinds, dict):
            raise ValueError(f"{where}: arch.{a} must be an object of kind -> entries")
        for kind, entries in kinds.items():
            if kind not in defaults:
                raise ValueError(f"{where}: arch.{a} has kind {kind!r}, which has no defaults")
            check_entries(entries, f"arch.{a}.{kind}")
    return t


def _load(family: str) -> dict:
    path = table_path(family)
    try:
        with open(path) as f:
            t = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the config table {path}: {e}") from e
    return validate_table(t, family)


def table(family: str) -> dict:
    """The (validated, cached) table of `family`."""
    t = _TABLES.get(family)
    if t is None:
        _check_family(family)
        _TABLES[family] = t = _load(family)
    return t


def reload() -> None:
    """Read the tables again (e.g. after DZ_CONFIG_DIR changed). They are read here, eagerly, and at import:
    lookups traced by torch.compile then touch no file. A table that fails to read is left out, and its first
    lookup raises the reason."""
    _TABLES.clear()
    invalidate()
    for family in FAMILIES:
        try:
            _TABLES[family] = _load(family)
        except ValueError:
            pass


def matches(match: dict, key: dict) -> bool:
    """Whether an entry's `match` holds for `key` (see the module doc)."""
    for name, want in match.items():
        if name.endswith("_max") and name[:-4] in key:
            ok = key[name[:-4]] <= want
        elif name.endswith("_min") and name[:-4] in key:
            ok = key[name[:-4]] >= want
        else:
            ok = name in key and key[name] == want
        if not ok:
            return False
    return True


def _first(entries, key):
    for e in entries or ():
        if matches(e["match"], key):
            return e
    return None


_MEMO: dict = {}
_GENERATION = 0


def generation() -> int:
    """A number that changes whenever a lookup may answer differently than before (reload, forced, invalidate):
    code that keeps a lookup's result beyond one call (dz_kernels.quant.Float8Linear's dispatch paths) keys it
    with this number."""
    return _GENERATION


def invalidate() -> None:
    """Forget the memoized lookups and move generation() on: call it after changing a loaded table in place."""
    global _GENERATION
    _MEMO.clear()
    _GENERATION += 1


def lookup(family: str, kind: str, arch: str, **key) -> Choice:
    """The configuration of kernel `kind` of `family` on `arch` for `key` (see the module doc for the rule).
    Launchers call this on every launch: results are memoized (until reload), so treat the config as read-only."""
    pinned = _FORCED.get((family, kind))
    if pinned is not None:
        return Choice(dict(pinned), "forced")
    memo_key = (family, kind, arch, tuple(sorted(key.items())))
    hit = _MEMO.get(memo_key)
    if hit is None:
        hit = _MEMO[memo_key] = _lookup(family, kind, arch, key)
    return hit


def _lookup(family: str, kind: str, arch: str, key: dict) -> Choice:
    t = table(family)
    if kind not in t["defaults"]:
        raise ValueError(f"config table {family!r} has no kind {kind!r}; kinds: {', '.join(t['defaults'])}")
    base = _first(t["defaults"][kind], key)
    if base is None:  # validate_table guarantees a catch-all; kept for a hand-edited table read around it
        raise ValueError(f"config table {family!r}: no default entry of {kind!r} matches {key}")
    config = dict(base["config"])
    tuned = _first(t.get("arch", {}).get(arch, {}).get(kind), key)
    if tuned is None:
        return Choice(config, "default")
    config.update(tuned["config"])
    return Choice(config, f"{arch}: {tuned.get('source', 'tuned')}")


@contextlib.contextmanager
def forced(family: str, kind: str, config: dict):
    """Inside the block, lookup(family, kind, ...) returns `config` (merged over the matching default) for any
    architecture and key. Not thread-safe: for the tuning sweeps, which run one candidate at a time."""
    _check_family(family)
    key = (family, kind)
    old = _FORCED.get(key)
    base = table(family)["defaults"].get(kind)
    if base is None:
        raise ValueError(f"config table {family!r} has no kind {kind!r}")
    _FORCED[key] = dict(base[-1]["config"], **config)
    invalidate()
    try:
        yield
    finally:
        if old is None:
            _FORCED.pop(key, None)
        else:
            _FORCED[key] = old
        invalidate()


_ARCH_CACHE: dict = {}


@torch.compiler.assume_constant_result
def arch_of(device) -> str:
    """"sm90" for a CUDA device of compute capability 9.0, "cpu" for the CPU (and any non-CUDA device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _ARCH_CACHE.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _ARCH_CACHE[index] = f"sm{major}{minor}"
    return arch


_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                torch.float8_e4m3fn: "float8_e4m3fn"}


def dtype_name(dtype: torch.dtype) -> str:
    """The tables' name of a dtype: "bfloat16", "float16", "float32", "float8_e4m3fn"."""
    name = _DTYPE_NAMES.get(dtype)
    return name if name is not None else str(dtype).replace("torch.", "")


def merge_entries(t: dict, arch: str, kind: str, new_entries: list) -> dict:
    """A copy of table `t` with `new_entries` put first in arch[arch][kind], replacing older entries whose
    `match` is the same (what a tuning sweep writes)."""
    out = copy.deepcopy(t)
    kinds = out.setdefault("arch", {}).setdefault(arch, {})
    keep = [e for e in kinds.get(kind, []) if all(e["match"] != n["match"] for n in new_entries)]
    kinds[kind] = list(new_entries) + keep
    return out


def dumps(t: dict) -> str:
    """A table as the committed files write it: one entry per line, so a tuning run's diff reads entry by entry."""
    def entries(d: dict, indent: str) -> list:
        lines = []
        kinds = list(d.items())
        for i, (kind, es) in enumerate(kinds):
            lines.append(f'{indent}{json.dumps(kind)}: [')
            lines += [f"{indent} {json.dumps(e)}" + ("," if j < len(es) - 1 else "") for j, e in enumerate(es)]
            lines.append(f"{indent}]" + ("," if i < len(kinds) - 1 else ""))
        return lines

    head = [k for k in t if k not in ("defaults", "arch")]
    out = ["{"] + [f" {json.dumps(k)}: {json.dumps(t[k])}," for k in head]
    out += [' "defaults": {'] + entries(t["defaults"], "  ") + [" },", ' "arch": {']
    archs = list(t.get("arch", {}).items())
    for i, (a, kinds) in enumerate(archs):
        out += [f"  {json.dumps(a)}: {{"] + entries(kinds, "   ") + ["  }" + ("," if i < len(archs) - 1 else "")]
    out += [" }", "}"]
    return "\n".join(out) + "\n"


reload()
