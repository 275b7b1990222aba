"""Every preset loads random weights saved in the key layouts the DreamZero release and its backbones write: the
release's full checkpoints (tiny variants of each backbone, keys written here from the release's CausalWanModel
structure, not by our writer), the LoRA-only files of its AgiBot/YAM scripts on top of the DreamZero-AgiBot
checkpoint, the original Wan2.2-TI2V-5B files and diffusers' Wan2.2 TI2V transformer (no CLIP branch)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dreamzero.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from dreamzero.config import PRESETS, RELEASE_LORA, get_config, tiny_config
from dreamzero.dreamzero import DreamZero
from test_checkpoint import _part_attention, _tiny_diffusers      # tests/ is on sys.path (conftest's rootdir)

PREFIX = "action_head.model."


def release_keys(c) -> dict:
    """The state dict of the release's CausalWanModel (wan_video_dit_action_casual_chunk.py), name -> shape, for the
    sizes of config `c`: Wan's blocks with the I2V cross-attention (model types 'i2v' and 'ti2v'), the head,
    img_emb = MLPProj, and one embodiment slot of the state/action encoders and the action decoder."""
    d, f = c.dim, c.ffn_dim
    out = {"patch_embedding.weight": (d, c.in_channels, 1, 2, 2), "patch_embedding.bias": (d,)}

    def lin(name, i, o):
        out[name + ".weight"], out[name + ".bias"] = (o, i), (o,)
    lin("text_embedding.0", c.text_dim, d)
    lin("text_embedding.2", d, d)
    lin("time_embedding.0", c.freq_dim, d)
    lin("time_embedding.2", d, d)
    lin("time_projection.1", d, 6 * d)
    for i in range(c.num_layers):
        b = f"blocks.{i}."
        for m in ("q", "k", "v", "o"):
            lin(b + "self_attn." + m, d, d)
        for m in ("q", "k", "v", "o", "k_img", "v_img"):
            lin(b + "cross_attn." + m, d, d)
        for m in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                  "cross_attn.norm_k_img", "norm3"):
            out[b + m + ".weight"] = (d,)
        out[b + "norm3.bias"] = (d,)
        lin(b + "ffn.0", d, f)
        lin(b + "ffn.2", f, d)
        out[b + "modulation"] = (1, 6, d)
    lin("head.head", d, c.latent_channels * 4)
    out["head.modulation"] = (1, 2, d)
    e = c.clip_dim
    out.update({"img_emb.proj.0.weight": (e,), "img_emb.proj.0.bias": (e,), "img_emb.proj.4.weight": (d,),
                "img_emb.proj.4.bias": (d,)})
    lin("img_emb.proj.1", e, e)
    lin("img_emb.proj.3", e, d)
    for name, i, o in (("state_encoder.layer1", c.state_dim, c.head_hidden), ("state_encoder.layer2", c.head_hidden, d),
                       ("action_encoder.W1", c.action_dim, d), ("action_encoder.W2", 2 * d, d),
                       ("action_encoder.W3", d, d), ("action_decoder.layer1", d, c.head_hidden),
                       ("action_decoder.layer2", c.head_hidden, c.action_dim)):
        out[name + ".W"], out[name + ".b"] = (1, i, o), (1, o)
    return out


def random_tensors(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def save_release_checkpoint(folder, tensors: dict, shards: int = 2) -> None:
    """As the release's VLA.save_pretrained writes it: model-0000i-of-0000n.safetensors + model.safetensors.index.json,
    the DiT under action_head.model., the frozen encoders beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _check_loaded(model, tensors: dict, prefix: str = "") -> None:
    sd = model.state_dict()
    for k, v in tensors.items():
        assert torch.equal(sd[k[len(prefix):]], v), k


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_loads_the_release_layout(tmp_path, preset):
    with torch.device("meta"):                               # the real size: the release's names and shapes
        real = DreamZero(preset)
    assert {n: tuple(t.shape) for n, t in real.state_dict().items()} == release_keys(get_config(preset))
    cfg = tiny_config(preset, num_embodiments=1)
    assert cfg.model_type == get_config(preset).model_type
    shapes = release_keys(cfg)
    tensors = {PREFIX + k: v for k, v in random_tensors(shapes, seed=len(preset)).items()}
    frozen = {"action_head.text_encoder.blocks.0.attn.q.weight": torch.randn(4, 4),
              "action_head.image_encoder.model.visual.proj": torch.randn(3, 2),
              "action_head.vae.model.encoder.conv1.weight": torch.randn(2, 3, 1, 1, 1)}
    save_release_checkpoint(tmp_path, {**tensors, **frozen})
    model, report = load_model(cfg, tmp_path, return_report=True)
    assert report.layout == "dreamzero" and report.prefix == PREFIX and not report.missing
    assert sorted(report.skipped) == sorted(frozen) and len(report.loaded) == len(shapes)
    _check_loaded(model, tensors, PREFIX)


