"""The kernels' config tables (dz_kernels/configs/*.json) and their loader: structure, the lookup and fallback rule,
the DZ_CONFIG_DIR overlay, and that the attention op takes its tiles and its dq pass from the table."""
import importlib
import json
from unittest import mock

import pytest
import torch

from dz_kernels import configs


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """A DZ_CONFIG_DIR whose tables start as copies of the packaged ones; yields a writer(family, table)."""
    def write(family, t):
        (tmp_path / f"{family}.json").write_text(json.dumps(t))
        configs.reload()

    monkeypatch.setenv("DZ_CONFIG_DIR", str(tmp_path))
    configs.reload()
    yield write
    monkeypatch.delenv("DZ_CONFIG_DIR")
    configs.reload()


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_packaged_tables_are_valid_and_written_as_dumps_writes_them(family):
    configs.reload()
    t = configs.table(family)
    configs.validate_table(t, family)
    path = configs.table_path(family)
    with open(path) as f:
        assert f.read() == configs.dumps(t), f"{path} is not in the dumps() layout (one entry per line)"
    for kind, entries in t["defaults"].items():
        assert entries[-1]["match"] == {}, f"{family}.{kind}: the last default must match everything"


def test_matches_equality_max_and_min():
    assert configs.matches({}, {"a": 1})
    assert configs.matches({"a": 1, "m_max": 16}, {"a": 1, "m": 16})
    assert not configs.matches({"m_max": 16}, {"m": 17})
    assert configs.matches({"block_c_min": 8192}, {"block_c": 8192})
    assert not configs.matches({"block_c_min": 8192}, {"block_c": 4096})
    assert not configs.matches({"a": 1}, {})            # a key the caller did not give does not match
    assert not configs.matches({"m_max": 4}, {})


def test_unknown_arch_and_cpu_get_the_defaults():
    configs.reload()
    for arch in ("sm999", "cpu", "sm90"):
        c = configs.lookup("fused", "row_fwd", arch, block_c=8192)
        assert c.config == {"num_warps": 16}
        if arch != "sm90" or not configs.table("fused")["arch"].get("sm90"):
            assert c.source == "default"
    assert configs.lookup("fused", "row_fwd", "sm999", block_c=64).config == {"num_warps": 2}


def test_tuned_entry_overrides_its_fields_and_keeps_the_defaults_others(table_dir):
    t = configs.table("nvfp4")
    t = configs.merge_entries(t, "sm90", "splitk", [{"match": {"n": 5120, "m_max": 4}, "config": {"BLOCK_N": 128},
                                                     "source": "tuned here"}])
    table_dir("nvfp4", t)
    hit = configs.lookup("nvfp4", "splitk", "sm90", m=1, n=5120, k=5120)
    assert hit.config["BLOCK_N"] == 128 and hit.config["BLOCK_K"] == 128 and hit.source == "sm90: tuned here"
    assert configs.lookup("nvfp4", "splitk", "sm90", m=8, n=5120, k=5120).source == "default"   # m past m_max
    assert configs.lookup("nvfp4", "splitk", "sm100", m=1, n=5120, k=5120).source == "default"  # other arch
    assert configs.lookup("nvfp4", "splitk", "sm90", m=1, n=13824, k=5120).source == "default"  # other shape


def test_merge_replaces_entries_with_the_same_match_and_dumps_round_trips():
    t = configs.table("kv_cache")
    e1 = {"match": {"H": 40}, "config": {"block_rows": 1}, "source": "a"}
    e2 = {"match": {"H": 40}, "config": {"block_rows": 2}, "source": "b"}
    t2 = configs.merge_entries(configs.merge_entries(t, "sm90", "epilogue", [e1]), "sm90", "epilogue", [e2])
    assert t2["arch"]["sm90"]["epilogue"] == [e2]
    assert json.loads(configs.dumps(t2)) == t2
    assert "sm90" not in t.get("arch", {})          # merge_entries copies


def test_bad_tables_are_refused_with_the_problem_named(table_dir):
    good = configs.table("fused")
    bad = json.loads(json.dumps(good))
    bad["defaults"]["row_fwd"] = bad["defaults"]["row_fwd"][:-1]
    table_dir("fused", bad)
    with pytest.raises(ValueError, match="must match everything"):
        configs.table("fused")
    bad = dict(good, arch={"sm90": {"nope": [{"match": {}, "config": {}}]}})
    table_dir("fused", bad)
    with pytest.raises(ValueError, match="kind 'nope'"):
        configs.table("fused")
    table_dir("fused", dict(good, format=99))
    with pytest.raises(ValueError, match="format"):
        configs.table("fused")
    with pytest.raises(ValueError, match="unknown config family"):
        configs.table("nope")
    table_dir("fused", good)
    with pytest.raises(ValueError, match="no kind 'nope'"):
        configs.lookup("fused", "nope", "sm90")


def test_forced_pins_a_kind_inside_the_block_only():
    configs.reload()
    with configs.forced("fused", "elementwise", {"BLOCK": 256}):
        c = configs.lookup("fused", "elementwise", "sm90", op="gelu_tanh_fwd")
        assert c == configs.Choice({"BLOCK": 256, "num_warps": 4}, "forced")
    assert configs.lookup("fused", "elementwise", "sm999", op="gelu_tanh_fwd").config["BLOCK"] == 1024


