"""What a served robot policy needs beside its weights: camera views, state/action keys, normalization statistics and
transforms. Torch-free (json; PyYAML only to read the DreamZero release's conf.yaml).

Two sources, one schema (`PolicyMetadata`, written as `dz_policy.json`, format "dz-policy" version 1):

- the DreamZero release's checkpoint folder: `experiment_cfg/metadata.json` (per embodiment tag: statistics of every
  state/action sub-key, the relative-action statistics in place of the absolute ones for relative keys, and the
  modalities with each camera's resolution) and `experiment_cfg/conf.yaml` (the resolved training config: the
  embodiment's transform list: VideoCrop scale, VideoResize size, the StateActionTransform normalization modes, the
  ConcatTransform orders; `relative_action`, `relative_action_keys`, `action_horizon`,
  `embodiment_tag_to_projector_index`). `from_release` reads them as the release's GrootSimPolicy does;
- a dataset of ours (`from_dataset(LeRobotDataset)`): the statistics and keys the trainer normalized with, the
  camera resolution of its videos and the tiling it trained with; `write_policy_metadata` puts the result beside
  exported weights. An export whose folder holds only `dz export`'s dz_stats.json (statistics and keys, no cameras)
  is read with `from_export_stats`, which takes the cameras from the dataset and prepared folder it names.

The schema (every field required unless marked):
    {"format": "dz-policy", "version": 1,
     "embodiment_tag": "oxe_droid", "embodiment_id": 17,        # the model's category-specific slot
     "source": "<where it came from>",                           # optional
     "video": {"keys": [...],                                    # views in the model's order (DROID: 2 exterior, wrist)
               "resolution": [h, w],                             # the size the client sends each view at
               "view_size": [h, w],                              # one view after the transform (tiled frame 2h x 2w)
               "transform": "release_eval" | "dz_train",         # see dreamzero.serve.droid.prepare_view
               "crop_scale": 0.95,                               # release_eval: center crop before the resize
               "tiling": "droid" | "grid" | "single", "wrist_index": 2 | null},
     "state":  [{"key": "joint_position", "dim": 7, "normalization": "q99", "stats": {"q01": [...], ...}}, ...],
     "action": [{"key": "joint_position", "dim": 7, "normalization": "q99", "relative": true, "stats": {...}}, ...],
     "action_horizon": 24, "frames_per_call": 4, "prompt_template": "auto" | "none"}
Statistics hold what the mode needs (q99: q01, q99; mean_std: mean, std; min_max: min, max), one value per dim;
relative action keys carry the statistics of the relative actions (the action minus the state of the same key).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

FORMAT = "dz-policy"
VERSION = 1
FILENAME = "dz_policy.json"
EXPORT_STATS = "dz_stats.json"          # what `dz export` writes beside the weights (dreamzero.train.export)
RELEASE_DIR = "experiment_cfg"
NORM_MODES = ("q99", "mean_std", "min_max", "none")
_NEEDS = {"q99": ("q01", "q99"), "mean_std": ("mean", "std"), "min_max": ("min", "max"), "none": ()}
VIDEO_TRANSFORMS = ("release_eval", "dz_train")
TILINGS = ("droid", "grid", "single")
# The release serves DROID with 4 frames per call after the first (ARDroidRoboarenaPolicy.FRAMES_PER_CHUNK in its
# socket_test_optimized_AR.py): a server-side rule, not part of the checkpoint, so the release reader supplies it.
RELEASE_FRAMES_PER_CALL = 4
_T = "_target_"


class PolicyMetadataError(ValueError):
    """Policy metadata that is missing, unreadable or inconsistent; the message names the file."""


@dataclasses.dataclass(frozen=True)
class KeySpec:
    key: str
    dim: int
    normalization: str
    stats: dict
    relative: bool = False


@dataclasses.dataclass(frozen=True)
class PolicyMetadata:
    embodiment_tag: str
    embodiment_id: int
    video_keys: tuple
    resolution: tuple
    view_size: tuple
    video_transform: str
    crop_scale: float
    tiling: str
    wrist_index: int | None
    state: tuple
    action: tuple
    action_horizon: int
    frames_per_call: int
    prompt_template: str
    source: str = ""

    @property
    def state_dim(self) -> int:
        return sum(s.dim for s in self.state)

    @property
    def action_dim(self) -> int:
        return sum(a.dim for a in self.action)

    def to_dict(self) -> dict:
        def key(k: KeySpec, action: bool) -> dict:
            d = {"key": k.key, "dim": k.dim, "normalization": k.normalization,
                 "stats": {n: [float(v) for v in vals] for n, vals in k.stats.items()}}
            if action:
                d["relative"] = k.relative
            return d
        return {"format": FORMAT, "version": VERSION, "embodiment_tag": self.embodiment_tag,
                "embodiment_id": self.embodiment_id, "source": self.source,
                "video": {"keys": list(self.video_keys), "resolution": list(self.resolution),
                          "view_size": list(self.view_size), "transform": self.video_transform,
                          "crop_scale": self.crop_scale, "tiling": self.tiling, "wrist_index": self.wrist_index},
                "state": [key(s, False) for s in self.state], "action": [key(a, True) for a in self.action],
                "action_horizon": self.action_horizon, "frames_per_call": self.frames_per_call,
                "prompt_template": self.prompt_template}

    @classmethod
    def from_dict(cls, d: dict, where: str = "policy metadata") -> "PolicyMetadata":
        """Validate a schema dict (see the module doc); PolicyMetadataError names `where` and the field."""
        def fail(msg):
            raise PolicyMetadataError(f"{where}: {msg}")

        def get(obj, name, kind, ctx=""):
            if not isinstance(obj, dict) or name not in obj:
                fail(f"missing field {ctx}{name!r}")
            v = obj[name]
            if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
                fail(f"{ctx}{name} must be an int, got {v!r}")
            if kind is not int and kind is not None and not isinstance(v, kind):
                fail(f"{ctx}{name} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
            return v

        def pair(obj, name, ctx):
            v = get(obj, name, list, ctx)
            if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
                fail(f"{ctx}{name} must be [height, width] of positive ints, got {v!r}")
            return tuple(v)

        if not isinstance(d, dict):
            fail(f"expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            fail(f"not a {FORMAT!r} version {VERSION} file (format={d.get('format')!r}, version={d.get('version')!r})")
        v = get(d, "video", dict)
        keys = get(v, "keys", list, "video.")
        if not keys or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
            fail(f"video.keys must be distinct non-empty strings, got {keys!r}")
        transform = get(v, "transform", str, "video.")
        if transform not in VIDEO_TRANSFORMS:
            fail(f"video.transform must be one of {VIDEO_TRANSFORMS}, got {transform!r}")
        crop = v.get("crop_scale", 1.0)
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            fail(f"video.crop_scale must be in (0, 1], got {crop!r}")
        tiling = get(v, "tiling", str, "video.")
        if tiling not in TILINGS:
            fail(f"video.tiling must be one of {TILINGS}, got {tiling!r}")
        wrist = v.get("wrist_index")
        if wrist is not None and (isinstance(wrist, bool) or not isinstance(wrist, int) or not 0 <= wrist < len(keys)):
            fail(f"video.wrist_index must be null or an index into video.keys, got {wrist!r}")
        if tiling == "droid" and len(keys) != 3:
            fail(f"the droid tiling needs 3 views, video.keys has {len(keys)}")
        if tiling == "grid" and len(keys) > 3:
            fail(f"the grid tiling holds at most 3 views, video.keys has {len(keys)}")

        def specs(section: str, action: bool) -> tuple:
            items = get(d, section, list)
            if not items:
                fail(f"{section} must list at least one key")
            out = []
            for i, it in enumerate(items):
                ctx = f"{section}[{i}]."
                name, dim = get(it, "key", str, ctx), get(it, "dim", int, ctx)
                mode = get(it, "normalization", str, ctx)
                if dim < 1:
                    fail(f"{ctx}dim must be >= 1, got {dim}")
                if mode not in NORM_MODES:
                    fail(f"{ctx}normalization {mode!r} is not supported (one of {NORM_MODES})")
                stats = get(it, "stats", dict, ctx)
                clean = {}
                for n in _NEEDS[mode]:
                    vals = stats.get(n)
                    ok = isinstance(vals, list) and len(vals) == dim and all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vals)
                    if not ok:
                        fail(f"{ctx}stats.{n} must be {dim} finite numbers for {mode!r} normalization, got "
                             f"{str(vals)[:80]}")
                    clean[n] = tuple(float(x) for x in vals)
                rel = it.get("relative", False) if action else False
                if not isinstance(rel, bool):
                    fail(f"{ctx}relative must be true or false, got {rel!r}")
                out.append(KeySpec(name, dim, mode, clean, rel))
            if len({s.key for s in out}) != len(out):
                fail(f"{section} keys must be distinct")
            return tuple(out)

        state, action = specs("state", False), specs("action", True)
        state_keys = {s.key: s.dim for s in state}
        for a in action:
            if a.relative and state_keys.get(a.key) != a.dim:
                fail(f"relative action key {a.key!r} needs a state key of the same name and dim ({a.dim})")
        fpc = get(d, "frames_per_call", int)
        horizon = get(d, "action_horizon", int)
        if fpc < 1 or horizon < 1:
            fail(f"frames_per_call and action_horizon must be >= 1, got {fpc} and {horizon}")
        template = d.get("prompt_template", "auto")
        if template not in ("auto", "none"):
            fail(f"prompt_template must be 'auto' or 'none', got {template!r}")
        emb = get(d, "embodiment_id", int)
        if emb < 0:
            fail(f"embodiment_id must be >= 0, got {emb}")
        return cls(embodiment_tag=get(d, "embodiment_tag", str), embodiment_id=emb, video_keys=tuple(keys),
                   resolution=pair(v, "resolution", "video."), view_size=pair(v, "view_size", "video."),
                   video_transform=transform, crop_scale=float(crop), tiling=tiling, wrist_index=wrist, state=state,
                   action=action, action_horizon=horizon, frames_per_call=fpc, prompt_template=template,
                   source=str(d.get("source", "")))


# ============================================================================================== the release
def _transform_list(conf: dict, tag: str, where: str) -> list:
    t = (conf.get("transforms") or {}).get(tag)
    if not isinstance(t, dict) or not isinstance(t.get("transforms"), list):
        raise PolicyMetadataError(f"{where}: no transforms for embodiment {tag!r} (transforms.{tag}.transforms)")
    return t["transforms"]


def _find(transforms: list, suffix: str, apply_prefix: str | None = None) -> list:
    out = []
    for t in transforms:
        if isinstance(t, dict) and str(t.get(_T, "")).endswith(suffix):
            if apply_prefix is None or any(str(k).startswith(apply_prefix) for k in t.get("apply_to") or ()):
                out.append(t)
    return out


def from_release(metadata: dict, conf: dict, embodiment_tag: str | None = None,
                 where: str = "the release's experiment_cfg") -> PolicyMetadata:
    """The schema from the release's experiment_cfg/metadata.json (parsed) and conf.yaml (parsed), for one
    embodiment tag (default: the only one in metadata.json, else oxe_droid)."""
    def fail(msg):
        raise PolicyMetadataError(f"{where}: {msg}")

    if not isinstance(metadata, dict) or not metadata:
        fail("metadata.json holds no embodiment")
    if embodiment_tag is None:
        embodiment_tag = next(iter(metadata)) if len(metadata) == 1 else "oxe_droid"
    if embodiment_tag not in metadata:
        fail(f"metadata.json has no embodiment {embodiment_tag!r}; it has {sorted(metadata)} (--embodiment-tag)")
    meta = metadata[embodiment_tag]
    try:
        stats, mods = meta["statistics"], meta["modalities"]
    except (KeyError, TypeError):
        fail(f"metadata.json[{embodiment_tag!r}] lacks 'statistics' or 'modalities'")
    tf = _transform_list(conf, embodiment_tag, where)
    concat = _find(tf, ".ConcatTransform")
    if len(concat) != 1:
        fail(f"expected one ConcatTransform for {embodiment_tag!r}, found {len(concat)}")
    concat = concat[0]
    if any(t.get("target_rotations") for t in _find(tf, ".StateActionTransform")):
        fail("rotation transforms (target_rotations) are not supported by this server")
    if conf.get("relative_action_per_horizon"):
        fail("relative_action_per_horizon (per-horizon statistics) is not supported by this server")

    def modes(prefix: str) -> dict:
        out = {}
        for t in _find(tf, ".StateActionTransform", prefix):
            out.update({k: v for k, v in (t.get("normalization_modes") or {}).items() if k.startswith(prefix)})
        return out

    rel_keys = set(conf.get("relative_action_keys") or ()) if conf.get("relative_action") else set()

    def keys(section: str) -> tuple:
        order = concat.get(f"{section}_concat_order") or []
        norm = modes(section + ".")
        out = []
        for full in order:
            name = full.split(".", 1)[1]
            try:
                dim = int(mods[section][name]["shape"][0])
                st = stats[section][name]
            except (KeyError, TypeError, IndexError, ValueError):
                fail(f"metadata.json[{embodiment_tag!r}] lacks the shape or statistics of {full}")
            mode = norm.get(full, "none")
            if mode not in NORM_MODES:
                fail(f"normalization {mode!r} of {full} is not supported (one of {NORM_MODES})")
            out.append({"key": name, "dim": dim, "normalization": mode,
                        "stats": {n: list(st[n]) for n in _NEEDS[mode] if n in st},
                        "relative": section == "action" and name in rel_keys})
        return out

    video_order = [k.split(".", 1)[1] for k in concat.get("video_concat_order") or []]
    try:
        res = {tuple(mods["video"][k]["resolution"]) for k in video_order}
    except (KeyError, TypeError):
        fail(f"metadata.json[{embodiment_tag!r}] lacks the resolution of a view in {video_order}")
    if len(res) != 1:
        fail(f"the views have different resolutions {sorted(res)}; the release's VideoCrop needs one")
    w, h = (int(x) for x in res.pop())                          # the release stores [width, height]
    crop = _find(tf, ".VideoCrop")
    resize = _find(tf, ".VideoResize")
    if len(resize) != 1:
        fail(f"expected one VideoResize for {embodiment_tag!r}, found {len(resize)}")
    resize = resize[0]
    if resize.get("interpolation", "linear") != "linear" or resize.get("backend", "torchvision") != "torchvision":
        fail("only the release's bilinear torchvision VideoResize is supported")
    if not resize.get("antialias", True):
        fail("only an antialiased VideoResize is supported")
    scale = float(crop[0]["scale"]) if crop else 1.0
    if crop and (crop[0].get("height") not in (None, h) or crop[0].get("width") not in (None, w)):
        fail("a VideoCrop with its own height/width (not the views' resolution) is not supported")
    dream = _find(tf, ".DreamTransform")
    horizon = (dream[0].get("action_horizon") if dream else None) or conf.get("action_horizon")
    n_views = len(video_order)
    tiling = ("droid" if embodiment_tag == "oxe_droid" and n_views >= 3 else "grid") if n_views > 1 else "single"
    proj = conf.get("embodiment_tag_to_projector_index") or {}
    if embodiment_tag not in proj:
        fail(f"conf.yaml has no embodiment_tag_to_projector_index[{embodiment_tag!r}]")
    d = {"format": FORMAT, "version": VERSION, "embodiment_tag": embodiment_tag, "embodiment_id": proj[embodiment_tag],
         "source": where,
         "video": {"keys": video_order, "resolution": [h, w], "transform": "release_eval", "crop_scale": scale,
                   "view_size": [int(resize["height"]), int(resize["width"])], "tiling": tiling,
                   "wrist_index": 2 if tiling == "droid" else None},
         "state": keys("state"), "action": keys("action"), "action_horizon": horizon,
         "frames_per_call": RELEASE_FRAMES_PER_CALL, "prompt_template": "auto"}
    return PolicyMetadata.from_dict(d, where)


# ============================================================================================== ours
def from_dataset(ds, embodiment_id: int | None = None, frames_per_call: int = RELEASE_FRAMES_PER_CALL
                 ) -> PolicyMetadata:
    """The schema for a model trained on `ds` (a dreamzero.train.data.LeRobotDataset): its statistics (computed and
    cached by the dataset if absent), keys, relative keys, tiling and camera resolution. The views arrive at the
    dataset's camera resolution and go through the trainer's resize ("dz_train")."""
    feats = ds.info["features"]
    res = set()
    for name, orig in ds.modality.video:
        f = feats.get(orig) or {}
        names, shape = f.get("names") or [], f.get("shape") or []
        if "height" not in names or "width" not in names or len(shape) != len(names):
            raise PolicyMetadataError(f"{ds.root}/meta/info.json: the video feature {orig!r} has no height/width "
                                      "(shape and names)")
        res.add((int(shape[names.index("height")]), int(shape[names.index("width")])))
    if len(res) != 1:
        raise PolicyMetadataError(f"{ds.root}: the cameras have different resolutions {sorted(res)}")
    cfg = ds.cfg

    def spec(modality: str, s) -> dict:
        st = ds._norm_stats(modality, s)        # exactly the statistics the dataset normalizes this sub-key with
        d = {"key": s.name, "dim": s.end - s.start, "normalization": cfg.normalization,
             "stats": {n: [float(x) for x in st[n]] for n in _NEEDS[cfg.normalization]}}
        if modality == "action":
            d["relative"] = s.name in ds.relative_keys
        return d

    d = {"format": FORMAT, "version": VERSION, "embodiment_tag": ds.embodiment_tag,
         "embodiment_id": cfg.embodiment_id if embodiment_id is None else embodiment_id, "source": f"dataset {ds.root}",
         "video": {"keys": [n for n, _ in ds.modality.video], "resolution": list(res.pop()),
                   "view_size": list(cfg.view_size), "transform": "dz_train", "crop_scale": 1.0, "tiling": ds.tiling,
                   "wrist_index": ds.wrist_index if ds.tiling == "droid" else None},
         "state": [spec("state", s) for s in ds.modality.state],
         "action": [spec("action", a) for a in ds.modality.action],
         "action_horizon": ds.horizon, "frames_per_call": frames_per_call, "prompt_template": cfg.prompt_template}
    return PolicyMetadata.from_dict(d, f"dataset {ds.root}")


def from_export_stats(doc: dict, embodiment_tag: str | None = None, where: str = "dz_stats.json") -> PolicyMetadata:
    """The schema for an export of ours whose folder holds `dz export`'s dz_stats.json ("dz-stats/1": per training
    dataset, the state/action keys with their statistics, relative keys, embodiment; see dreamzero.train.export) but
    no dz_policy.json. dz_stats.json does not describe the cameras, so the dataset and prepared folder it names are
    read (resolution, views, tiling, the data config), and its statistics override theirs."""
    def fail(msg):
        raise PolicyMetadataError(f"{where}: {msg}")

    if not isinstance(doc, dict) or doc.get("format") != "dz-stats/1":
        fail(f"not a 'dz-stats/1' file (format={doc.get('format') if isinstance(doc, dict) else None!r})")
    entries = [e for e in doc.get("datasets") or [] if isinstance(e, dict) and e.get("action")]
    if embodiment_tag is not None:
        entries = [e for e in entries if e.get("embodiment_tag") == embodiment_tag]
    if len(entries) != 1:
        fail(f"{len(entries)} datasets with actions{' for ' + repr(embodiment_tag) if embodiment_tag else ''}; "
             "pick one with --embodiment-tag" if entries else "no dataset with actions to serve")
    e = entries[0]
    prepared = os.path.join(str(e.get("prepared") or ""), "prepared.json")
    if not e.get("dataset") or not os.path.isdir(e["dataset"]) or not os.path.isfile(prepared):
        fail(f"the cameras' layout is not in the export and the dataset it names ({e.get('dataset')}) or its prepared "
             f"folder ({e.get('prepared')}) is not here: write dz_policy.json beside the weights with "
             "dreamzero.serve.policy_meta.write_policy_metadata(folder, from_dataset(LeRobotDataset(root, data_cfg)))")
    from ..train.data import DataConfig, LeRobotDataset

    data_cfg = _read_json(prepared).get("settings", {}).get("data_config")
    try:
        ds = LeRobotDataset(e["dataset"], DataConfig(**data_cfg))
    except (TypeError, ValueError, OSError) as err:
        fail(f"cannot read the training dataset {e['dataset']} with the data config of {prepared}: {err}")
    d = from_dataset(ds, embodiment_id=int(e["embodiment_id"])).to_dict()
    for section in ("state", "action"):
        ours = {x["key"]: x for x in e[section]}
        if [x["key"] for x in d[section]] != [x["key"] for x in e[section]]:
            fail(f"its {section} keys {list(ours)} are not the dataset's {[x['key'] for x in d[section]]}")
        for x in d[section]:
            x["stats"] = {n: ours[x["key"]][n] for n in _NEEDS[x["normalization"]]}      # the export's statistics
            if section == "action":
                x["relative"] = bool(ours[x["key"]].get("relative", False))
    d["source"] = f"{where} (cameras from {e['dataset']})"
    return PolicyMetadata.from_dict(d, where)


def write_policy_metadata(folder: str, meta: PolicyMetadata) -> str:
    """Write `meta` as `<folder>/dz_policy.json` (atomically); returns the path."""
    from dz_kernels.atomic import atomic_write_json

    path = os.path.join(folder, FILENAME)
    atomic_write_json(path, meta.to_dict())
    return path


# ============================================================================================== reading
def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise PolicyMetadataError(f"cannot read {path}: {e}") from e
    except ValueError as e:
        raise PolicyMetadataError(f"{path} is not valid JSON: {e}") from e


def load_policy_metadata(path: str, embodiment_tag: str | None = None) -> PolicyMetadata:
    """Policy metadata from `path`: a dz_policy.json file, the release's experiment_cfg/metadata.json, or a folder
    holding either (a checkpoint folder; a weights file's folder is searched too)."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith((".safetensors", ".safetensors.index.json")):
        path = os.path.dirname(os.path.abspath(path))            # a weights file: look beside it
    if os.path.isdir(path):
        ours = os.path.join(path, FILENAME)
        rel = os.path.join(path, RELEASE_DIR, "metadata.json")
        stats = os.path.join(path, EXPORT_STATS)
        if os.path.isfile(ours):
            path = ours
        elif os.path.isfile(rel):
            path = rel
        elif os.path.isfile(stats):
            return from_export_stats(_read_json(stats), embodiment_tag, where=stats)
        else:
            raise PolicyMetadataError(f"{path} holds no policy metadata: neither {FILENAME} nor {EXPORT_STATS} (dz "
                                      f"export) nor {RELEASE_DIR}/metadata.json + conf.yaml (the DreamZero release); "
                                      "pass --policy-metadata FILE")
    if not os.path.isfile(path):
        raise PolicyMetadataError(f"policy metadata file not found: {path}")
    if os.path.basename(path) == "metadata.json":
        conf_path = os.path.join(os.path.dirname(path), "conf.yaml")
        if not os.path.isfile(conf_path):
            raise PolicyMetadataError(f"{path} is the release's metadata, but {conf_path} (its training config, "
                                      "with the transforms) is missing")
        try:
            import yaml
        except ImportError as e:
            raise PolicyMetadataError("reading the release's conf.yaml needs PyYAML (pip install pyyaml)") from e
        try:
            with open(conf_path) as f:
                conf = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise PolicyMetadataError(f"cannot read {conf_path}: {e}") from e
        if not isinstance(conf, dict):
            raise PolicyMetadataError(f"{conf_path} is not a YAML mapping")
        return from_release(_read_json(path), conf, embodiment_tag, where=os.path.dirname(path))
    doc = _read_json(path)
    if isinstance(doc, dict) and doc.get("format") == "dz-stats/1":
        return from_export_stats(doc, embodiment_tag, where=path)
    meta = PolicyMetadata.from_dict(doc, path)
    if embodiment_tag is not None and embodiment_tag != meta.embodiment_tag:
        raise PolicyMetadataError(f"{path} is for embodiment {meta.embodiment_tag!r}, not {embodiment_tag!r}")
    return meta
