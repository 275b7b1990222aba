"""The key layouts of DreamZero checkpoints: our parameter names are the original Wan2.1 release's plus the DreamZero
release's heads.

    "dreamzero"  the DreamZero release's full-model files (`model.safetensors` or `model.safetensors.index.json`,
                 written by the release's VLA.save_pretrained): our names under the prefix `action_head.model.`
                 (the DiT lives at `self.model` of the action head, which lives at `action_head` of the VLA). The
                 release's files also hold the frozen encoders (`action_head.text_encoder.`,
                 `action_head.image_encoder.`, `action_head.vae.`); those are skipped here (encoders.py loads them
                 from their own releases) and listed in the report. A LoRA-trained release wraps the DiT in PEFT
                 (`action_head.model.base_model.model.`, `q.base_layer.weight`, `q.lora_A.default.weight`, ...): the
                 base weights load and each LoRA pair is merged, W += (lora_alpha / rank) * B @ A
                 (see `dreamzero.checkpoint.lora`).
    "wan"        the original Wan releases (`diffusion_pytorch_model*.safetensors` of Wan-AI/Wan2.1-I2V-14B-480P, and of
                 Wan-AI/Wan2.2-TI2V-5B for the 5B): our names, no prefix. They have no DreamZero heads: these stay as
                 initialized, only with `allow_missing_heads=True`, and the report lists them. Wan2.2-TI2V-5B is a
                 text-to-video block stack with no CLIP branch (img_emb, cross_attn.{k_img,v_img,norm_k_img}), which
                 the DreamZero release adds to its 5B and trains from its own init (it loads the 5B weights with
                 strict=False); for a 'ti2v' model those count with the heads (`backbone_lacks`) and a model built
                 on the meta device gets the release's init for them (Xavier-uniform linears, zero biases, unit
                 norms). Everything else is the Wan2.1 naming (Wan2.2's wan/modules/model.py uses the same names).
    "diffusers"  diffusers' WanTransformer3DModel (the `transformer/` folder of the *-Diffusers releases). The mapping
                 is the inverse of diffusers' own `convert_wan_transformer_to_diffusers` (loaders/single_file_utils.py):
                     blocks.N.self_attn.{q,k,v,o}     <-> blocks.N.attn1.{to_q,to_k,to_v,to_out.0}
                     blocks.N.self_attn.norm_{q,k}    <-> blocks.N.attn1.norm_{q,k}
                     blocks.N.cross_attn.{q,k,v,o}    <-> blocks.N.attn2.{to_q,to_k,to_v,to_out.0}
                     blocks.N.cross_attn.norm_{q,k}   <-> blocks.N.attn2.norm_{q,k}
                     blocks.N.cross_attn.{k,v}_img    <-> blocks.N.attn2.add_{k,v}_proj
                     blocks.N.cross_attn.norm_k_img   <-> blocks.N.attn2.norm_added_k
                     blocks.N.norm3 (cross-attn, affine) <-> blocks.N.norm2   (diffusers numbers its norms in call
                                                          order; our norm2 and diffusers' norm3 have no parameters)
                     blocks.N.ffn.0 / ffn.2           <-> blocks.N.ffn.net.0.proj / ffn.net.2
                     blocks.N.modulation              <-> blocks.N.scale_shift_table
                     time_embedding.{0,2}             <-> condition_embedder.time_embedder.linear_{1,2}
                     time_projection.1                <-> condition_embedder.time_proj
                     text_embedding.{0,2}             <-> condition_embedder.text_embedder.linear_{1,2}
                     img_emb.proj.{0,1,3,4}           <-> condition_embedder.image_embedder.{norm1,ff.net.0.proj,
                                                                                             ff.net.2,norm2}
                     head.head / head.modulation      <-> proj_out / scale_shift_table
                     patch_embedding                  <-> patch_embedding
                 `blocks.N.attn2.norm_added_q.weight` (an unused norm in some early diffusers files, which diffusers
                 itself ignores on load) is skipped. The math is the same as ours: tests/test_checkpoint.py runs a
                 random diffusers model and ours on the same input and compares the outputs (RoPE on adjacent pairs
                 with the same 3D split, [cos, sin] time embedding). One numerical difference: diffusers computes the
                 sinusoidal time embedding in fp32, Wan (and we) in fp64; at t ~ 1000 that is ~6e-5 in an angle.
                 The DreamZero heads have no diffusers names: they are written and read under our names.
                 Wan2.2-TI2V-5B-Diffusers has no image_embedder and no attn2.add_{k,v}_proj: as for "wan" above.
The DreamZero release's 5B checkpoints ('dreamzero' layout) hold every parameter, the CLIP branch included.
"""
from __future__ import annotations

