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


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), as (ok, what was found).

    The one place that decides it: ``--amp auto`` trains under bf16 autocast on such CPUs (their
    bf16 GEMMs run 2-3x faster than fp32 ones) and in fp32 elsewhere, where bf16 is emulated and
    slower. Asks torch's cpuinfo when it can (any OS), else reads the flags of /proc/cpuinfo.
    """
    import torch

    # name shown -> (torch.cpu probe, /proc/cpuinfo flag); AMX tiles come with AMX-BF16 on every CPU
    # that has them.
    probes = {
        "avx512_bf16": ("_is_avx512_bf16_supported", "avx512_bf16"),
        "amx": ("_is_amx_tile_supported", "amx_bf16"),
    }
    found: dict[str, bool] = {}
    for name, (probe, _) in probes.items():
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            found[name] = bool(fn())
    if len(found) < len(probes):
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        for name, (_, flag) in probes.items():
            found.setdefault(name, flag in flags)
    have = [name for name, ok in found.items() if ok]
    if have:
        return True, " and ".join(have)
    return False, "neither AVX512_BF16 nor AMX-BF16 found: bf16 would be emulated (slower than fp32)"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict[str, Any]:
    import torch

    from janus.ops.skinny_linear import cpu_bf16_dot

    bf16, bf16_detail = cpu_bf16_support()
    out: dict[str, Any] = {
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": bf16,
        "cpu_bf16_detail": bf16_detail,
        "cpu_bf16_dot": cpu_bf16_dot(),
        "cuda": [],
        "cuda_why_not": "",
    }
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
    devices {cpu_threads, cpu_capability, cpu_bf16, cpu_bf16_detail, cpu_bf16_dot, cuda: [{index, name, capability}],
    cuda_why_not},
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
    lines.append(f"cpu threads: {devices['cpu_threads']} ({devices['cpu_capability']})")
    bf16 = "yes" if devices["cpu_bf16"] else "no"
    lines.append(
        f"cpu native bf16: {bf16} ({devices['cpu_bf16_detail']}); --amp auto trains on CPU in "
        f"{'bf16' if devices['cpu_bf16'] else 'fp32'}"
    )
    lines.append(
        f"cpu bf16 inference products: {'bf16 dot products (vdpbf16ps)' if devices['cpu_bf16_dot'] else 'widened FMAs'}"
    )
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
