"""Package layout: janus.kernels maps to kernels/, csrc/ ships with janus, imports stay cheap."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_janus_kernels_is_the_top_level_kernels_folder():
    import janus.kernels

    assert Path(janus.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"


def test_csrc_sources_are_found():
    from janus import _ext

    root = _ext.source_dir()
    assert root is not None
    assert (root / "ops.cpp").is_file() and (root / "cpu" / "pad_batch.cpp").is_file()


@pytest.mark.parametrize("cuda_buildable", [False, True])
def test_stale_prebuilt_library_is_noticed_only_for_sources_it_was_built_from(tmp_path, monkeypatch, cuda_buildable):
    from types import SimpleNamespace

    from janus import _ext

    # A checkout in tmp_path: janus/_ext.py beside csrc/ holding one C++ and one CUDA source.
    (tmp_path / "janus").mkdir()
    for name in ("ops.cpp", "cpu/op.cpp", "cuda/op.cu"):
        (tmp_path / "csrc" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "csrc" / name).write_text("// source\n")
    library = tmp_path / "janus" / "_C.so"
    library.write_text("")
    monkeypatch.setattr(_ext, "__file__", str(tmp_path / "janus" / "_ext.py"))
    monkeypatch.setattr(_ext, "source_dir", lambda: tmp_path / "csrc")
    monkeypatch.setattr(_ext, "_cuda_buildable", lambda: cuda_buildable)
    module = SimpleNamespace(__file__=str(library))
    for name in ("ops.cpp", "cpu/op.cpp", "cuda/op.cu"):
        os.utime(tmp_path / "csrc" / name, (1000, 1000))
    os.utime(library, (2000, 2000))
    assert _ext._stale_note(module) == ""
    os.utime(tmp_path / "csrc" / "cuda" / "op.cu", (3000, 3000))  # only a CUDA source changed
    note = _ext._stale_note(module)
    assert ("cuda/op.cu is newer" in note) == cuda_buildable, note
    os.utime(tmp_path / "csrc" / "cpu" / "op.cpp", (3000, 3000))
    assert "stale" in _ext._stale_note(module) and "pip install --no-build-isolation -e ." in _ext._stale_note(module)


@pytest.mark.parametrize("module", ["janus", "janus.ops", "janus.kernels", "janus.info"])
def test_import_is_cheap(module):
    """Importing janus (or its ops) loads neither triton nor the compiled extension."""
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.') or m == 'janus._C')\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"import {module} imported {proc.stdout.strip()} {proc.stderr}"


def test_pyproject_declares_markers_and_script():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    markers = {m.split(":")[0] for m in config["tool"]["pytest"]["ini_options"]["markers"]}
    assert {"triton", "cpp", "gpu", "slow"} <= markers
    assert config["project"]["scripts"]["janus"] == "janus.cli:main"
    assert "torch" not in " ".join(config["build-system"]["requires"])


@pytest.mark.slow
def test_wheel_ships_kernels_and_sources(tmp_path):
    """A regular (non-editable) wheel holds janus/kernels and the C++ sources for builds on first use."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "build", "*.egg-info")
    for name in ("janus", "kernels", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), "."]
    env = dict(os.environ, JANUS_BUILD_EXT="0")
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("janus-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "janus/__init__.py",
        "janus/kernels/__init__.py",
        "janus/csrc/ops.cpp",
        "janus/csrc/cpu/pad_batch.cpp",
        "janus/csrc/cpu/remask_lowest.cpp",
        "janus/csrc/cuda/remask_lowest.cu",
        "janus/csrc/cuda/length_beam_init.cu",
        "janus/csrc/decode_order.h",
        "janus/csrc/common.h",
        "janus/samples/__init__.py",
        "janus/samples/libreoffice.de",
        "janus/samples/libreoffice.en",
        "janus/samples/de-en/model.safetensors",
        "janus/samples/de-en/average.json",
        "janus/samples/de-en/config.json",
        "janus/samples/de-en/spm.model",
        "janus/samples/de-en/scores.json",
        "janus/samples/de-en/MODEL.md",
        "janus/samples/NOTICE",
        "janus/samples/LICENSE.MPL-2.0",
    ):
        assert expected in names, sorted(names)
    assert not any(n.startswith("kernels/") or n.startswith("csrc/") for n in names), sorted(names)


LINK_TEST_SOURCE = r"""
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

void fail(int64_t n) { TORCH_CHECK_VALUE(false, "n=", n, ", shape ", c10::IntArrayRef({3, 4})); }

TORCH_LIBRARY(janus_link_test, m) { m.def("fail(int n) -> ()", &fail); }
"""

LINK_TEST_BUILD = """
import importlib.util, sys
from setuptools import setup
from torch.utils import cpp_extension
spec = importlib.util.spec_from_file_location("janus_setup", sys.argv[1])
janus_setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(janus_setup)
ext = cpp_extension.CppExtension("janus_link_test", ["link_test.cpp"], extra_link_args=janus_setup.STDCXX_LINK)
build_ext = janus_setup._build_ext(cpp_extension.BuildExtension)
setup(name="janus_link_test", ext_modules=[ext], cmdclass={"build_ext": build_ext},
      script_args=["build_ext", "--inplace"])
"""


@pytest.mark.slow
@pytest.mark.cpp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="-static-libstdc++ is a GNU toolchain flag")
def test_extension_shares_torchs_libstdcxx_even_when_ldflags_ask_for_a_static_one(tmp_path):
    """setup.py's link of a C++ op library under LDFLAGS=-static-libstdc++ (as some CUDA images set): the
    library still uses the process's libstdc++, so an error message formats its numbers (with a static
    copy they came out cut short here, and crashed the process on a GPU machine)."""
    (tmp_path / "link_test.cpp").write_text(LINK_TEST_SOURCE)
    (tmp_path / "build.py").write_text(LINK_TEST_BUILD)
    env = dict(os.environ, LDFLAGS="-static-libstdc++")
    proc = subprocess.run([sys.executable, "build.py", str(REPO / "setup.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dropped -static-libstdc++" in proc.stderr
    (library,) = tmp_path.glob("janus_link_test*.so")
    call = ("import torch, sys\ntorch.ops.load_library(sys.argv[1])\ntry:\n    torch.ops.janus_link_test.fail(7)\n"
            "except ValueError as e:\n    print(str(e).splitlines()[0])")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", call, str(library)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "n=7, shape [3, 4]"
