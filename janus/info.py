"""What this installation can run: versions, devices, and every op backend with why not.

    python -m janus.info          # readable report
    python -m janus.info --json   # the same as JSON (collect())

Checking the "cpp" backends loads the compiled ops, which compiles them on first
use when no prebuilt janus._C exists (once per torch version, tens of seconds).
Nothing here raises when triton, xformers or the extension are missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

import janus

_PACKAGES = ("torch", "triton", "sentencepiece", "sacrebleu", "numpy", "safetensors", "xformers")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"cpu_threads": torch.get_num_threads(), "cuda": [], "cuda_why_not": ""}
    if torch.version.cuda is None:
        out["cuda_why_not"] = f"torch {torch.__version__} is built without CUDA"
    elif not torch.cuda.is_available():
        out["cuda_why_not"] = f"no CUDA device visible (torch built for CUDA {torch.version.cuda})"
    else:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            out["cuda"].append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    return out


def _ops() -> tuple[dict[str, list[dict[str, Any]]], str]:
    try:
        from janus.ops import registry

        ops = {
            name: [{"backend": b, "available": ok, "why_not": why} for b, ok, why in op.status()]
            for name, op in sorted(registry().items())
        }
        return ops, ""
    except Exception as e:  # report a broken op module instead of hiding every other line
        return {}, f"{type(e).__name__}: {e}"


def collect() -> dict[str, Any]:
    """Everything the report shows, as a JSON-serialisable dict.

    Keys: python, platform, versions {package: version or "not installed"},
    devices {cpu_threads, cuda: [{index, name, capability}], cuda_why_not},
    extension {available, detail}, ops {op: [{backend, available, why_not}]},
    ops_error ("" unless an op module failed to import), env (JANUS_* and TRITON_INTERPRET).
    """
    from janus import _ext

    versions = {"janus": janus.__version__} | {name: _version(name) for name in _PACKAGES}
    ops, ops_error = _ops()
    ext_ok, ext_detail = _ext.status()
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("JANUS_") or k == "TRITON_INTERPRET"}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "devices": _devices(),
        "extension": {"available": ext_ok, "detail": ext_detail},
        "ops": ops,
        "ops_error": ops_error,
        "env": env,
    }


def format_report(info: dict[str, Any]) -> str:
    """The readable report of a ``collect()`` dict."""
    lines = [f"python: {info['python']} ({info['platform']})"]
    lines += [f"{name}: {version}" for name, version in info["versions"].items()]
    devices = info["devices"]
    lines.append(f"cpu threads: {devices['cpu_threads']}")
    if devices["cuda"]:
        lines += [f"cuda:{d['index']}: {d['name']} (sm {d['capability']})" for d in devices["cuda"]]
    else:
        lines.append(f"cuda: none ({devices['cuda_why_not']})")
    ext = info["extension"]
    lines.append(f"extension: {'available' if ext['available'] else 'unavailable'}: {ext['detail']}")
    if info["ops_error"]:
        lines.append(f"ops: failed to import: {info['ops_error']}")
    for op, backends in info["ops"].items():
        lines.append(f"op {op}:")
        for b in backends:
            state = "available" if b["available"] else f"unavailable: {b['why_not']}"
            lines.append(f"    {b['backend']}: {state}")
    for key, value in info["env"].items():
        lines.append(f"env {key}={value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (or its JSON with --json); returns the exit status 0."""
    parser = argparse.ArgumentParser(prog="python -m janus.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print collect() as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
