"""House rules of the kernel library, checked on the source (issue 16): the op families stand on their own (no
import of the model), read the environment only through dz_kernels/env.py, have the same files, keep their Triton
kernels in triton_*.py, and no file of dz_kernels grows past 600 lines."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dz_kernels")
# the families with the common shape, and the shared modules; apply_ and the diffusers adapter know a model by design
FAMILIES = ("attention", "kv_cache", "quant", "fused")
SHARED = ("_common.py", "testing.py", "env.py", "_ext.py")


def _sources():
    for fam in FAMILIES:
        for name in sorted(os.listdir(os.path.join(PKG, fam))):
            if name.endswith(".py"):
                yield os.path.join(fam, name)
    yield from SHARED


def _tree(rel):
    with open(os.path.join(PKG, rel)) as f:
        return ast.parse(f.read(), rel)


@pytest.mark.parametrize("rel", list(_sources()))
def test_no_import_of_the_model(rel):
    for node in ast.walk(_tree(rel)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        assert not any(n == "dreamzero" or n.startswith("dreamzero.") for n in names), \
            f"dz_kernels/{rel} imports {names}: the kernel library takes plain descriptions from the model instead"


@pytest.mark.parametrize("rel", [r for r in _sources() if r != "env.py"])
def test_environment_only_through_env_py(rel):
    for node in ast.walk(_tree(rel)):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            pytest.fail(f"dz_kernels/{rel}:{node.lineno} reads os.{node.attr}; go through dz_kernels/env.py")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_the_same_files(family):
    names = set(os.listdir(os.path.join(PKG, family)))
    assert {"__init__.py", "ops.py", "reference.py"} <= names, sorted(names)
    assert any(n.startswith("triton_") and n.endswith(".py") for n in names), sorted(names)


def _defines_triton_kernels(tree) -> bool:
    """Whether a module defines a @triton.jit function (a kernel or a device function)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                d = d.func if isinstance(d, ast.Call) else d
                if isinstance(d, ast.Attribute) and d.attr == "jit" and isinstance(d.value, ast.Name) and \
                        d.value.id == "triton":
                    return True
    return False


@pytest.mark.parametrize("rel", [r for r in _sources() if "/" in r])
def test_triton_kernels_live_in_triton_modules(rel):
    """Within a family, @triton.jit functions are in triton_*.py (the kernels and their launchers), nowhere else."""
    if _defines_triton_kernels(_tree(rel)):
        assert os.path.basename(rel).startswith("triton_"), \
            f"dz_kernels/{rel} defines @triton.jit functions; kernels and launchers go in the family's triton_*.py"


def test_the_kernel_rule_sees_a_kernel():
    """The check above finds @triton.jit in a module (so it cannot pass by finding nothing)."""
    assert _defines_triton_kernels(_tree(os.path.join("quant", "triton_nvfp4_splitk.py")))
    assert _defines_triton_kernels(_tree(os.path.join("fused", "triton_kernels.py")))
    assert _defines_triton_kernels(_tree(os.path.join("attention", "triton_bwd.py")))
    assert not _defines_triton_kernels(_tree(os.path.join("quant", "ops.py")))
    assert not _defines_triton_kernels(_tree(os.path.join("attention", "ops.py")))


def test_every_family_is_checked():
    """Every op family folder of dz_kernels is in FAMILIES (a new one cannot skip the rules above)."""
    folders = {n for n in os.listdir(PKG) if os.path.isfile(os.path.join(PKG, n, "__init__.py"))}
    assert folders - {"configs"} == set(FAMILIES), sorted(folders)


def test_no_file_over_600_lines():
    long = []
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    n = sum(1 for _ in f)
                if n > 600:
                    long.append((os.path.relpath(os.path.join(root, name), PKG), n))
    assert not long, f"over 600 lines: {long}"