def lora_only_file(c, base: dict, seed: int) -> tuple:
    """What the release's LoRA scripts save (save_lora_only: the trainable parameters of the PEFT-wrapped DiT): for
    every Linear named q, k, v, o, ffn.0 or ffn.2, lora_A [r, in] and lora_B [out, r] under
    action_head.model.base_model.model.<module>.lora_{A,B}.default.weight, and the action/state modules in full.
    Returns (tensors, the merged weights expected)."""
    g = torch.Generator().manual_seed(seed)
    r, alpha, targets = RELEASE_LORA["rank"], RELEASE_LORA["alpha"], RELEASE_LORA["targets"]
    pre = PREFIX + "base_model.model."
    out, expect = {}, {}
    for name, shape in release_keys(c).items():
        module = name.rsplit(".", 1)[0]
        # PEFT's rule: a module is targeted when its name is a target or ends with "." + target
        if name.endswith(".weight") and len(shape) == 2 and any(module.endswith("." + t) for t in targets):
            A, B = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
            out[pre + module + ".lora_A.default.weight"] = A
            out[pre + module + ".lora_B.default.weight"] = B
            expect[name] = base[name] + (alpha / r) * (B @ A)
        elif name.startswith(("action_encoder.", "state_encoder.", "action_decoder.")):
            out[pre + name] = expect[name] = torch.randn(*shape, generator=g)
    return out, expect


@pytest.mark.parametrize("preset", [p for p in PRESETS if get_config(p).finetune == "lora"])
def test_lora_presets_load_their_lora_file_over_the_agibot_checkpoint(tmp_path, preset):
    """agibot-14b and yam-14b: the release's scripts train LoRA (rank 4, alpha 4) on top of DreamZero-AgiBot and
    save the LoRA matrices and the action/state modules; loading = the AgiBot checkpoint, then that file merged."""
    assert get_config(preset).init_from == "GEAR-Dreams/DreamZero-AgiBot"
    cfg = tiny_config(preset, num_embodiments=1)
    base = random_tensors(release_keys(cfg), seed=11)
    save_release_checkpoint(tmp_path / "agibot", {PREFIX + k: v for k, v in base.items()})
    lora, expect = lora_only_file(cfg, base, seed=12)
    assert any(".cross_attn.q.lora_A." in k for k in lora) and any(".ffn.2.lora_B." in k for k in lora)
    assert not any("k_img.lora" in k for k in lora)
    (tmp_path / "yam").mkdir()
    save_file(lora, tmp_path / "yam" / "model.safetensors")
    # the release's config.json beside it says lora_alpha (action_head_cfg.config)
    (tmp_path / "yam" / "config.json").write_text(json.dumps({"action_head_cfg": {"config": {
        "lora_rank": RELEASE_LORA["rank"], "lora_alpha": RELEASE_LORA["alpha"]}}}))
    model = load_model(cfg, tmp_path / "agibot")
    report = load_checkpoint(model, tmp_path / "yam", strict=False)
    assert report.prefix == PREFIX + "base_model.model."
    merged = [k for k in expect if not k.startswith(("action_", "state_"))]
    assert sorted(report.lora_merged) == sorted(merged) and len(merged) == cfg.num_layers * 10
    sd = model.state_dict()
    for k, v in expect.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-6)
    untouched = [k for k in base if k not in expect]
    assert all(torch.equal(sd[k], base[k]) for k in untouched) and "blocks.0.cross_attn.k_img.weight" in untouched