import re

LAYOUTS = ("dreamzero", "wan", "diffusers")
DREAMZERO_PREFIX = "action_head.model."
# Frozen parts stored beside the DiT in the release's full-model files; encoders.py loads them from their releases.
DREAMZERO_FROZEN_PREFIXES = ("action_head.text_encoder.", "action_head.image_encoder.", "action_head.vae.")
HEAD_PREFIXES = ("action_encoder.", "state_encoder.", "action_decoder.")
# The CLIP image branch: in Wan2.1-I2V, absent from Wan2.2-TI2V-5B (the DreamZero release adds it to the 5B)
IMAGE_BRANCH_RE = re.compile(r"(img_emb\.|blocks\.\d+\.cross_attn\.(k_img|v_img|norm_k_img)\.).+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: unreadable files, or keys that do not match the model."""


# ---------------------------------------------------------------------------------------------- key mappings
_D_GLOBAL = {  # module paths: ours -> diffusers
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
_D_GLOBAL_PARAM = {"head.modulation": "scale_shift_table"}
_D_BLOCK = {  # module paths under blocks.N: ours -> diffusers
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_D_BLOCK_PARAM = {"modulation": "scale_shift_table"}
_INV = {name: {v: k for k, v in table.items()} for name, table in
        (("global", _D_GLOBAL), ("global_param", _D_GLOBAL_PARAM), ("block", _D_BLOCK),
         ("block_param", _D_BLOCK_PARAM))}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
DIFFUSERS_IGNORED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight")


def _map_name(name: str, fwd: bool) -> str | None:
    """Ours -> diffusers (fwd) or diffusers -> ours; None when the name has no counterpart."""
    g, gp, b, bp = ((_D_GLOBAL, _D_GLOBAL_PARAM, _D_BLOCK, _D_BLOCK_PARAM) if fwd else
                    (_INV["global"], _INV["global_param"], _INV["block"], _INV["block_param"]))
    if name.startswith(HEAD_PREFIXES):
        return name
    if name in gp:
        return gp[name]
    m = _BLOCK_RE.fullmatch(name)
    if m:
        i, rest = m.groups()
        if rest in bp:
            return f"blocks.{i}.{bp[rest]}"
        if "." in rest:
            mod, leaf = rest.rsplit(".", 1)
            if mod in b:
                return f"blocks.{i}.{b[mod]}.{leaf}"
        return None
    if "." in name:
        mod, leaf = name.rsplit(".", 1)
        if mod in g:
            return f"{g[mod]}.{leaf}"
    return None


def to_layout_name(name: str, layout: str) -> str:
    """Our parameter name -> its key in `layout` (prefix included for 'dreamzero')."""
    check_layout(layout)
    if layout == "dreamzero":
        return DREAMZERO_PREFIX + name
    if layout == "wan":
        return name
    out = _map_name(name, fwd=True)
    if out is None:
        raise CheckpointError(f"parameter {name!r} has no name in the diffusers layout")
    return out


def from_layout_name(key: str, layout: str) -> str | None:
    """A checkpoint key of `layout` with its prefix already removed -> our parameter name (None if it has none)."""
    check_layout(layout)
    if layout == "diffusers":
        return _map_name(key, fwd=False)
    return key


def backbone_lacks(name: str, model_type: str = "i2v") -> str | None:
    """Why the Wan backbone release has no parameter `name` (ours), or None when it has it: the DreamZero heads (every
    backbone), and for a 'ti2v' model (Wan2.2-TI2V-5B) the CLIP image branch."""
    if name.startswith(HEAD_PREFIXES):
        return "DreamZero head"
    if model_type == "ti2v" and IMAGE_BRANCH_RE.fullmatch(name):
        return "CLIP branch, which Wan2.2-TI2V-5B lacks (the release trains it from its init)"
    return None


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known: {LAYOUTS}")


def detect_layout(keys) -> str:
    """Guess the key layout of a checkpoint from its tensor names ('dreamzero', 'wan' or 'diffusers')."""
    keys = list(keys)
    if any(".attn1.to_q." in k or ".attn2.add_k_proj." in k or k.startswith("condition_embedder.")
           or ".condition_embedder." in k for k in keys):
        return "diffusers"
    if any(k.startswith("action_head.") for k in keys):
        return "dreamzero"
    if any(re.search(r"(^|\.)blocks\.\d+\.(self_attn|cross_attn)\.", k) or k.startswith(HEAD_PREFIXES)
           for k in keys):
        return "wan"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"cannot tell the key layout of this checkpoint ({len(keys)} tensors, e.g. {sample}); "
                          f"pass layout= one of {LAYOUTS}")

