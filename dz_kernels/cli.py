"""The `dz` command line: `dz <command> [args...]`.

Built-in commands:
    dz env                  versions, CUDA / extension / cupy availability, and the environment variables read
    dz bench [args...]      the benchmarks (same arguments as `python -m dz_bench`; `dz bench --list`)

Adding commands: every command is a function `main(argv: list[str]) -> int` that parses its own arguments, named
by a "module:function" string and imported only when the command runs. Other packages add commands without
touching this file by exporting a dict from `dreamzero.cli_commands`:

    COMMANDS = {"serve": ("dreamzero.serve.cli:serve_main", "serve a DreamZero policy ..."), ...}

Entries there are merged into `COMMANDS` below (a built-in name is never replaced). A module that fails to import
is reported on stderr and the built-in commands still work.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("dz_kernels.cli:env_main", "print versions, CUDA/extension/cupy availability and the env vars"),
    "bench": ("dz_bench.__main__:main", "run benchmarks (python -m dz_bench); --list shows them"),
}

EXTENSION_MODULES = ("dreamzero.cli_commands",)


def _extension_commands() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for modname in EXTENSION_MODULES:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and modname.startswith(e.name):  # the module (or its package) is simply not there
                continue
            print(f"dz: ignoring {modname}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        except Exception as e:
            print(f"dz: ignoring {modname}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        for name, spec in getattr(module, "COMMANDS", {}).items():
            target, help_text = (spec, "") if isinstance(spec, str) else spec
            if name not in COMMANDS:
                found[name] = (target, help_text)
    return found


def all_commands() -> dict[str, tuple[str, str]]:
    """Built-in commands plus those exported by the extension modules."""
    return {**COMMANDS, **_extension_commands()}


def _resolve(target: str):
    module, _, func = target.partition(":")
    if not module or not func:
        raise ValueError(f"command target must be 'module:function', got {target!r}")
    return getattr(importlib.import_module(module), func)


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as e:
        return f"not available ({type(e).__name__})"


def env_info() -> dict:
    """What `dz env` prints, as a dict."""
    import torch

    from dz_kernels import _ext, env

    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "triton": _version("triton"),
        "numpy": _version("numpy"),
    }
    ext = _ext.cuda_ext()
    info["dz_ext"] = ({"available": True, "archs": ext.compiled_archs, "cuda_runtime": ext.cuda_runtime_version()}
                      if ext is not None else {"available": False, "reason": _ext.cuda_ext_reason()})
    ok, reason = _ext.cupy_available()
    info["cupy"] = {"available": ok, "version": _version("cupy") if ok else None, "reason": reason}
    try:
        info["csrc_dir"] = _ext.csrc_dir()
    except FileNotFoundError as e:
        info["csrc_dir"] = f"not found: {e}"
    info["nvcc"] = env.nvcc_path()
    info["env"] = env.current_values()
    return info


def env_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dz env", description="Print versions, availability and env vars.")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = env_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    from dz_kernels import env

    for key in ("python", "platform", "torch", "torch_cuda", "cuda_available", "devices", "triton", "numpy",
                "nvcc", "csrc_dir"):
        print(f"{key:16s} {info[key]}")
    ext = info["dz_ext"]
    print(f"{'dz_kernels._C':16s} " + (f"built for {ext['archs']} (CUDA runtime {ext['cuda_runtime']})"
                                      if ext["available"] else f"absent: {ext['reason']}"))
    cupy = info["cupy"]
    print(f"{'cupy':16s} " + (cupy["version"] if cupy["available"] else f"absent: {cupy['reason']}"))
    print("environment variables:")
    for var in env.ENV_VARS:
        value = info["env"][var.name]
        shown = "(unset)" if value is None else repr(value)
        print(f"  {var.name:20s} {shown:24s} {var.meaning} [default {var.default or 'unset'}; {var.read_by}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:           # `dz --debug <command> ...`: the command takes the flag (its traceback)
        argv = argv[1:2] + ["--debug"] + argv[2:]
    commands = all_commands()
    parser = argparse.ArgumentParser(prog="dz", description="dz_kernels command line.",
                                     epilog="Run `dz <command> --help` for a command's own options; `dz --debug "
                                            "<command> ...` shows the traceback of an error.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        parser.error(f"unknown command {name!r}; choose from {', '.join(commands)}")
    result = _resolve(commands[name][0])(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