def test_arch_of():
    assert configs.arch_of(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert configs.arch_of(torch.device("cuda")) == f"sm{major}{minor}"


# ---------------------------------------------------------------------- attention reads its tiles from the table
def test_attention_config_from_the_table(table_dir):
    from dz_kernels.attention import TileConfig, default_config
    from dz_kernels.attention.config import _INTERPRETER_CONFIG, table_config

    assert default_config(torch.device("cpu"), torch.bfloat16, 128) == _INTERPRETER_CONFIG
    cfg, src = table_config("sm90", torch.bfloat16, 128, "train")
    assert src == "default" and cfg.fwd == (128, 64) and cfg.fwd_warps == 8 and not cfg.atomic_dq
    assert cfg.dkv == (32, 64) and cfg.bwd_warps == 8 and cfg.dq_warps == 8
    assert table_config("sm90", torch.float32, 128, "infer")[0].fwd == (64, 32)
    assert table_config("sm90", torch.bfloat16, 64, "infer")[0].fwd_warps == 8
    t = configs.merge_entries(configs.table("attention"), "sm90", "tiles", [
        {"match": {"head_dim": 128, "dtype": "bfloat16", "mode": "train"},
         "config": {"dkv": [64, 64], "atomic_dq": False, "heads_first": True}, "source": "tuned"}])
    table_dir("attention", t)
    cfg, src = table_config("sm90", torch.bfloat16, 128, "train")
    assert cfg.dkv == (64, 64) and not cfg.atomic_dq and cfg.heads_first and cfg.fwd == (128, 64)
    assert src == "sm90: tuned"
    assert table_config("sm90", torch.bfloat16, 128, "infer")[1] == "default"
    assert TileConfig.from_dict(json.loads(json.dumps(cfg.__dict__, default=list))) == cfg
    with pytest.raises(ValueError, match="unknown TileConfig fields"):
        TileConfig.from_dict({"fwd": [64, 64], "bogus": 1})
    with pytest.raises(ValueError, match="mode"):
        table_config("sm90", torch.bfloat16, 128, "training")


def test_tiles_list_carries_the_dq_launch_and_the_flags():
    from dz_kernels.attention import TileConfig
    from dz_kernels.attention.config import FLAG_FWD_WS, FLAG_HEADS_FIRST

    tiles = TileConfig(dq_warps=8, dq_stages=2, heads_first=True, fwd_ws=True).as_list()
    assert tiles[10:] == [8, 2, FLAG_HEADS_FIRST | FLAG_FWD_WS]
    assert TileConfig().as_list()[10:] == [4, 3, 0]       # dq takes the backward's warps and stages by default
    with pytest.raises(ValueError, match="dq_warps"):
        TileConfig(dq_warps=3).validate()


def test_non_deterministic_backward_takes_the_separate_dq_pass_when_the_config_says_so():
    """atomic_dq=False: a non-deterministic call runs the op with deterministic=True (the separate dq kernel);
    atomic_dq=True keeps the atomics. Gradients agree either way."""
    import dz_kernels.attention as attn
    from dreamzero.config import get_config
    from dreamzero.layout import layout_for_config

    lay = layout_for_config(get_config("tiny"), "train", num_chunks=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, 16, generator=g).requires_grad_() for n in (lay.q_len, lay.k_len, lay.k_len))
    seen, grads = [], []
    ops = importlib.import_module("dz_kernels.attention.ops")
    real = ops.layout_attention_op

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    base = attn.default_config(torch.device("cpu"), torch.float32, 16)
    for atomic in (True, False):
        cfg = attn.TileConfig(**{**base.__dict__, "atomic_dq": atomic})
        with mock.patch.object(ops, "layout_attention_op", spy):
            out = attn.layout_attention(q, k, v, lay, config=cfg)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    assert seen == [False, True]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_heads_first_grid_computes_the_same():
    import dz_kernels.attention as attn
    from dreamzero.config import get_config
    from dreamzero.layout import layout_for_config

    lay = layout_for_config(get_config("tiny"), "train", num_chunks=1)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g) for n in (lay.q_len, lay.k_len, lay.k_len))
    base = attn.default_config(torch.device("cpu"), torch.float32, 16)
    with attn.poison_outputs():
        ref = attn.layout_attention(q, k, v, lay, config=base)
        got = attn.layout_attention(q, k, v, lay, config=attn.TileConfig(**{**base.__dict__, "heads_first": True}))
    assert torch.equal(ref, got)


def test_lookups_trace_under_torch_compile_fullgraph():
    """layout_attention resolves its tiles inside torch.compile'd model code: the lookup must trace without a
    graph break (the tables are read eagerly, at import and on reload, never while tracing)."""
    from dz_kernels.attention.config import config_choice, table_config

    configs.reload()

    def f(x):
        cfg, _ = table_config("sm90", torch.bfloat16, 128, "train")
        cfg2, _ = config_choice(x.device, torch.bfloat16, 64, "infer")
        return x * cfg.fwd[0] + cfg2.fwd_warps

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
    assert out.tolist() == [136.0, 136.0]       # 128 queries per forward tile + 8 warps at head dim 64
