"""Builds the janus._C extension from csrc/ when torch is importable at build time.

    pip install --no-build-isolation -e .   # torch installed first: janus/_C*.so is built here
    pip install -e .                         # isolated build, no torch: no extension; it is
                                             # compiled on first use instead (janus/_ext.py)
    JANUS_BUILD_EXT=0 pip install ...        # never build it here

C++ sources are always built; CUDA sources (csrc/cuda/*.cu) too when torch has CUDA
and nvcc is found through CUDA_HOME. Everything else about the package is in
pyproject.toml; the package list is here only because kernels/ and csrc/ are
installed under janus (janus.kernels, janus.csrc).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Sources travel with the package so that an install without a prebuilt janus._C
# can still compile it on first use.
CSRC_GLOBS = ["*.cpp", "*.h", "*.cu", "*.cuh"]


# libstdc++ by name, dynamically: the one torch itself uses. A second, static copy inside janus._C
# (an environment's -static-libstdc++, see _build_ext) has locale facets of its own: an error message
# that formats a number then comes out cut short, or the process crashes (seen with torch 2.11 on a
# CUDA image).
STDCXX_LINK = ["-lstdc++"] if sys.platform.startswith("linux") else []


def _say(message: str) -> None:
    print(f"janus setup.py: {message}", file=sys.stderr)


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=["janus", "janus.*"])
    packages += ["janus.kernels"] + [f"janus.kernels.{p}" for p in find_packages("kernels")]
    # csrc/ and its subfolders (cpu/, cuda/) as data-only packages: janus.csrc, janus.csrc.cpu, ...
    subfolders = [d.name for d in sorted(CSRC.iterdir()) if d.is_dir() and d.name.isidentifier()]
    packages += ["janus.csrc"] + [f"janus.csrc.{name}" for name in subfolders]
    return packages, {"janus.kernels": "kernels", "janus.csrc": "csrc"}


def _extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for janus._C, or nothing with a printed reason."""
    if os.environ.get("JANUS_BUILD_EXT", "1") == "0":
        _say("JANUS_BUILD_EXT=0: not building janus._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable in the build environment: janus._C will be compiled on first use")
        return [], {}

    def rel(paths):
        return sorted(str(p.relative_to(ROOT)) for p in paths)

    sources = rel(CSRC.glob("*.cpp")) + rel(CSRC.glob("cpu/*.cpp"))
    cuda_sources = rel(CSRC.glob("cuda/*.cu"))
    # No -std flag: BuildExtension passes the standard this torch needs.
    # OpenMP on Linux, as torch's own CPU kernels: at::parallel_for in the CPU kernels is an OpenMP
    # pragma, serial without it (the library then shares the libgomp torch has loaded).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    kwargs = dict(
        name="janus._C",
        include_dirs=[str(CSRC)],
        # -g0: Python's CFLAGS add -g
        extra_compile_args={"cxx": ["/O2"] if os.name == "nt" else ["-O3", "-g0", *openmp]},
        extra_link_args=openmp + STDCXX_LINK,
        py_limited_api=True,
    )
    make = cpp_extension.CppExtension
    if cuda_sources:
        if torch.version.cuda is None:
            _say(f"torch {torch.__version__} has no CUDA: skipping {len(cuda_sources)} CUDA source(s)")
        elif cpp_extension.CUDA_HOME is None:
            _say("nvcc not found (set CUDA_HOME): skipping the CUDA sources")
        else:
            make = cpp_extension.CUDAExtension
            sources += cuda_sources
            kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
    ext = make(sources=sources, **kwargs)
    return [ext], {"build_ext": _build_ext(cpp_extension.BuildExtension)}


def _build_ext(base: type) -> type:
    """torch's BuildExtension, minus a -static-libstdc++ that the environment (LDFLAGS, Python's
    LDSHARED) puts on the link line: janus._C must share torch's libstdc++ (see _extensions)."""

    class BuildExt(base):
        def build_extensions(self) -> None:
            for attr in ("linker_so", "linker_so_cxx"):
                command = getattr(self.compiler, attr, None)
                if isinstance(command, list) and "-static-libstdc++" in command:
                    setattr(self.compiler, attr, [a for a in command if a != "-static-libstdc++"])
                    _say(f"dropped -static-libstdc++ from the {attr} command: janus._C links torch's libstdc++")
            super().build_extensions()

    return BuildExt


def _readme() -> str:
    readme = ROOT / "README.md"
    return readme.read_text(encoding="utf-8") if readme.is_file() else ""


def main() -> None:
    packages, package_dir = _packages()
    package_data = {p: CSRC_GLOBS for p in packages if p.startswith("janus.csrc")}
    # The text sample of the benchmarks' embedded default, its license, and the shipped model (de-en/).
    package_data["janus.samples"] = ["*.de", "*.en", "NOTICE", "LICENSE.*", "de-en/*"]
    ext_modules, cmdclass = _extensions()
    setup(
        long_description=_readme(),
        long_description_content_type="text/markdown",
        packages=packages,
        package_dir=package_dir,
        package_data=package_data,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        # One binary for every CPython >= 3.10: janus._C uses only the limited API.
        options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
    )


# pip and setuptools run this file as __main__; tests import it for _build_ext and STDCXX_LINK.
if __name__ == "__main__":
    main()
