"""Checkpoint loading and saving (model/dreamzero/checkpoint/): round trips in the three key layouts, sharding, the one error
that lists every mismatch, corrupt files, layout detection, LoRA merging, memory, and the diffusers layout checked
against diffusers' own WanTransformer3DModel on the same input."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dreamzero.checkpoint import (CheckpointError, detect_layout, load_checkpoint, load_model, read_checkpoint_index,
                                  save_checkpoint, to_layout_name)
from dreamzero.config import get_config
from dreamzero.dreamzero import DreamZero
from tiny import tiny_model


def _random_model(cfg="tiny", seed=0):
    """A tiny model random everywhere (the Wan init zeroes the head, which would hide mistakes), in eval mode."""
    return tiny_model(cfg, seed=seed).eval()


def _forward(model, seed=1, K=1):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    B, Fr, H, W = 2, cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    na, ns = K * cfg.actions_per_chunk, K * cfg.states_per_chunk
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    with torch.no_grad():
        return model(model.layout("train", num_chunks=K), clean=r(B, 16, Fr, H, W), clean_cond=r(B, 20, Fr, H, W),
                     noisy=r(B, 16, Fr, H, W), noisy_cond=r(B, 20, Fr, H, W),
                     t_video=torch.rand(B, Fr, generator=g) * 1000,
                     actions=r(B, na, cfg.action_dim), t_action=torch.rand(B, na, generator=g) * 1000,
                     state=r(B, ns, cfg.state_dim), embodiment=torch.tensor([0, cfg.num_embodiments - 1]),
                     text=r(B, cfg.text_len, cfg.text_dim), clip=r(B, cfg.clip_tokens, cfg.clip_dim))


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["dreamzero", "wan", "diffusers"])
def test_round_trip_each_layout(tmp_path, layout):
    src = _random_model()
    path = save_checkpoint(src, tmp_path / "ckpt", layout=layout)
    assert os.path.basename(path) == ("model.safetensors" if layout == "dreamzero"
                                      else "diffusion_pytorch_model.safetensors")
    keys = set(load_file(path))                      # the safetensors library reads our writer's files
    assert to_layout_name("blocks.1.self_attn.q.weight", layout) in keys
    if layout == "dreamzero":
        assert "action_head.model.blocks.0.cross_attn.k_img.weight" in keys
        assert "action_head.model.action_encoder.W1.W" in keys
    if layout == "diffusers":
        assert {"blocks.0.attn2.add_k_proj.weight", "blocks.0.norm2.weight", "proj_out.weight",
                "scale_shift_table", "condition_embedder.image_embedder.ff.net.2.weight"} <= keys
    dst, report = load_model("tiny", tmp_path / "ckpt", return_report=True)   # layout detected from the keys
    assert report.layout == layout and not report.missing and not report.skipped
    _assert_same_weights(src, dst)
    (v0, a0), (v1, a1) = _forward(src), _forward(dst)
    assert torch.equal(v0, v1) and torch.equal(a0, a1)


def test_sharded_round_trip_and_resave(tmp_path):
    src = _random_model()
    path = save_checkpoint(src, tmp_path, layout="dreamzero", max_shard_bytes=60_000)
    assert path.endswith("model.safetensors.index.json")
    index = json.load(open(path))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(os.path.exists(tmp_path / s) for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.state_dict().values())
    for s in shards:                                   # no shard exceeds the limit unless it holds a single tensor
        n = len(load_file(tmp_path / s))
        assert os.path.getsize(tmp_path / s) <= 60_000 + 8192 or n == 1
    dst = load_model("tiny", path)
    _assert_same_weights(src, dst)
    assert torch.equal(_forward(src)[0], _forward(dst)[0])
    # re-saving unsharded into the same folder removes the old shards and index (no ambiguity left behind)
    save_checkpoint(src, tmp_path, layout="dreamzero")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    _assert_same_weights(src, load_model("tiny", tmp_path))


def test_save_to_named_file_shards_beside_it(tmp_path):
    src = _random_model()
    path = save_checkpoint(src, tmp_path / "w.safetensors", layout="wan", max_shard_bytes=100_000)
    assert path == str(tmp_path / "w.safetensors.index.json")
    _assert_same_weights(src, load_model("tiny", tmp_path / "w.safetensors"))


def test_dtype_and_device_conversion_on_load(tmp_path):
    src = _random_model()
    save_checkpoint(src, tmp_path, layout="wan")
    dst = load_model("tiny", tmp_path, dtype=torch.bfloat16, device="cpu")
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), n
    # saving with a dtype converts on the way out
    save_checkpoint(src, tmp_path / "half", layout="diffusers", dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "half" / "diffusion_pytorch_model.safetensors")
               .values())


def test_load_into_existing_model_copies_in_place(tmp_path):
    src = _random_model(seed=0)
    save_checkpoint(src, tmp_path, layout="dreamzero")
    dst = _random_model(seed=5)
    ptr = dst.blocks[0].self_attn.q.weight.data_ptr()
    report = load_checkpoint(dst, tmp_path)
    assert dst.blocks[0].self_attn.q.weight.data_ptr() == ptr          # same storage: optimizers keep working
    assert len(report.loaded) == len(src.state_dict())
    _assert_same_weights(src, dst)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_unexpected_misshaped_listed_in_one_error(tmp_path):
    sd = {("action_head.model." + k): v.contiguous() for k, v in _random_model().state_dict().items()}
    del sd["action_head.model.blocks.1.ffn.2.bias"]
    del sd["action_head.model.head.modulation"]
    sd["action_head.model.blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    sd["action_head.model.blocks.0.cross_attn.k_img.weight"] = torch.zeros(64, 20)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_model("tiny", tmp_path)
    msg = str(ei.value)
    assert "4 problem(s)" in msg
    for needle in ("missing: action_head.model.blocks.1.ffn.2.bias", "missing: action_head.model.head.modulation",
                   "unexpected: action_head.model.blocks.0.self_attn.extra.weight",
                   "mis-shaped: action_head.model.blocks.0.cross_attn.k_img.weight: checkpoint [64, 20], "
                   "model blocks.0.cross_attn.k_img.weight [64, 64]"):
        assert needle in msg, msg
    assert str(tmp_path) in msg


def test_float8_and_mixed_dtypes_are_refused_at_load_naming_the_tensors(tmp_path):
    """A file whose tensors would reach the model as they are (a meta model, dtype=None) in float8, or in a mix of
    float16 and float32, used to load and fail later inside a GELU or a matmul: it is refused at load, naming the
    tensors, and dtype= (which converts every tensor) loads it."""
    src = _random_model()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    mixed = dict(sd, **{"blocks.1.ffn.0.weight": sd["blocks.1.ffn.0.weight"].half(),
                        "blocks.0.norm3.bias": sd["blocks.0.norm3.bias"].half()})
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match=r"mixes floating dtypes \(F16: blocks.0.norm3.bias, "
                                              r"blocks.1.ffn.0.weight; F32: .*\); .* pass dtype="):
        load_model("tiny", tmp_path / "mixed.safetensors")
    m = load_model("tiny", tmp_path / "mixed.safetensors", dtype=torch.float32)
    assert _forward(m)[1].isfinite().all()
    fp8 = dict(sd, **{"blocks.0.ffn.2.weight": sd["blocks.0.ffn.2.weight"].to(torch.float8_e4m3fn)})
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    for kw in ({}, {"dtype": torch.float32}):                  # float8 without its scales is refused either way
        with pytest.raises(CheckpointError, match=r"wrong dtype: blocks.0.ffn.2.weight: F8_E4M3 \(float8 values "
                                                  r"without their scales"):
            load_model("tiny", tmp_path / "fp8.safetensors", **kw)
    with pytest.raises(CheckpointError, match="wrong dtype: blocks.0.ffn.2.weight: F8_E4M3"):
        load_checkpoint(_random_model(seed=3), tmp_path / "fp8.safetensors")


def test_wan_layout_without_heads_needs_explicit_permission(tmp_path):
    src = _random_model()
    save_checkpoint(src, tmp_path, layout="wan", include_heads=False)
    assert not any(k.startswith("action_") or k.startswith("state_")
                   for k in load_file(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as ei:
        load_model("tiny", tmp_path)
    assert "allow_missing_heads=True" in str(ei.value) and "action_encoder.W1.W" in str(ei.value)
    dst, report = load_model("tiny", tmp_path, allow_missing_heads=True, return_report=True)
    heads = sorted(n for n in src.state_dict() if n.startswith(("action_", "state_")))
    assert report.missing == heads and report.initialized == heads
    for n, t in dst.state_dict().items():
        if n in heads:
            assert t.dtype == torch.float32 and torch.isfinite(t).all() and not torch.equal(t, src.state_dict()[n])
        else:
            assert torch.equal(t, src.state_dict()[n]), n
    video, action = _forward(dst)
    assert torch.isfinite(video).all() and torch.isfinite(action).all()


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    src = _random_model()
    path = save_checkpoint(src, tmp_path / "a", layout="dreamzero")
    data = open(path, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 1000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    badjson = tmp_path / "badheader.safetensors"
    badjson.write_bytes(len(b"{not json").to_bytes(8, "little") + b"{not json" + b"\0" * 64)
    for f in (trunc, garbage, empty, badjson):
        with pytest.raises(CheckpointError, match="corrupt or not a safetensors file") as ei:
            load_model("tiny", f)
        assert str(f) in str(ei.value)


def test_bad_shard_or_index_names_the_file(tmp_path):
    src = _random_model()
    index = save_checkpoint(src, tmp_path, layout="wan", max_shard_bytes=100_000)
    shard = tmp_path / json.load(open(index))["weight_map"]["blocks.0.ffn.0.weight"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as ei:
        load_model("tiny", tmp_path)
    assert str(shard) in str(ei.value)
    bad_index = tmp_path / "x.safetensors.index.json"
    bad_index.write_text("{\"weight_map\": ")
    with pytest.raises(CheckpointError, match="not a valid safetensors index") as ei:
        load_model("tiny", bad_index)
    assert str(bad_index) in str(ei.value)
    bad_index.write_text(json.dumps({"weight_map": {"blocks.0.ffn.0.weight": "nowhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="nowhere.safetensors"):
        load_model("tiny", bad_index)


def test_index_and_shards_must_agree(tmp_path):
    src = _random_model()
    index = save_checkpoint(src, tmp_path, layout="wan", max_shard_bytes=100_000)
    body = json.load(open(index))
    body["weight_map"].pop("head.head.weight")
    json.dump(body, open(index, "w"))
    with pytest.raises(CheckpointError, match="head.head.weight: in .* but not in the index"):
        load_model("tiny", tmp_path)


def test_checksum_manifest_is_verified_when_present(tmp_path):
    """checkpoint.manifest: SHA256SUMS beside the weights (what `dz export` writes) is checked on load: a changed,
    unlisted or missing file is named; two exports into one folder both stay loadable; no manifest, no check."""
    from dreamzero.checkpoint import MANIFEST_NAME, write_manifest

    src = _random_model()
    one = save_checkpoint(src, tmp_path / "a.safetensors")
    two = save_checkpoint(src, tmp_path / "b.safetensors", max_shard_bytes=40_000)     # shards and an index
    write_manifest(str(tmp_path), ["a.safetensors"])
    shards = sorted(p.name for p in tmp_path.glob("b-*.safetensors"))
    write_manifest(str(tmp_path), shards + ["b.safetensors.index.json"])
    listed = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    assert len(listed) == 2 + len(shards) and len(shards) > 1 and all(len(x.split("  ")[0]) == 64 for x in listed)
    _assert_same_weights(src, load_model("tiny", one))
    _assert_same_weights(src, load_model("tiny", two))
    raw = bytearray((tmp_path / shards[-1]).read_bytes())
    raw[-1] ^= 1
    (tmp_path / shards[-1]).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: sha256 .* does not match .* in .*{MANIFEST_NAME}"):
        load_model("tiny", two)
    report = load_checkpoint(_random_model(seed=2), two, verify=False)       # verify=False skips the check
    assert len(report.loaded) == len(src.state_dict())
    _assert_same_weights(src, load_model("tiny", one))                         # the other export is unaffected
    save_checkpoint(src, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"c.safetensors: not listed in"):
        load_model("tiny", tmp_path / "c.safetensors")
    index = json.loads((tmp_path / "b.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 1                                       # the index changed too
    (tmp_path / "b.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"b.safetensors.index.json: sha256 .* does not match"):
        load_model("tiny", one)
    (tmp_path / MANIFEST_NAME).write_text("not a checksum line\n")
    with pytest.raises(CheckpointError, match="line 1: not a '<sha256>  <file name>' line"):
        load_model("tiny", one)
    (tmp_path / MANIFEST_NAME).unlink()
    _assert_same_weights(src, load_model("tiny", tmp_path / "c.safetensors"))    # no manifest: nothing to check


def test_pickle_files_are_refused(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_model("tiny", p)


def test_folder_with_two_checkpoints_is_ambiguous(tmp_path):
    src = _random_model()
    save_checkpoint(src, tmp_path, layout="dreamzero")
    save_checkpoint(src, tmp_path, layout="wan")
    with pytest.raises(CheckpointError, match="several checkpoints"):
        load_model("tiny", tmp_path)
    load_model("tiny", tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------------- detection
def test_detect_layout():
    assert detect_layout(["action_head.model.blocks.0.self_attn.q.weight", "action_head.vae.model.x"]) == "dreamzero"
    assert detect_layout(["blocks.0.self_attn.q.weight", "head.head.weight"]) == "wan"
    assert detect_layout(["model.diffusion_model.blocks.3.cross_attn.k.weight"]) == "wan"
    assert detect_layout(["blocks.0.attn1.to_q.weight", "proj_out.weight"]) == "diffusers"
    assert detect_layout(["condition_embedder.time_proj.weight"]) == "diffusers"
    with pytest.raises(CheckpointError, match="cannot tell the key layout"):
        detect_layout(["encoder.layers.0.weight", "decoder.x"])


def test_explicit_layout_overrides_detection_and_prefix_is_stripped(tmp_path):
    src = _random_model()
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, tmp_path / "comfy.safetensors")
    dst, report = load_model("tiny", tmp_path / "comfy.safetensors", layout="wan", return_report=True)
    assert report.prefix == "model.diffusion_model."
    _assert_same_weights(src, dst)
    with pytest.raises(CheckpointError, match="missing: model.diffusion_model.proj_out.weight"):
        load_model("tiny", tmp_path / "comfy.safetensors", layout="diffusers")


# ---------------------------------------------------------------------------------------------- release specifics
def test_release_frozen_encoders_skipped_and_lora_merged(tmp_path):
    """A LoRA-trained release file: PEFT prefix, base_layer weights, lora_A/lora_B pairs, frozen encoder weights."""
    src = _random_model()
    sd, loras = {}, {}
    pre = "action_head.model.base_model.model."
    targets = ["blocks.0.self_attn.q", "blocks.1.ffn.2"]
    for k, v in src.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        sd[pre + (k.replace(mod, mod + ".base_layer") if mod in targets else k)] = v.contiguous()
    r, alpha = 3, 6.0
    for mod in targets:
        w = src.get_parameter(mod + ".weight")
        A, B = torch.randn(r, w.shape[1]), torch.randn(w.shape[0], r)
        sd[pre + mod + ".lora_A.default.weight"], sd[pre + mod + ".lora_B.default.weight"] = A, B
        loras[mod] = (A, B)
    sd["action_head.text_encoder.blocks.0.attn.q.weight"] = torch.zeros(4, 4)
    sd["action_head.vae.model.encoder.conv1.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lora_alpha"):
        load_model("tiny", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"action_head_cfg": {"config": {"lora_alpha": alpha,
                                                                                     "lora_rank": r}}}))
    dst, report = load_model("tiny", tmp_path, return_report=True)
    assert report.layout == "dreamzero" and report.prefix == pre
    assert report.skipped == ["action_head.text_encoder.blocks.0.attn.q.weight",
                              "action_head.vae.model.encoder.conv1.weight"]
    assert sorted(report.lora_merged) == sorted(t + ".weight" for t in targets)
    for n, t in dst.state_dict().items():
        want = src.state_dict()[n]
        mod = n.rsplit(".", 1)[0]
        if n.endswith("weight") and mod in targets:
            A, B = loras[mod]
            torch.testing.assert_close(t, want + (alpha / r) * B @ A, rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(t, want), n
    # an unrelated key outside the model is still an error
    sd["backbone.something.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected: backbone.something.weight"):
        load_model("tiny", tmp_path)


def test_lora_only_file_applies_on_loaded_base(tmp_path):
    src = _random_model()
    A, B = torch.randn(2, 64), torch.randn(64, 2)
    save_file({"blocks.0.cross_attn.o.lora_A.default.weight": A, "blocks.0.cross_attn.o.lora_B.default.weight": B},
              tmp_path / "lora.safetensors")
    dst = _random_model()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(dst, tmp_path / "lora.safetensors", layout="wan", lora_alpha=2.0)
    report = load_checkpoint(dst, tmp_path / "lora.safetensors", layout="wan", lora_alpha=2.0, strict=False)
    assert report.lora_merged == ["blocks.0.cross_attn.o.weight"]
    torch.testing.assert_close(dst.blocks[0].cross_attn.o.weight, src.blocks[0].cross_attn.o.weight + B @ A)
    with torch.device("meta"):
        meta = DreamZero("tiny")
    with pytest.raises(CheckpointError, match="meta device"):
        load_checkpoint(meta, tmp_path / "lora.safetensors", layout="wan", lora_alpha=2.0, strict=False)


# ---------------------------------------------------------------------------------------------- writing
def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    import dreamzero.checkpoint.safetensors_io as ck
    src = _random_model(seed=0)
    path = save_checkpoint(src, tmp_path, layout="dreamzero")
    before = open(path, "rb").read()
    calls = {"n": 0}
    real = ck._tensor_bytes

    def failing(t):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (simulated)")
        return real(t)
    monkeypatch.setattr(ck, "_tensor_bytes", failing)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(_random_model(seed=3), tmp_path, layout="dreamzero")
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]          # the temporary file is gone


def test_save_refuses_meta_model(tmp_path):
    with torch.device("meta"):
        m = DreamZero("tiny")
    with pytest.raises(ValueError, match="meta device"):
        save_checkpoint(m, tmp_path)


def test_load_model_never_initializes_the_backbone(tmp_path, monkeypatch):
    save_checkpoint(_random_model(), tmp_path, layout="dreamzero")

    def boom(self):
        raise AssertionError("load_model must build on the meta device, not initialize")
    monkeypatch.setattr(DreamZero, "init_weights", boom)
    model = load_model("tiny", tmp_path)
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc (Linux only)")
def test_loading_does_not_hold_the_weights_twice(tmp_path):
    """Peak anonymous memory while loading stays near one copy of the weights (the file is memory-mapped)."""
    cfg = get_config("tiny", dim=512, num_heads=8, ffn_dim=1024, num_layers=4, num_embodiments=1)
    torch.manual_seed(0)
    m = DreamZero(cfg)
    nbytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert nbytes > 40e6
    save_checkpoint(m, tmp_path, layout="dreamzero")
    del m
    script = textwrap.dedent(f"""
        import torch, dreamzero.checkpoint.load as ck
        from dreamzero.config import get_config
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        cfg = get_config("tiny", dim=512, num_heads=8, ffn_dim=1024, num_layers=4, num_embodiments=1)
        peak = [0]
        real = ck._set_tensor
        def watched(*a, **k):
            real(*a, **k)
            peak[0] = max(peak[0], anon())
        ck._set_tensor = watched
        base = anon()
        model = ck.load_model(cfg, {str(tmp_path)!r})
        print(peak[0] - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert nbytes * 0.9 <= grown <= nbytes * 1.3 + 16e6, (grown, nbytes)


# ---------------------------------------------------------------------------------------------- diffusers itself
def _tiny_diffusers(seed=0, **config):
    """A random tiny WanTransformer3DModel: the I2V layout of the 'tiny' config, or `config` over it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=36, out_channels=16,
              text_dim=24, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=20, added_kv_proj_dim=64, rope_max_seq_len=64)
    dm = diffusers.WanTransformer3DModel(**{**kw, **config}).eval()
    with torch.no_grad():       # random everything, norm weights around 1, so a swapped norm or projection shows
        for n, p in dm.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if ("norm" in n and n.endswith("weight")) else 0.0))
    return dm


def _part_attention(q, k, v, layout, scale=None):
    """Unmasked attention inside each part of the layout (the noisy video part then attends to all its frames, as
    diffusers' bidirectional model does; the clean copy, actions and state do not touch it)."""
    if layout.n_cached:
        raise ValueError("no cache here")
    out = torch.empty_like(q)
    for p in layout.parts:
        s = slice(p.start, p.start + p.length)
        out[:, s] = F.scaled_dot_product_attention(q[:, s].transpose(1, 2), k[:, s].transpose(1, 2),
                                                   v[:, s].transpose(1, 2), scale=scale).transpose(1, 2)
    return out


def _compare_with_diffusers(dm, model, per_token: bool):
    cfg = model.cfg
    K, B = 2, 2
    Fr, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    g = torch.Generator().manual_seed(7)
    lat, cond = torch.randn(B, 16, Fr, H, W, generator=g), torch.randn(B, 20, Fr, H, W, generator=g)
    text = torch.randn(B, 512, cfg.text_dim, generator=g)
    clip = torch.randn(B, cfg.clip_tokens, cfg.clip_dim, generator=g)
    if per_token:       # diffusers' 2-D timestep path: one timestep per token (ours: per frame)
        t_video = torch.rand(B, Fr, generator=g) * 1000
        t_diff = t_video.repeat_interleave(cfg.frame_tokens, dim=1)
    else:               # Wan2.1's path: one timestep per sample
        t_diff = torch.tensor([937.0, 211.5])
        t_video = t_diff[:, None].expand(B, Fr)
    na = K * cfg.actions_per_chunk
    model.ops = model.ops.replace(attention=_part_attention)
    with torch.no_grad():
        ref = dm(torch.cat([lat, cond], dim=1), t_diff, text, clip).sample
        video, _ = model(model.layout("train", num_chunks=K), clean=torch.randn_like(lat), clean_cond=cond,
                         noisy=lat, noisy_cond=cond, t_video=t_video, actions=torch.randn(B, na, cfg.action_dim),
                         t_action=torch.rand(B, na) * 1000, state=torch.randn(B, K, cfg.state_dim),
                         embodiment=torch.zeros(B, dtype=torch.long), text=text, clip=clip)
    assert ref.abs().max() > 1.0                                   # a real signal, not zeros
    # fp32 on both sides; the remaining difference is mostly diffusers' fp32 (ours fp64) sinusoidal time embedding
    torch.testing.assert_close(video, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_token", [False, True], ids=["timestep-per-sample", "timestep-per-token"])
def test_diffusers_checkpoint_gives_diffusers_outputs(tmp_path, per_token):
    dm = _tiny_diffusers()
    dm.save_pretrained(tmp_path)                   # diffusers' own writer and file names (+ config.json)
    cfg = get_config("tiny", text_len=512)         # diffusers' I2V attention hard-codes 512 text tokens
    model, report = load_model(cfg, tmp_path, allow_missing_heads=True, return_report=True)
    assert report.layout == "diffusers" and len(report.loaded) == len(dm.state_dict())
    assert all(n.startswith(("action_", "state_")) for n in report.missing)
    _compare_with_diffusers(dm, model, per_token)


def test_our_diffusers_export_loads_into_diffusers(tmp_path):
    dm = _tiny_diffusers(seed=1)
    cfg = get_config("tiny", text_len=512)
    ours = _random_model(cfg, seed=2)
    save_checkpoint(ours, tmp_path, layout="diffusers", include_heads=False)
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    missing, unexpected = dm.load_state_dict(sd, strict=True)      # strict: every diffusers name, nothing else
    assert not missing and not unexpected
    _compare_with_diffusers(dm, ours, per_token=False)


def test_diffusers_unused_norm_added_q_is_skipped(tmp_path):
    dm = _tiny_diffusers()
    sd = {k: v.contiguous() for k, v in dm.state_dict().items()}
    sd["blocks.0.attn2.norm_added_q.weight"] = torch.ones(64)
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    _, report = load_model(get_config("tiny", text_len=512), tmp_path, allow_missing_heads=True, return_report=True)
    assert report.skipped == ["blocks.0.attn2.norm_added_q.weight"]


def test_read_checkpoint_index_reports_shapes(tmp_path):
    save_checkpoint(_random_model(), tmp_path, layout="diffusers", max_shard_bytes=50_000)
    tensors, files = read_checkpoint_index(tmp_path)
    assert len(files) > 1
    assert tensors["blocks.0.attn2.add_k_proj.weight"].shape == (64, 64)
    assert tensors["action_encoder.W2.W"].shape == (2, 128, 64) and tensors["action_encoder.W2.W"].dtype == "F32"


@pytest.mark.parametrize("preset,theirs_kw", [
    ("droid-14b", dict(num_attention_heads=40, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40,
                       image_dim=1280, added_kv_proj_dim=5120)),
    ("droid-5b", dict(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30,
                      image_dim=None))], ids=["wan2.1-i2v-14b", "wan2.2-ti2v-5b"])
def test_full_size_names_and_shapes_match_diffusers(preset, theirs_kw):
    """At the real shapes (built on the meta device): our backbone, less what the Wan release lacks (the heads; the
    5B's CLIP branch), maps one to one onto diffusers' transformer of that release (Wan2.1-I2V-14B as diffusers'
    conversion script configures it, Wan2.2-TI2V-5B), names and shapes."""
    diffusers = pytest.importorskip("diffusers")
    from dreamzero.checkpoint import backbone_lacks
    with torch.device("meta"):
        ours = DreamZero(preset)
        theirs = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, **theirs_kw)
    mine = {to_layout_name(n, "diffusers"): tuple(t.shape) for n, t in ours.state_dict().items()
            if not backbone_lacks(n, ours.cfg.model_type)}
    ref = {n: tuple(t.shape) for n, t in theirs.state_dict().items()}
    assert mine == ref