def test_5b_from_the_wan22_release_files(tmp_path):
    """Wan2.2-TI2V-5B's own files ('wan' layout): no DreamZero heads, no CLIP branch. The release loads them with
    strict=False and trains the rest from its init; we do the same, with permission, and report it."""
    cfg = tiny_config("droid-5b")
    shapes = release_keys(cfg)
    lacking = [k for k in shapes if k.startswith(("img_emb.", "action_", "state_")) or "_img" in k]
    assert len(lacking) == 8 + 5 * cfg.num_layers + 14      # img_emb (4 modules), k_img/v_img/norm_k_img, heads
    tensors = random_tensors({k: s for k, s in shapes.items() if k not in lacking}, seed=21)
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="CLIP branch"):
        load_model(cfg, tmp_path)
    model, report = load_model(cfg, tmp_path, allow_missing_heads=True, return_report=True)
    assert report.layout == "wan" and sorted(report.missing) == sorted(lacking) == sorted(report.initialized)
    _check_loaded(model, tensors)
    sd = model.state_dict()
    bound = (6 / (2 * cfg.dim)) ** 0.5                            # Xavier-uniform for the d x d k_img / v_img
    for i in range(cfg.num_layers):
        w = sd[f"blocks.{i}.cross_attn.k_img.weight"]
        assert w.abs().max() <= bound and w.std() > bound / 4
        assert not sd[f"blocks.{i}.cross_attn.v_img.bias"].any()
        assert torch.equal(sd[f"blocks.{i}.cross_attn.norm_k_img.weight"], torch.ones(cfg.dim))
    assert torch.equal(sd["img_emb.proj.0.weight"], torch.ones(cfg.clip_dim)) and not sd["img_emb.proj.4.bias"].any()
    # a 14B (i2v) model needs the image branch of its Wan2.1 file: no permission covers it
    cfg14 = tiny_config("droid-14b")
    sh14 = release_keys(cfg14)
    save_file(random_tensors({k: s for k, s in sh14.items() if "_img" not in k and not k.startswith(
        ("img_emb.", "action_", "state_"))}, seed=22), tmp_path / "w21.safetensors")
    with pytest.raises(CheckpointError, match="k_img"):
        load_model(cfg14, tmp_path / "w21.safetensors", allow_missing_heads=True)


def test_5b_from_wan22_diffusers_gives_diffusers_outputs(tmp_path):
    """diffusers' Wan2.2 TI2V transformer (no image_embedder, no add_k/v_proj) loads into the 5B variant; with the
    CLIP branch's values at zero our video velocity is diffusers' output, per-token timesteps included."""
    cfg = tiny_config("droid-5b")
    dm = _tiny_diffusers(0, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=48,
                         out_channels=48, ffn_dim=cfg.ffn_dim, image_dim=None, added_kv_proj_dim=None)
    dm.save_pretrained(tmp_path)
    model, report = load_model(cfg, tmp_path, allow_missing_heads=True, return_report=True)
    assert report.layout == "diffusers" and len(report.loaded) == len(dm.state_dict())
    assert all(n.startswith(("action_", "state_", "img_emb.")) or "_img" in n for n in report.missing)
    with torch.no_grad():
        for blk in model.blocks:                                   # the image attention then adds exactly zero
            blk.cross_attn.v_img.weight.zero_()
            blk.cross_attn.v_img.bias.zero_()
    K, B = 2, 2
    Fr, H, W = cfg.num_frames(K), cfg.latent_height, cfg.latent_width
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(B, 48, Fr, H, W, generator=g)
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    t_video = torch.rand(B, Fr, generator=g) * 1000
    na = K * cfg.actions_per_chunk
    model.ops = model.ops.replace(attention=_part_attention)
    with torch.no_grad():
        ref = dm(lat, t_video.repeat_interleave(cfg.frame_tokens, dim=1), text).sample
        video, _ = model(model.layout("train", num_chunks=K), clean=torch.randn_like(lat), noisy=lat,
                         t_video=t_video, actions=torch.randn(B, na, cfg.action_dim), t_action=torch.rand(B, na) * 1000,
                         state=torch.randn(B, K, cfg.state_dim), text=text,
                         clip=torch.randn(B, cfg.clip_tokens, cfg.clip_dim, generator=g))
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(video, ref, rtol=1e-4, atol=1e-4)
    # and back: the backbone-only export of the 5B (no heads, no CLIP branch) is diffusers' TI2V state dict
    save_checkpoint(model, tmp_path / "out", layout="diffusers", include_heads=False)
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    missing, unexpected = dm.load_state_dict(sd, strict=True)
    assert not missing and not unexpected and set(sd) == set(dm.state_dict())
